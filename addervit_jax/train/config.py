"""What the trainer reads from a config, and the checks that refuse one before any compute.

:func:`validate_config` fails early, naming the fields, on a configuration that cannot run;
:func:`config_differences` is the rule of which fields a resumed run may change
(:data:`RESUMABLE_CHANGES`); :func:`model_overrides`, :func:`uses_adaptive_lr` and
:func:`make_inputs` turn a config into what ``models``, ``optim`` and ``data`` take.
"""

from __future__ import annotations

import json
import math

import jax
import ml_collections

from addervit_jax import configs, data, models, optim
from addervit_jax.train.distill import FEATURE_KERNELS

__all__ = [
    "RESUMABLE_CHANGES",
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
    if distill is not None:
        feature_weight = distill.get("feature_weight", 0.0)
        if not (math.isfinite(feature_weight) and feature_weight >= 0):
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
