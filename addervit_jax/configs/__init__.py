"""Experiment configs, one file per experiment, each with a ``get_config()`` (big_vision style).

``addervit train --config NAME`` takes the name of a file here (without ``.py``) or a path to any
config file of the same form; ``--config.key=value`` overrides a field.
"""

import pathlib

import ml_collections

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
    c.grad_clip = 1.0
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
