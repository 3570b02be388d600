"""The adder on 8-bit codes: ``-sum_i |qx[..., i] - qw[i, d]|`` summed exactly in int32.

An adder layer can run on integers if its input ``u = E * x`` and its weight ``W`` are coded on
one grid, one scale and one offset per layer:

    codes(v) = clip(round((v - low) / scale), 0, 255)        (uint8)
    |u - w| = scale * |codes(u) - codes(w)|  up to rounding, for u and w in [low, low + 255 scale]

The offset cancels in the difference, so the grid can sit anywhere (the calibration places it on
the values), and the sum of differences is integer: ``adder(u, W) ~= scale * adder_int8(codes(u),
codes(W))``, one multiplication per output, none per term. A scale per output channel would not
cancel: ``|u / s_u - w / s_d|`` needs a product per term. Coding ``u`` costs one multiply-add per
input element (as in every int8 network); the ``D_in x D_out`` terms of each token are integer
subtractions, absolute values and additions.

:func:`adder_int8_layer` is an int8 adder layer's whole forward, the similarity with the layer's
normalisation, gain and bias, in one pass of the native kernel (no array of codes, no array of
integer sums). :func:`adder_int8` runs on the native CPU kernel (``kernels/cpu_native.py``'s
``sad``: x86 PSADBW, 64 terms per instruction with AVX-512BW) where it builds, and on an exact
XLA loop of integer updates elsewhere. :class:`addervit_jax.models.int8.Int8AdderDense` is the layer
and :func:`addervit_jax.models.int8.quantize` the calibration of a whole model.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from addervit_jax.adder import backends
from addervit_jax.adder.op import resolve_backend, shard_rows

__all__ = ["LEVELS", "adder_int8", "adder_int8_layer", "int8_codes"]

#: the number of code values (uint8)
LEVELS = 256


def int8_codes(v: jax.Array, low: jax.Array | float, scale: jax.Array | float) -> jax.Array:
    """``clip(round((v - low) / scale), 0, 255)`` as uint8: the grid ``low + scale * k``,
    ``k = 0..255``, with values outside it clipped to its ends (round half to even)."""
    q = jnp.round((jnp.asarray(v, jnp.float32) - low) / scale)
    return jnp.clip(q, 0, LEVELS - 1).astype(jnp.uint8)


def _unsigned(q: jax.Array) -> jax.Array:
    """int8 codes as uint8 with the same differences (``q + 128``: the sign bit flipped)."""
    if q.dtype == jnp.int8:
        return lax.bitcast_convert_type(q, jnp.uint8) ^ jnp.uint8(0x80)
    return q


def adder_int8(qx: jax.Array, qw: jax.Array, *, backend: str = "auto") -> jax.Array:
    """``y[..., d] = -sum_i |qx[..., i] - qw[i, d]|`` in int32, exactly.

    Args:
      qx: ``(..., D_in)`` 8-bit codes, uint8 or int8.
      qw: ``(D_in, D_out)`` codes of the same dtype and grid.
      backend: ``"auto"`` (the native kernel on a CPU where it builds, else ``"xla"``),
        ``"cpu_native"`` or ``"xla"``; a backend without an integer kernel (``"pallas"``,
        ``"naive"``) runs ``"xla"``.

    Returns:
      ``(..., D_out)`` int32. Exact for ``D_in`` up to ``(2**31 - 1) // 255`` (8.4 million).
    """
    qx, qw = jnp.asarray(qx), jnp.asarray(qw)
    shapes = f"qx.shape={tuple(qx.shape)}, qw.shape={tuple(qw.shape)}"
    if qx.dtype not in (jnp.uint8, jnp.int8) or qw.dtype != qx.dtype:
        raise TypeError(
            f"adder_int8: qx and qw must both be uint8 or both int8, got {qx.dtype} and "
            f"{qw.dtype} ({shapes})"
        )
    if qw.ndim != 2 or qx.ndim < 1 or qx.shape[-1] != qw.shape[0]:
        raise ValueError(
            f"adder_int8: expected qx (..., D_in) and qw (D_in, D_out) with the same D_in "
            f"({shapes})"
        )
    if qw.shape[0] > (2**31 - 1) // 255:
        raise ValueError(f"adder_int8: D_in={qw.shape[0]} could overflow int32 ({shapes})")
    backend = resolve_backend(backend)
    module = backends.get(backend)
    if not hasattr(module, "sad"):
        module = backends.get("xla")
    lead, (d_in, d_out) = qx.shape[:-1], qw.shape
    rows = _unsigned(qx).reshape(-1, d_in)
    sad = partial(module.sad, negate=True)
    if module.CUSTOM_CALL:
        y = shard_rows(sad, (rows,), (_unsigned(qw),))
    else:
        y = sad(rows, _unsigned(qw))
    return y.reshape(*lead, d_out)


def adder_int8_layer(
    x: jax.Array,
    codes_w: jax.Array,
    *,
    low: jax.Array | float,
    scale: jax.Array | float,
    stretch: jax.Array | None = None,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    norm: bool = True,
    epsilon: float = 1e-5,
    backend: str = "auto",
) -> jax.Array:
    """The int8 adder layer (``models.int8.Int8AdderDense``):

        y = mask * N(scale * adder_int8(int8_codes(stretch * x, low, scale), codes_w)) + bias

    with ``N`` the layers' LayerNorm without affine parameters over the output features
    (``jax.nn.standardize``, as ``layers.AdderDense`` applies it; ``norm=False``: the identity).
    ``x`` is ``(..., D_in)`` float, ``codes_w`` ``(D_in, D_out)`` uint8 codes of the weight on
    the grid ``(low, scale)``; ``stretch`` ``(D_in,)``, ``mask`` and ``bias`` ``(D_out,)`` are
    optional (None: ones, ones, zeros). Returns float32 ``(..., D_out)``.

    On the native CPU kernel this is one pass: rows of ``x`` are coded while they are packed and
    each finished row of sums is normalised while it is still in cache. Elsewhere it is the
    composition above in XLA. The two agree up to codes that land on a rounding tie differently
    (one grid step on one term) and float32 rounding of the normalisation.
    """
    x, codes_w = jnp.asarray(x, jnp.float32), jnp.asarray(codes_w)
    if codes_w.dtype != jnp.uint8 or codes_w.ndim != 2 or x.shape[-1:] != codes_w.shape[:1]:
        raise ValueError(
            f"adder_int8_layer: expected x (..., D_in) float and codes_w (D_in, D_out) uint8, got "
            f"x.shape={tuple(x.shape)}, codes_w {codes_w.dtype}{list(codes_w.shape)}"
        )
    (d_in, d_out), lead = codes_w.shape, x.shape[:-1]
    module = backends.get(resolve_backend(backend))
    if not hasattr(module, "adder_int8_layer"):
        u = x if stretch is None else x * stretch
        y = scale * adder_int8(int8_codes(u, low, scale), codes_w, backend=backend).astype(
            jnp.float32
        )
        if norm:
            y = jax.nn.standardize(y, axis=-1, epsilon=epsilon)
        if mask is not None:
            y = y * mask
        return y if bias is None else y + bias
    ones = jnp.ones((d_out,), jnp.float32)
    shared = (
        jnp.ones((d_in,), jnp.float32) if stretch is None else stretch,
        codes_w,
        jnp.stack([jnp.asarray(low, jnp.float32), jnp.asarray(scale, jnp.float32)]),
        ones if mask is None else mask,
        jnp.zeros((d_out,), jnp.float32) if bias is None else bias,
    )

    def kernel(rows, e, w, grid, m, b):
        return module.adder_int8_layer(rows, e, w, grid, m, b, norm=norm, epsilon=epsilon)

    y = shard_rows(kernel, (x.reshape(-1, d_in),), shared)
    return y.reshape(*lead, d_out)
