"""The one trainer: a jitted train step over a device mesh, Orbax checkpoints, logs and plots.

``train(config, workdir, resume=False)`` trains any named variant on any dataset of
``addervit_jax.data`` on one CPU, one GPU, or many devices and hosts. ``train_step`` and
``eval_step`` are pure functions of a :class:`TrainState`, which tests call directly.

Reproducibility: the data order is a function of ``(seed, step)`` and the augmentation key of
``fold_in(rng, step)``, so a run resumed from a checkpoint at step ``k`` computes exactly what the
uninterrupted run computes from step ``k`` on (bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import itertools
import json
import math
import os
import pathlib
import signal
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, serialization, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from addervit_jax import data, models, optim, timing

__all__ = [
    "RunDirectoryBusy",
    "StepRecipe",
    "TrainState",
    "TrainingDiverged",
    "Teacher",
    "create_train_state",
    "distill_loss",
    "eval_step",
    "evaluate",
    "evaluate_workdir",
    "load_params",
    "load_teacher",
    "restore",
    "save_params",
    "train",
    "train_step",
    "validate_config",
]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: Any
    rng: jax.Array  # raw uint32 key data of the run's base key
    rest: nnx.State  # non-trainable variables (e.g. a fixed attention temperature)
    graphdef: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def model_overrides(config: ml_collections.ConfigDict) -> dict:
    """``models.build`` overrides: ``config.model`` plus the dataset's image size and classes."""
    height, _, channels = data.DATASETS[config.dataset].image_shape
    overrides = {
        "image_size": height,
        "channels": channels,
        "num_classes": data.DATASETS[config.dataset].num_classes,
    }
    overrides.update(dict(config.model) if config.get("model") else {})
    return overrides


def uses_adaptive_lr(config) -> bool:
    if config.get("adaptive_lr") is not None:
        return bool(config.adaptive_lr)
    return models.VARIANTS[config.variant].adaptive_lr


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fail before any compute on an impossible configuration, naming the fields."""
    problems = []
    if config.variant not in models.VARIANTS:
        problems.append(f"variant={config.variant!r} (known: {sorted(models.VARIANTS)})")
    if config.dataset not in data.DATASETS:
        problems.append(f"dataset={config.dataset!r} (known: {sorted(data.DATASETS)})")
    if config.optimizer not in optim.OPTIMIZERS:
        problems.append(f"optimizer={config.optimizer!r} (known: {optim.OPTIMIZERS})")
    for field in ("batch_size", "num_epochs", "log_every_steps", "keep_checkpoints"):
        if not config[field] > 0:
            problems.append(f"{field}={config[field]} must be positive")
    for field in ("total_steps", "eval_every_steps", "checkpoint_every_steps"):
        if config.get(field, 0) < 0:
            problems.append(f"{field}={config[field]} must be 0 (the default) or positive")
    if not config.learning_rate > 0:
        problems.append(f"learning_rate={config.learning_rate} must be positive")
    if config.batch_size % jax.device_count():
        problems.append(
            f"batch_size={config.batch_size} must be divisible by the {jax.device_count()} "
            "devices of the data-parallel mesh"
        )
    distill = config.get("distill")
    if distill is not None and distill.teacher is not None:
        if not distill.weight > 0:
            problems.append(f"distill.weight={distill.weight} must be positive with a teacher")
        if not distill.temperature > 0:
            problems.append(f"distill.temperature={distill.temperature} must be positive")
    if not config.get("adder_lr_scale", 1.0) > 0:
        problems.append(f"adder_lr_scale={config.adder_lr_scale} must be positive")
    if config.randaugment is not None and len(tuple(config.randaugment)) != 2:
        problems.append(f"randaugment={config.randaugment} must be (num_ops, magnitude) or None")
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))
    try:
        models.config(config.variant, **model_overrides(config))
    except (ValueError, TypeError) as err:
        raise ValueError(f"invalid config: model: {err}") from err


# ---------------------------------------------------------------------------------------------
# State, steps
# ---------------------------------------------------------------------------------------------


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


def _cross_entropy(logits, labels, smoothing):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


@struct.dataclass
class Teacher:
    """A finished run's model for knowledge distillation (:func:`load_teacher`)."""

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


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _flat(tree) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="."): x for path, x in leaves}


