"""The pure-JAX backend: runs everywhere, and is the reference the kernels are tested against.

Nothing materialises the ``(L, D_in, D_out)`` difference tensor (9.7 GB for a ViT-S MLP layer on
4,096 tokens): the forward and the sign/clip parts of the backward are "pseudo-matmuls" computed as
a loop of rank-``_ROWS_PER_STEP`` updates of an accumulator the size of the output
(:func:`_rank1_sum`), so extra memory is ``O(L*D_in + D_in*D_out + L*D_out)``. Operands are
computed in at least float32 (float64 stays float64).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from addervit_jax.adder import rules

ORDER = 0
CUSTOM_CALL = False
AUTODIFF = False

# Rows of the reduction operand folded into the accumulator per loop step. Measured on a 2-core
# AMD EPYC (AVX2) with experiments/bench_ops.py: 8 gives the forward at 2.9x a matmul of the
# same shape (L=4096, 384->1536); 4 and 16 are within 30% of it, 32 is twice as slow (the fused
# update no longer fits in registers).
_ROWS_PER_STEP = 8


def available() -> bool:
    return True


def _stretched(x: jax.Array, e: jax.Array | None) -> jax.Array:
    return x if e is None else x * e


def _rank1_sum(
    term: Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array],
    a: jax.Array,
    b: jax.Array,
    c: jax.Array | None = None,
) -> jax.Array:
    """``out[p, q] = sum_r term(a[r, p], b[r, q], c[p, q])`` without an ``(R, P, Q)`` temporary.

    ``a`` is ``(R, P)``, ``b`` is ``(R, Q)``, ``c`` is ``(P, Q)`` or None; ``term`` is elementwise
    and is called with ``a[r][:, None]``, ``b[r][None, :]`` and ``c``. ``R`` is padded with zero
    rows to a multiple of ``_ROWS_PER_STEP``, so ``term`` must vanish when ``a`` or ``b`` rows are
    zero in the way each caller pads (an L1 distance of two zeros, or a zero cotangent weight).

    Each loop step adds ``_ROWS_PER_STEP`` rank-1 terms in one fused elementwise pass over the
    ``(P, Q)`` accumulator. The rows used at step ``t`` are sliced at step ``t - 1`` and carried:
    if the slice sits inside the fused update instead, XLA:CPU evaluates the dynamic-slice per
    element and the loop runs 5x slower (measured).
    """
    k = _ROWS_PER_STEP
    num_rows, p = a.shape
    q = b.shape[1]
    if num_rows == 0:
        return jnp.zeros((p, q), a.dtype)
    steps = -(-num_rows // k)
    pad = steps * k - num_rows
    a = jnp.pad(a, ((0, pad), (0, 0))).reshape(steps, k, p)
    b = jnp.pad(b, ((0, pad), (0, 0))).reshape(steps, k, q)

    def step(t, carry):
        acc, a_rows, b_rows = carry
        nxt = jnp.minimum(t + 1, steps - 1)
        for j in range(k):
            acc = acc + term(a_rows[j][:, None], b_rows[j][None, :], c)
        return acc, a[nxt], b[nxt]

    init = (jnp.zeros((p, q), a.dtype), a[0], b[0])
    acc, _, _ = lax.fori_loop(0, steps, step, init)
    return acc


def _cast(dtype, *arrays):
    return tuple(None if a is None else a.astype(dtype) for a in arrays)


def forward(x, w, e=None, *, interpret: bool = False) -> jax.Array:
    """``-sum_i |u[l, i] - w[i, d]|``; zero padding of D_in adds zero."""
    del interpret
    xc, wc, ec = _cast(rules.compute_dtype(x, w), x, w, e)
    u = _stretched(xc, ec)
    distance = _rank1_sum(lambda xi, wi, _: jnp.abs(xi - wi), u.T, wc)
    return (-distance).astype(jnp.result_type(x, w))


def x_grad(x, w, g, e=None, *, grad: str, clip_scale: float, interpret: bool = False):
    """``du[l, i] = sum_d g[l, d] * s(w[i, d] - u[l, i])``; zero-padded g adds zero."""
    del interpret
    xc, wc, gc, ec = _cast(rules.compute_dtype(x, w, g), x, w, g, e)
    s = rules.surrogate(grad, clip_scale)
    return _rank1_sum(lambda gd, wd, uu: gd * s(wd - uu), gc.T, wc.T, _stretched(xc, ec))


def w_grad_exact(x, w, g, e=None, *, interpret: bool = False) -> jax.Array:
    """``dw[i, d] = sum_l g[l, d] * sign(u[l, i] - w[i, d])``; zero-padded g adds zero."""
    del interpret
    xc, wc, gc, ec = _cast(rules.compute_dtype(x, w, g), x, w, g, e)
    u = _stretched(xc, ec)
    return _rank1_sum(lambda gl, ul, ww: gl * jnp.sign(ul - ww), gc, u, wc.T).T


def sad(a: jax.Array, b: jax.Array, *, negate: bool = False) -> jax.Array:
    """``out[l, n] = sum_k |a[l, k] - b[k, n]|`` for uint8 codes, in int32 (exact; ``negate``:
    ``-out``); zero padding of K adds ``|0 - 0| = 0``."""
    a, b = a.astype(jnp.int32), b.astype(jnp.int32)
    out = _rank1_sum(lambda ak, bk, _: jnp.abs(ak - bk), a.T, b)
    return -out if negate else out
