"""Evaluation of a model, and of a finished run read back from its directory: :func:`evaluate`
over a split's batches, :func:`evaluate_workdir` (``addervit eval``, float and int8), and
:func:`load_teacher`, a finished run's model as the teacher of a distilled run.

Imports nothing of the training loop: ``addervit eval`` reads a run without it.
"""

from __future__ import annotations

import itertools
import os
import pathlib
from collections.abc import Collection

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from addervit_jax import data, models
from addervit_jax.train.checkpoints import read_json, restore
from addervit_jax.train.config import make_inputs, model_overrides
from addervit_jax.train.distill import Teacher, inference_model
from addervit_jax.train.state import TrainState, global_batch, make_mesh
from addervit_jax.train.step import eval_step

__all__ = ["evaluate", "evaluate_workdir", "feature_shapes", "finished_run", "load_teacher"]


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


def finished_run(
    field: str, workdir: pathlib.Path, *, whose: str
) -> tuple[dict, ml_collections.ConfigDict]:
    """The summary and config of the finished run in ``workdir``, which the config's ``field``
    names (a teacher, a run to convert); refused, naming ``field``, when it holds no summary.json
    or config.json (``FileNotFoundError``), did not finish, or names a variant or dataset this
    version does not know (``ValueError``; ``whose`` says whose config.json it is)."""
    summary_path = workdir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(
            f"{field}={str(workdir)!r} is not a finished training run: no summary.json"
        )
    summary = read_json(summary_path)
    if summary.get("status") != "finished":
        raise ValueError(
            f"{field}={str(workdir)!r} did not finish (status {summary.get('status')!r}); "
            "resume it first"
        )
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{field}={str(workdir)!r} is not a training run: no config.json")
    config = ml_collections.ConfigDict(read_json(config_path))
    for name, known in (("variant", models.VARIANTS), ("dataset", data.DATASETS)):
        if config.get(name) not in known:
            raise ValueError(
                f"{field}={str(workdir)!r}: {whose} {config_path} names {name} "
                f"{config.get(name)!r}, which this version does not know (known: {sorted(known)})"
            )
    return summary, config


def load_teacher(config: ml_collections.ConfigDict) -> tuple[Teacher, dict]:
    """The model of the finished run ``config.distill.teacher`` and a description of it.

    Checked before any training: the run finished, and it was trained on the same dataset (so the
    same image shape and number of classes) as ``config``.
    """
    workdir = pathlib.Path(config.distill.teacher)
    summary, teacher_config = finished_run("distill.teacher", workdir, whose="the teacher's")
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
    if config.distill.get("feature_weight", 0.0) > 0:
        mine, theirs = feature_shapes(config), feature_shapes(teacher_config)
        if mine != theirs:
            raise ValueError(
                f"distill.feature_weight: the features of distill.teacher={str(workdir)!r} "
                f"({teacher_config.variant}: {theirs}) do not match this run's "
                f"({config.variant}: {mine}); feature distillation needs a teacher of the same "
                "depth and width"
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


def feature_shapes(config) -> list[tuple[int, ...]]:
    """The shapes of one image's features (``return_features``) of ``config``'s model, traced
    abstractly (nothing is computed)."""
    overrides = model_overrides(config)
    image = jnp.zeros((1, overrides["image_size"], overrides["image_size"], overrides["channels"]))

    def features():
        model = models.build(config.variant, rngs=nnx.Rngs(0), **overrides)
        model.eval()
        return model(image, return_features=True)[1]

    return [tuple(f.shape) for f in jax.eval_shape(features)]


def evaluate_workdir(
    workdir: str | os.PathLike,
    *,
    split: str | None = None,
    batch_size: int | None = None,
    int8: bool = False,
    calibration_batches: int = 4,
    kinds: Collection[str] | None = None,
) -> dict:
    """Evaluate the latest checkpoint of a training run on its eval split (or ``split``).

    With ``int8``, also its int8 form (``models.quantize``: every adder, multiplication and
    ternary site, or only the sites of ``kinds``, e.g. ``("adder",)``), its adder sites
    calibrated on the first ``calibration_batches`` batches of the run's training split without
    augmentation: the result then holds ``"float"`` and ``"int8"`` (accuracy, loss, count of
    each), ``"int8_sites"`` (how many sites of each kind run on integers), ``"float_sites"``
    (every similarity site left float, ``"path (kind)"``: euclid and shift sites, attention
    scores and values, ...) and the calibration (0 images where there is no adder site to
    calibrate).

    Refused before anything is computed: an empty ``split`` or one that selects no examples, a
    ``batch_size`` larger than the split (the batches are padded to it: a huge one allocates for
    nothing), and, with ``int8``, calibration batches that would draw a training image twice
    (more than one epoch of the training split).
    """
    if split is not None and not split.strip():
        raise ValueError("split='' is empty; name a split (e.g. 'test') or leave it out")
    if calibration_batches < 1:
        raise ValueError(f"calibration_batches must be positive, got {calibration_batches}")
    if kinds is not None and not int8:
        raise ValueError(f"kinds={tuple(kinds)} chooses the sites of the int8 form: add int8=True")
    state, meta, config = restore(workdir)
    split = config.eval_split if split is None else split
    inputs = make_inputs(config, eval_split=split, batch_size=batch_size)
    if batch_size is not None and batch_size > inputs.num_eval:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {inputs.num_eval} examples of "
            f"{config.dataset} {split!r}; use at most {inputs.num_eval}"
        )
    if int8 and calibration_batches > inputs.steps_per_epoch:
        raise ValueError(
            f"calibration_batches={calibration_batches} of {inputs.batch_size} images "
            f"({calibration_batches * inputs.batch_size}) would repeat the {inputs.num_train} "
            f"training examples of {config.dataset} {config.train_split!r}; use at most "
            f"{inputs.steps_per_epoch} (or a smaller batch_size)"
        )
    mesh = make_mesh()
    head = {"workdir": str(workdir), "step": meta["step"], "split": split}
    with jax.set_mesh(mesh):
        if not int8:
            return {**head, **evaluate(state, inputs.eval_batches(), mesh=mesh, info=inputs.info)}
        calibrated = []  # the images quantize drew (only adder sites are calibrated)

        def calibration():
            for _, batch in itertools.islice(inputs.train_batches(0), calibration_batches):
                images = data.preprocess(None, batch["image"], inputs.info, train=False)
                calibrated.append(len(images))
                yield images

        model = inference_model(state.graphdef, state.params, state.rest)
        # first: it refuses kinds that have no int8 form, or no site, before the evaluations
        int8_model = models.quantize(model, calibration(), kinds=kinds)
        graphdef, params, rest = nnx.split(int8_model, nnx.Param, ...)
        int8_state = state.replace(graphdef=graphdef, params=params, rest=rest)
        result = evaluate(state, inputs.eval_batches(), mesh=mesh, info=inputs.info)
        quantized = evaluate(int8_state, inputs.eval_batches(), mesh=mesh, info=inputs.info)
    int8_sites: dict[str, int] = {}
    for _, module in nnx.iter_modules(int8_model):
        if isinstance(module, models.INT8_SITES):
            kind = getattr(module, "source_kind", module.kind)
            int8_sites[kind] = int8_sites.get(kind, 0) + 1
    calibration = {"split": config.train_split, "images": sum(calibrated), "augmentation": False}
    return {
        **head,
        "float": result,
        "int8": quantized,
        "int8_sites": int8_sites,
        "float_sites": [f"{path} ({kind})" for path, kind in models.float_sites(int8_model)],
        "calibration": calibration,
    }