def _unflat(template, flat: dict[str, Any]):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = [jax.tree_util.keystr(path, simple=True, separator=".") for path, _ in leaves]
    return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in keys])


_CHECKPOINTED = ("step", "params", "opt_state", "rng")


def _checkpointed(state: TrainState) -> dict:
    """The parts of a state a checkpoint holds, saved by Orbax as they are (the NNX states
    included); the rest is rebuilt from the config."""
    return {name: getattr(state, name) for name in _CHECKPOINTED}


def _flat_layout(state: TrainState) -> dict[str, Any]:
    """Checkpoints written before the ``"layout": "tree"`` metadata saved the tuple (step, params,
    opt_state, rng) flattened into a dict of dotted names; they still restore."""
    return _flat(tuple(getattr(state, name) for name in _CHECKPOINTED))


def _digest(flat: dict[str, Any]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a tree's arrays, in name order."""
    h = hashlib.sha256()
    for name in sorted(flat):
        a = np.ascontiguousarray(_host(flat[name]))
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class Checkpoints:
    """Orbax checkpoints of (params, optimiser state, step, rng) plus the data position, which is
    the step: the batch order is a function of (seed, step).

    When to save is Orbax's decision (:meth:`should_save`): every ``every`` steps, and at a
    preemption sync point of a multi-process run (JAX's preemption service; every process reaches
    it at the same step, so every process joins the save). The loop also saves at the end and on
    a signal to a single process, with :meth:`save`.

    Each checkpoint's metadata holds a sha256 of the arrays it saved, verified on restore: a
    checkpoint whose files were damaged is skipped like one that does not load; when a run resumes
    from an older one, the newer ones that did not restore are moved aside
    (:meth:`set_aside_broken`), so the resumed run writes those steps again.
    """

    def __init__(self, directory: pathlib.Path, *, keep: int, every: int = 1):
        policies = ocp.checkpoint_managers
        self.manager = ocp.CheckpointManager(
            directory.absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                save_decision_policy=policies.AnySavePolicy(
                    [
                        policies.FixedIntervalPolicy(every),
                        policies.PreemptionCheckpointingPolicy(),
                    ]
                ),
            ),
        )
        self.directory = directory  # as given, for messages
        self.good: set[int] = set()  # steps written or verified by this process
        self.broken: list[int] = []  # steps that did not restore, newest first

    def should_save(self, step: int) -> bool:
        """Whether the run should save after ``step`` steps (collective in a multi-process run:
        every process calls it at every step)."""
        return self.manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def save(self, state: TrainState, **extra) -> None:
        """Save ``state`` now; ``extra`` (JSON values) goes into the checkpoint's metadata."""
        step = int(state.step)
        if step in self.good:
            return
        tree = _checkpointed(state)
        meta = {
            "step": step,
            "data_position": step,
            "layout": "tree",
            "sha256": _digest(_flat(tree)),
            **extra,
        }
        if step in self.manager.all_steps():  # a damaged one, not deleted: replace it
            self.manager.wait_until_finished()
            self.manager.delete(step)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self.good.add(step)

    def restore_latest(self, template: TrainState) -> tuple[TrainState, dict] | None:
        """The newest checkpoint that restores and matches its checksum; older ones are tried
        after a warning (the steps skipped are in ``self.broken``)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta = self._restore(step, template)
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint falls back
                self.broken.append(step)
                warnings.warn(
                    f"checkpoint at step {step} in {self.manager.directory} could not be restored "
                    f"({type(err).__name__}: {str(err)[:200]}); trying the previous one",
                    stacklevel=2,
                )
                continue
            self.good.add(step)
            return state, meta
        return None

    def _restore(self, step: int, template: TrainState) -> tuple[TrainState, dict]:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = dict(meta.meta)
        tree = meta.get("layout") == "tree"
        target = _checkpointed(template) if tree else _flat_layout(template)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        ).state
        expected = meta.get("sha256")
        if expected is None:
            warnings.warn(
                f"checkpoint at step {step} in {self.manager.directory} has no checksum "
                "(written before checksums existed): restored unverified",
                stacklevel=3,
            )
        elif _digest(_flat(restored)) != expected:
            raise ValueError("its arrays do not match the checksum written with them")
        if not tree:
            parts = _unflat(tuple(_checkpointed(template).values()), dict(restored))
            restored = dict(zip(_CHECKPOINTED, parts, strict=True))
        return template.replace(**restored), meta

    def set_aside_broken(self) -> None:
        """Move the checkpoints that did not restore (after an older one did) into
        ``<directory>_damaged/``, so that the run writes those steps again; nothing is deleted (a
        checkpoint may have failed for a passing reason)."""
        self.manager.wait_until_finished()
        if self.broken and jax.process_index() == 0:
            aside = pathlib.Path(f"{self.directory}_damaged")
            aside.mkdir(exist_ok=True)
            for step in self.broken:
                target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                (pathlib.Path(self.manager.directory) / str(step)).rename(target)
                warnings.warn(
                    f"moved the checkpoint that did not restore to {target}", stacklevel=3
                )
        if self.broken and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("addervit: damaged checkpoints set aside")
        self.manager.reload()
        self.broken = []

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class RunLock:
    """One process at a time owns a run directory: an exclusive ``flock`` on ``DIR/.lock``, which
    the operating system releases when the process ends, however it ends."""

    def __init__(self, workdir: pathlib.Path):
        self.path = pathlib.Path(workdir) / ".lock"
        self._file = None

    def __enter__(self):
        self._file = open(self.path, "a+")  # noqa: SIM115 - held for the life of the run
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            owner = self._file.read().strip() or "another process"
            self._file.close()
            raise RunDirectoryBusy(
                f"{self.path.parent} is in use by {owner}; wait for it to end, or train into "
                "another --workdir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"process {os.getpid()}\n")
        self._file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


class RunDirectoryBusy(RuntimeError):
    """Another process is training in this run directory."""


# Config fields a resumed run may change: they decide what is logged and kept, and where data is
# read from, not what is computed.
RESUMABLE_CHANGES = frozenset(
    {
        "log_every_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "data_dir",
        "stream",
        "stream_workers",
        "distributed",
        "coordinator_address",
        "num_processes",
        "process_id",
    }
)


def config_differences(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """``field: saved != now`` for every field that a resumed run may not change."""

    def flat(tree, prefix=""):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    before, now = flat(saved), flat(json.loads(config.to_json_best_effort()))
    return [
        f"{k}: {before.get(k)!r} (run) != {now.get(k)!r} (now)"
        for k in sorted(set(before) | set(now))
        if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k)
    ]


# ---------------------------------------------------------------------------------------------
# Final parameters (params-only) and distillation teachers
# ---------------------------------------------------------------------------------------------

PARAMS_FILE = "params.msgpack"


def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # FSDP over several processes
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _variables_digest(tree: dict) -> str:
    """The checksum of a :func:`save_params` tree's arrays (both parts, one name space)."""
    return _digest({f"{part}.{k}": v for part in ("params", "rest") for k, v in tree[part].items()})


