"""The int8 inference path of a model: every site kind that has an integer form.

* :class:`Int8AdderDense`: a trained ``layers.AdderDense`` (``adder``, ``adder_orig``) summed on
  8-bit codes of one grid per layer (``ops.adder_int8_layer``), made by
  :meth:`Int8AdderDense.calibrate`.
* :class:`Int8DenseMulti`: a multiplication site (``multi``, ``multi_ln``) as an int8 matmul:
  per-output-channel weight scales, per-token activation scales, products summed in int32.
* :class:`Int8Ternary`: a ``ternary`` site (BitNet b1.58) on its own int8 activation codes and
  ternary weight codes, the int32 sum exact, one rescale per output.

``shift`` sites (DeepShift) have no int8 form (``NO_INT8_FORM`` says why), nor ``euclid`` sites.

``quantize(model, batches)`` is a trained model's int8 form, every site of those kinds replaced
(adder sites calibrated on ``batches``), and it says, with a warning, which sites stay float;
``float_sites`` lists them. The adder op itself is ``addervit_jax.adder.quantized``, reached
through ``addervit_jax.ops``.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from addervit_jax import layers, ops, quantizers
from addervit_jax.layers import AdderDense, similarity_scope
from addervit_jax.models import sites as sites_of
from addervit_jax.models.blocks import Attention


class Int8Codes(nnx.Variable):
    """The integer codes of an int8 site's weight (not trained)."""


class Int8AdderDense(nnx.Module):
    """An :class:`AdderDense` for inference on 8-bit integers: ``ops.adder_int8_layer`` (the
    formula is there), ``y = F * N(scale * adder_int8(codes(E * x), codes(W))) + b``, the
    similarity summed in int32 on codes of ``u = E * x`` and ``W`` on one grid (``low``,
    ``scale``; :mod:`addervit_jax.adder.quantized`). ``E``, ``F``, ``b`` and the normalisation
    stay float. A ``norm="batch"`` site's normalisation, at inference an affine map per unit with
    its running statistics, is folded into ``F`` and ``b``: ``F / sqrt(var + eps)`` and
    ``b - F * mean / sqrt(var + eps)``.

    Where the grid ``[low, high]`` (``high = low + 255 * scale``) leaves weights outside, a site
    whose normalisation is per unit or none (``norm`` ``"batch"`` or ``"none"``) keeps their
    part outside exactly: for ``u`` on the grid and ``w > high``, ``|u - w| = |u - high| +
    (w - high)`` (and ``|u - low| + (low - w)`` for ``w < low``), so the codes of ``W`` are
    clipped to the grid and ``c_d = sum_i (max(w_id - high, 0) + max(low - w_id, 0))``, a
    constant per output, moves into the bias: ``b - F * c``. The grid then only has to span
    the inputs (:meth:`calibrate`). A ``norm="layer"`` site normalises over its outputs before
    ``F`` and ``b``, where a constant per output does not fold; its weights outside the grid are
    clipped. Make one with :meth:`calibrate`."""

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
        mask, bias = layer.mask, layer.bias
        if layer.batch_norm is not None:
            mask, bias = _fold_batch_norm(layer)
        if self.folds_outside(self.norm):
            outside = _outside(layer.kernel[...], low, low + (ops.INT8_LEVELS - 1) * scale)
            gain = 1.0 if mask is None else mask[...]
            shift = 0.0 if bias is None else bias[...]
            bias = nnx.Variable(jnp.asarray(shift - gain * outside, jnp.float32))
        self.stretch, self.mask, self.bias = layer.stretch, mask, bias

    @staticmethod
    def folds_outside(norm: str) -> bool:
        """Whether a site of this ``norm`` keeps the weights' part outside the grid in its bias
        (every norm but ``"layer"``)."""
        return norm != "layer"

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

    # The fractions of the values of u (and, for norm="layer", of W) left outside the grid, one
    # candidate grid each.
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

        Each candidate grid spans ``[q_u(f), q_u(1 - f)]``, with ``q_u`` the quantiles of
        ``u = E * x`` and ``f`` one of ``clip_fractions``: the weights outside it are kept exactly
        (the class docstring). A ``norm="layer"`` site, which cannot keep them, spans the weights
        too: ``[min(q_u(f), q_w(f)), max(q_u(1 - f), q_w(1 - f))]``, ``q_w`` the quantiles of
        ``W``. The chosen grid has the smallest mean squared error of the layer's output (after
        the normalisation, the mask and the bias: what the next layer sees). Minimum error on the
        output, rather than a fixed percentile, because clipping trades rounding error on every
        term against a large error on a few, and which wins depends on the layer. The float layer
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
            low, high = jnp.quantile(u, f), jnp.quantile(u, 1.0 - f)
            if not cls.folds_outside(layer.norm):  # the grid must hold W too
                low, high = min(low, jnp.quantile(w, f)), max(high, jnp.quantile(w, 1.0 - f))
            scale = max(float(high - low), 1e-12) / (ops.INT8_LEVELS - 1)
            candidate = cls(layer, float(low), scale, backend=backend)
            error = float(jnp.mean((candidate(x) - reference) ** 2))
            if best is None or error < best[0]:
                best = (error, candidate)
        return best[1]


