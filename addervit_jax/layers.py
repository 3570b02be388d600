"""Flax NNX linear layers around the three similarity operations of ``addervit_jax.ops``.

``AdderDense`` is the layer of the *Exploration of AdderViT* study's final method,

    y = F * N(adder(E * x, W)) + b,

with ``E`` (``stretch``, shape ``(in,)``, init ones) an input stretch against the L1 distance's loss
of diversity (the study's Problem 2), ``F`` (``mask``, shape ``(out,)``, init ones) an output soft
mask, so that ``F = 0, b = 0`` makes ``x + layer(x)`` exactly the identity (its Problem 3), and
``N`` a LayerNorm without affine parameters over the output features (``norm="layer"``, the
study's), a BatchNorm without affine parameters per output unit over the batch and the tokens
(``norm="batch"``, AdderNet's), or the identity (``norm="none"``). ``W`` starts from N(0, 1), as in
AdderNet.

Why a per-unit norm: an adder output ``y_d = -sum_i |u_i - W_id|`` has a mean and a spread that
depend on the unit's template ``W[:, d]`` (a unit whose template lies far from the inputs has a
large negative mean), so the units of one token differ by offsets that a per-token norm keeps and
a per-unit norm removes. AdderNet (Chen et al., "AdderNet: Do We Really Need Multiplications in
Deep Learning?", CVPR 2020) puts a BatchNorm after every adder layer for this reason; ours has
its running statistics updated with momentum 0.9 (PyTorch's 0.1, which AdderNet's code keeps) and
is evaluated with them, as in any network with batch statistics (``model.eval()``).

The int8 form of a trained ``AdderDense`` for inference (``Int8AdderDense``) lives with the rest of
a model's int8 path in ``addervit_jax.models.int8``.

``EuclidDense`` is the same layer around ``ops.euclid``; ``Dense`` is the multiplication baseline,
with no extra normalisation, and ``NormedDense`` (kind ``multi_ln``) the multiplication with the
same normalisation, F and b, the control for it. ``TernaryDense`` (kind ``ternary``, BitNet
b1.58's layer) and ``ShiftDense`` (kind ``shift``, DeepShift-Q's) are the other
multiplication-free families at the same sites; their quantisers are
:mod:`addervit_jax.quantizers`. ``make_linear`` is the one factory the models use for every
linear site.

The adder weight ``W`` is an :class:`AdderWeight`, a subclass of ``nnx.Param``. It is the only
parameter AdderNet's adaptive learning rate applies to; select it with the NNX filter
``AdderWeight``, e.g. ``nnx.state(model, AdderWeight)``, or test ``isinstance(v, AdderWeight)``
on the variables of ``nnx.state(model, nnx.Param)``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from addervit_jax import ops, quantizers

__all__ = [
    "LINEAR_KINDS",
    "AdderDense",
    "AdderWeight",
    "Dense",
    "EuclidDense",
    "NormedDense",
    "SITE_OPTIONS",
    "ShiftDense",
    "TernaryDense",
    "make_linear",
    "offline_scope",
    "similarity_scope",
    "zero_weight_fraction",
]

LINEAR_KINDS = ("multi", "multi_ln", "adder", "adder_orig", "euclid", "ternary", "shift")
NORMS = ("layer", "batch", "none")
BATCH_NORM_MOMENTUM = 0.9  # flax's convention: running = m * running + (1 - m) * batch
DENSE_INIT = nnx.initializers.lecun_normal()  # flax's Dense default
DISTANCE_INIT = nnx.initializers.normal(stddev=1.0)  # AdderNet and the study: W ~ N(0, 1)


class AdderWeight(nnx.Param):
    """The weight ``W`` of an adder layer: what AdderNet's adaptive learning rate scales."""


def similarity_scope(kind: str):
    """Name scope that marks a similarity computation of ``kind`` for ``addervit_jax.counts``."""
    return jax.named_scope(f"similarity_{kind}")


def offline_scope():
    """Name scope of a computation on the weights alone (a quantised weight), which inference
    does once, offline: ``addervit_jax.counts`` does not count it per image."""
    return jax.named_scope("offline_weights")


