"""The three similarity operations of an (adder) vision transformer and their backward rules.

Shapes follow SPEC section 1: ``x`` is ``(..., D_in)``, ``w`` is ``(D_in, D_out)`` and the result is
``(..., D_out)``. ``l`` indexes the flattened leading dimensions of ``x`` and ``g[l, d]`` is the
cotangent of ``y[l, d]``.

* ``dense``:  ``y[l, d] =  sum_i x[l, i] * w[i, d]`` (the multiplication baseline).
* ``adder``:  ``y[l, d] = -sum_i |x[l, i] - w[i, d]|`` (AdderNet's L1 similarity; Chen et al.,
  "AdderNet: Do we really need multiplications in deep learning?", CVPR 2020).
* ``euclid``: ``y[l, d] = -sum_i (x[l, i] - w[i, d])^2`` (EuclidNet's squared L2 similarity;
  Li et al., "EuclidNets: An alternative operation for efficient inference of deep learning
  models", 2022).

``adder`` is not differentiable at ``x == w`` and its true gradient, a sign, trains badly, so its
backward pass is a choice (``grad``):

* ``"exact"``:    dL/dw[i, d] = sum_l g[l,d] * sign(x[l,i] - w[i,d]),
                  dL/dx[l, i] = sum_d g[l,d] * sign(w[i,d] - x[l,i]);
* ``"addernet"``: dL/dw[i, d] = sum_l g[l,d] * (x[l,i] - w[i,d]),
                  dL/dx[l, i] = sum_d g[l,d] * hardtanh(w[i,d] - x[l,i]);
* ``"clipped"``:  dL/dw[i, d] = sum_l g[l,d] * (x[l,i] - w[i,d]),
                  dL/dx[l, i] = sum_d g[l,d] * hardtanh(clip_scale * (w[i,d] - x[l,i])),

with ``hardtanh(z) = clip(z, -1, 1)``. ``"addernet"`` is AdderNet's full-precision gradient for the
weights with a HardTanh-clipped input gradient. ``"clipped"`` is the fix of the *Exploration of
AdderViT* study (its Problem 1): scaling by 4 before the clip brings the x gradient closer to the
true sign while keeping it bounded.

Implementation (memory and speed):

* Nothing materialises the ``(L, D_in, D_out)`` difference tensor (9.7 GB for a ViT-S MLP layer on
  4,096 tokens). The forward and the sign/clip parts of the backward are "pseudo-matmuls" computed
  as a loop of rank-``_ROWS_PER_STEP`` updates of an accumulator the size of the output
  (:func:`_rank1_sum`), so extra memory is ``O(L*D_in + D_in*D_out + L*D_out)``.
* For ``"addernet"``/``"clipped"``, dL/dw is ``x^T g - w * sum_l g``: one matrix product and a
  column sum, because the rule is linear in ``x - w``.
* Inputs of any float dtype are computed in at least float32 and results are returned in the
  input dtype (bfloat16 in, bfloat16 out, float32 accumulation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["BACKENDS", "GRAD_RULES", "adder", "dense", "euclid", "resolve_backend"]

GRAD_RULES = ("clipped", "addernet", "exact")
BACKENDS = ("auto", "xla", "pallas", "cpu_native")

# Rows of the reduction operand folded into the accumulator per loop step. Measured on a 2-core
# AMD EPYC (AVX2) with experiments/bench_ops.py: 8 gives the forward at 2.9x a matmul of the
# same shape (L=4096, 384->1536); 4 and 16 are within 30% of it, 32 is twice as slow (the fused
# update no longer fits in registers).
_ROWS_PER_STEP = 8


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _check_operands(op: str, x: jax.Array, w: jax.Array) -> None:
    x_shape, w_shape = x.shape, w.shape
    shapes = f"x.shape={tuple(x_shape)}, w.shape={tuple(w_shape)}"
    if len(w_shape) != 2:
        raise ValueError(
            f"{op}: w must be a 2-D (D_in, D_out) weight matrix, got rank {len(w_shape)} ({shapes})"
        )
    if len(x_shape) < 1:
        raise ValueError(
            f"{op}: x must have shape (..., D_in) with at least one dimension ({shapes})"
        )
    if x_shape[-1] != w_shape[0]:
        raise ValueError(
            f"{op}: feature mismatch, x.shape[-1]={x_shape[-1]} must equal w.shape[0]={w_shape[0]} "
            f"({shapes})"
        )
    if w_shape[0] == 0:
        raise ValueError(f"{op}: w must have at least one input feature ({shapes})")
    for name, arr in (("x", x), ("w", w)):
        dtype = arr.dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{op}: {name} must have a floating dtype (float32, bfloat16, ...), "
                f"got {name}.dtype={dtype} ({shapes})"
            )


def _compute_dtype(*dtypes) -> jnp.dtype:
    """At least float32: bfloat16/float16 inputs accumulate in float32, float64 stays float64."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def resolve_backend(backend: str) -> str:
    """Map ``"auto"`` to the backend that runs on the default device; reject unknown names."""
    if backend not in BACKENDS:
        raise ValueError(f"adder: unknown backend={backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        # The fused Pallas GPU kernels and the native CPU kernel arrive with their own issues;
        # until then the pure-JAX formulation is the fastest available everywhere.
        return "xla"
    if backend in ("pallas", "cpu_native"):
        raise NotImplementedError(
            f"adder: backend={backend!r} is not available in this version; use backend='xla' "
            "or 'auto'"
        )
    return backend


# ---------------------------------------------------------------------------------------------
# Pseudo-matmul: the bounded-memory core of every L1 computation
# ---------------------------------------------------------------------------------------------


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


def _l1_distance(x: jax.Array, w: jax.Array) -> jax.Array:
    """``sum_i |x[l, i] - w[i, d]|`` for 2-D ``x`` (L, D_in); zero padding of D_in adds zero."""
    return _rank1_sum(lambda xi, wi, _: jnp.abs(xi - wi), x.T, w)


def _x_grad(x: jax.Array, w: jax.Array, g: jax.Array, surrogate: Callable) -> jax.Array:
    """``dx[l, i] = sum_d g[l, d] * surrogate(w[i, d] - x[l, i])``; zero-padded g adds zero."""
    return _rank1_sum(lambda gd, wd, xx: gd * surrogate(wd - xx), g.T, w.T, x)


def _w_grad_exact(x: jax.Array, w: jax.Array, g: jax.Array) -> jax.Array:
    """``dw[i, d] = sum_l g[l, d] * sign(x[l, i] - w[i, d])``; zero-padded g adds zero."""
    return _rank1_sum(lambda gl, xl, ww: gl * jnp.sign(xl - ww), g, x, w.T).T


def _x_surrogate(grad: str, clip_scale: float) -> Callable[[jax.Array], jax.Array]:
    """The function of ``w - x`` that replaces ``sign(w - x)`` in dL/dx."""
    if grad == "exact":
        return jnp.sign
    scale = 1.0 if grad == "addernet" else clip_scale
    if scale == 1.0:
        return lambda z: jnp.clip(z, -1.0, 1.0)
    return lambda z: jnp.clip(scale * z, -1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# adder: custom_vjp on 2-D operands
# ---------------------------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _adder_2d(x: jax.Array, w: jax.Array, grad: str, clip_scale: float, backend: str):
    del grad, clip_scale, backend  # they only select the backward rule and the implementation
    out_dtype = jnp.result_type(x, w)
    dtype = _compute_dtype(x, w)
    y = -_l1_distance(x.astype(dtype), w.astype(dtype))
    return y.astype(out_dtype)


def _adder_2d_fwd(x, w, grad, clip_scale, backend):
    return _adder_2d(x, w, grad, clip_scale, backend), (x, w)


def _adder_2d_bwd(grad, clip_scale, backend, residuals, g):
    del backend
    x, w = residuals
    dtype = _compute_dtype(x, w, g)
    xc, wc, gc = x.astype(dtype), w.astype(dtype), g.astype(dtype)
    dx = _x_grad(xc, wc, gc, _x_surrogate(grad, clip_scale))
    if grad == "exact":
        dw = _w_grad_exact(xc, wc, gc)
    else:
        # sum_l g[l, d] * (x[l, i] - w[i, d]) = (x^T g)[i, d] - w[i, d] * sum_l g[l, d].
        # HIGHEST keeps GPUs from running this float32 product in TF32.
        xtg = jnp.matmul(xc.T, gc, precision=lax.Precision.HIGHEST)
        dw = xtg - wc * jnp.sum(gc, axis=0)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_adder_2d.defvjp(_adder_2d_fwd, _adder_2d_bwd)


def adder(
    x: jax.Array,
    w: jax.Array,
    *,
    grad: str = "clipped",
    clip_scale: float = 4.0,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """AdderNet's L1 similarity ``y[..., d] = -sum_i |x[..., i] - w[i, d]|``.

    Args:
      x: ``(..., D_in)`` float array (any number of leading dimensions, bfloat16 allowed).
      w: ``(D_in, D_out)`` float array.
      grad: backward rule, ``"clipped"`` (default), ``"addernet"`` or ``"exact"``; see the module
        docstring for the formulas.
      clip_scale: the factor inside ``hardtanh`` of the ``"clipped"`` x-gradient (4 in the
        *Exploration of AdderViT* study). A positive Python number; ignored by other rules.
      backend: ``"auto"``, ``"xla"`` (pure JAX, runs everywhere), ``"pallas"`` (fused GPU
        kernels) or ``"cpu_native"``.
      interpret: run Pallas kernels in interpret mode (CPU tests); ignored by other backends.

    Returns:
      ``(..., D_out)`` array of dtype ``result_type(x, w)``, accumulated in at least float32.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    _check_operands("adder", x, w)
    if grad not in GRAD_RULES:
        raise ValueError(f"adder: unknown grad={grad!r}; expected one of {GRAD_RULES}")
    if isinstance(clip_scale, bool) or not isinstance(clip_scale, int | float | np.number):
        raise TypeError(
            "adder: clip_scale must be a Python number (it selects the backward rule at trace "
            f"time), got {type(clip_scale).__name__}"
        )
    clip_scale = float(clip_scale)
    if not (clip_scale > 0 and math.isfinite(clip_scale)):
        raise ValueError(f"adder: clip_scale must be positive and finite, got {clip_scale}")
    del interpret  # only meaningful for the Pallas backend, which is not available yet
    backend = resolve_backend(backend)
    lead, (d_in, d_out) = x.shape[:-1], w.shape
    y = _adder_2d(x.reshape(-1, d_in), w, grad, clip_scale, backend)
    return y.reshape(*lead, d_out)


# ---------------------------------------------------------------------------------------------
# euclid and dense: plain matrix products, exact gradients by autodiff
# ---------------------------------------------------------------------------------------------


def euclid(x: jax.Array, w: jax.Array) -> jax.Array:
    """EuclidNet's squared L2 similarity ``y[..., d] = -sum_i (x[..., i] - w[i, d])^2``.

    Computed as ``2 x @ w - sum_i x_i^2 - sum_i w_id^2`` (no difference tensor) in at least
    float32 and at full float32 matmul precision; gradients are exact, by autodiff.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    _check_operands("euclid", x, w)
    out_dtype = jnp.result_type(x, w)
    dtype = _compute_dtype(x, w)
    xc, wc = x.astype(dtype), w.astype(dtype)
    xw = jnp.matmul(xc, wc, precision=lax.Precision.HIGHEST)
    y = 2.0 * xw - jnp.sum(xc * xc, axis=-1, keepdims=True) - jnp.sum(wc * wc, axis=0)
    return y.astype(out_dtype)


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """The multiplication baseline ``y[..., d] = sum_i x[..., i] * w[i, d]``.

    Accumulates in at least float32 and returns ``result_type(x, w)``; the matmul runs at the
    backend's default precision, as a ``flax`` Dense layer does, so speed comparisons are fair.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    _check_operands("dense", x, w)
    out_dtype = jnp.result_type(x, w)
    y = jnp.matmul(x, w, preferred_element_type=_compute_dtype(x, w))
    return y.astype(out_dtype)
