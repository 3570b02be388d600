"""The step: the loss (cross-entropy and the distillation terms of :mod:`.distill`),
:func:`train_step` and :func:`eval_step` as pure functions of a
:class:`~addervit_jax.train.state.TrainState`, and :func:`jit_train_step`, the jitted step the
trainer runs (and ``experiments/speed_table.py`` times).

Reproducibility: the augmentation key of step ``k`` is ``fold_in(rng, k)``, so a run resumed at
step ``k`` computes exactly what the uninterrupted run computes from step ``k`` on.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from addervit_jax import data
from addervit_jax.train.distill import Teacher, distill_loss, feature_loss, inference_model
from addervit_jax.train.state import TrainState

__all__ = ["StepRecipe", "eval_step", "jit_train_step", "train_step"]


def _cross_entropy(logits, labels, smoothing):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


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
    feature_weight: float = 0.0
    feature_kernel: str = "none"

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
            # configs made before feature distillation existed: none
            feature_weight=0.0 if distill is None else distill.get("feature_weight", 0.0),
            feature_kernel="none" if distill is None else distill.get("feature_kernel", "none"),
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
    augmented images; no gradient reaches the teacher), plus ``feature_weight * feature_loss``
    where that weight is positive, and every term is logged. The model runs
    in training mode: its batch statistics (``norm="batch"`` sites) come from the global batch
    and their running averages are returned in the new state's ``rest``.
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
    features = teacher is not None and recipe.feature_weight > 0
    if teacher is not None:
        taught = jax.lax.stop_gradient(teacher(images, return_features=features))
        teacher_logits, teacher_features = taught if features else (taught, None)

    def loss_fn(params):
        # the variables of ``rest`` made anew in this trace, where the batch norms update them
        rest = jax.tree.map(lambda x: x, state.rest)
        model = nnx.merge(state.graphdef, params, rest)
        logits = model(images, return_features=features)
        if features:
            logits, student_features = logits
        loss = _cross_entropy(logits, batch["label"], recipe.label_smoothing).mean()
        terms = {"ce_loss": loss}
        if teacher is not None:
            kd = distill_loss(logits, teacher_logits, recipe.distill_temperature).mean()
            terms["distill_loss"] = kd
            loss = loss + recipe.distill_weight * kd
        if features:
            fd = feature_loss(student_features, teacher_features, recipe.feature_kernel).mean()
            terms["feature_loss"] = fd
            loss = loss + recipe.feature_weight * fd
        _, _, rest = nnx.split(model, nnx.Param, ...)  # running batch statistics, updated
        return loss, (logits, terms, rest)

    (loss, (logits, terms, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "grad_norm": optax.tree.norm(grads),
        **(terms if teacher is not None else {}),
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rest=rest)
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, info) -> dict:
    """Sums of correct predictions, loss and examples over the valid (masked) part of a batch."""
    images = data.preprocess(None, batch["image"], info, train=False)
    logits = inference_model(state.graphdef, state.params, state.rest)(images)
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