class Dense(nnx.Module):
    """The multiplication baseline ``y = x @ W + b`` (``ops.dense``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        kernel_init: nnx.Initializer = DENSE_INIT,
        rngs: nnx.Rngs,
    ):
        _check_features(in_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        with similarity_scope("multi"):
            y = ops.dense(x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class _DistanceDense(nnx.Module):
    """``y = F * N(similarity(E * x, W)) + b`` for a distance-based similarity."""

    kind: str
    weight_type: type[nnx.Param] = nnx.Param

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        stretch: bool = True,
        mask: bool = True,
        norm: str = "layer",
        use_bias: bool = True,
        kernel_init: nnx.Initializer = DISTANCE_INIT,
        rngs: nnx.Rngs,
    ):
        _check_features(in_features, out_features)
        if norm not in NORMS:
            raise ValueError(
                f"{type(self).__name__}: unknown norm={norm!r}; expected one of {NORMS}"
            )
        self.in_features, self.out_features, self.norm = in_features, out_features, norm
        self.kernel = self.weight_type(kernel_init(rngs.params(), (in_features, out_features)))
        self.stretch = nnx.Param(jnp.ones((in_features,))) if stretch else None
        self.mask = nnx.Param(jnp.ones((out_features,))) if mask else None
        self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None
        # F and b are the site's own (mask, bias): the batch norm has no affine parameters
        self.batch_norm = (
            nnx.BatchNorm(
                out_features,
                momentum=BATCH_NORM_MOMENTUM,
                epsilon=_EPSILON,
                use_bias=False,
                use_scale=False,
                rngs=rngs,
            )
            if norm == "batch"
            else None
        )

    def _similarity(self, x: jax.Array, w: jax.Array, stretch: jax.Array | None) -> jax.Array:
        """``similarity(stretch * x, w)`` (``stretch`` None: no stretch)."""
        raise NotImplementedError

    def _site_similarity(self, x: jax.Array) -> jax.Array:
        stretch = None if self.stretch is None else self.stretch[...]
        with similarity_scope(self.kind):
            return self._similarity(x, self.kernel[...], stretch)

    def set_running_statistics(self, x: jax.Array) -> None:
        """``norm="batch"``: the running mean and variance set to those of this site's
        similarities on ``x`` (over every axis but the last), so that evaluation on ``x`` gives
        what a training step on ``x`` alone gives; nothing for the other norms. Conversion
        (``train.convert``) calls it on the inputs a fitted site was fitted on."""
        if self.batch_norm is None:
            return
        y = self._site_similarity(x)
        axes = tuple(range(y.ndim - 1))
        mean = jnp.mean(y, axes)
        # as nnx.BatchNorm computes a batch's variance in training (its fast variance)
        self.batch_norm.mean[...] = mean
        self.batch_norm.var[...] = jnp.maximum(jnp.mean(jnp.square(y), axes) - mean**2, 0.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self._site_similarity(x)
        mask = jnp.ones((self.out_features,)) if self.mask is None else self.mask[...]
        bias = jnp.zeros((self.out_features,)) if self.bias is None else self.bias[...]
        if self.norm == "layer":
            # Adder and euclid outputs are large negative sums of D_in distances; the study's
            # layer normalises them over the output features before the mask.
            return _normalize_affine(y, mask, bias, (-1,))
        bn = self.batch_norm
        if bn is not None and not bn.use_running_average:
            # training: nnx.BatchNorm's batch statistics and running averages, and the same
            # normalisation with the backward written out (autodiff of the norm kept three
            # tensors of the output's size per site: 1.53x multi's training memory, 1.50x its step)
            rows = tuple(range(y.ndim - 1))
            mean, variance = jax.lax.stop_gradient(_moments(y, rows))
            m = bn.momentum
            bn.mean[...] = m * bn.mean[...] + (1 - m) * mean.reshape(-1)
            bn.var[...] = m * bn.var[...] + (1 - m) * variance.reshape(-1)
            return _normalize_affine(y, mask, bias, rows)
        if bn is not None:
            y = bn(y)
        if self.mask is not None:
            y = y * self.mask[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y


_EPSILON = 1e-5


def _moments(y, axes=(-1,)):
    """The mean and the variance over ``axes``, as ``jax.nn.standardize`` and ``nnx.BatchNorm``
    compute them (their default "fast" variance, ``mean(y^2) - mean^2`` clipped at 0)."""
    mean = jnp.mean(y, axis=axes, keepdims=True)
    variance = jnp.clip(jnp.mean(jnp.square(y), axis=axes, keepdims=True) - jnp.square(mean), 0)
    return mean, variance


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize_affine(y, mask, bias, axes):
    """``mask * N(y) + bias``, N the normalisation without affine parameters over ``axes``: the
    last axis (the LayerNorm, ``norm="layer"``) or every other (the batch norm in training,
    ``norm="batch"``, over the batch and the tokens).

    The same values as ``jax.nn.standardize``; the backward is written out so that training keeps
    only ``N(y)`` and ``1 / sigma`` per site, where autodiff of the norm keeps three tensors of the
    output's size (measured: the per-site norms took most of ``qkv_2ffn``'s 2.1x the training
    memory of ``multi``)."""
    mean, variance = _moments(y, axes)
    return (
        jax.nn.standardize(y, axis=axes, mean=mean, variance=variance, epsilon=_EPSILON) * mask
        + bias
    )


def _normalize_affine_fwd(y, mask, bias, axes):
    mean, variance = _moments(y, axes)
    z = jax.nn.standardize(y, axis=axes, mean=mean, variance=variance, epsilon=_EPSILON)
    # The barrier keeps the residuals as they are: without it XLA:CPU merged the backward's
    # broadcasts of 1 / sigma and of the mask with the forward's and kept them at full size.
    residuals = jax.lax.optimization_barrier((z, jax.lax.rsqrt(variance + _EPSILON), mask))
    return z * mask + bias, residuals


def _normalize_affine_bwd(axes, residuals, g):
    z, inv_sigma, mask = residuals
    rows = tuple(range(g.ndim - 1))
    dz = g * mask
    # d/dy of (y - mean) / sigma: (dz - mean(dz) - z * mean(dz * z)) / sigma, means over axes
    dy = inv_sigma * (
        dz - jnp.mean(dz, axis=axes, keepdims=True) - z * jnp.mean(dz * z, axis=axes, keepdims=True)
    )
    return dy, jnp.sum(g * z, axis=rows).astype(mask.dtype), jnp.sum(g, axis=rows)


_normalize_affine.defvjp(_normalize_affine_fwd, _normalize_affine_bwd)


class AdderDense(_DistanceDense):
    """``y = F * N(adder(E * x, W)) + b``. How the op runs is one ``ops.AdderOptions``
    (``options``, default ``AdderOptions()``); ``grad``, ``clip_scale``, ``backend`` and
    ``interpret``, when given, replace its fields. E goes to the op too."""

    kind = "adder"
    weight_type = AdderWeight

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        grad: str | None = None,
        clip_scale: float | None = None,
        backend: str | None = None,
        interpret: bool | None = None,
        options: ops.AdderOptions | None = None,
        **kwargs: Any,
    ):
        options = ops.AdderOptions.of(
            options, grad=grad, clip_scale=clip_scale, backend=backend, interpret=interpret
        )
        super().__init__(in_features, out_features, **kwargs)
        self.options = options

    def _similarity(self, x, w, stretch):
        # E goes into the op, whose kernels fuse it into their loads
        return ops.adder(x, w, stretch=stretch, options=self.options)


class EuclidDense(_DistanceDense):
    """``y = F * N(euclid(E * x, W)) + b`` (exact gradients)."""

    kind = "euclid"

    def _similarity(self, x, w, stretch):
        return ops.euclid(x if stretch is None else x * stretch, w)


class NormedDense(_DistanceDense):
    """``y = F * N(x @ W) + b``: a multiplication site with the distance sites' normalisation,
    gain F and bias b (kind ``multi_ln``), the control that makes "adder vs multiplication"
    compare the similarity alone. It has no stretch E: for a dot product ``(E * x) @ W`` is
    ``x @ (diag(E) W)``, which ``W`` already expresses. ``W`` starts like ``Dense``'s."""

    kind = "multi"  # a dot product, for the operation counts of addervit_jax.counts

    def __init__(self, in_features, out_features, *, kernel_init=DENSE_INIT, **kwargs):
        super().__init__(
            in_features, out_features, stretch=False, kernel_init=kernel_init, **kwargs
        )

    def _similarity(self, x, w, stretch):
        del stretch
        return ops.dense(x, w)