def save_params(state: TrainState, path: pathlib.Path) -> None:
    """The model's variables (parameters and non-trainable ones), without optimiser state, as one
    msgpack file of arrays keyed by their dotted paths (``flax.serialization``). Written to a
    temporary file and renamed, so an interruption never leaves a half-written file."""
    tree = {
        "params": {k: _host(v) for k, v in _flat(state.params).items()},
        "rest": {k: _host(v) for k, v in _flat(state.rest).items()},
    }
    tree["sha256"] = _variables_digest(tree)
    if jax.process_index() != 0:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(serialization.msgpack_serialize(tree))
    os.replace(tmp, path)


def load_params(path: pathlib.Path, template: TrainState) -> TrainState:
    """``template`` with the variables of a :func:`save_params` file, whose checksum is verified;
    every name and shape must match the template's model."""
    try:
        tree = serialization.msgpack_restore(pathlib.Path(path).read_bytes())
        checksum = tree.get("sha256")
        intact = checksum is None or checksum == _variables_digest(tree)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ValueError(f"{path} is damaged: it does not load ({type(err).__name__})") from err
    if checksum is None:
        warnings.warn(f"{path} has no checksum (written before checksums existed)", stacklevel=2)
    if not intact:
        raise ValueError(f"{path} is damaged: its arrays do not match the checksum saved with them")
    replaced = {}
    for part in ("params", "rest"):
        wanted = _flat(getattr(template, part))
        saved = tree.get(part, {})
        missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
        wrong = [
            f"{k}: {tuple(saved[k].shape)} != {tuple(v.shape)}"
            for k, v in wanted.items()
            if k in saved and tuple(saved[k].shape) != tuple(v.shape)
        ]
        if missing or extra or wrong:
            raise ValueError(
                f"{path} does not hold this model's {part}: missing {missing[:5]}, unexpected "
                f"{extra[:5]}, shapes {wrong[:5]}"
            )
        flat = {k: jnp.asarray(saved[k], v.dtype) for k, v in wanted.items()}
        replaced[part] = _unflat(getattr(template, part), flat)
    return template.replace(**replaced)


