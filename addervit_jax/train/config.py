"""What the trainer reads from a config, and the checks that refuse one before any compute.

:func:`validate_config` fails early, naming the fields, on a configuration that cannot run;
:func:`config_differences` is the rule of which fields a resumed run may change
(:data:`RESUMABLE_CHANGES`); :func:`model_overrides`, :func:`uses_adaptive_lr` and
:func:`make_inputs` turn a config into what ``models``, ``optim`` and ``data`` take.
"""

from __future__ import annotations

import json
import math
import warnings

import jax
import ml_collections
from flax import nnx

from addervit_jax import configs, data, models, optim
from addervit_jax.train.distill import FEATURE_KERNELS

__all__ = [
    "RESUMABLE_CHANGES",
    "check_inputs",
    "config_differences",
    "make_inputs",
    "model_overrides",
    "uses_adaptive_lr",
    "validate_config",
]


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


def _real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# The recipe's numbers, each finite: (field, whether 0 is allowed, upper bound or None, whether
# the bound is allowed, what 0 means).
_RANGES = (
    ("num_epochs", False, None, False, ""),
    ("learning_rate", False, None, False, ""),
    ("weight_decay", True, None, False, ""),
    ("momentum", True, 1.0, False, ""),
    ("warmup_epochs", True, None, False, ""),
    ("end_lr_fraction", True, 1.0, True, ""),
    ("grad_clip", True, None, False, " (0: no clipping)"),
    ("adaptive_eta", False, None, False, ""),
    ("adder_lr_scale", False, None, False, ""),
    ("label_smoothing", True, 1.0, False, ""),
)