class TernaryDense(_DistanceDense):
    """BitNet b1.58's BitLinear (kind ``ternary``): ternary weights with one scale per matrix and
    8-bit activations with one scale per token,

        y = (codes(RMSNorm(x)) @ ternary(W)) * gamma / s + b,

    ``codes``/``s`` the per-token absmax 8-bit codes and their scale
    (``quantizers.absmax_int8``), ``ternary``/``gamma`` the absmean codes in {-1, 0, 1} and their
    scale (``quantizers.absmean_ternary``), with straight-through gradients: d/dx is that of
    ``RMSNorm(x)`` applied to ``g @ (gamma * ternary(W))^T`` and d/dW is
    ``(codes / s)^T g``, as the BitNet team's ``x + (quant(x) - x).detach()`` gives (Ma, Wang,
    Wei, "The Era of 1-bit LLMs: Training Tips, Code and FAQ", 2024, Figure 3). The product sums
    integers (exact in float32 below 2^24 per output), so the int8 form
    (``models.int8.Int8Ternary``) computes the same numbers in int32; the scales are applied
    after it, once per output, as the FAQ's inference code does (its Figure 4).

    The normalisation before the quantisation: the FAQ's BitLinear normalises its own input
    (``RMSNorm``), replacing LLaMA's RMSNorm before attention and the FFN. Our blocks keep their
    pre-LayerNorm (SimpleViT's, shared with every other kind), and each ternary site normalises
    its input again with a parameter-free RMSNorm, as BitLinear does (so the FFN's second layer,
    after GELU, is normalised too: the FAQ notes the activations before the down projection are
    the hardest to quantise). Our reading: the FAQ does not say whether that RMSNorm has a gain;
    we give it none (vLLM's BitNet layer applies the same parameter-free RMSNorm before each
    linear layer), since the block's LayerNorm before q/k/v and the first FFN layer has one.
    A per-token absmax quantiser is blind to a per-token scale, so the RMSNorm changes no code:
    its effect is to make the output independent of each token's scale.

    No per-site output normalisation by default (``norm="none"``, no ``mask``): BitLinear has
    none, so the site is the paper's; ``norm``, ``mask`` and ``use_bias`` are honoured as at the
    distance sites, for a study that wants the same ``F * N(.) + b`` there. ``W`` starts like
    ``Dense``'s (the absmean codes do not depend on its scale). BitNet has no biases; our sites
    keep ``b`` where the model gives one (q/k/v of every non-``multi`` kind), like the adder's.
    """

    kind = "ternary"

    def __init__(
        self, in_features, out_features, *, kernel_init=DENSE_INIT, mask=False, norm="none", **kw
    ):
        super().__init__(
            in_features,
            out_features,
            stretch=False,
            mask=mask,
            norm=norm,
            kernel_init=kernel_init,
            **kw,
        )

    def weight_codes(self) -> tuple[jax.Array, jax.Array]:
        """The ternary codes of ``W`` and their scale ``gamma`` (``W ~= gamma * codes``)."""
        with offline_scope():
            return quantizers.absmean_ternary(self.kernel[...])

    def zero_fraction(self) -> float:
        """The fraction of ``W``'s ternary codes that are 0 (terms an adder tree can skip)."""
        return float(jnp.mean(self.weight_codes()[0] == 0))

    def _similarity(self, x, w, stretch):
        del stretch
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # bfloat16 in: code in float32
        codes_x, scale = quantizers.absmax_int8(quantizers.rms_norm(x))
        with offline_scope():
            codes_w, gamma = quantizers.absmean_ternary(w)
        return ops.dense(codes_x, codes_w) * (gamma / scale)


