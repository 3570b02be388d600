"""The three similarity operations of an (adder) vision transformer.

``x`` is ``(..., D_in)``, ``w`` is ``(D_in, D_out)`` and the result is ``(..., D_out)``:

* ``dense``:  ``y[..., d] =  sum_i x[..., i] * w[i, d]`` (the multiplication baseline).
* ``adder``:  ``y[..., d] = -sum_i |x[..., i] - w[i, d]|`` (AdderNet's L1 similarity; Chen et al.,
  "AdderNet: Do we really need multiplications in deep learning?", CVPR 2020), with a choice of
  backward rule (``grad``) and of backend: the subpackage :mod:`addervit_jax.adder`, whose
  :mod:`~addervit_jax.adder.rules` holds the rules' formulas. ``adder_scores`` is its form for
  two activations (L1 attention logits).
* ``adder_int8``: ``y[..., d] = -sum_i |qx[..., i] - qw[i, d]|`` on 8-bit codes, in int32 (the int8
  adder layer's inference; codes from ``int8_codes``, the grid explained in
  :mod:`addervit_jax.adder.quantized`), and ``adder_int8_layer``, the int8 layer's whole forward
  in one kernel pass.
* ``int8_matmul``: ``sums[..., d] = sum_i q[..., i] * w[i, d]`` in int32, with ``q`` the per-token
  8-bit codes of ``x`` (``quantizers.absmax_int8``) and ``w`` int8: the int8 multi and ternary
  sites' product, in oneDNN's int8 matmul on a CPU where it is installed
  (``kernels/cpu_native.py``, the coding fused into the call), else XLA's int8 ``dot_general``.
  ``ternary_matmul``: the same with ternary weights in 2 bits (``quantizers.pack_ternary``).
* ``euclid``: ``y[..., d] = -sum_i (x[..., i] - w[i, d])^2`` (EuclidNet's squared L2 similarity;
  Li et al., "EuclidNets: An alternative operation for efficient inference of deep learning
  models", 2022), exact gradients by autodiff.

Inputs of any float dtype are computed in at least float32 and results are returned in the input
dtype (bfloat16 in, bfloat16 out, float32 accumulation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from addervit_jax import quantizers
from addervit_jax.adder import (
    BACKENDS,
    GRAD_RULES,
    INT8_LEVELS,
    AdderOptions,
    adder,
    adder_int8,
    adder_int8_layer,
    adder_scores,
    backends,
    check_operands,
    int8_codes,
    resolve_backend,
    shard_rows,
)
from addervit_jax.adder.rules import compute_dtype

__all__ = [
    "BACKENDS",
    "AdderOptions",
    "GRAD_RULES",
    "INT8_LEVELS",
    "adder",
    "adder_int8",
    "adder_int8_layer",
    "adder_scores",
    "dense",
    "euclid",
    "int8_codes",
    "int8_dense",
    "int8_matmul",
    "ternary_dense",
    "ternary_matmul",
    "resolve_backend",
    "shard_rows",
]


# ---------------------------------------------------------------------------------------------
# euclid and dense: plain matrix products, exact gradients by autodiff
# ---------------------------------------------------------------------------------------------


def euclid(x: jax.Array, w: jax.Array) -> jax.Array:
    """EuclidNet's squared L2 similarity ``y[..., d] = -sum_i (x[..., i] - w[i, d])^2``.

    Computed as ``2 x @ w - sum_i x_i^2 - sum_i w_id^2`` (no difference tensor) in at least
    float32 and at full float32 matmul precision; gradients are exact, by autodiff.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    check_operands("euclid", x, w)
    out_dtype = jnp.result_type(x, w)
    dtype = compute_dtype(x, w)
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
    check_operands("dense", x, w)
    out_dtype = jnp.result_type(x, w)
    y = jnp.matmul(x, w, preferred_element_type=compute_dtype(x, w))
    return y.astype(out_dtype)


#: the most terms an int8 product sums exactly in int32 (codes in [-127, 127], weights int8)
INT8_MATMUL_MAX_TERMS = (2**31 - 1) // (127 * 128)


def int8_matmul(
    x: jax.Array, w: jax.Array, *, backend: str = "auto"
) -> tuple[jax.Array, jax.Array]:
    """The int8 product of a site: ``(sums, scale)`` with ``sums[..., d] = sum_i q[..., i] *
    w[i, d]`` in int32 (exact) and ``q``, ``scale`` (``(..., 1)``) the per-token codes and
    scale of ``quantizers.absmax_int8(x)``, so ``x @ (w * sw) ~= sums * sw / scale``.

    Args:
      x: ``(..., D_in)`` floats (computed in float32).
      w: ``(D_in, D_out)`` int8.
      backend: ``"auto"`` (the native kernel, oneDNN's int8 matmul with the coding fused, on a
        CPU where it is built: ``kernels.cpu_native.int8_matmul_path``; else XLA's int8
        ``dot_general``), ``"cpu_native"`` or ``"xla"``; a backend without an int8 product
        (``"pallas"``, ``"naive"``) runs ``"xla"``. Both give the same integers.
    """
    x, w = _int8_operands("int8_matmul", x, w)
    lead = x.shape[:-1]
    native = _native_int8(backend, "int8_matmul", x, (w,))
    if native is not None:
        sums, scale = native
        return sums.reshape(*lead, w.shape[1]), scale.reshape(*lead, 1)
    codes, scale = quantizers.absmax_int8(x.astype(jnp.float32))
    sums = lax.dot_general(
        codes.astype(jnp.int8),
        w,
        (((x.ndim - 1,), (0,)), ((), ())),
        preferred_element_type=jnp.int32,
    )
    return sums, scale


