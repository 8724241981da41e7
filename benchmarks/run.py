"""Run every benchmark table, print it, and (a full run) write benchmarks/RESULTS.md.

Run: python benchmarks/run.py [--quick] [--only NAME ...] [--output PATH]
Tables (one module each, in this order): quantize_throughput, qat_step, dot_paths, fp8_dot, conv_paths, weight_only,
decode, quality, calibration_time (decode trains its LM on the first run, ~12 min, then loads it from ~/.cache/jquant/).
`--quick` uses fewer sizes and repeats (a few minutes on 2 CPU cores; the full run takes longer)
and only prints: the committed RESULTS.md holds full runs, so a quick run writes a file
only where `--output` names one. Peers (Qwix, AQT) come from the `bench` extra
(`pip install -e .[bench]`); a peer that cannot be imported shows as "not installed". Every
figure in the file comes from this run.
"""

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from common import environment

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TABLES = ("quantize_throughput", "qat_step", "dot_paths", "fp8_dot", "conv_paths", "weight_only", "decode", "quality",
          "calibration_time")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--only", nargs="+", choices=TABLES, default=TABLES, help="tables to run")
    parser.add_argument("--output", type=Path, default=None,
                        help="markdown file to write (default: RESULTS.md for a full run, none for --quick)")
    args = parser.parse_args(argv)
    output = args.output or (None if args.quick else RESULTS)
    env = environment()
    print(env, flush=True)
    load_before = _load()
    start = time.perf_counter()
    sections = []
    for name in args.only:
        table = importlib.import_module(name).run(args.quick)
        print(f"\n{table.markdown()}", flush=True)
        sections.append(table.markdown())
    minutes = (time.perf_counter() - start) / 60
    if output is None:
        print(f"\n--quick: {RESULTS} left as it is (a quick run writes only to a file named by --output)")
        return 0
    command = "python benchmarks/run.py" + (" --quick" if args.quick else "") + (
        "" if tuple(args.only) == TABLES else " --only " + " ".join(args.only))
    header = [
        "# Benchmark results", "",
        f"Written by `{command}` ({minutes:.1f} min); do not edit by hand, rerun instead.", "",
        env,
        f"- machine load (1-minute load average) at start / end: {load_before} / {_load()}; other "
        "processes sharing the CPU slow every column, so compare ratios within a row (the "
        "candidates of a row are timed in alternating rounds) rather than absolute milliseconds.",
        "",
    ]
    output.write_text("\n".join(header) + "\n" + "\n".join(sections), encoding="utf-8")
    print(f"wrote {output}")
    return 0


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


if __name__ == "__main__":
    sys.exit(main())
