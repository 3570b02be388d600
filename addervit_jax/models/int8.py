"""The int8 inference path of a model: its adder sites on 8-bit integers.

``Int8AdderDense`` is a trained ``layers.AdderDense`` for inference on 8-bit integers
(``ops.adder_int8_layer``), made by ``Int8AdderDense.calibrate``; ``quantize(model, batches)`` is a
trained model's int8 form, every adder site replaced by one calibrated on ``batches``. The op
itself is ``addervit_jax.adder.quantized``, reached through ``addervit_jax.ops``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from addervit_jax import ops
from addervit_jax.layers import AdderDense, similarity_scope
from addervit_jax.models import sites as sites_of


class Int8Codes(nnx.Variable):
    """The 8-bit codes of an :class:`Int8AdderDense`'s weight (not trained)."""


class Int8AdderDense(nnx.Module):
    """An :class:`AdderDense` for inference on 8-bit integers: ``ops.adder_int8_layer`` (the
    formula is there), ``y = F * N(scale * adder_int8(codes(E * x), codes(W))) + b``, the
    similarity summed in int32 on codes of ``u = E * x`` and ``W`` on one grid (``low``,
    ``scale``; :mod:`addervit_jax.adder.quantized`). ``E``, ``F``, ``b`` and the normalisation
    stay float. A ``norm="batch"`` site's normalisation, at inference an affine map per unit with
    its running statistics, is folded into ``F`` and ``b``: ``F / sqrt(var + eps)`` and
    ``b - F * mean / sqrt(var + eps)``. Make one with :meth:`calibrate`."""

    kind = "adder"

    def __init__(self, layer: AdderDense, low: float, scale: float, *, backend: str = "auto"):
        if not isinstance(layer, AdderDense):
            raise TypeError(f"Int8AdderDense: expected an AdderDense, got {type(layer).__name__}")
        if not scale > 0:
            raise ValueError(f"Int8AdderDense: scale must be positive, got {scale}")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.norm, self.backend = layer.norm, backend
        self.low = nnx.Variable(jnp.asarray(low, jnp.float32))
        self.scale = nnx.Variable(jnp.asarray(scale, jnp.float32))
        self.kernel = Int8Codes(ops.int8_codes(layer.kernel[...], low, scale))
        self.stretch, self.mask, self.bias = layer.stretch, layer.mask, layer.bias
        if layer.batch_norm is not None:
            self.mask, self.bias = _fold_batch_norm(layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        value = lambda v: None if v is None else v[...]  # noqa: E731
        with similarity_scope(self.kind):
            return ops.adder_int8_layer(
                x,
                self.kernel[...],
                low=self.low[...],
                scale=self.scale[...],
                stretch=value(self.stretch),
                mask=value(self.mask),
                bias=value(self.bias),
                norm=self.norm == "layer",
                backend=self.backend,
            )

    # The fractions of the values of u and of W left outside the grid, one candidate grid each.
    CLIP_FRACTIONS = (0.0, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2)

    @classmethod
    def calibrate(
        cls,
        layer: AdderDense,
        x: jax.Array,
        *,
        clip_fractions: tuple[float, ...] = CLIP_FRACTIONS,
        backend: str = "auto",
    ) -> Int8AdderDense:
        """The int8 form of ``layer`` whose grid makes its output on ``x`` (``(N, D_in)``
        inputs, e.g. tokens of a few training batches) closest to the float layer's.

        Each candidate grid spans ``[min(q_u(f), q_w(f)), max(q_u(1 - f), q_w(1 - f))]``, with
        ``q_u``, ``q_w`` the quantiles of ``u = E * x`` and of ``W`` and ``f`` one of
        ``clip_fractions``; the chosen one has the smallest mean squared error of the layer's
        output (after the normalisation, the mask and the bias: what the next layer sees). Minimum
        error on the output, rather than a fixed percentile, because clipping trades rounding
        error on every term against a large error on a few, and which wins depends on the layer:
        an outlier of ``W`` is used by every token, one of ``u`` by one token. The float layer
        is evaluated as at inference (a batch norm with its running statistics); ``layer`` itself
        is not changed.
        """
        if layer.batch_norm is not None and not layer.batch_norm.use_running_average:
            layer = nnx.clone(layer)
            layer.eval()
        x = jnp.asarray(x, jnp.float32).reshape(-1, layer.in_features)
        if x.shape[0] == 0:
            raise ValueError("Int8AdderDense.calibrate: x has no rows to calibrate on")
        stretch = None if layer.stretch is None else layer.stretch[...]
        u = x if stretch is None else x * stretch
        w = jnp.asarray(layer.kernel[...], jnp.float32)
        reference = layer(x)
        best = None
        for f in clip_fractions:
            low = min(jnp.quantile(u, f), jnp.quantile(w, f))
            high = max(jnp.quantile(u, 1.0 - f), jnp.quantile(w, 1.0 - f))
            scale = max(float(high - low), 1e-12) / 255  # 256 codes
            candidate = cls(layer, float(low), scale, backend=backend)
            error = float(jnp.mean((candidate(x) - reference) ** 2))
            if best is None or error < best[0]:
                best = (error, candidate)
        return best[1]


def _fold_batch_norm(layer: AdderDense) -> tuple[nnx.Variable, nnx.Variable]:
    """The per-unit gain and bias of ``layer``'s ``F * BN(y) + b`` in evaluation mode."""
    bn = layer.batch_norm
    inv_sigma = jax.lax.rsqrt(bn.var[...] + bn.epsilon)
    mask = inv_sigma if layer.mask is None else layer.mask[...] * inv_sigma
    bias = -mask * bn.mean[...] + (0.0 if layer.bias is None else layer.bias[...])
    return nnx.Variable(mask), nnx.Variable(bias)


def quantize(
    model: nnx.Module,
    batches,
    *,
    max_tokens: int = 8192,
    clip_fractions: tuple[float, ...] = Int8AdderDense.CLIP_FRACTIONS,
    backend: str = "auto",
    seed: int = 0,
) -> nnx.Module:
    """A copy of ``model`` whose adder sites (every ``AdderDense``, ``adder`` and ``adder_orig``)
    run on 8-bit integers (:class:`Int8AdderDense`), calibrated on ``batches``.

    ``batches`` is an iterable of preprocessed image arrays ``(B, H, W, C)``, e.g. a few training
    batches without augmentation; the model runs on them once, eagerly, and each site is
    calibrated (``Int8AdderDense.calibrate``) on at most ``max_tokens`` of its inputs, drawn with
    ``seed``. Sites are calibrated on the float model's activations, in evaluation mode (batch
    norms use their running statistics; the copy returned is in it too). Everything else stays as it
    is: multiplication, ``multi_ln`` and euclid sites, the LayerNorms, and the L1 attention
    scores of ``attn="l1"``/``"l1_identity"`` (products of two activations, for which a shared
    grid would have to be found per example). ``model`` itself is not changed.
    """
    model = nnx.clone(model)
    model.eval()
    sites = sites_of.linear_sites(model, (AdderDense,))
    if not sites:
        raise ValueError(f"quantize: {type(model).__name__} has no adder sites to quantise")
    recorded, _ = sites_of.record_inputs(model, [path for path, _ in sites], batches)
    rng = np.random.default_rng(seed)
    for path, layer in sites:
        x = recorded.pop(path)
        if x.shape[0] > max_tokens:
            x = x[np.sort(rng.choice(x.shape[0], max_tokens, replace=False))]
        quantized = Int8AdderDense.calibrate(
            layer, x, clip_fractions=clip_fractions, backend=backend
        )
        sites_of.replace(model, path, quantized)
    return model