class ShiftDense(_DistanceDense):
    """DeepShift-Q's linear layer (kind ``shift``): ``y = x @ P(W) + b`` with power-of-two
    weights ``P(W) = sign(W) * 2^p``, ``p = clip(round(log2|W|), low, high)``
    (``quantizers.power_of_two``), float activations, and the straight-through gradient of
    DeepShift's ``RoundPowerOf2``: d/dW = ``x^T g`` and d/dx = ``g @ P(W)^T`` (Elhoushi et al.,
    "DeepShift: Towards Multiplication-Less Neural Networks", CVPR Workshops 2021; their code's
    ``LinearShiftQ``). Each term is a shift of ``x_i`` by ``p`` (for a float, an addition to its
    exponent) and a sign; the sum is additions.

    ``weight_bits`` (DeepShift's ``-wb``, default 5) gives the exponent range
    ``(-(2^(bits - 1) - 1), 0)``, one bit being the sign: ``(-15, 0)`` by default. Where we
    depart: DeepShift clamps the latent weights themselves into ``[2^low, 2^high]`` before each
    forward (an in-place change outside the optimiser); we clip the exponent, which gives the
    same forward, and leave the latent weights where the optimiser puts them. DeepShift-Q also
    rounds activations to 16.16-bit fixed point, which at our activations' range is float
    precision; we keep them float. No per-site output normalisation by default, as in DeepShift
    (``norm``, ``mask``, ``use_bias`` honoured as at the distance sites). ``W`` starts like
    ``Dense``'s.
    """

    kind = "shift"

    def __init__(
        self,
        in_features,
        out_features,
        *,
        weight_bits: int = 5,
        kernel_init=DENSE_INIT,
        mask=False,
        norm="none",
        **kw,
    ):
        if isinstance(weight_bits, bool) or not isinstance(weight_bits, int) or weight_bits < 2:
            raise ValueError(
                f"ShiftDense: weight_bits must be an int >= 2 (a sign and an exponent), got "
                f"{weight_bits!r}"
            )
        if weight_bits > 7:  # exponents down to -63 stay normal float32 numbers
            raise ValueError(f"ShiftDense: weight_bits={weight_bits} > 7 is not supported")
        super().__init__(
            in_features,
            out_features,
            stretch=False,
            mask=mask,
            norm=norm,
            kernel_init=kernel_init,
            **kw,
        )
        self.shift_range = (-(2 ** (weight_bits - 1) - 1), 0)

    def weight(self) -> jax.Array:
        """The power-of-two weight ``P(W)``."""
        with offline_scope():
            return quantizers.power_of_two(self.kernel[...], self.shift_range)

    def _similarity(self, x, w, stretch):
        del stretch
        with offline_scope():
            w = quantizers.power_of_two(w, self.shift_range)
        return ops.dense(x, w)