def load_teacher(config: ml_collections.ConfigDict) -> tuple[Teacher, dict]:
    """The model of the finished run ``config.distill.teacher`` and a description of it.

    Checked before any training: the run finished, and it was trained on the same dataset (so the
    same image shape and number of classes) as ``config``.
    """
    workdir = pathlib.Path(config.distill.teacher)
    summary_path = workdir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(
            f"distill.teacher={str(workdir)!r} is not a finished training run: no summary.json"
        )
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "finished":
        raise ValueError(
            f"distill.teacher={str(workdir)!r} did not finish (status "
            f"{summary.get('status')!r}); resume it first"
        )
    teacher_config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    mine, theirs = model_overrides(config), model_overrides(teacher_config)
    for field in ("image_size", "channels", "num_classes"):
        if config.dataset != teacher_config.dataset or mine[field] != theirs[field]:
            raise ValueError(
                f"distill.teacher={str(workdir)!r} was trained on {teacher_config.dataset!r} "
                f"({theirs['num_classes']} classes, {theirs['image_size']} px, "
                f"{theirs['channels']} channels); this run is on {config.dataset!r} "
                f"({mine['num_classes']} classes, {mine['image_size']} px, "
                f"{mine['channels']} channels)"
            )
    state, meta, _ = restore(workdir)
    replicated = NamedSharding(make_mesh(), P())
    teacher = Teacher(
        params=jax.device_put(state.params, replicated),
        rest=jax.device_put(state.rest, replicated),
        graphdef=state.graphdef,
    )
    described = {
        "workdir": str(workdir),
        "variant": teacher_config.variant,
        "step": meta["step"],
        "eval_accuracy": summary.get("eval_accuracy"),
        "params_checksum": summary.get("params_checksum"),
    }
    return teacher, described


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------


