"""The training state and where it lives: :class:`TrainState`, its creation from a config, and
its placement on the 1-D ``data`` mesh (data parallel, FSDP-style parameter sharding by config).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from addervit_jax import models, optim
from addervit_jax.train.config import model_overrides, uses_adaptive_lr

__all__ = ["TrainState", "create_train_state", "global_batch", "make_mesh", "shard_state"]


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: Any
    rng: jax.Array  # raw uint32 key data of the run's base key
    rest: nnx.State  # non-trainable variables (e.g. a fixed attention temperature)
    graphdef: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def create_train_state(config, *, total_steps: int, steps_per_epoch: int) -> TrainState:
    model = models.build(config.variant, rngs=nnx.Rngs(config.seed), **model_overrides(config))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optim.make_optimizer(
        name=config.optimizer,
        learning_rate=config.learning_rate,
        total_steps=total_steps,
        warmup_steps=int(config.warmup_epochs * steps_per_epoch),
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        grad_clip=config.grad_clip,
        adaptive=uses_adaptive_lr(config),
        eta=config.adaptive_eta,
        adder_lr_scale=config.get("adder_lr_scale", 1.0),  # runs made before it existed: 1
        end_fraction=config.end_lr_fraction,
    )
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(config.seed)),
        graphdef=graphdef,
        rest=rest,
        tx=tx,
    )


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D ``data`` mesh over every device of every process.

    Auto axes: XLA propagates the shardings of the batch and the parameters through the step
    (JAX 0.10's ``make_mesh`` would otherwise make them explicit, typed shardings).
    """
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _param_sharding(mesh, x, fsdp: bool):
    """FSDP-style: split the largest axis divisible by the mesh size; otherwise replicate."""
    if not fsdp or not hasattr(x, "shape") or x.ndim == 0:
        return NamedSharding(mesh, P())
    size = mesh.shape["data"]
    axes = [a for a in np.argsort(x.shape)[::-1] if x.shape[a] % size == 0 and x.shape[a] >= size]
    if not axes:
        return NamedSharding(mesh, P())
    spec = [None] * x.ndim
    spec[axes[0]] = "data"
    return NamedSharding(mesh, P(*spec))


def shard_state(state: TrainState, mesh, fsdp: bool) -> TrainState:
    shardings = jax.tree.map(lambda x: _param_sharding(mesh, x, fsdp), state)
    return jax.device_put(state, shardings)


def global_batch(batch: dict, mesh) -> dict:
    """Host batch (identical on every process) -> arrays split over the ``data`` axis."""
    sharding = NamedSharding(mesh, P("data"))
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    rows = next(iter(batch.values())).shape[0] // jax.process_count()
    start = jax.process_index() * rows
    return {
        k: jax.make_array_from_process_local_data(sharding, v[start : start + rows], v.shape)
        for k, v in batch.items()
    }
