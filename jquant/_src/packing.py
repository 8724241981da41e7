"""Sub-byte storage: pack unsigned b-bit codes (b = 1..4) into uint8 along the last axis, and back.

Layout (one definition for every b): each row of the last axis is a little-endian bit stream —
bit t of element j sits at stream position b·j + t, and stream position p is bit p mod 8 of byte
p div 8. An array of shape (..., n) packs to (..., ceil(n·b/8)); the final byte's unused bits are
0; other axes (and their sharding) are untouched. 0-d arrays pack as shape (1,). For b = 1, 2, 4
that is simply 8/b codes per byte, element j at bit offset b·(j mod 8/b); 3-bit codes take 3
bytes per 8. Codes are stored as given (the caller maps integers to codes); unpacking is exact.
Bits 5..8 are not packed: callers store them as int8 (the integer dot needs int8 operands).
"""

from __future__ import annotations

import math
from typing import Tuple

import jax.numpy as jnp

MAX_PACKED_BITS = 4


def is_packed(bits: int) -> bool:
    """Whether b-bit values are stored packed (b ≤ 4) rather than one int8 per value."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} out of range for storage; allowed: 1..8")
    return bits <= MAX_PACKED_BITS


def packed_shape(shape: Tuple[int, ...], bits: int) -> Tuple[int, ...]:
    """Shape of `pack(codes of shape, bits)`."""
    shape = tuple(shape) or (1,)
    return shape[:-1] + (math.ceil(shape[-1] * bits / 8),)


def pack(codes, bits: int):
    """Pack unsigned codes (< 2^bits) into uint8 bit streams along the last axis.

    Args:
      codes: integer array of any shape, values in [0, 2^bits).
      bits: 1..4.

    Returns:
      uint8 array of shape `packed_shape(codes.shape, bits)`.
    """
    _check(bits)
    codes = jnp.atleast_1d(codes).astype(jnp.uint8)
    n = codes.shape[-1]
    if 8 % bits == 0:  # whole codes per byte: shift each into place
        per_byte = 8 // bits
        codes = _pad_last(codes, per_byte)
        codes = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // per_byte, per_byte))  # not -1: size 0
        shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
        return jnp.sum(codes << shifts, axis=-1, dtype=jnp.uint8)  # disjoint fields: sum = OR
    # Codes straddle bytes: go through bit planes, 8 codes (= `bits` bytes) at a time.
    codes = _pad_last(codes, 8)
    m = codes.shape[-1] // 8  # explicit sizes rather than -1, which fails on size-0 arrays
    codes = codes.reshape(codes.shape[:-1] + (m, 8, 1))
    planes = (codes >> jnp.arange(bits, dtype=jnp.uint8)) & 1  # (..., m, 8, bits): stream order
    planes = planes.reshape(planes.shape[:-3] + (m, bits, 8))
    packed = jnp.sum(planes << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)
    packed = packed.reshape(packed.shape[:-2] + (m * bits,))
    return packed[..., :math.ceil(n * bits / 8)]


def unpack(packed, bits: int, shape: Tuple[int, ...]):
    """Inverse of `pack`: uint8 codes of `shape`."""
    _check(bits)
    n = shape[-1] if shape else 1
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
        codes = (packed[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
    else:
        packed = _pad_last(packed, bits)
        m = packed.shape[-1] // bits  # explicit sizes rather than -1, which fails on size-0 arrays
        packed = packed.reshape(packed.shape[:-1] + (m, bits, 1))
        planes = (packed >> jnp.arange(8, dtype=jnp.uint8)) & 1  # (..., m, bits, 8): stream order
        planes = planes.reshape(planes.shape[:-3] + (m, 8, bits))
        codes = jnp.sum(planes << jnp.arange(bits, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)
    codes = codes.reshape(codes.shape[:-2] + (codes.shape[-2] * codes.shape[-1],))
    return codes[..., :n].reshape(shape)


def _check(bits: int) -> None:
    if not 1 <= bits <= MAX_PACKED_BITS:
        raise ValueError(f"bits={bits}: pack handles 1..{MAX_PACKED_BITS} (5..8 are stored unpacked as int8)")


def _pad_last(x, multiple: int):
    pad = (-x.shape[-1]) % multiple
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x
