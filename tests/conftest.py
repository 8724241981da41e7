"""Settings for the whole suite: XLA's code generation and the hypothesis profiles.

* XLA compiles the suite's programs without LLVM's optimisation passes
  (`--xla_backend_optimization_level=0`, added to any XLA_FLAGS given): the suite is mostly
  compilation and the tests check values, HLO and buffer sizes, not speed (a quarter less time).
  What a program computes is XLA's: its vectorised reductions (the NaN-dropping max of
  tests/test_numerics.py) behave the same at both levels, and tests/test_determinism.py checks
  that a process at the default level stores the same bits and integer dot results.

The examples' tests (subprocesses of 10–30 s each) are collected first, so that the two
workers share them from the start instead of one finishing the run alone.

Hypothesis profiles:
* "ci" (default): derandomized (the same examples on every run and machine), no deadline (the
  first example of a test pays for XLA compilation), no example database, and 15 examples for
  tests that do not set their own `max_examples` (each new shape compiles: the suite must stay
  within CI's 10 minutes on 2 cores).
* "thorough": random examples, 500 per test without its own `max_examples`, for a long local run:
  `HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_properties.py`.
"""

import os

UNOPTIMISED = "--xla_backend_optimization_level=0"
if UNOPTIMISED not in os.environ.get("XLA_FLAGS", "").split():
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {UNOPTIMISED}".strip()

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, database=None, max_examples=15,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=500,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.module.__name__ != "test_examples")  # stable: the rest keep their order