def _range_problem(field: str, value, zero_ok, high, high_ok, zero_means) -> str | None:
    """``field=value must be ...`` where ``value`` is not a finite number in its range."""
    ok = _real(value) and (value >= 0 if zero_ok else value > 0)
    if ok and high is not None:
        ok = value <= high if high_ok else value < high
    if ok:
        return None
    if high is None:
        bound = ">= 0" if zero_ok else "> 0"
    else:
        bound = f"in {'[' if zero_ok else '('}0, {high:g}{']' if high_ok else ')'}"
    return f"{field}={value!r} must be a finite number {bound}{zero_means}"


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fail before any compute on an impossible configuration, naming the fields."""
    problems = []
    if config.variant not in models.VARIANTS:
        problems.append(f"variant={config.variant!r} (known: {sorted(models.VARIANTS)})")
    if config.dataset not in data.DATASETS:
        problems.append(f"dataset={config.dataset!r} (known: {sorted(data.DATASETS)})")
    if config.optimizer not in optim.OPTIMIZERS:
        problems.append(f"optimizer={config.optimizer!r} (known: {optim.OPTIMIZERS})")
    for field in ("train_split", "eval_split"):
        if not isinstance(config[field], str) or not config[field].strip():
            problems.append(f"{field}={config[field]!r} must name a split, e.g. 'test'")
    for field in ("batch_size", "log_every_steps", "keep_checkpoints"):
        if not config[field] > 0:
            problems.append(f"{field}={config[field]} must be positive")
    for field in ("total_steps", "eval_every_steps", "checkpoint_every_steps"):
        if config.get(field, 0) < 0:
            problems.append(f"{field}={config[field]} must be 0 (the default) or positive")
    for field, *bounds in _RANGES:
        problem = _range_problem(field, config.get(field, 1.0), *bounds)
        if problem:
            problems.append(problem)
    seed = config.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"seed={seed!r} must be an integer >= 0 (it seeds numpy's SeedSequence)")
    crop = config.crop_padding
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < 0:
        problems.append(f"crop_padding={crop!r} must be an integer >= 0 (0: no crop)")
    if config.batch_size % jax.device_count():
        problems.append(
            f"batch_size={config.batch_size} must be divisible by the {jax.device_count()} "
            "devices of the data-parallel mesh"
        )
    distill = config.get("distill")
    if distill is not None:
        for field in ("weight", "temperature"):
            value = distill[field]
            if not _real(value):
                problems.append(f"distill.{field}={value!r} must be a finite number")
            elif distill.teacher is not None and not value > 0:
                problems.append(f"distill.{field}={value} must be positive with a teacher")
        feature_weight = distill.get("feature_weight", 0.0)
        if not (_real(feature_weight) and feature_weight >= 0):
            problems.append(f"distill.feature_weight={feature_weight} must be 0 (off) or positive")
        elif feature_weight > 0 and distill.teacher is None:
            problems.append(
                f"distill.feature_weight={feature_weight} needs a teacher (distill.teacher)"
            )
        if distill.get("feature_kernel", "none") not in FEATURE_KERNELS:
            problems.append(
                f"distill.feature_kernel={distill.feature_kernel!r} (known: {FEATURE_KERNELS})"
            )
    if config.get("init_from") is not None:
        for field in ("init_fit_steps", "init_fit_batches"):
            value = config[field]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{field}={value!r} must be a positive integer with init_from")
    if config.randaugment is not None and len(tuple(config.randaugment)) != 2:
        problems.append(f"randaugment={config.randaugment} must be (num_ops, magnitude) or None")
    if config.dataset in data.DATASETS:
        problems += _dataset_mismatches(config)
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))
    overrides = model_overrides(config)
    try:
        models.config(config.variant, **overrides)
        # built abstractly (nothing computed): the layers' own checks of their options
        nnx.eval_shape(lambda: models.build(config.variant, rngs=nnx.Rngs(0), **overrides))
    except (ValueError, TypeError) as err:
        raise ValueError(f"invalid config: model: {err}") from err


def _dataset_mismatches(config) -> list[str]:
    """A ``model.num_classes`` or ``model.channels`` that is not the dataset's: the labels and the
    pixels are the dataset's, so such a model trains on nonsense (5 classes of 10 train to 34%)
    or fails after the run directory exists. ``model.image_size`` is checked against the batches
    when training (:func:`check_inputs`: a streamed dataset is resized to it)."""
    info = data.DATASETS[config.dataset]
    model = dict(config.model) if config.get("model") else {}
    found = {
        "num_classes": (info.num_classes, "classes"),
        "channels": (info.image_shape[2], "image channels"),
    }
    return [
        f"model.{field}={model[field]!r} but {config.dataset} has {value} {what}"
        for field, (value, what) in found.items()
        if field in model and model[field] != value
    ]


def check_inputs(
    config: ml_collections.ConfigDict, inputs: data.Inputs, *, warn: bool = True
) -> None:
    """Fail before the run directory exists when the batches of ``inputs`` cannot train
    ``config``'s model: a batch larger than the training split, images of another size than the
    model's ``image_size`` (in-memory datasets keep their size; a model built for another one
    fails at its first step), a conversion fit on more batches than one epoch has (it would
    hold them all in memory). Warns (``warn``: a new run, not a resumed one, which was warned
    when it started) where the warm-up is not shorter than the run (the schedule then warms up
    over all but the last step and never decays)."""
    if inputs.steps_per_epoch < 1:
        raise ValueError(
            f"batch_size={config.batch_size} is larger than the {inputs.num_train} training "
            f"examples of {config.dataset} {config.train_split}"
        )
    if config.get("init_from") is not None and config.init_fit_batches > inputs.steps_per_epoch:
        raise ValueError(
            f"init_fit_batches={config.init_fit_batches} is more than the "
            f"{inputs.steps_per_epoch} batches of one epoch of {config.dataset} "
            f"{config.train_split} (batch_size {config.batch_size}): the conversion fit holds its "
            "batches in memory; use at most one epoch's"
        )
    total = config.get("total_steps") or math.ceil(config.num_epochs * inputs.steps_per_epoch)
    warmup = int(config.warmup_epochs * inputs.steps_per_epoch)
    if warn and warmup >= total > 0:
        warnings.warn(
            f"warmup_epochs={config.warmup_epochs:g} ({warmup} steps) is not shorter than the run "
            f"({total} steps): the learning rate warms up over {max(total - 1, 0)} steps and never "
            "decays",
            stacklevel=2,
        )
    size = model_overrides(config)["image_size"]
    if not inputs.streamed and size != inputs.info.image_shape[0]:
        raise ValueError(
            f"invalid config: model.image_size={size!r} but the {config.dataset} images are "
            f"{inputs.info.image_shape[0]} px (only a streamed dataset is resized)"
        )


def make_inputs(
    config, *, eval_split: str | None = None, batch_size: int | None = None
) -> data.Inputs:
    """:func:`data.make_inputs` for ``config`` (``eval_split``/``batch_size`` override its own)."""
    return data.make_inputs(
        config.dataset,
        train_split=config.train_split,
        eval_split=config.eval_split if eval_split is None else eval_split,
        batch_size=config.batch_size if batch_size is None else batch_size,
        seed=config.seed,
        data_dir=config.data_dir,
        stream=config.get("stream"),
        image_size=model_overrides(config)["image_size"],
        num_workers=None if config.stream_workers < 0 else config.stream_workers,
    )


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
    """``field: saved != now`` for every field that a resumed run may not change.

    A field the saved run lacks was added to the configs after it was made; it counts as the
    default of ``configs.default_config()``, which is the behaviour the run had (a new field's
    default keeps what was computed before it existed).
    """

    def flat(tree, prefix=""):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    defaults = flat(json.loads(configs.default_config().to_json_best_effort()))
    now = flat(json.loads(config.to_json_best_effort()))
    before = {k: v for k, v in defaults.items() if k in now} | flat(saved)
    return [
        f"{k}: {before.get(k)!r} (run) != {now.get(k)!r} (now)"
        for k in sorted(set(before) | set(now))
        if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k)
    ]
