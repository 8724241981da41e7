"""Hypothesis profiles for the whole suite.

* "ci" (default): derandomized (the same examples on every run and machine), no deadline (the
  first example of a test pays for XLA compilation), no example database, and 15 examples for
  tests that do not set their own `max_examples` (each new shape compiles: the suite must stay
  within CI's 10 minutes on 2 cores).
* "thorough": random examples, 500 per test without its own `max_examples`, for a long local run:
  `HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_properties.py`.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, database=None, max_examples=15,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=500,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
