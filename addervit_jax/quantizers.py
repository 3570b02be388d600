"""The quantisers of the other multiplication-free families, each with its straight-through
gradient: BitNet b1.58's ternary weights and 8-bit activations, and DeepShift's powers of two.

* :func:`absmax_int8`: per-token absmax quantisation of activations to 8 bits, ``codes =
  clip(round(x * 127 / max|x|), -128, 127)`` with ``scale = 127 / max(max|x|, 1e-5)`` per
  token (the last axis), as in the BitNet team's training code (Ma, Wang, Wei, "The Era of 1-bit
  LLMs: Training Tips, Code and FAQ", 2024, Figure 3, ``activation_quant``).
* :func:`absmean_ternary`: BitNet b1.58's absmean quantisation of a weight matrix (Ma et al.,
  "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits", arXiv 2402.17764, 2024,
  eqs. 1-3), ``codes = clip(round(W / gamma), -1, 1)`` with one ``gamma = max(mean|W|, 1e-5)``
  per matrix (the FAQ's ``weight_quant``; the paper writes ``W / (gamma + eps)``).
* :func:`power_of_two`: DeepShift-Q's weights (Elhoushi et al., "DeepShift: Towards
  Multiplication-Less Neural Networks", CVPR Workshops 2021), ``sign(W) * 2^p`` with
  ``p = clip(round(log2|W|), low, high)``; DeepShift's code (``deepshift/modules_q.py``,
  ``LinearShiftQ``) takes ``(low, high) = (-(2^(bits-1) - 1), 0)`` for ``bits``-bit weights, 5
  by default: ``(-15, 0)``.
* :func:`pack_ternary` / :func:`unpack_ternary`: ternary codes stored in 2 bits, four per byte
  (the storage of ``models.Int8Ternary``; bitnet.cpp's I2_S format also packs four per byte, as
  recalled, though its byte layout is its own).
* :func:`rms_norm`: the parameter-free RMSNorm that BitNet's BitLinear applies before the
  activation quantisation.

Straight-through gradients: the rounding and the clipping pass the gradient unchanged
(:func:`round_clip_ste`) and the scales (``127 / max|x|``, ``gamma``) are constants of the
backward, which is what BitNet's ``x + (quant(x) - x).detach()`` and DeepShift's
``RoundPowerOf2`` (backward: the identity) compute. Written as a ``custom_jvp`` rather than as
``x + stop_gradient(q - x)``, so that the forward returns ``q`` itself (exact integers) and costs
no extra additions in ``addervit_jax.counts``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "ACTIVATION_LEVELS",
    "SHIFT_RANGE",
    "absmax_int8",
    "absmean_ternary",
    "pack_ternary",
    "unpack_ternary",
    "exact_power_of_two",
    "power_of_two",
    "power_of_two_codes",
    "rms_norm",
    "round_clip_ste",
]

#: the largest activation code: ``x * 127 / max|x|`` lands in [-127, 127] (the BitNet FAQ's
#: ``activation_quant``; its clip to [-128, 127] never binds)
ACTIVATION_LEVELS = 127
#: the exponent range of DeepShift's default 5-bit weights (one bit is the sign)
SHIFT_RANGE = (-15, 0)
_SCALE_EPS = 1e-5  # the FAQ's clamp_(min=1e-5) of max|x| and of mean|W|
_RMS_EPS = 1e-6  # LLaMA's RMSNorm epsilon, which BitLinear's built-in norm replaces


@partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def round_clip_ste(z: jax.Array, low: float, high: float) -> jax.Array:
    """``clip(round(z), low, high)`` (round half to even) with the straight-through gradient:
    the derivative is 1 everywhere, the clipped values included."""
    return jnp.clip(jnp.round(z), low, high)


@round_clip_ste.defjvp
def _round_clip_ste_jvp(low, high, primals, tangents):
    (z,), (dz,) = primals, tangents
    return round_clip_ste(z, low, high), dz


def rms_norm(x: jax.Array, epsilon: float = _RMS_EPS) -> jax.Array:
    """``x / sqrt(mean(x^2) + epsilon)`` over the last axis, without parameters (exact
    gradients)."""
    return x * lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + epsilon)


def absmax_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token 8-bit codes of ``x`` and their scale: ``(codes, scale)`` with
    ``codes = clip(round(x * scale), -128, 127)`` (integer-valued, ``x``'s dtype) and
    ``scale = 127 / max(max|x|, 1e-5)`` over the last axis (shape ``(..., 1)``), so that
    ``x ~= codes / scale``. The gradient of ``codes`` is ``scale`` times that of ``x`` (straight
    through the rounding; the scale is a constant of the backward)."""
    peak = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = lax.stop_gradient(ACTIVATION_LEVELS / jnp.maximum(peak, _SCALE_EPS))
    return round_clip_ste(x * scale, -ACTIVATION_LEVELS - 1, ACTIVATION_LEVELS), scale


