"""AdderNet's adaptive learning rate as an Optax transform, and the one optimiser factory.

AdderNet (Chen et al., CVPR 2020, Sec. 3.3) scales the gradient of each adder layer ``l`` by a
local learning rate ``alpha_l = eta * sqrt(k) / ||g_l||_2`` (``k`` elements in ``g_l``), because
the full-precision adder gradients are far smaller than those of a multiplication layer and differ
from layer to layer. The *Exploration of AdderViT* study kept it (``eta = 0.2``, its "/5") and found
that removing it ("noupdtm") hurts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from addervit_jax.layers import AdderWeight

__all__ = ["adaptive_lr", "adder_weight_mask", "make_optimizer", "make_schedule"]

OPTIMIZERS = ("adamw", "sgd")


def adaptive_lr(eta: float = 0.2, eps: float = 1e-12) -> optax.GradientTransformation:
    """Scale every leaf ``g`` to ``g * eta * sqrt(g.size) / max(||g||_2, eps)``.

    Apply it to the adder weights only (see :func:`adder_weight_mask`) and before the optimiser,
    so that momentum, Adam statistics and weight decay see the rescaled gradient, as in AdderNet.
    """
    if not eta > 0:
        raise ValueError(f"adaptive_lr: eta must be positive, got {eta}")

    def update_fn(updates, state, params=None):
        del params

        def scale(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            factor = eta * math.sqrt(g.size) / jnp.maximum(norm, eps)
            return (g * factor).astype(g.dtype)

        return jax.tree.map(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def adder_weight_mask(params):
    """``True`` at every ``layers.AdderWeight`` of an ``nnx.State`` of parameters."""
    return jax.tree.map(
        lambda v: isinstance(v, AdderWeight), params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def _decay_mask(params):
    # Weight decay on matrices only (kernels, position tables), not on biases, norm scales,
    # the stretch E, the mask F or attention temperatures.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_schedule(
    *, peak: float, total_steps: int, warmup_steps: int, end_fraction: float = 0.1
) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak``, then cosine decay to ``end_fraction * peak``."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=end_fraction * peak,
    )


def make_optimizer(
    *,
    name: str,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int,
    weight_decay: float,
    momentum: float = 0.9,
    grad_clip: float = 0.0,
    adaptive: bool = True,
    eta: float = 0.2,
    adder_lr_scale: float = 1.0,
    end_fraction: float = 0.1,
) -> optax.GradientTransformation:
    """The one place the optimiser is built.

    Chain: [clip the raw gradients by global norm] -> [adaptive_lr on adder weights] -> AdamW or
    SGD with momentum (decoupled weight decay on matrices for AdamW, L2 added to the gradient for
    SGD, as AdderNet's recipe), on a warm-up + cosine schedule -> [adder weights' updates times
    ``adder_lr_scale``].

    The clip comes first: after ``adaptive_lr`` every adder leaf has norm ``eta * sqrt(size)``,
    so a clip there would see a constant, large norm and scale every parameter's gradient down on
    every step (by about 1/135 on the cifar10 config) instead of reacting to spikes.

    Under AdamW the scale that ``adaptive_lr`` gives each adder leaf is largely cancelled (Adam
    divides by the running root mean square of the same gradient); only the relative weighting
    within a step and the first steps' statistics keep an effect. With SGD it sets the step.

    ``adder_lr_scale`` multiplies the learning rate of the adder weights only (applied to the
    final updates, so that it works under Adam too). Reason for a value above 1: the adder
    weights start from N(0, 1) (AdderNet) while a Dense kernel starts at std ``1/sqrt(fan_in)``
    (0.09 at 128 inputs); Adam moves every weight by about the learning rate per step, so an
    adder weight changes ~10x less relative to its scale than a Dense weight at the same rate.
    The *Exploration of AdderViT* study went the other way (10x lower for its adder runs).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name={name!r}; expected one of {OPTIMIZERS}")
    if not adder_lr_scale > 0:
        raise ValueError(f"adder_lr_scale must be positive, got {adder_lr_scale}")
    schedule = make_schedule(
        peak=learning_rate,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        end_fraction=end_fraction,
    )
    chain = []
    if grad_clip > 0:
        chain.append(optax.clip_by_global_norm(grad_clip))
    if adaptive:
        chain.append(optax.masked(adaptive_lr(eta), adder_weight_mask))
    if name == "adamw":
        chain.append(optax.adamw(schedule, weight_decay=weight_decay, mask=_decay_mask))
    else:
        chain.append(optax.masked(optax.add_decayed_weights(weight_decay), _decay_mask))
        chain.append(optax.sgd(schedule, momentum=momentum))
    if adder_lr_scale != 1.0:
        chain.append(optax.masked(optax.scale(adder_lr_scale), adder_weight_mask))
    return optax.chain(*chain)