def zero_weight_fraction(model: nnx.Module) -> float:
    """The fraction of the ternary weights of ``model`` (every ``TernaryDense``) that are 0,
    weighted by the layers' sizes: the ``zero_weights={"ternary": ...}`` of
    ``counts.count_ops`` (exact where every ternary site sees the same number of tokens, as
    SimpleViT's block sites do). 0.0 for a model without ternary sites."""
    sizes, zeros = 0, 0.0
    for _, module in nnx.iter_modules(model):
        if isinstance(module, TernaryDense):
            size = module.in_features * module.out_features
            sizes += size
            zeros += size * module.zero_fraction()
    return zeros / sizes if sizes else 0.0


# The options each kind of site honours. An option given to a site whose kind does not honour
# it raises: a study that sets it must not silently train a different model than it says.
SITE_OPTIONS = {
    "multi": frozenset({"use_bias", "kernel_init"}),
    "multi_ln": frozenset({"mask", "norm", "use_bias", "kernel_init"}),
    "adder": frozenset(
        {
            "options",
            "grad",
            "clip_scale",
            "backend",
            "interpret",
            "stretch",
            "mask",
            "norm",
            "use_bias",
            "kernel_init",
        }
    ),
    "adder_orig": frozenset({"options", "backend", "interpret", "norm", "use_bias", "kernel_init"}),
    "euclid": frozenset({"stretch", "mask", "norm", "use_bias", "kernel_init"}),
    "ternary": frozenset({"mask", "norm", "use_bias", "kernel_init"}),
    "shift": frozenset({"weight_bits", "mask", "norm", "use_bias", "kernel_init"}),
}


def make_linear(kind: str, in_features: int, out_features: int, *, rngs: nnx.Rngs, **opts):
    """The one factory for linear sites: ``kind`` in ``multi | multi_ln | adder | adder_orig |
    euclid | ternary | shift``.

    ``multi_ln`` is :class:`NormedDense`, ``ternary`` :class:`TernaryDense` (BitNet b1.58) and
    ``shift`` :class:`ShiftDense` (DeepShift-Q). ``adder_orig`` is AdderNet's original layer
    (Chen et al., CVPR 2020): ``grad="addernet"``, no stretch E, and the normalisation with a
    learnable gain F and bias b, which AdderNet had as the batch norm after every adder layer;
    of an ``options`` value it takes the backend and ``interpret``, its rule being AdderNet's.
    An option that ``kind`` does not honour (see ``SITE_OPTIONS``: ``grad`` at a ``multi`` or an
    ``adder_orig`` site) raises ``TypeError`` naming the option and the kind.
    """
    if kind not in LINEAR_KINDS:
        raise ValueError(f"make_linear: unknown kind={kind!r}; expected one of {LINEAR_KINDS}")
    ignored = sorted(set(opts) - SITE_OPTIONS[kind])
    if ignored:
        raise TypeError(
            f"make_linear: a {kind!r} site does not honour option(s) {ignored}; it takes "
            f"{sorted(SITE_OPTIONS[kind])}"
        )
    if kind == "multi":
        return Dense(in_features, out_features, rngs=rngs, **opts)
    if kind == "multi_ln":
        return NormedDense(in_features, out_features, rngs=rngs, **opts)
    if kind == "adder":
        return AdderDense(in_features, out_features, rngs=rngs, **opts)
    if kind == "adder_orig":
        options = ops.AdderOptions.of(opts.pop("options", None), grad="addernet")
        return AdderDense(
            in_features, out_features, options=options, stretch=False, mask=True, rngs=rngs, **opts
        )
    if kind == "ternary":
        return TernaryDense(in_features, out_features, rngs=rngs, **opts)
    if kind == "shift":
        return ShiftDense(in_features, out_features, rngs=rngs, **opts)
    return EuclidDense(in_features, out_features, rngs=rngs, **opts)


def _check_features(in_features, out_features) -> None:
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
