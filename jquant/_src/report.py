"""`report`: what a quantized tree really costs and how much signal it kept, per leaf and in total."""

from __future__ import annotations

import dataclasses
import io
from typing import List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jquant._src.paths import is_qarray, leaves_with_paths
from jquant._src.policy import Policy


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """One leaf: path, shape, the rule (or spec) behind it, stored bits per weight (scales and
    zero-points included), SQNR in dB (None for leaves kept as they were), bytes before/after,
    and the relative output error on calibration data when a PTQ algorithm reported one."""

    path: str
    shape: Tuple[int, ...]
    rule: str
    bits_per_weight: float
    sqnr_db: Optional[float]
    bytes_before: int
    bytes_after: int
    output_error: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Report:
    """Rows and totals; `str(report)` (or `print(report)`) renders a table."""

    rows: Tuple[ReportRow, ...]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    @property
    def compression(self) -> float:
        """bytes_before / bytes_after."""
        return self.bytes_before / max(self.bytes_after, 1)

    @property
    def quantized_bits_per_weight(self) -> float:
        """Stored bits per weight over the quantized leaves only."""
        rows = [r for r in self.rows if r.sqnr_db is not None]
        count = sum(int(np.prod(r.shape)) for r in rows)
        return 8 * sum(r.bytes_after for r in rows) / max(count, 1)

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="jquant report")
        with_errors = any(r.output_error is not None for r in self.rows)
        names = ("path", "shape", "rule", "bits/w", "SQNR dB", "bytes before", "bytes after")
        for name in names + (("output error",) if with_errors else ()):
            table.add_column(name, justify="left" if name in ("path", "rule") else "right")
        for r in self.rows:
            sqnr = "-" if r.sqnr_db is None else f"{r.sqnr_db:.2f}"
            error = ("-" if r.output_error is None else f"{r.output_error:.4g}",) if with_errors else ()
            table.add_row(r.path, str(r.shape), r.rule, f"{r.bits_per_weight:.3f}", sqnr,
                          f"{r.bytes_before:,}", f"{r.bytes_after:,}", *error)
        table.add_section()
        table.add_row("total", "", f"{self.compression:.2f}x smaller", f"{self.quantized_bits_per_weight:.3f}", "",
                      f"{self.bytes_before:,}", f"{self.bytes_after:,}", *(("",) if with_errors else ()))
        out = io.StringIO()
        Console(file=out, width=160, force_terminal=False).print(table)
        return out.getvalue()


@jax.jit
def _sqnr_db(x, x_hat):
    x, x_hat = x.astype(jnp.float32), x_hat.astype(jnp.float32)
    noise = jnp.sum(jnp.square(x - x_hat))
    return 10 * jnp.log10(jnp.sum(jnp.square(x)) / jnp.maximum(noise, jnp.finfo(jnp.float32).tiny))


def report(params, qtree, policy: Optional[Policy] = None, errors: Optional[Mapping[str, float]] = None) -> Report:
    """Compare the float tree `params` with its quantized version `qtree` (same structure).

    Args:
      params: the original float tree.
      qtree: `quantize_params(params, policy)`.
      policy: if given, the "rule" column names the rule each leaf got; otherwise the spec.
      errors: {path: relative output error on calibration data}: floats, or the `LayerError`s of
        a `jquant.ptq` Result (their `.error`); shown as an "output error" column.

    Returns:
      Report with one row per array leaf (kept leaves too, so totals are the whole tree's bytes).

    Raises:
      ValueError: the two trees do not have the same leaf paths.
    """
    before = leaves_with_paths(params)
    after = leaves_with_paths(qtree)
    if [p for p, _ in before] != [p for p, _ in after]:
        missing = sorted(set(p for p, _ in before) ^ set(p for p, _ in after))
        raise ValueError(f"report: params and qtree differ in structure; first differing paths: {missing[:3]}")
    rows: List[ReportRow] = []
    for (path, x), (_, q) in zip(before, after):
        if not hasattr(x, "shape"):
            continue
        nbytes_before = int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
        if is_qarray(q):
            hit = policy.rule_for(path, q.ndim) if policy is not None else None
            rule = f"{hit[0]}: {hit[1].pattern}" if hit else repr(q.spec)
            rows.append(ReportRow(path, tuple(x.shape), rule, q.bits_per_weight,
                                  float(_sqnr_db(x, q.dequantize())), nbytes_before, q.nbytes,
                                  None if errors is None or path not in errors else _error(errors[path])))
        else:
            bits = 8 * jnp.dtype(x.dtype).itemsize
            rows.append(ReportRow(path, tuple(x.shape), "kept", float(bits), None, nbytes_before, nbytes_before))
    return Report(tuple(rows))


def _error(value) -> float:
    return float(getattr(value, "error", value))  # a LayerError, or a number
