"""What every benchmark table shares: timing, data, the optional peers, the environment, tables.

A table module exposes `run(quick: bool) -> Table`; `benchmarks/run.py` runs them all and prints
them (a full run also writes `benchmarks/RESULTS.md`); each module also runs alone
(`python benchmarks/<module>.py [--quick]`) and only prints.

The alternating timer (`interleaved_ms`), the digits data and the training loop live in
`examples/_common.py`, shared with the examples (one copy of each); this module puts `examples/`
on `sys.path` and re-exports what the tables use.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Callable, List, Optional

import jax

sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "examples"))  # after benchmarks/ itself
from _common import (classifier_loss as classifier_loss, digits as digits, fit as fit,  # noqa: E402
                     interleaved_ms as interleaved_ms, minibatches as minibatches, optimizer_step as optimizer_step)

NOT_INSTALLED = "not installed"
PEERS = {"qwix": "qwix", "aqt": "aqtp"}  # import name: distribution name


def peer(name: str):
    """The peer library's module (`"qwix"`, `"aqt"`), or None when it cannot be imported."""
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure means "not installed" for the tables
        return None


def ratio(value: Optional[float], base: float, fmt: str = "{:.2f}") -> str:
    """`"value (value/base x)"`, or the reason the value is missing."""
    if value is None:
        return NOT_INSTALLED
    if isinstance(value, str):
        return value
    return f"{fmt.format(value)} ({value / base:.2f}x)"


def tree_bytes(tree) -> int:
    """Bytes of every array leaf, sub-byte dtypes (int4) counted at their bit width."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        bits = getattr(jax.dtypes, "itemsize_bits", None)
        width = bits(leaf.dtype) if bits else 8 * leaf.dtype.itemsize
        total += leaf.size * width // 8
    return total


@dataclasses.dataclass
class Table:
    """One markdown table with its title, an explanation and the targets it checks."""

    title: str
    columns: List[str]
    rows: List[List[str]] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)

    def add(self, *cells) -> None:
        """Append a row and print it (the header too, before the first row): progress as it runs."""
        if not self.rows:
            print(f"{self.title}\n{self.header()}", flush=True)
        self.rows.append([str(c) for c in cells])
        print("| " + " | ".join(self.rows[-1]) + " |", flush=True)

    def header(self) -> str:
        return "| " + " | ".join(self.columns) + " |\n|" + "---|" * len(self.columns)

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", self.header()]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def environment() -> str:
    """Date, machine and library versions, one markdown line each."""
    versions = []
    for dist in ("jax", "jaxlib", "flax", "qwix", "aqtp", "jquant"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} {NOT_INSTALLED}")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory = ""
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory = f", {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2 ** 30:.0f} GiB"
    return "\n".join([
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {cpu}, {os.cpu_count()} CPU cores{memory}, {platform.system()} {platform.release()}; "
        f"jax backend {jax.default_backend()} ({jax.device_count()} device)",
        f"- versions: python {platform.python_version()}, " + ", ".join(versions),
    ])


def standalone(run: Callable[[bool], Table], doc: str) -> None:
    """`main()` of a table module: parse `--quick`, run, print the finished table (it writes no file)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    args = parser.parse_args()
    print(environment())
    print(run(args.quick).markdown())
