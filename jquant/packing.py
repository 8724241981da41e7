"""Sub-byte storage: pack unsigned b-bit codes into uint8 along the last axis, and back.

Layout: a code of `c` container bits (c = 1, 2 or 4; 3-bit codes use 4-bit containers) sits at
bit offset `c·j` of its byte, j = 0 .. 8/c - 1 counting consecutive elements of the last axis.
The last axis is zero-padded to a multiple of 8/c, so an array of shape (..., n) packs to
(..., ceil(n·c/8)); other axes (and their sharding) are untouched. 0-d arrays pack as shape (1,).
Codes are stored as given (the caller maps signed integers to codes); unpacking is exact.
"""

from __future__ import annotations

import math
from typing import Tuple

import jax.numpy as jnp


def container_bits(bits: int) -> int:
    """Bits a b-bit code occupies in storage: 1, 2, 4 (for 3 and 4), or 8 (for 5..8, unpacked)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} out of range for packing; allowed: 1..8")
    return 1 << (bits - 1).bit_length()


def packed_shape(shape: Tuple[int, ...], bits: int) -> Tuple[int, ...]:
    """Shape of `pack(codes of shape, bits)`."""
    per_byte = 8 // container_bits(bits)
    shape = tuple(shape) or (1,)
    return shape[:-1] + (math.ceil(shape[-1] / per_byte),)


def pack(codes, bits: int):
    """Pack unsigned codes (< 2^bits) into uint8, `8 // container_bits(bits)` per byte.

    Args:
      codes: integer array of any shape, values in [0, 2^bits).
      bits: 1..4 (5..8 are stored unpacked by the caller).

    Returns:
      uint8 array of shape `packed_shape(codes.shape, bits)`.
    """
    c = container_bits(bits)
    if c == 8:
        raise ValueError(f"bits={bits} is stored unpacked; pack handles bits 1..4")
    per_byte = 8 // c
    codes = jnp.atleast_1d(codes).astype(jnp.uint8)
    n = codes.shape[-1]
    pad = (-n) % per_byte
    if pad:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    codes = codes.reshape(codes.shape[:-1] + (-1, per_byte))
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * c
    # Fields do not overlap, so the sum is a bitwise OR.
    return jnp.sum(codes << shifts, axis=-1, dtype=jnp.uint8)


def unpack(packed, bits: int, shape: Tuple[int, ...]):
    """Inverse of `pack`: uint8 codes of `shape`."""
    c = container_bits(bits)
    per_byte = 8 // c
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * c
    codes = (packed[..., None] >> shifts) & jnp.uint8((1 << c) - 1)
    codes = codes.reshape(packed.shape[:-1] + (-1,))
    n = shape[-1] if shape else 1
    return codes[..., :n].reshape(shape)
