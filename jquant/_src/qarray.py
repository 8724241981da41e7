"""`QArray`, a quantized tensor as a pytree, and `quantize` / `dequantize`.

Storage (`QArray.value`):
* bits 5..8: the signed integers q as int8, in the tensor's own shape;
* bits 1..4: unsigned codes packed into uint8 along the last axis (`packing`), as the format maps
  integers to codes (`Format.to_codes`): uniform codes are q - Qmin, sign codes are (q + 1) / 2,
  codebook codes are the level indices. 4-bit
  takes half the bytes of int8, 3-bit three eighths, 2-bit a quarter, 1-bit an eighth.

Scale and zero-point have shape `numerics.layout(shape, spec).scale_shape`: the tensor's shape
(with the group axis split) and 1 on every axis that shares a scale. For `method="kmeans"` the
`scale` holds each group's sorted levels instead, shape `scale_shape + (2^bits,)`.

Rotated and equalized specs (`QuantSpec(rotation=jquant.Hadamard(), equalization=jquant.Equalize())`):
storage, scale and zero-point are those of Rᵀ·(x / r) (`in_stored_basis` is that QArray, same
storage), `eq_scale` holds r (`jquant._src.equalization`; None without an equalization), and
`dequantize` returns r·R·(its dequantization) (`jquant._src.rotation`).
"""

from __future__ import annotations

import functools
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jquant._src import equalization, numerics, packing, rotation
from jquant._src.spec import QuantSpec, transformed, untransformed, unstacked


# What converting a QArray to an array says (NumPy and jax.numpy ask through __array__ and
# __jax_array__; a float layer given served params, e.g. an unwrapped Flax model, does that).
_WHERE_FLOAT = ("a QArray was given where a float array is needed ({!r}): dequantize it (qa.dequantize(), "
                "jquant.dequantize_params(tree)), or, for a Flax model given quantized params, wrap the model "
                "with jquant.flax.quantize(model, policy)")


