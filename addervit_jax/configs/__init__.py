"""Experiment configs, one file per experiment, each with a ``get_config()`` (big_vision style).

``addervit train --config NAME`` takes the name of a file here (without ``.py``) or a path to any
config file of the same form; ``--config.key=value`` overrides a field (ml_collections'
``config_flags``). Code and the experiment scripts (``--set key=value``) override fields with
:func:`override`, which is ml_collections' ``update_from_flattened_dict`` after a check that every
field exists.
"""

import ast
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

# Fields whose children are free-form: the overrides of the variant's model config.
FREE_FORM = ("model",)

CONFIG_DIR = pathlib.Path(__file__).parent


def names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def path(name_or_path: str) -> str:
    """The file of a packaged config name, or ``name_or_path`` itself when it is a file."""
    base, sep, arg = name_or_path.partition(":")
    if pathlib.Path(base).is_file():
        return name_or_path
    candidate = CONFIG_DIR / f"{base}.py"
    if candidate.is_file():
        return f"{candidate}{sep}{arg}"
    raise ValueError(f"--config {name_or_path!r} is neither a file nor one of {names()}")


def load(name_or_path: str) -> ml_collections.ConfigDict:
    """Run a config file's ``get_config()`` (a packaged name or a path; ``path:arg`` passes
    ``arg``), checking that it has one and that it returns a ``ConfigDict``."""
    import importlib.util

    file, _, arg = path(name_or_path).partition(":")
    spec = importlib.util.spec_from_file_location("_addervit_config", file)
    if spec is None or not file.endswith(".py"):
        raise ValueError(
            f"config file {file} is not a Python file (.py) with a get_config() function"
        )
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise ValueError(f"config file {file} fails to run: {type(err).__name__}: {err}") from err
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ValueError(f"config file {file} has no get_config() function")
    config = get_config(arg) if arg else get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(
            f"config file {file}: get_config() returned {type(config).__name__}, expected an "
            "ml_collections.ConfigDict (start from addervit_jax.configs.default_config())"
        )
    return config


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> ``{dotted key: value}``; a value is a Python literal
    (``2``, ``0.5``, ``True``, ``None``, ``(2, 14)``), else the string itself."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r}: expected KEY=VALUE")
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[key] = text
    return overrides


def override(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """Set the dotted fields ``overrides`` names in ``config`` (in place; returns it).

    Every field must exist, except under :data:`FREE_FORM` (``model.*``: the variant's model
    config, whose fields the model knows). A value must fit the field's type (ints are accepted
    for floats), as ml_collections checks.
    """
    for key in overrides:
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            if part in FREE_FORM and node is config and part not in node:
                node[part] = ml_collections.ConfigDict()
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ValueError(f"the config has no field {key!r}")
            node = node[part]
        free = bool(parents) and parents[0] in FREE_FORM
        if not free and (not isinstance(node, ml_collections.ConfigDict) or leaf not in node):
            raise ValueError(f"the config has no field {key!r}")
    try:
        config.update_from_flattened_dict(dict(overrides))
    except (TypeError, KeyError) as err:
        raise ValueError(str(err).strip("'\"")) from err
    return config


def default_config() -> ml_collections.ConfigDict:
    """Every field a training config has; experiment files start from this and change fields."""
    c = ml_collections.ConfigDict()
    c.variant = "qkv_2ffn"
    c.model = ml_collections.ConfigDict()  # overrides of the variant's model config
    c.dataset = "digits"
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.stream = ml_collections.FieldReference(None, field_type=bool)  # None: by dataset size
    c.stream_workers = -1  # Grain worker processes when streaming; -1: one per CPU core
    c.train_split = "train"
    c.eval_split = "test"
    c.seed = 0
    c.batch_size = 64
    c.num_epochs = 30.0
    c.total_steps = 0  # > 0 overrides num_epochs
    c.optimizer = "adamw"
    c.learning_rate = 2e-3
    c.weight_decay = 0.002
    c.momentum = 0.9
    c.warmup_epochs = 5.0
    c.end_lr_fraction = 0.1
    c.grad_clip = 1.0  # clip of the raw gradients' global norm (optim.make_optimizer); 0: none
    c.adaptive_lr = ml_collections.FieldReference(None, field_type=bool)  # None: the variant's
    c.adaptive_eta = 0.2
    # learning rate of the adder weights W relative to every other parameter (optim.make_optimizer)
    c.adder_lr_scale = 1.0
    c.label_smoothing = 0.0
    # knowledge distillation from a finished run's model (train.train_step, train.distill_loss)
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = ml_collections.FieldReference(None, field_type=str)  # its work directory
    c.distill.weight = 1.0  # of the distillation term, added to the cross-entropy
    c.distill.temperature = 4.0
    # the feature term (train.feature_loss): every block's output tokens matched to the teacher's
    c.distill.feature_weight = 0.0  # 0: off
    c.distill.feature_kernel = "none"  # "none" (standardised tokens) or "pkkd" (kernel matrices)
    # conversion of a finished run of another variant (train.convert): its parameters copied where
    # the module and shape match, the other sites fitted to its sites; None: a random start
    c.init_from = ml_collections.FieldReference(None, field_type=str)  # its work directory
    c.init_fit_steps = 300  # Adam steps of each site's fit
    c.init_fit_batches = 4  # training batches (no augmentation, no labels) the sites are fitted on
    c.crop_padding = 4
    c.flip = ml_collections.FieldReference(None, field_type=bool)  # None: the dataset's default
    c.randaugment = ml_collections.FieldReference(None, field_type=tuple)
    c.log_every_steps = 50
    c.eval_every_steps = 0  # 0: once per epoch
    c.checkpoint_every_steps = 0  # 0: once per epoch
    c.keep_checkpoints = 3
    c.fsdp = False
    c.distributed = False  # call jax.distributed.initialize() (multi-host)
    c.coordinator_address = ml_collections.FieldReference(None, field_type=str)  # None: detect
    c.num_processes = 0  # 0: detect
    c.process_id = -1  # -1: detect
    return c
