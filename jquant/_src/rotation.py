"""Hadamard rotations (incoherence processing): the `Hadamard` config of `QuantSpec.rotation` and
its fast transform.

A rotated spec stores W' = Rᵀ·W quantized, R orthogonal along one axis of W of size n (the
contraction axis: `numerics.Layout.transform_axis`), and dequantizes to R·Q(Rᵀ·W) ≈ W. Since
x·W = (x·R)·(Rᵀ·W), a dot can instead rotate the activation along its contracted axis: x·R is
Rᵀ applied to each row of x, so one operation, v ↦ Rᵀv along an axis (`to_rotated`), serves
the weight and the activation; its inverse v ↦ Rv (`from_rotated`) dequantizes.

    R = D · diag(H_b, …, H_b) / √b,

D = diag(d) with d ∈ {±1}ⁿ pseudo-random from the seed (splitmix64 of (seed, index): the same
signs on every machine and NumPy/JAX version, so a loaded checkpoint dequantizes the same), and
n/b copies of one b×b Hadamard matrix H_b (H_b H_bᵀ = b·I) on the diagonal: b = n by default
(one rotation of the whole axis), or `Hadamard(block=b)`. H_b = H_m ⊗ H_{2^k} (b = m·2^k): H_{2^k}
Sylvester's (`scipy.linalg.hadamard`), H_m with m = 1 or a Paley order (m = q + 1 with a prime
power q ≡ 3 mod 4, Paley I; m = 2(q + 1) with q ≡ 1 mod 4, Paley II), the smallest such m that
works. The sizes of real models: 384 = 12·32, 768 = 12·64, 1536 = 12·128, 2048, 4096 = 2^k, and
11008 = 344·32 with H_344 Paley I over GF(7³) (H_172 = 11008/64 has no Paley construction).

Transform, O(n·(log2 b + m)) per vector: H_{2^k} by k radix-2 butterfly stages
(a, b) → (a + b, a − b) (the fast Walsh–Hadamard transform), H_m by fixed sums of ±rows for
m ≤ `_ADDITION_CHAIN_MAX` (a matrix product for larger m, e.g. H_344), the signs (exact ±1
products) before the additions and the one rounding scale 1/√b after them — so every element
is the same fixed sequence of float operations eagerly and under jit (no dot kernel or fused
multiply-add choice can change a bit), as `jquant._src.numerics` requires (a large H_m's matrix
product is the one exception: XLA may sum it in another order under jit). Dense Sylvester
factors of ≤ 64 as matrix products measured 1.0–2.4× faster on the transform alone (XLA:CPU,
2 loaded cores, rows of K = 384…11008 at M = 1…256; e.g. K = 4096, M = 16: 0.21 vs 0.49 ms;
the whole K×K matrix product: 8.5 ms), but differ between eager and jit in the last bit; the
transform is a few percent of the dot it precedes. Arithmetic in float32 (float64 for float64
input).

Whole axis or blocks (the default is the whole axis). Measured SQNR (RTN, asymmetric, per output
channel and group; 4096×1024 weights; none / block = group / whole axis): Student-t(3) weights
3-bit g128 9.7 / 13.9 / 13.4 dB, 2-bit g64 5.9 / 7.4 / 6.9; Gaussian with 1% outlier input
channels ×10: 3-bit 8.8 / 14.2 / 13.4, 2-bit 6.3 / 7.9 / 6.8. So for weights alone a block per
group is 0.3–1 dB better (each group keeps its own scale for its own energy). But a W4A4
per-token dot (activations with 8 outlier channels ×30, 256 tokens, K = 4096, Student-t
weights 4-bit g128): output SQNR none 4.0 / block 128 13.4 / block 1024 14.6 / whole 15.0 dB
— a per-token scale spans all of K, so the activation wants the whole-axis rotation; and on the
char-LM (examples/char_lm.py's model, 256 evaluation windows) 2-bit g64 RTN is +17.3% (whole)
vs +17.9% (block 64) perplexity over float, 3-bit g128 +3.9% vs +3.7%, with GPTQ all within
0.1% of each other.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ADDITION_CHAIN_MAX = 32
"""Paley factors up to this order are applied as fixed sums of ±rows, larger ones as a matrix
product (module docstring, "Transform")."""
_MAX_PALEY = 1024
"""Largest Paley factor m looked for (an m×m dense product per vector)."""


@dataclasses.dataclass(frozen=True)
class Hadamard:
    """A randomized Hadamard rotation R = D·H/√b along a weight's contraction axis
    (`QuantSpec(rotation=Hadamard())`; module docstring for R, the signs and the sizes).

    Args:
      seed: the signs' seed, an int in [0, 2^63).
      block: None (default): one Hadamard matrix over the whole axis. An int b: a block-diagonal
        rotation, n/b independent b×b blocks (b must divide the axis; e.g. the group size).
        Either size must be m·2^k with m = 1 or a Paley order (12, 20, 24, 28, …; `size_problem`).

    Raises:
      TypeError: a field that is not an int (block: or None). ValueError: a negative seed, or a
        block size that has no Hadamard construction here.
    """

    seed: int = 0
    block: Optional[int] = None

    def __post_init__(self):
        if not _is_int(self.seed):
            raise TypeError(f"Hadamard.seed must be an int, got {self.seed!r}")
        if not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"Hadamard.seed={self.seed} must be in [0, 2^63)")
        if self.block is not None:
            if not _is_int(self.block):
                raise TypeError(f"Hadamard.block must be a positive int or None, got {self.block!r}")
            if self.block < 1 or _factor(self.block) is None:
                raise ValueError(f"Hadamard.block={self.block} has no Hadamard matrix here; allowed: m·2^k with m = 1 "
                                 f"or a Paley order ({_paley_examples()}), e.g. a power of two such as 128")

    def size_problem(self, n: int) -> Optional[str]:
        """Why this rotation cannot rotate an axis of size `n` (None: it can)."""
        if self.block is not None:
            if n % self.block:
                return f"Hadamard(block={self.block}) does not divide the rotated axis of size {n}; choose a divisor"
            return None
        if _factor(n) is None:
            blocks = [b for b in (2 ** i for i in range(n.bit_length())) if n % b == 0 and b > 1]
            hint = f"; or a block-diagonal rotation, e.g. Hadamard(block={blocks[-1]})" if blocks else ""
            return (f"no Hadamard matrix of order {n} (the rotated axis) here; allowed: m·2^k with m = 1 or a Paley "
                    f"order ({_paley_examples()}){hint}")
        return None

    def __repr__(self) -> str:
        parts = [f"seed={self.seed}"] + ([f"block={self.block}"] if self.block is not None else [])
        return f"Hadamard({', '.join(parts)})"


def to_rotated(x, rotation: Hadamard, axis: int):
    """Rᵀ·x along `axis` of x (size n): the basis a rotated weight is stored in, and x·R for an
    activation whose contracted axis is `axis`. In x's compute dtype (float32 or float64)."""
    return _apply(x, rotation, axis, transpose=True)