class _StopSignals:
    """Turn SIGTERM/SIGINT into a flag the loop checks after each step (then saves and exits).

    Only in a single-process run: an Orbax save needs every process, so a multi-process run
    learns of a preemption from JAX's preemption service instead, at a step every process
    reaches (:meth:`Checkpoints.should_save`).
    """

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name

    def __enter__(self):
        if jax.process_count() > 1:
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Clock:
    """The training time and images of every segment of a run, and the metrics of the steps since
    the last look (kept on the device until then: one host copy per look)."""

    def __init__(self, seconds: float = 0.0, images: int = 0):
        self.seconds, self.images = seconds, images
        self._pending: list[dict] = []
        self._since = time.perf_counter()

    def add(self, metrics: dict) -> None:
        self._pending.append(metrics)

    def lap(self, batch_size: int) -> tuple[dict, float, float | None]:
        """The mean metrics of the steps since the last lap (so logged train accuracy is not one
        batch's), their images per second, and the last loss if any of them is not finite."""
        host = jax.device_get(self._pending)
        self._pending = []
        elapsed = time.perf_counter() - self._since
        self.seconds += elapsed
        self.images += len(host) * batch_size
        losses = [float(m["loss"]) for m in host]
        bad = losses[-1] if not all(math.isfinite(loss) for loss in losses) else None
        window = {k: np.mean([m[k] for m in host]) for k in host[-1]}
        return window, len(host) * batch_size / max(elapsed, 1e-9), bad

    def restart(self) -> None:
        """Start timing again (evaluations and checkpoints are not training time)."""
        self._since = time.perf_counter()

    def totals(self) -> dict:
        """What a checkpoint records, so that a resumed run's summary times the whole run."""
        return {"train_seconds": self.seconds, "images_seen": self.images}

    def summary(self) -> dict:
        rate = self.images / self.seconds if self.seconds else 0.0
        return {"train_seconds": self.seconds, "images_per_second": rate}


def params_checksum(params) -> float:
    """Sum of |p| over all parameters (float64 on the host): equal runs give equal checksums."""
    total = jax.jit(
        lambda p: sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(p)),
        out_shardings=NamedSharding(make_mesh(), P()),
    )(params)
    return float(np.asarray(total.addressable_data(0)))


def _device_description() -> str:
    """The devices (with the CPU model on CPU), JAX version and process count, for summaries."""
    return f"{timing.describe_device()}, {jax.process_count()} process(es)"


def evaluate(state: TrainState, batches, *, mesh, info, jitted=None) -> dict:
    """Accuracy and mean loss over ``batches`` (every example once, with a padding mask)."""
    fn = jitted or jax.jit(lambda s, b: eval_step(s, b, info=info))
    totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    for batch in batches:
        out = jax.device_get(fn(state, global_batch(batch, mesh)))
        for k in totals:
            totals[k] += float(out[k])
    return {
        "accuracy": totals["correct"] / totals["count"],
        "loss": totals["loss"] / totals["count"],
        "count": int(totals["count"]),
    }


def make_inputs(
    config, *, eval_split: str | None = None, batch_size: int | None = None
) -> data.Inputs:
    """:func:`data.make_inputs` for ``config`` (``eval_split``/``batch_size`` override its own)."""
    return data.make_inputs(
        config.dataset,
        train_split=config.train_split,
        eval_split=eval_split or config.eval_split,
        batch_size=batch_size or config.batch_size,
        seed=config.seed,
        data_dir=config.data_dir,
        stream=config.get("stream"),
        image_size=model_overrides(config)["image_size"],
        num_workers=None if config.stream_workers < 0 else config.stream_workers,
    )