def _native_int8(backend: str, kernel: str, x, shared: tuple, **static):
    """``backend``'s native int8 ``kernel`` on the rows of ``x`` (its leading axes flattened,
    spread over a mesh by ``shard_rows``) and ``shared``, or None where that backend has no
    native int8 product (XLA's then serves)."""
    module = backends.get(resolve_backend(backend))
    if not getattr(module, "int8_matmul_available", lambda: False)():
        return None
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return shard_rows(functools.partial(getattr(module, kernel), **static), (rows,), shared)


def _int8_operands(name: str, x, w) -> tuple[jax.Array, jax.Array]:
    x, w = jnp.asarray(x), jnp.asarray(w)
    shapes = f"x.shape={tuple(x.shape)}, w.shape={tuple(w.shape)}"
    if w.dtype != jnp.int8 or w.ndim != 2:
        raise TypeError(f"{name}: w must be 2-D int8, got {w.dtype} ({shapes})")
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"{name}: expected float x (..., D_in) and w (D_in, D_out) with the same D_in, "
            f"got x {x.dtype} ({shapes})"
        )
    if w.shape[0] > INT8_MATMUL_MAX_TERMS:
        raise ValueError(
            f"{name}: D_in={w.shape[0]} could overflow int32 (at most "
            f"{INT8_MATMUL_MAX_TERMS}; {shapes})"
        )
    return x, w


def _rescale_operands(name: str, d_out: int, col, bias) -> tuple[jax.Array, jax.Array]:
    col = jnp.asarray(col, jnp.float32)
    bias = jnp.zeros((d_out,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    if col.shape != (d_out,) or bias.shape != (d_out,):
        raise ValueError(
            f"{name}: col and bias must be ({d_out},), one per output, got col.shape="
            f"{tuple(col.shape)}, bias.shape={tuple(bias.shape)}"
        )
    return col, bias


def _rescale(sums, col, scale, bias):
    return sums.astype(jnp.float32) * col * (1.0 / scale) + bias


def int8_dense(x, w, col, bias=None, *, backend: str = "auto") -> jax.Array:
    """An int8 multiplication site's output before its norm: the int8 product of
    :func:`int8_matmul` rescaled, ``y = sums * col * (1 / scale) + bias`` in float32 (rounded in
    that order; ``col``, ``bias``: ``(D_out,)``, ``bias`` None: zeros), so
    ``y ~= x @ (w * col) + bias``.
    The native kernel applies the rescale in its jobs, while the int32 sums of a block of rows
    are in cache (the sums are never written out); XLA computes the same formula on
    :func:`int8_matmul`'s sums. ``backend`` as in :func:`int8_matmul`."""
    x, w = _int8_operands("int8_dense", x, w)
    col, bias = _rescale_operands("int8_dense", w.shape[1], col, bias)
    y = _native_int8(backend, "int8_dense", x, (w, col, bias))
    if y is not None:
        return y.reshape(*x.shape[:-1], w.shape[1])
    sums, scale = int8_matmul(x, w, backend="xla")
    return _rescale(sums, col, scale, bias)


def ternary_dense(x, packed, d_out: int, col, bias=None, *, backend: str = "auto") -> jax.Array:
    """:func:`int8_dense` with ternary weights stored in 2 bits (``packed``, as in
    :func:`ternary_matmul`)."""
    x, packed = _ternary_operands("ternary_dense", x, packed, d_out)
    col, bias = _rescale_operands("ternary_dense", d_out, col, bias)
    y = _native_int8(backend, "ternary_dense", x, (packed, col, bias), n=int(d_out))
    if y is not None:
        return y.reshape(*x.shape[:-1], d_out)
    sums, scale = ternary_matmul(x, packed, d_out, backend="xla")
    return _rescale(sums, col, scale, bias)


def _ternary_operands(name: str, x, packed, d_out: int) -> tuple[jax.Array, jax.Array]:
    x, packed = jnp.asarray(x), jnp.asarray(packed)
    shapes = f"x.shape={tuple(x.shape)}, packed.shape={tuple(packed.shape)}, d_out={d_out}"
    if packed.dtype != jnp.uint8 or packed.ndim != 2 or packed.shape[1] != -(-d_out // 4):
        raise TypeError(
            f"{name}: packed must be uint8 (D_in, ceil(d_out / 4)), got {packed.dtype} ({shapes})"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 1 or x.shape[-1] != packed.shape[0]:
        raise ValueError(
            f"{name}: expected float x (..., D_in) with packed's D_in, got x {x.dtype} ({shapes})"
        )
    return x, packed


def ternary_matmul(
    x: jax.Array, packed: jax.Array, d_out: int, *, backend: str = "auto"
) -> tuple[jax.Array, jax.Array]:
    """:func:`int8_matmul` with ternary weights stored in 2 bits, four per byte: ``packed``
    ``(D_in, ceil(d_out / 4))`` uint8 of ``quantizers.pack_ternary``. The native kernel unpacks
    them once per call before oneDNN's product; XLA unpacks them in the graph
    (``quantizers.unpack_ternary``). Both give :func:`int8_matmul`'s integers on the unpacked
    codes."""
    x, packed = _ternary_operands("ternary_matmul", x, packed, d_out)
    native = _native_int8(backend, "ternary_matmul", x, (packed,), n=int(d_out))
    if native is not None:
        sums, scale = native
        return sums.reshape(*x.shape[:-1], d_out), scale.reshape(*x.shape[:-1], 1)
    return int8_matmul(x, quantizers.unpack_ternary(packed, d_out), backend="xla")