def from_rotated(x, rotation: Hadamard, axis: int):
    """R·x along `axis`: the inverse of `to_rotated` (dequantization)."""
    return _apply(x, rotation, axis, transpose=False)


def matrix(rotation: Hadamard, n: int) -> np.ndarray:
    """R (n×n, float64) as a dense matrix: R = D·diag(H_b, …)/√b (for tests and small n)."""
    b = n if rotation.block is None else rotation.block
    m, k = _factor(b)
    h = np.kron(_paley(m), _sylvester(2 ** k))
    return signs(rotation.seed, n)[:, None] * np.kron(np.eye(n // b), h) / math.sqrt(b)


def signs(seed: int, n: int) -> np.ndarray:
    """d ∈ {±1}ⁿ: bit 0 of splitmix64(seed·2^32 + i) (Steele et al. 2014), i = 0..n−1."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) * np.uint64(2 ** 32) + np.arange(n, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return np.where(z & np.uint64(1), -1.0, 1.0)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _apply(x, rotation: Hadamard, axis: int, transpose: bool):
    # jit: one compiled program per shape when called eagerly (the stages are many small ops)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x = jnp.asarray(x, dtype)
    axis %= x.ndim
    n = x.shape[axis]
    b = n if rotation.block is None else rotation.block
    problem = rotation.size_problem(n)
    if problem is not None:
        raise ValueError(problem)
    m, k = _factor(b)
    along = lambda v: jnp.reshape(jnp.asarray(v, dtype), (n,) + (1,) * (x.ndim - axis - 1))  # noqa: E731
    # Only exact products (±1) come before the additions and one rounding multiply after them,
    # so no fused multiply-add can change a bit between eager and jit.
    if transpose:  # Rᵀx = (diag(Hᵀ) (D x)) / √b
        x = x * along(signs(rotation.seed, n))
    # the axis last, as (n/b, m, 2^k): H_b = H_m ⊗ H_{2^k} in row-major order
    y = jnp.moveaxis(x, axis, -1)
    moved = y.shape
    y = _sylvester_transform(jnp.reshape(y, moved[:-1] + (n // b, m, 2 ** k)))
    if m > 1:
        h = _paley(m).T if transpose else _paley(m)
        y = _dense_transform(y, h, dtype) if m > _ADDITION_CHAIN_MAX else _signed_sums(y, h)
    y = jnp.moveaxis(jnp.reshape(y, moved), -1, axis)
    return y * along(np.full(n, 1 / math.sqrt(b)) if transpose else signs(rotation.seed, n) / math.sqrt(b))


def _sylvester_transform(y):
    """H_{2^k} (symmetric) along the last axis: k radix-2 butterfly stages (a, b) → (a + b, a − b)."""
    size, half = y.shape[-1], 1
    while half < size:
        z = jnp.reshape(y, y.shape[:-1] + (size // (2 * half), 2, half))
        a, b = z[..., 0, :], z[..., 1, :]
        y = jnp.reshape(jnp.stack([a + b, a - b], axis=-2), y.shape)
        half *= 2
    return y


def _signed_sums(y, h):
    """H_m (±1 entries) along axis −2: each output a fixed left-to-right sum of ±rows."""
    rows = [y[..., j, :] for j in range(h.shape[1])]
    out = []
    for i in range(h.shape[0]):
        acc = rows[0] if h[i, 0] > 0 else -rows[0]
        for j in range(1, h.shape[1]):
            acc = acc + rows[j] if h[i, j] > 0 else acc - rows[j]
        out.append(acc)
    return jnp.stack(out, axis=-2)


def _dense_transform(y, h, dtype):
    """H_m along axis −2 as one matrix product (large Paley factors)."""
    return jnp.einsum("ij,...jk->...ik", jnp.asarray(h, dtype), y, precision=lax.Precision.HIGHEST)


@functools.lru_cache(maxsize=None)
def _factor(b: int) -> Optional[Tuple[int, int]]:
    """(m, k) with b = m·2^k, m = 1 or the smallest Paley order that works; None if none does."""
    k = (b & -b).bit_length() - 1
    for j in range(k, -1, -1):
        m = b >> j
        if m == 1 or (m <= _MAX_PALEY and _paley_kind(m) is not None):
            return m, j
    return None


def _paley_kind(m: int) -> Optional[Tuple[int, int]]:
    """(1, q) for Paley I (m = q + 1, q ≡ 3 mod 4), (2, q) for Paley II (m = 2(q + 1), q ≡ 1 mod 4),
    q a prime power; None otherwise."""
    if m % 4:
        return None
    if _prime_power(m - 1) and (m - 1) % 4 == 3:
        return 1, m - 1
    if _prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return 2, m // 2 - 1
    return None


def _paley_examples() -> str:
    return ", ".join(str(m) for m in range(4, 100) if _paley_kind(m) and m & (m - 1)) + ", …"


@functools.lru_cache(maxsize=None)
def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


@functools.lru_cache(maxsize=None)
def _paley(m: int) -> np.ndarray:
    """A Hadamard matrix of order m (m = 1 or a Paley order), float64, H Hᵀ = m·I."""
    if m == 1:
        return np.ones((1, 1))
    kind, q = _paley_kind(m)
    chi = _quadratic_character(q)  # chi[a - b] over GF(q), elements as integers (base-p digits)
    p, e = _prime_power(q)
    digits = (np.arange(q)[:, None] // p ** np.arange(e)) % p
    diff = ((digits[:, None, :] - digits[None, :, :]) % p) @ (p ** np.arange(e))
    jacobsthal = chi[diff]  # Q[a, b] = χ(a − b)
    ones = np.ones((1, q))
    if kind == 1:  # H = I + S, S = [[0, 1ᵀ], [−1, Q]] skew-symmetric (q ≡ 3 mod 4)
        s = np.block([[np.zeros((1, 1)), ones], [-ones.T, jacobsthal]])
        h = np.eye(m) + s
    else:  # C = [[0, 1ᵀ], [1, Q]] symmetric conference matrix; H = C ⊗ [[1, −1], [−1, −1]] + I ⊗ H_2
        c = np.block([[np.zeros((1, 1)), ones], [ones.T, jacobsthal]])
        h = np.kron(c, np.array([[1.0, -1.0], [-1.0, -1.0]])) + np.kron(np.eye(q + 1), _sylvester(2))
    assert np.array_equal(h @ h.T, m * np.eye(m)), m  # construction invariant
    return h


def _quadratic_character(q: int) -> np.ndarray:
    """χ over GF(q) indexed by the element's integer code: 0 at 0, +1 on nonzero squares, −1 else.
    GF(p^e) is polynomials over GF(p) modulo the first monic irreducible of degree e found."""
    p, e = _prime_power(q)
    modulus = _irreducible(p, e)
    digits = (np.arange(q)[:, None] // p ** np.arange(e)) % p
    squares = {int(_poly_mul(a, a, modulus, p) @ (p ** np.arange(e))) for a in digits[1:]}
    chi = -np.ones(q)
    chi[0] = 0
    chi[list(squares)] = 1
    return chi


def _poly_mul(a, b, modulus, p):
    """a·b mod (modulus, p) for coefficient vectors of length e (lowest first); modulus is monic, e + 1 long."""
    e = len(a)
    prod = np.convolve(a, b) % p
    for i in range(len(prod) - 1, e - 1, -1):  # reduce by x^e = −(modulus without its leading term)
        if prod[i]:
            prod[i - e:i + 1] = (prod[i - e:i + 1] - prod[i] * modulus) % p
    return prod[:e]


def _irreducible(p: int, e: int) -> np.ndarray:
    """The first monic polynomial of degree e over GF(p) (coefficients lowest first) with no monic
    factor of degree 1..e/2 (trial division), i.e. irreducible."""
    if e == 1:
        return np.array([0, 1])
    for code in range(p ** e):
        low = (code // p ** np.arange(e)) % p
        poly = np.append(low, 1)
        if not _has_factor(poly, p, e):
            return poly
    raise AssertionError((p, e))


def _has_factor(poly, p, e) -> bool:
    for degree in range(1, e // 2 + 1):
        for code in range(p ** degree):
            divisor = np.append((code // p ** np.arange(degree)) % p, 1)
            rest = poly.copy()
            for i in range(e, degree - 1, -1):
                rest[i - degree:i + 1] = (rest[i - degree:i + 1] - rest[i] * divisor) % p
            if not rest[:degree].any():
                return True
    return False


def _prime_power(q: int) -> Optional[Tuple[int, int]]:
    """(p, e) with q = p^e, p prime, e ≥ 1; None otherwise."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