def train(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, resume: bool = False
) -> dict:
    """Train ``config`` in ``workdir``; returns the summary (also written to summary.json)."""
    from addervit_jax import logs  # matplotlib and tqdm only when training

    if config.get("distributed"):
        # None/unset values are auto-detected by JAX on SLURM, Kubernetes, Cloud TPU, ...
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address or None,
            num_processes=config.num_processes or None,
            process_id=None if config.process_id < 0 else config.process_id,
        )
    # Everything that can be checked is checked before the run directory is created.
    validate_config(config)
    workdir = pathlib.Path(workdir)
    _check_workdir(config, workdir, resume)
    teacher, teacher_info = None, None
    if config.get("distill") is not None and config.distill.teacher is not None:
        teacher, teacher_info = load_teacher(config)  # fails here on a wrong teacher
    inputs = make_inputs(config)
    if inputs.steps_per_epoch < 1:
        raise ValueError(
            f"batch_size={config.batch_size} is larger than the {inputs.num_train} training "
            f"examples of {config.dataset} {config.train_split}"
        )
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create --workdir {workdir}: {err.strerror or err}") from err
    is_main = jax.process_index() == 0
    if is_main:
        try:  # a read-only or foreign directory fails here, not at the first checkpoint
            probe = workdir / f".write_test_{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise ValueError(
                f"cannot write into --workdir {workdir}: {err.strerror or err}"
            ) from err
    with RunLock(workdir) if is_main else contextlib.nullcontext():
        _check_workdir(config, workdir, resume)  # again: it may have changed before the lock
        if is_main:
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        return _train_in(config, workdir, resume, inputs, teacher, teacher_info, logs)


def _check_workdir(config, workdir: pathlib.Path, resume: bool) -> None:
    """Refuse a run directory that this run cannot use, naming why and what to do instead."""
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir} is a file, not a directory")
    ckpt_dir = workdir / "checkpoints"
    if not resume:
        if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
            raise FileExistsError(
                f"{workdir} already holds checkpoints; pass --resume to continue that run or "
                "choose another --workdir"
            )
        return
    saved = workdir / "config.json"
    if not saved.is_file():
        raise FileNotFoundError(
            f"--resume: {workdir} holds no run to resume (no config.json); drop --resume to start "
            "a new run there"
        )
    differences = config_differences(json.loads(saved.read_text()), config)
    if differences:
        raise ValueError(
            f"--resume: the config differs from that of the run in {workdir}: "
            f"{'; '.join(differences)}. Resume with the run's config (its config.json), or start "
            "a new run in another --workdir"
        )


def _train_in(config, workdir, resume, inputs, teacher, teacher_info, logs):
    steps_per_epoch = inputs.steps_per_epoch
    total_steps = config.get("total_steps") or int(math.ceil(config.num_epochs * steps_per_epoch))
    eval_every = config.eval_every_steps or steps_per_epoch
    mesh = make_mesh()
    # the mesh in context lets ops run the Pallas kernels per device (jax.shard_map)
    with jax.set_mesh(mesh):
        checkpoints = Checkpoints(
            workdir / "checkpoints",
            keep=config.keep_checkpoints,
            every=config.checkpoint_every_steps or steps_per_epoch,
        )
        state, clock = _start(config, workdir, resume, checkpoints, mesh, total_steps, inputs)
        step_fn, evaluate_all = _compile(config, state, mesh, inputs)
        log = logs.RunLog(
            workdir, total_steps=total_steps, start_step=int(state.step), enabled=_is_main()
        )
        log.header(
            f"{config.variant} on {config.dataset} ({inputs.num_train} train / "
            f"{inputs.num_eval} eval images), {total_steps} steps of {config.batch_size}, "
            f"{_device_description()}"
        )
        status = "finished"
        with _StopSignals() as stop:
            for step, batch in inputs.train_batches(int(state.step)):
                if step >= total_steps:
                    break
                state, metrics = step_fn(state, global_batch(batch, mesh), teacher)
                clock.add(metrics)
                done = step + 1
                save = checkpoints.should_save(done) or stop.received is not None
                preempted = save and checkpoints.reached_preemption(done)
                evaluate_now = done % eval_every == 0 and done < total_steps and not preempted
                log_now = done % config.log_every_steps == 0 or done == total_steps
                if save or evaluate_now or log_now:
                    window, rate, bad_loss = clock.lap(config.batch_size)
                    if bad_loss is not None:
                        _diverged(bad_loss, done, config, checkpoints, log)
                    log.train(done, window, images_per_second=rate)
                    if save:
                        checkpoints.save(state, **clock.totals())
                    if evaluate_now:
                        log.eval(done, evaluate_all(state))
                    clock.restart()
                if stop.received is not None or preempted:
                    status = f"interrupted by {stop.name}" if stop.received else "preempted"
                    break

        checkpoints.save(state, **clock.totals())
        checkpoints.wait()
        save_params(state, workdir / PARAMS_FILE)
        result = evaluate_all(state)
        if status == "finished":
            log.eval(int(state.step), result)
        summary = {
            "variant": config.variant,
            "dataset": config.dataset,
            "steps": int(state.step),
            "total_steps": total_steps,
            "status": status,
            "eval_accuracy": result["accuracy"],
            "eval_loss": result["loss"],
            "eval_examples": result["count"],
            "best_eval_accuracy": log.best_eval_accuracy(),
            **clock.summary(),
            "device": _device_description(),
            "adaptive_lr": uses_adaptive_lr(config),
            "params_checksum": params_checksum(state.params),
            "workdir": str(workdir),
        }
        if teacher_info is not None:
            summary["teacher"] = teacher_info
    log.finish(summary)
    checkpoints.close()
    if stop.received:
        summary["signal"] = stop.received
    return summary