@jax.tree_util.register_pytree_with_keys_class
class QArray:
    """A quantized tensor: integer storage, scale, zero-point, and static metadata.

    Children (arrays, so `jit`, `tree_map`, `device_put` and sharding see them): `value`, `scale`,
    `zero_point` (None when symmetric), `eq_scale` (an equalized spec's r, else None). Static
    auxiliary data: `spec`, `shape`, `dtype` (the original float dtype that `dequantize` returns).

    `shape` is static, so a QArray made inside `jax.vmap` keeps the per-example shape while its
    leaves gain the batch axis: dequantize it inside the same `vmap` (or quantize the batch whole).
    The other way round, a stack of layers quantized with per-layer scales (`Rule(stacked=k)`, k
    leading channel axes) that `lax.scan`/`nn.scan`/`vmap` slices is each layer's QArray, with the
    layer's spec and shape.
    Inside `jax.shard_map` the leaves are per-device blocks of the same rank: there `shape` is the
    block's, read off the storage (`value`) when the tree is rebuilt, so a QArray passed in with
    `in_specs` (e.g. `P(None, "model")` on each leaf of an `(in, out)` kernel) is the local
    quantized block, and one returned through `out_specs` is whole again.
    """

    def __init__(self, value, scale, zero_point, *, spec: QuantSpec, shape: Tuple[int, ...], dtype, eq_scale=None):
        self.value = value
        self.scale = scale
        self.zero_point = zero_point
        self.eq_scale = eq_scale
        self.spec = spec
        self.shape = tuple(shape)
        self.dtype = jnp.dtype(dtype)

    def tree_flatten_with_keys(self):
        keys = jax.tree_util.GetAttrKey
        children = ((keys("value"), self.value), (keys("scale"), self.scale), (keys("zero_point"), self.zero_point),
                    (keys("eq_scale"), self.eq_scale))
        return children, (self.spec, self.shape, self.dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        spec, shape, dtype = aux
        spec, shape = _layer_of_stack(spec, shape, children[0])
        block = _shape_of_storage(spec, shape, children[0])
        if spec.rotation is not None and block != shape:
            _whole_rotation_axis(spec, shape, block)
        value, scale, zero_point, eq_scale = children
        return cls(value, scale, zero_point, spec=spec, shape=block, dtype=dtype, eq_scale=eq_scale)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def layout(self) -> numerics.Layout:
        """The spec resolved against `shape` (group split, reduced axes)."""
        return numerics.layout(self.shape, self.spec)

    @property
    def q(self):
        """The integers q as int8, in `shape` (unpacked if stored packed): signed grid values for
        uniform and sign, level indices 0..2^b-1 for codebook methods."""
        if not packing.is_packed(self.spec.bits):
            return self.value
        return self.spec.method.from_codes(packing.unpack(self.value, self.spec.bits, self.shape), self.spec)

    def astype(self, dtype) -> "QArray":
        """The same storage dequantizing to `dtype` (a layer's compute dtype): what a float layer
        that casts its kernel to `dtype` before the dot gets from a quantized kernel."""
        return QArray(self.value, self.scale, self.zero_point, spec=self.spec, shape=self.shape, dtype=dtype,
                      eq_scale=self.eq_scale)

    def __getitem__(self, index):
        """`qa[...]` is `qa` (how NNX reads a Variable's value); other indexing is not defined on
        packed storage — dequantize first."""
        if index is Ellipsis:
            return self
        raise TypeError(f"QArray supports only qa[...]; got qa[{index!r}] — index qa.dequantize() instead")

    def __array__(self, dtype=None, copy=None):
        raise TypeError(_WHERE_FLOAT.format(self))

    def __jax_array__(self):
        raise TypeError(_WHERE_FLOAT.format(self))

    def dequantize(self):
        """x̂ = s · (q - z) (codebook methods: the indexed level) in the original shape and dtype;
        R·(that) for a rotated spec, times r for an equalized one. Eagerly one jitted program per
        (spec, shape, dtype), as `quantize` (the same numbers as under jit, one compilation
        instead of one per operation)."""
        if not any(isinstance(a, jax.core.Tracer) for a in (self.value, self.scale, self.zero_point, self.eq_scale)):
            return _dequantize_eagerly(self)
        return decode(self.q, self.scale, self.zero_point, self.spec, self.shape, self.dtype, eq_scale=self.eq_scale)

    @property
    def nbytes(self) -> int:
        """True storage bytes: integer storage + scales + zero-points (+ an equalization's r)."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in (self.value, self.scale, self.zero_point, self.eq_scale) if a is not None)

    @property
    def bits_per_weight(self) -> float:
        """8 · nbytes / number of elements: what one weight really costs, metadata included."""
        return 8 * self.nbytes / max(self.size, 1)

    def __repr__(self) -> str:
        return (f"QArray({self.spec!r}, shape={self.shape}, dtype={self.dtype.name}, "
                f"bits/weight={self.bits_per_weight:.3f})")


@jax.jit
def _dequantize_eagerly(qa: QArray):
    return decode(qa.q, qa.scale, qa.zero_point, qa.spec, qa.shape, qa.dtype, eq_scale=qa.eq_scale)


def decode(q, scale, zero_point, spec: QuantSpec, shape, dtype, *, saturate: bool = True, eq_scale=None):
    """`QArray.dequantize` of unpacked integers `q` of `shape` (for callers that unpack storage
    piecewise, e.g. the weight-only dot's bit planes); `saturate=False` where the format's
    `saturates(scale, zero_point, spec)` is False (it then skips a per-element clip). A rotated spec's values
    are rotated back (R·, in float32) and an equalized one's multiplied by `eq_scale` (r) before the
    cast to `dtype`."""
    lay = numerics.layout(tuple(shape), spec)
    values = (spec.method.decode(q, scale, zero_point, spec, lay) if saturate
              else spec.method.decode(q, scale, zero_point, spec, lay, saturate=False))
    return numerics.cast_saturating(from_stored_basis(values, spec, lay, eq_scale), dtype)


def to_stored_basis(x, spec: QuantSpec, lay: numerics.Layout, eq_scale=None):
    """(Rᵀ·(x / r), r) for a rotated and/or equalized spec (r: `eq_scale`, or computed from x; None
    without an equalization), in x's compute dtype; (x, None) for a spec with neither. What such a
    spec quantizes with its transforms taken off (`untransformed`)."""
    if spec.equalization is not None:
        if eq_scale is None:
            eq_scale = equalization.scales(x, spec.equalization, lay)
        dtype = numerics.compute_dtype(jnp.result_type(x))
        x = numerics.divide(jnp.asarray(x, dtype), eq_scale.astype(dtype))
    if spec.rotation is not None:
        x = rotation.to_rotated(x, spec.rotation, lay.transform_axis)
    return x, eq_scale


def from_stored_basis(values, spec: QuantSpec, lay: numerics.Layout, eq_scale):
    """r·R·values: the inverse of `to_stored_basis` (dequantization), in the compute dtype."""
    if spec.rotation is not None:
        values = rotation.from_rotated(values, spec.rotation, lay.transform_axis)
    if spec.equalization is not None:
        values = values * eq_scale.astype(values.dtype)
    return values


def in_stored_basis(qa: QArray) -> QArray:
    """A rotated or equalized QArray (Q(Rᵀ·(x / r)), dequantizing to r·R·Q(…)) as the plain QArray
    of Q(Rᵀ·(x / r)): the same storage, scale and zero-point under the spec without its rotation
    and equalization; `qa` itself if it has neither."""
    if not transformed(qa.spec):
        return qa
    return QArray(qa.value, qa.scale, qa.zero_point, spec=untransformed(qa.spec),
                  shape=qa.shape, dtype=qa.dtype)


def _layer_of_stack(spec: QuantSpec, shape, value):
    """(spec, shape) of one layer when storage `value` has k fewer leading axes than `shape`: a
    stack of layers quantized with per-layer scales (`Rule(stacked=k)`: its k leading axes are
    channel axes) and sliced by `lax.scan` / `nn.scan` / `vmap`, each slice a layer's QArray.
    Otherwise (spec, shape) unchanged."""
    block = getattr(value, "shape", None)
    layers = len(shape) - len(block) if isinstance(block, tuple) else 0
    if layers <= 0 or len(block) == 0:
        return spec, shape
    layer = unstacked(spec, layers, len(shape))
    return (spec, shape) if layer is None else (layer, tuple(shape[layers:]))


def _whole_rotation_axis(spec: QuantSpec, shape, block) -> None:
    """Refuse a block of a rotated QArray (or a whole made of blocks) that splits the rotated axis:
    R spans the whole axis, so no block can be dequantized or multiplied on its own.

    Raises:
      ValueError: the rotated axis differs between `shape` and `block`.
    """
    axis = numerics.layout(shape, spec).transform_axis
    if block[axis] != shape[axis]:
        raise ValueError(f"a QArray of shape {tuple(shape)} rotated along axis {axis} ({spec.rotation!r}) was split into "
                         f"blocks of shape {tuple(block)} (jax.shard_map in_specs/out_specs): the rotation spans the "
                         f"whole axis, so a block cannot be dequantized or rotated on its own; keep axis {axis} whole "
                         f"on every device (shard the other axes), or let jit partition it (NamedSharding)")


def _shape_of_storage(spec: QuantSpec, shape, value):
    """The logical shape that storage `value` holds: `shape`, unless `value` is an array of the same
    rank but another shape — a block of the storage (shard_map) or a whole again (its out_specs) —
    whose shape then gives it (the packed last axis: 8/b codes per byte, whole codes only)."""
    block = getattr(value, "shape", None)
    full = packing.packed_shape(shape, spec.bits) if packing.is_packed(spec.bits) else tuple(shape)
    if not shape or not isinstance(block, tuple) or len(block) != len(full) or block == full:
        return shape
    last = block[-1]
    if packing.is_packed(spec.bits) and block[-1] != full[-1]:
        last, partial = divmod(block[-1] * 8, spec.bits)
        if partial or packing.packed_shape((last,), spec.bits) != (block[-1],):
            return shape  # not a whole number of codes: leave it (the layout check will say)
    elif block[-1] == full[-1]:
        last = shape[-1]
    return tuple(block[:-1]) + (last,)


def quantize(x, spec: QuantSpec, *, scale=None, zero_point=None) -> QArray:
    """Quantize a float array to a QArray (the numerics are the format's: `jquant._src.formats`).

    Args:
      x: float array (f32, bf16, f16, f64) of any shape.
      spec: the QuantSpec.
      scale, zero_point: a fixed (calibrated) scale and zero-point, broadcastable to the scale
        shape `numerics.layout(x.shape, spec).scale_shape`; default: computed from `x`
        (absmax, min/max, or mean|x| for sign). `zero_point` is needed iff `spec.symmetric` is False.

    Eagerly (a concrete `x`, scales computed from it) this runs as one compiled program per shape,
    dtype and spec — the numbers of the same call under `jit` (eager = jit bit for bit is the
    library's rule, tested) at one compilation, where op-by-op dispatch compiled each primitive.

    Returns:
      QArray with `shape == x.shape` and `dtype == x.dtype`.

    Raises:
      TypeError: `x` is not a float array, or `spec` is not a QuantSpec. ValueError: the spec does
        not fit `x.shape`; a fixed scale or zero-point that does not broadcast to the scale shape;
        eagerly, a fixed zero-point that is not an integer in [Qmin, Qmax] (under jit it is
        clipped to that range).
    """
    x = check_float_input(x, spec, "quantize")
    lay = numerics.layout(x.shape, spec)
    if scale is None and zero_point is None and not isinstance(x, jax.core.Tracer):
        return _quantize_eagerly(x, spec)
    return _quantize(x, spec, lay, scale, zero_point)


def _quantize(x, spec, lay, scale, zero_point):
    if transformed(spec):
        stored, eq_scale = to_stored_basis(x, spec, lay)
        stored = quantize(stored, untransformed(spec), scale=scale, zero_point=zero_point)
        return QArray(stored.value, stored.scale, stored.zero_point, spec=spec, shape=x.shape, dtype=x.dtype,
                      eq_scale=eq_scale)
    fmt = spec.method
    fixed = scale is not None
    scale, zero_point = fmt.params(x, spec, lay, scale, zero_point)
    q = fmt.encode(x, spec, lay, scale, zero_point, fixed=fixed)
    value = packing.pack(fmt.to_codes(q, spec).astype(jnp.uint8), spec.bits) if packing.is_packed(spec.bits) else q
    return QArray(value, scale, zero_point, spec=spec, shape=x.shape, dtype=x.dtype)


@functools.partial(jax.jit, static_argnums=1)
def _quantize_eagerly(x, spec):
    return _quantize(x, spec, numerics.layout(x.shape, spec), None, None)


def check_float_input(x, spec, where: str):
    """`x` as a float array, after a TypeError unless `spec` is a QuantSpec (a bare int or dict
    would fail deep inside) and `x` is a float array."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{where}: spec must be a jquant.QuantSpec, got {type(spec).__name__} {spec!r}")
    if isinstance(x, QArray):
        raise TypeError(f"{where} expects a float array, got a QArray ({x!r}), which is quantized already: use it "
                        "as it is, or dequantize it first (qa.dequantize())")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{where} expects a float array (float16, bfloat16, float32 or float64), got dtype {x.dtype}")
    return x


def dequantize(qarray: QArray):
    """`qarray.dequantize()`: x̂ = s · (q - z) in the original shape and dtype."""
    return qarray.dequantize()
