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

:func:`adder_int8` runs on the native CPU kernel (``kernels/cpu_native.py``'s ``sad``: x86
PSADBW, 64 terms per instruction with AVX-512BW) where it builds, and on an exact XLA loop of
integer updates elsewhere. :class:`addervit_jax.layers.Int8AdderDense` is the layer and
:func:`addervit_jax.models.quantize` the calibration of a whole model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from addervit_jax.adder import backends
from addervit_jax.adder.op import resolve_backend, shard_rows

__all__ = ["LEVELS", "adder_int8", "int8_codes"]

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
    if module.CUSTOM_CALL:
        distance = shard_rows(module.sad, (rows,), (_unsigned(qw),))
    else:
        distance = module.sad(rows, _unsigned(qw))
    return (-distance).reshape(*lead, d_out)