def _is_main() -> bool:
    return jax.process_index() == 0


def _start(config, workdir, resume, checkpoints, mesh, total_steps, inputs):
    """The state to train from (the newest checkpoint that restores, when resuming) and the
    clock of the run so far; refuses to resume when no checkpoint restores."""
    state = create_train_state(
        config, total_steps=total_steps, steps_per_epoch=inputs.steps_per_epoch
    )
    state = shard_state(state, mesh, config.fsdp)
    directory = checkpoints.directory
    restored = checkpoints.restore_latest(state) if resume else None
    if restored is not None:
        state, meta = restored
        checkpoints.set_aside_broken()  # so that the run writes those steps again
        print(f"resumed from step {meta['step']} in {directory}", flush=True)
        return shard_state(state, mesh, config.fsdp), _Clock(*_time_so_far(workdir, meta))
    if checkpoints.broken:
        checkpoints.close()
        raise ValueError(
            f"--resume: no checkpoint in {directory} restores (steps {checkpoints.broken} are "
            f"damaged); delete {directory} to train again from step 0, or train into another "
            "--workdir"
        )
    if resume:
        print(f"no checkpoint in {directory} yet: starting from step 0", flush=True)
    return state, _Clock()


def _compile(config, state, mesh, inputs):
    """The jitted train step (state donated; it reads only :class:`StepRecipe` of the config)
    and a function that evaluates a state on every evaluation example."""
    recipe = StepRecipe.from_config(config)
    step_fn = jax.jit(
        functools.partial(train_step, info=inputs.info, recipe=recipe),
        out_shardings=(jax.tree.map(lambda x: x.sharding, state), NamedSharding(mesh, P())),
        donate_argnums=0,
    )
    eval_fn = jax.jit(functools.partial(eval_step, info=inputs.info))
    return step_fn, lambda s: evaluate(
        s, inputs.eval_batches(), mesh=mesh, info=inputs.info, jitted=eval_fn
    )


def _diverged(loss: float, step: int, config, checkpoints: Checkpoints, log) -> None:
    """Stop a run whose loss is no longer finite, naming the last good checkpoint."""
    checkpoints.wait()
    log.close()
    saved = checkpoints.manager.latest_step()
    kept = (
        f"the last good checkpoint, step {saved}, is kept in {checkpoints.directory}"
        if saved is not None
        else "no checkpoint had been written yet"
    )
    raise TrainingDiverged(
        f"loss became {loss} by step {step} (variant {config.variant}, learning_rate "
        f"{config.learning_rate}); {kept}"
    )