def absmean_ternary(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """BitNet b1.58's ternary codes of a weight matrix and its scale: ``(codes, gamma)`` with
    ``codes = clip(round(w / gamma), -1, 1)`` and one ``gamma = max(mean|w|, 1e-5)``, so that
    ``w ~= gamma * codes``. The gradient of ``codes`` is that of ``w / gamma`` (straight through;
    ``gamma`` a constant of the backward)."""
    gamma = lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(w)), _SCALE_EPS))
    return round_clip_ste(w / gamma, -1, 1), gamma


def pack_ternary(codes: jax.Array) -> jax.Array:
    """Ternary codes ``(K, N)`` in {-1, 0, 1} as ``(K, ceil(N / 4))`` uint8, four per byte: code
    ``c`` of column ``4 j + i`` is the 2-bit field ``c + 1`` at bits ``2 i`` of byte ``j`` (columns
    past ``N`` hold 1, a zero weight). Codes outside {-1, 0, 1}: ``ValueError``."""
    codes = jnp.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"pack_ternary: expected codes (K, N), got shape {tuple(codes.shape)}")
    if not bool(jnp.all((codes == -1) | (codes == 0) | (codes == 1))):
        raise ValueError("pack_ternary: the codes must all be -1, 0 or 1")
    k, n = codes.shape
    padded = jnp.pad(codes.astype(jnp.int32) + 1, ((0, 0), (0, -n % 4)), constant_values=1)
    fields = padded.reshape(k, -1, 4) << jnp.arange(0, 8, 2, dtype=jnp.int32)
    return jnp.sum(fields, axis=-1).astype(jnp.uint8)


def unpack_ternary(packed: jax.Array, n: int) -> jax.Array:
    """The int8 codes ``(K, n)`` of :func:`pack_ternary`'s bytes ``(K, ceil(n / 4))``."""
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8 or packed.ndim != 2 or packed.shape[1] != -(-n // 4):
        raise ValueError(
            f"unpack_ternary: expected uint8 (K, ceil({n} / 4)) bytes, got {packed.dtype} "
            f"{tuple(packed.shape)}"
        )
    fields = (packed[:, :, None].astype(jnp.int32) >> jnp.arange(0, 8, 2, dtype=jnp.int32)) & 3
    return (fields.reshape(packed.shape[0], -1)[:, :n] - 1).astype(jnp.int8)


def power_of_two_codes(
    w: jax.Array, shift_range: tuple[int, int] = SHIFT_RANGE
) -> tuple[jax.Array, jax.Array]:
    """DeepShift's ``(sign, exponent)`` of ``w``: ``sign(w)`` in {-1, 0, 1} and
    ``clip(round(log2|w|), *shift_range)`` (a zero weight has sign 0 and the lowest exponent).
    No gradient (see :func:`power_of_two`)."""
    low, high = shift_range
    magnitude = jnp.abs(w)
    # log2 of a zero weight is -inf; its sign is 0, so any exponent gives the weight 0
    safe = jnp.where(magnitude > 0, magnitude, 2.0**low)
    return jnp.sign(w), jnp.clip(jnp.round(jnp.log2(safe)), low, high)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def power_of_two(w: jax.Array, shift_range: tuple[int, int] = SHIFT_RANGE) -> jax.Array:
    """DeepShift-Q's weight ``sign(w) * 2^p``, ``p = clip(round(log2|w|), *shift_range)``, with
    the straight-through gradient (the identity, DeepShift's ``RoundPowerOf2``)."""
    sign, exponent = power_of_two_codes(w, shift_range)
    return sign * exact_power_of_two(exponent).astype(sign.dtype)


def exact_power_of_two(exponent: jax.Array) -> jax.Array:
    """``2^exponent`` in float32, exactly (its bit pattern; ``jnp.exp2`` is an approximation),
    for integer-valued exponents in float32's normal range [-126, 127]."""
    biased = jnp.asarray(exponent).astype(jnp.int32) + 127
    return lax.bitcast_convert_type(jnp.left_shift(biased, 23), jnp.float32)


@power_of_two.defjvp
def _power_of_two_jvp(shift_range, primals, tangents):
    (w,), (dw,) = primals, tangents
    return power_of_two(w, shift_range), dw
