"""The dot of two QArrays with floating-point elements (FP8 × FP8, and MX/NVFP4 operands).

Math. For x̂ = s_l · e_l and ŵ = s_r · e_r with scales constant along the contracted axes (FP8 per
tensor, per channel of a free axis, per token),

    Σ_k x̂ ŵ = s_l s_r Σ_k e_l e_r,

the elements' dot (`lax.dot_general` on the float8 arrays, `preferred_element_type=float32`:
every product of two FP8 values is exact in float32, the sum is rounded as float32 sums are)
multiplied once by s_l·s_r — the way the integer path applies its scales. Scales that vary along
the contraction (MX and NVFP4 blocks, FP8 groups) cannot leave the sum: those operands are
dequantized (x̂ in float32 as `dequantize` computes it; exact for MX, whose scales are powers of
two) and a float32 dot runs. Either way the result is within float32 rounding of the float64 product of the dequantized
operands.

Path choice, measured on XLA:CPU (jax 0.10.2, 2 cores shared with other jobs, K = N = 4096,
fp8_e4m3 weight per output channel, activation per token; `python benchmarks/fp8_dot.py`, median
ms at M = 1 / 16 / 64 / 256): XLA:CPU has no FP8 GEMM — it converts float8 operands to float32
element by element, and converting the 16 M weight elements dominates: the element dot took
41 / 55 / 62 / 104 ms, both operands dequantized 37 / 52 / 75 / 100, the float32 dot of float32
operands 2.3 / 9.6 / 24 / 54. The activation dequantized and the weight through the weight-only
dot (decoded 512 rows at a time while in cache, `jquant._src.dot`) took 3.9 / 9.4 / 17 / 69. So on
CPU that is the path; on GPU/TPU, whose FP8 dots run natively (H100/H200, recent TPUs), the
element dot runs with the scales applied after it (not measured here: no accelerator).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from jquant._src.formats.floating import _FP8, _Floating
from jquant._src.qarray import QArray


def takes(lhs, rhs) -> bool:
    """Whether this module multiplies the two operands (QArrays, or a spec for one about to be
    quantized): at least one has floating-point elements."""
    specs = [getattr(op, "spec", op) for op in (lhs, rhs)]
    return any(isinstance(spec.method, _Floating) for spec in specs)


def element_dot_problem(lhs: QArray, rhs: QArray, dimension_numbers) -> Optional[str]:
    """Why the FP8 element dot (scales applied after it) cannot take these operands, or None."""
    (lc, rc), _ = dimension_numbers
    for name, op, contracted in (("lhs", lhs, lc), ("rhs", rhs, rc)):
        if not isinstance(op.spec.method, _FP8):
            return f"{name} is {op.spec!r}, not FP8 (fp8_e4m3, fp8_e5m2)"
        lay = op.layout
        contracted = {a % op.ndim for a in contracted}
        if lay.group_axis is not None or contracted & set(lay.channel_axes):
            return f"{name}'s scale varies along a contracted axis ({op.spec!r} on shape {op.shape})"
    return None


def dot_general(lhs: QArray, rhs: QArray, dimension_numbers, precision=None, out_dtype=jnp.float32,
                *, path: Optional[str] = None):
    """x̂ · ŵ for QArrays with floating-point elements (module docstring), as `out_dtype`.

    Args:
      lhs, rhs: QArrays (at least one of a floating-point format; the other any format).
      dimension_numbers: as in `lax.dot_general`.
      precision: for the float32 dots.
      out_dtype: float output dtype.
      path: None (choose by backend, module docstring), "elements" (the FP8 element dot, scales
        after it), "weight_only" (lhs dequantized, rhs through the weight-only dot) or
        "dequantized" (both dequantized, one float32 dot).

    Raises:
      ValueError: `path="elements"` for operands it cannot take (saying why); an unknown path.
    """
    if path is None:
        if element_dot_problem(lhs, rhs, dimension_numbers) is None and jax.default_backend() != "cpu":
            path = "elements"
        else:
            path = "weight_only"
    if path == "elements":
        problem = element_dot_problem(lhs, rhs, dimension_numbers)
        if problem is not None:
            raise ValueError(f"dot_general: the FP8 element dot cannot take these operands: {problem}")
        return _element_dot(lhs, rhs, dimension_numbers, precision).astype(out_dtype)
    x = lhs.dequantize().astype(jnp.float32)
    if path == "weight_only":
        from jquant._src.dot import dot_general as quantized_dot  # dot.py dispatches here: import late
        return quantized_dot(x, rhs, dimension_numbers, precision, jnp.float32).astype(out_dtype)
    if path == "dequantized":
        return lax.dot_general(x, rhs.dequantize().astype(jnp.float32), dimension_numbers, precision=precision,
                               preferred_element_type=jnp.float32).astype(out_dtype)
    raise ValueError(f"dot_general: path={path!r} is unknown; allowed: None, 'elements', 'weight_only', "
                     "'dequantized'")


def _elements(qa: QArray):
    """The FP8 elements of `qa` as its float8 dtype (a bitcast of the stored bytes)."""
    return lax.bitcast_convert_type(qa.value, qa.spec.method.element.dtype)


def _element_dot(lhs: QArray, rhs: QArray, dimension_numbers, precision):
    """Σ e_l e_r in float32, times s_l·s_r aligned to the output (batch, lhs free, rhs free)."""
    (lc, rc), (lb, rb) = dimension_numbers
    acc = lax.dot_general(_elements(lhs), _elements(rhs), dimension_numbers, precision=precision,
                          preferred_element_type=jnp.float32)
    lc, lb = [tuple(a % lhs.ndim for a in axes) for axes in (lc, lb)]
    rc, rb = [tuple(a % rhs.ndim for a in axes) for axes in (rc, rb)]
    l_free = tuple(a for a in range(lhs.ndim) if a not in lc + lb)
    r_free = tuple(a for a in range(rhs.ndim) if a not in rc + rb)

    def aligned(qa, batch, free, own_first):
        # scale (size 1 on contracted axes) → (batch, lhs free, rhs free) with 1s for the other's
        s = jnp.transpose(qa.scale.astype(jnp.float32), batch + free + tuple(
            a for a in range(qa.ndim) if a not in batch + free))
        s = jnp.reshape(s, s.shape[:len(batch) + len(free)])
        other = (1,) * (len(r_free) if own_first else len(l_free))
        b, f = s.shape[:len(batch)], s.shape[len(batch):]
        return jnp.reshape(s, b + (f + other if own_first else other + f))

    return acc * (aligned(lhs, lb, l_free, True) * aligned(rhs, rb, r_free, False))