def _time_so_far(workdir: pathlib.Path, meta: dict) -> tuple[float, int]:
    """Training seconds and images of the segments before the checkpoint ``meta`` describes, so
    that a resumed run's summary times the whole run. Checkpoints record them; for one written
    before they did, the summary of the interrupted segment that saved it, if it has that step."""
    if "train_seconds" in meta:
        return float(meta["train_seconds"]), int(meta["images_seen"])
    try:
        previous = json.loads((workdir / "summary.json").read_text())
    except (OSError, ValueError):
        return 0.0, 0
    if previous.get("status") == "finished" or previous.get("steps") != meta["step"]:
        return 0.0, 0
    seconds = float(previous.get("train_seconds", 0.0))
    return seconds, round(seconds * float(previous.get("images_per_second", 0.0)))


def restore(workdir: str | os.PathLike) -> tuple[TrainState, dict, ml_collections.ConfigDict]:
    """A run's latest restorable checkpoint, or, where it has none (a run directory kept in a
    repository keeps only its final parameters), its ``params.msgpack``: (state, metadata with
    the step, config). The optimiser state of the latter is fresh."""
    workdir = pathlib.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{workdir} is not a training run: no config.json")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    template = shard_state(
        create_train_state(config, total_steps=1, steps_per_epoch=1), make_mesh(), False
    )
    restored, broken = None, []
    ckpt_dir = workdir / "checkpoints"
    if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        checkpoints = Checkpoints(ckpt_dir, keep=config.keep_checkpoints)
        restored, broken = checkpoints.restore_latest(template), checkpoints.broken
        checkpoints.close()
    if restored is not None:
        return (*restored, config)
    params_path = workdir / PARAMS_FILE
    if not params_path.exists():
        damaged = f" (steps {broken} are damaged)" if broken else ""
        raise FileNotFoundError(
            f"no restorable checkpoint in {ckpt_dir}{damaged} and no {PARAMS_FILE} in {workdir}"
        )
    if broken:
        warnings.warn(
            f"no checkpoint in {ckpt_dir} restores (steps {broken}); using {params_path}",
            stacklevel=2,
        )
    summary_path = workdir / "summary.json"
    step = json.loads(summary_path.read_text())["steps"] if summary_path.exists() else None
    state = load_params(params_path, template)
    state = shard_state(state.replace(step=jnp.asarray(step or 0, jnp.int32)), make_mesh(), False)
    return state, {"step": step, "source": PARAMS_FILE}, config


def evaluate_workdir(
    workdir: str | os.PathLike,
    *,
    split: str | None = None,
    batch_size: int | None = None,
    int8: bool = False,
    calibration_batches: int = 4,
) -> dict:
    """Evaluate the latest checkpoint of a training run on its eval split (or ``split``).

    With ``int8``, also its int8 form (``models.quantize``), calibrated on the first
    ``calibration_batches`` batches of the run's training split without augmentation: the result
    then holds ``"float"`` and ``"int8"`` (accuracy, loss, count of each) and the calibration.
    """
    state, meta, config = restore(workdir)
    split = split or config.eval_split
    inputs = make_inputs(config, eval_split=split, batch_size=batch_size)
    mesh = make_mesh()
    head = {"workdir": str(workdir), "step": meta["step"], "split": split}
    with jax.set_mesh(mesh):
        result = evaluate(state, inputs.eval_batches(), mesh=mesh, info=inputs.info)
        if not int8:
            return {**head, **result}
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be positive, got {calibration_batches}")
        images = [
            data.preprocess(None, batch["image"], inputs.info, train=False)
            for _, batch in itertools.islice(inputs.train_batches(0), calibration_batches)
        ]
        model = nnx.merge(state.graphdef, state.params, state.rest)
        graphdef, params, rest = nnx.split(models.quantize(model, images), nnx.Param, ...)
        int8_state = state.replace(graphdef=graphdef, params=params, rest=rest)
        quantized = evaluate(int8_state, inputs.eval_batches(), mesh=mesh, info=inputs.info)
    calibration = {
        "split": config.train_split,
        "images": sum(len(x) for x in images),
        "augmentation": False,
    }
    return {**head, "float": result, "int8": quantized, "calibration": calibration}
