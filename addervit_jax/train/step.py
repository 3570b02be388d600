"""The step: the losses (cross-entropy, logit distillation), :func:`train_step` and
:func:`eval_step` as pure functions of a :class:`~addervit_jax.train.state.TrainState`, and
:func:`jit_train_step`, the jitted step the trainer runs (and ``experiments/speed_table.py``
times).

Reproducibility: the augmentation key of step ``k`` is ``fold_in(rng, k)``, so a run resumed at
step ``k`` computes exactly what the uninterrupted run computes from step ``k`` on.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from addervit_jax import data
from addervit_jax.train.state import TrainState

__all__ = [
    "StepRecipe",
    "Teacher",
    "distill_loss",
    "eval_step",
    "jit_train_step",
    "train_step",
]


def _cross_entropy(logits, labels, smoothing):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


@struct.dataclass
class Teacher:
    """A finished run's model for knowledge distillation (``train.load_teacher``)."""

    params: nnx.State
    rest: nnx.State
    graphdef: Any = struct.field(pytree_node=False)

    def __call__(self, images):
        return nnx.merge(self.graphdef, self.params, self.rest)(images)


def distill_loss(student_logits, teacher_logits, temperature: float) -> jax.Array:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per example.

    Hinton et al., "Distilling the Knowledge in a Neural Network" (2015): the ``T^2`` keeps the
    gradient's scale independent of ``T``. PKKD (Xu et al., "Kernel Based Progressive
    Distillation for Adder Neural Networks", NeurIPS 2020) distils an AdderNet from a CNN of the
    same architecture; this is its output (logit) term, without its kernel mapping of features
    or its progressive teacher.
    """
    t = teacher_logits.astype(jnp.float32) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    kl = optax.kl_divergence(jax.nn.log_softmax(s), jax.nn.softmax(t))
    return temperature**2 * kl


@dataclasses.dataclass(frozen=True)
class StepRecipe:
    """What :func:`train_step` reads from a config: the augmentation and the loss, nothing else
    (hashable, so a jitted step is specialised on exactly these values)."""

    crop_padding: int
    flip: bool | None
    randaugment: tuple[int, int] | None
    label_smoothing: float
    distill_weight: float
    distill_temperature: float

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> StepRecipe:
        distill = config.get("distill")
        return cls(
            crop_padding=config.crop_padding,
            flip=config.flip,
            randaugment=None if config.randaugment is None else tuple(config.randaugment),
            label_smoothing=config.label_smoothing,
            distill_weight=1.0 if distill is None else distill.weight,
            distill_temperature=1.0 if distill is None else distill.temperature,
        )


def train_step(
    state: TrainState,
    batch: dict,
    teacher: Teacher | None = None,
    *,
    info: data.DatasetInfo,
    recipe: StepRecipe,
) -> tuple[TrainState, dict]:
    """One optimiser step on a (sharded) global batch of uint8 images and int labels.

    With a ``teacher`` the loss is ``cross-entropy + distill_weight * distill_loss`` (on the same
    augmented images; no gradient reaches the teacher), and both terms are logged.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    images = data.preprocess(
        key,
        batch["image"],
        info,
        train=True,
        crop_padding=recipe.crop_padding,
        flip=recipe.flip,
        randaugment=recipe.randaugment,
    )
    teacher_logits = None if teacher is None else jax.lax.stop_gradient(teacher(images))

    def loss_fn(params):
        logits = nnx.merge(state.graphdef, params, state.rest)(images)
        ce = _cross_entropy(logits, batch["label"], recipe.label_smoothing).mean()
        terms = {"ce_loss": ce}
        if teacher_logits is not None:
            kd = distill_loss(logits, teacher_logits, recipe.distill_temperature).mean()
            terms["distill_loss"] = kd
            ce = ce + recipe.distill_weight * kd
        return ce, (logits, terms)

    (loss, (logits, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "grad_norm": optax.tree.norm(grads),
        **(terms if teacher is not None else {}),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(state: TrainState, batch: dict, *, info) -> dict:
    """Sums of correct predictions, loss and examples over the valid (masked) part of a batch."""
    images = data.preprocess(None, batch["image"], info, train=False)
    logits = nnx.merge(state.graphdef, state.params, state.rest)(images)
    mask = batch["mask"].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    loss = _cross_entropy(logits, batch["label"], 0.0)
    return {
        "correct": jnp.sum(correct * mask),
        "loss": jnp.sum(loss * mask),
        "count": jnp.sum(mask),
    }


def jit_train_step(config: ml_collections.ConfigDict, state: TrainState, mesh, info):
    """The trainer's jitted step for ``config``: ``(state, batch, teacher) -> (state, metrics)``,
    the state donated and kept in its shardings (it reads only :class:`StepRecipe` of the
    config)."""
    return jax.jit(
        functools.partial(train_step, info=info, recipe=StepRecipe.from_config(config)),
        out_shardings=(jax.tree.map(lambda x: x.sharding, state), NamedSharding(mesh, P())),
        donate_argnums=0,
    )