def _outside(w: jax.Array, low: float, high: float) -> jax.Array:
    """``c_d = sum_i (max(w_id - high, 0) + max(low - w_id, 0))``: each output's weight distance
    beyond the grid ``[low, high]`` (:class:`Int8AdderDense`)."""
    w = jnp.asarray(w, jnp.float32)
    return jnp.sum(jnp.maximum(w - high, 0.0) + jnp.maximum(low - w, 0.0), axis=0)


def _fold_batch_norm(layer: nnx.Module) -> tuple[nnx.Variable, nnx.Variable]:
    """The per-unit gain and bias of ``layer``'s ``F * BN(y) + b`` in evaluation mode."""
    bn = layer.batch_norm
    inv_sigma = jax.lax.rsqrt(bn.var[...] + bn.epsilon)
    mask = inv_sigma if layer.mask is None else layer.mask[...] * inv_sigma
    bias = -mask * bn.mean[...] + (0.0 if layer.bias is None else layer.bias[...])
    return nnx.Variable(mask), nnx.Variable(bias)


class _Int8Site(nnx.Module):
    """An integer similarity on the per-token int8 codes of the input, rescaled, then the float
    layer's ``F * N(.) + b`` (a plain bias for ``Dense``): ``N`` the LayerNorm without affine
    parameters, or a batch norm folded into ``F`` and ``b`` (its running statistics, as in
    :class:`Int8AdderDense`), or none."""

    kind: str
    rms_norm_input = False  # BitNet's BitLinear normalises its input before coding it
    backend = "auto"  # of ops.int8_matmul, for int8 weights

    def _keep_affine(self, layer: nnx.Module) -> None:
        self.source_kind = site_kind(layer)  # multi_ln reads as multi in the counts' scopes
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.norm = getattr(layer, "norm", "none")
        self.mask, self.bias = getattr(layer, "mask", None), layer.bias
        if getattr(layer, "batch_norm", None) is not None:
            self.mask, self.bias = _fold_batch_norm(layer)

    def _coded_input(self, x: jax.Array) -> jax.Array:
        """What the codes are taken of: ``x``, or BitNet's ``RMSNorm(x)``."""
        h = jnp.asarray(x, jnp.float32)
        return quantizers.rms_norm(h) if self.rms_norm_input else h

    def activation_codes(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The int8 codes of the input and their per-token scale (``x ~= codes / scale``)."""
        codes, scale = quantizers.absmax_int8(self._coded_input(x))
        return codes.astype(jnp.int8), scale

    def integer_weights(self) -> jax.Array:
        """The integer weights the codes are summed against."""
        raise NotImplementedError

    def column_scale(self) -> jax.Array:
        """``(D_out,)``: what the sums of each output are multiplied by, beside ``1 / scale``."""
        raise NotImplementedError

    def _dense(self, x: jax.Array, col: jax.Array, bias: jax.Array | None) -> jax.Array:
        """``sums * col * (1 / scale) + bias`` (``ops.int8_dense`` on its ``backend``)."""
        with similarity_scope(self.kind):
            w = self.integer_weights()
            return ops.int8_dense(self._coded_input(x), w, col, bias, backend=self.backend)

    def integer_similarity(self, x: jax.Array) -> jax.Array:
        """The int32 sums of the site on ``x``, before any scale."""
        return self._products(x)[0]

    def _products(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The int32 sums of the codes of ``x`` against :meth:`integer_weights`, and the codes'
        scale (``ops.int8_matmul`` on its ``backend``)."""
        with similarity_scope(self.kind):
            w = self.integer_weights()
            return ops.int8_matmul(self._coded_input(x), w, backend=self.backend)

    def __call__(self, x: jax.Array) -> jax.Array:
        col = self.column_scale()
        bias = None if self.bias is None else self.bias[...]
        if self.norm != "layer":  # F and b fold into the product's rescale, done in the kernel
            col = col if self.mask is None else col * self.mask[...]
            return self._dense(x, col, bias)
        y = jax.nn.standardize(self._dense(x, col, None), axis=-1, epsilon=1e-5)
        if self.mask is not None:
            y = y * self.mask[...]
        return y if bias is None else y + bias


class Int8DenseMulti(_Int8Site):
    """A multiplication site (``layers.Dense``, kind ``multi``, or ``layers.NormedDense``, kind
    ``multi_ln``) as an int8 matmul, the honest int8 baseline of the multiplication-free sites:

        y = F * N((qx @ qw) * sw / s) + b

    ``qw = round(W / sw)`` with one scale per output channel, ``sw[d] = max_i |W[i, d]| / 127``,
    and ``qx``, ``s`` the per-token absmax codes and scale of the input
    (``quantizers.absmax_int8``, no calibration); the products of int8 codes are summed exactly
    in int32, and each output is rescaled by its channel's and its token's scale."""

    kind = "multi"

    def __init__(self, layer: layers.Dense | layers.NormedDense, *, backend: str = "auto"):
        self.backend = backend
        if not isinstance(layer, layers.Dense | layers.NormedDense):
            raise TypeError(
                f"Int8DenseMulti: expected a Dense or NormedDense, got {type(layer).__name__}"
            )
        self._keep_affine(layer)
        w = jnp.asarray(layer.kernel[...], jnp.float32)
        scale = jnp.maximum(jnp.max(jnp.abs(w), axis=0), 1e-12) / quantizers.ACTIVATION_LEVELS
        self.kernel = Int8Codes(jnp.round(w / scale).astype(jnp.int8))
        self.weight_scale = nnx.Variable(scale)

    def integer_weights(self):
        return self.kernel[...]

    def column_scale(self):
        return self.weight_scale[...]


class Int8Ternary(_Int8Site):
    """A ``layers.TernaryDense`` (BitNet b1.58) on integers, as the BitNet FAQ's inference code
    has it (its Figure 4): the int8 codes of ``RMSNorm(x)`` times the ternary codes of ``W``,
    summed exactly in int32, then one rescale per output by ``gamma / s`` (the weight's and the
    token's scales), then the layer's ``F * N(.) + b``. The float layer computes the same integer
    sums in float32, so the two agree to float32 rounding of the rescale.

    The codes are stored in 2 bits, four per byte (``packed``, ``quantizers.pack_ternary``): a
    quarter of their int8 size. The product is ``ops.ternary_matmul`` (the native kernel unpacks
    them once per call before oneDNN's int8 product; XLA unpacks them in the graph)."""

    kind = "ternary"
    rms_norm_input = True

    def __init__(self, layer: layers.TernaryDense, *, backend: str = "auto"):
        self.backend = backend
        if not isinstance(layer, layers.TernaryDense):
            raise TypeError(f"Int8Ternary: expected a TernaryDense, got {type(layer).__name__}")
        self._keep_affine(layer)
        codes, gamma = layer.weight_codes()
        self.packed = Int8Codes(quantizers.pack_ternary(codes))
        self.gamma = nnx.Variable(jnp.asarray(gamma, jnp.float32))

    def integer_weights(self):
        """The int8 codes, unpacked from their 2-bit storage."""
        return quantizers.unpack_ternary(self.packed[...], self.out_features)

    def _products(self, x):
        with similarity_scope(self.kind):
            h = self._coded_input(x)
            return ops.ternary_matmul(h, self.packed[...], self.out_features, backend=self.backend)

    def column_scale(self):
        return jnp.broadcast_to(self.gamma[...], (self.out_features,))

    def _dense(self, x, col, bias):
        with similarity_scope(self.kind):
            h, packed = self._coded_input(x), self.packed[...]
            return ops.ternary_dense(h, packed, self.out_features, col, bias, backend=self.backend)


#: the int8 site modules (``quantize``'s replacements of the float sites)
INT8_SITES = (Int8AdderDense, Int8DenseMulti, Int8Ternary)

#: the site kinds ``quantize`` converts (``adder`` covers ``adder_orig``, one type)
INT8_KINDS = ("adder", "multi", "multi_ln", "ternary")

#: why the other linear kinds stay float in an int8 model (``quantize`` says it)
NO_INT8_FORM = {
    "euclid": (
        "not built: sum_i (x_i - w_i)^2 = |x|^2 - 2 x.w + |w|^2 could run on the int8 product, "
        "with x's squared norm in float"
    ),
    "shift": (
        "trained shift sites use 16 exponents (2^-15..2^0 in the CIFAR-10 screen), so their "
        "integer weights sign << k need 16 bits: no int8 product holds them, an exact form needs "
        "three int8 products (about float32's time), and the int32 product the int8 form had ran "
        "2.36x float multi's time (Ice Lake, batch 256); the float shift model is the faster"
    ),
}


def site_kind(module: nnx.Module) -> str:
    """The kind of a linear site module (``multi``, ``multi_ln``, ``adder``, ``euclid``,
    ``ternary``, ``shift``; ``adder_orig`` sites are ``AdderDense`` and read ``adder``)."""
    if isinstance(module, layers.NormedDense):
        return "multi_ln"
    if isinstance(module, layers.Dense):
        return "multi"
    return module.kind


def float_sites(model: nnx.Module) -> list[tuple[str, str]]:
    """``(path, kind)`` of every similarity site of ``model`` that computes in float: linear sites
    that are not int8 and, in every attention block, the scores (``scores_dot`` or
    ``scores_l1``) and the attention-weighted values (``attention_values``), products of two
    activations, which no int8 form here covers."""
    found = [
        (".".join(map(str, path)), site_kind(module))
        for path, module in sites_of.linear_sites(model)
    ]
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Attention):
            name = ".".join(map(str, path))
            found.append((name, "scores_dot" if module.attn == "dot" else "scores_l1"))
            found.append((name, "attention_values"))
    return found


def _describe(found: list[tuple[str, str]]) -> str:
    by_kind: dict[str, list[str]] = {}
    for path, kind in found:
        by_kind.setdefault(kind, []).append(path)
    return "; ".join(
        f"{kind} x{len(paths)} ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})"
        for kind, paths in by_kind.items()
    )


def quantize(
    model: nnx.Module,
    batches,
    *,
    kinds: Collection[str] | None = None,
    max_tokens: int = 8192,
    clip_fractions: tuple[float, ...] = Int8AdderDense.CLIP_FRACTIONS,
    backend: str = "auto",
    seed: int = 0,
) -> nnx.Module:
    """A copy of ``model`` whose sites of ``kinds`` (default: every kind of ``INT8_KINDS``) run
    on integers: adder sites (``adder``, ``adder_orig``) as :class:`Int8AdderDense` calibrated on
    ``batches``, ``multi`` and ``multi_ln`` as :class:`Int8DenseMulti`, ``ternary`` as
    :class:`Int8Ternary` (which need no calibration).

    ``kinds`` is a collection of kind names (one name alone is one kind). ``batches`` is an
    iterable of preprocessed image arrays ``(B, H, W, C)``, e.g. a few training
    batches without augmentation (needed only where there are adder sites to quantise); the model
    runs on them once, eagerly, and each adder site is calibrated
    (``Int8AdderDense.calibrate``) on at most ``max_tokens`` of its inputs, drawn with ``seed``.
    Adder sites are calibrated on the float model's activations, in evaluation mode (batch norms
    use their running statistics; the copy returned is in it too).

    ``backend`` (``ops.adder``'s names) runs the adder sites' SAD and the multi and ternary
    sites' int8 product (``ops.int8_matmul``): ``"auto"`` takes the native kernels on a CPU.
    Every other similarity site stays float, and a ``UserWarning`` names them (``float_sites``
    lists them, and ``NO_INT8_FORM`` says why for euclid and shift sites): euclid and shift
    sites, sites of a kind not in ``kinds``, and in every attention block the scores (dot or L1)
    and the attention-weighted values, products of two activations (for the L1 scores a shared
    grid would have to be found per example). The LayerNorms, softmax and GELU stay float too.
    ``model`` itself is not changed.
    """
    if isinstance(kinds, str):  # one kind, not its letters
        kinds = (kinds,)
    kinds = INT8_KINDS if kinds is None else tuple(kinds)
    if not kinds:
        raise ValueError(f"quantize: kinds is empty; name at least one of {INT8_KINDS}")
    for kind in kinds:
        if kind in NO_INT8_FORM:
            raise ValueError(f"quantize: {kind} sites have no int8 form: {NO_INT8_FORM[kind]}")
    unknown = sorted(set(kinds) - set(INT8_KINDS))
    if unknown:
        raise ValueError(
            f"quantize: kinds {unknown} have no int8 form here; expected some of {INT8_KINDS}"
        )
    model = nnx.clone(model)
    model.eval()
    sites = [(p, m) for p, m in sites_of.linear_sites(model) if site_kind(m) in kinds]
    if not sites:
        raise ValueError(
            f"quantize: {type(model).__name__} has no {' / '.join(kinds)} sites to quantise"
        )
    adders = [path for path, m in sites if isinstance(m, AdderDense)]
    if adders and (batches is None or isinstance(batches, str | bytes)):
        raise ValueError(
            f"quantize: batches={batches!r}, but {len(adders)} adder sites need calibration "
            "images: pass an iterable of preprocessed image arrays (B, H, W, C)"
        )
    recorded = sites_of.record_inputs(model, adders, batches)[0] if adders else {}
    for path, x in recorded.items():
        if not np.all(np.isfinite(x)):
            raise ValueError(
                f"quantize: the calibration inputs of site {'.'.join(map(str, path))} hold NaN "
                "or infinity: the batches (or the model's weights) are not finite"
            )
    rng = np.random.default_rng(seed)
    for path, layer in sites:
        if isinstance(layer, AdderDense):
            x = recorded.pop(path)
            if x.shape[0] > max_tokens:
                x = x[np.sort(rng.choice(x.shape[0], max_tokens, replace=False))]
            quantized = Int8AdderDense.calibrate(
                layer, x, clip_fractions=clip_fractions, backend=backend
            )
        elif isinstance(layer, layers.TernaryDense):
            quantized = Int8Ternary(layer, backend=backend)
        else:
            quantized = Int8DenseMulti(layer, backend=backend)
        sites_of.replace(model, path, quantized)
    left = float_sites(model)
    formless = sorted({kind for _, kind in left if kind in NO_INT8_FORM})
    why = ""
    if formless:
        why = f" ({', '.join(formless)}: no int8 form, models.NO_INT8_FORM says why)"
    warnings.warn(
        f"quantize: these similarity sites of {type(model).__name__} stay float{why}: "
        f"{_describe(left)}",
        stacklevel=2,
    )
    return model
