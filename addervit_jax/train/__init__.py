"""The one trainer, a package of one job per module; every public name is re-exported here.

``train(config, workdir, resume=False | True | "auto", overwrite=False)`` trains any named
variant on any dataset of ``addervit_jax.data`` on one CPU, one GPU, or many devices and hosts.

==================  =============================================================================
module              its one job
==================  =============================================================================
``config``          what the trainer reads from a config, ``validate_config``, resume rule
``state``           ``TrainState``, its creation, its placement on the ``data`` mesh
``distill``         the teacher, the logit and feature distillation terms
``step``            the loss, ``train_step`` / ``eval_step`` (pure), the jitted step
``checkpoints``     checksummed Orbax checkpoints, ``params.msgpack`` (final state), ``restore``
``workdir``         what a run directory holds; what a new, resumed or overwriting run may do;
                    a resumed run's teacher and source (``teacher.json``, ``conversion.json``)
``evaluation``      ``evaluate``, ``evaluate_workdir`` (``addervit eval``), ``load_teacher``
``convert``         a new run started from a finished run of another variant (``init_from``)
``loop``            ``train``: a run to its end, resumable at any step
==================  =============================================================================

Dependencies point one way: ``config`` <- ``state`` <- ``distill`` <- ``step``;
{``state``, ``checkpoints``, ``step``} <- ``evaluation`` <- ``convert`` <- ``loop``;
{``config``, ``checkpoints``} <- ``workdir`` <- ``loop``;
``addervit eval`` needs nothing of the loop.
"""

from addervit_jax.train import convert
from addervit_jax.train.checkpoints import (
    PARAMS_FILE,
    Checkpoints,
    RunDirectoryBusy,
    RunLock,
    load_params,
    params_checksum,
    read_json,
    restore,
    save_params,
)
from addervit_jax.train.config import (
    RESUMABLE_CHANGES,
    check_inputs,
    config_differences,
    make_inputs,
    model_overrides,
    uses_adaptive_lr,
    validate_config,
)
from addervit_jax.train.distill import (
    FEATURE_KERNELS,
    Teacher,
    distill_loss,
    feature_loss,
    inference_model,
)
from addervit_jax.train.evaluation import (
    evaluate,
    evaluate_workdir,
    finished_run,
    load_teacher,
)
from addervit_jax.train.loop import RESUME_MODES, ConversionInterrupted, TrainingDiverged, train
from addervit_jax.train.state import (
    TrainState,
    create_train_state,
    global_batch,
    make_mesh,
    shard_state,
)
from addervit_jax.train.step import StepRecipe, eval_step, jit_train_step, train_step
from addervit_jax.train.workdir import (
    RUN_FILES,
    check_sources_outside,
    check_workdir,
    finished_summary,
    has_checkpoints,
    move_aside,
    run_files,
)

__all__ = [
    "FEATURE_KERNELS",
    "PARAMS_FILE",
    "RESUMABLE_CHANGES",
    "RESUME_MODES",
    "RUN_FILES",
    "Checkpoints",
    "RunDirectoryBusy",
    "RunLock",
    "StepRecipe",
    "Teacher",
    "TrainState",
    "ConversionInterrupted",
    "TrainingDiverged",
    "check_inputs",
    "check_sources_outside",
    "check_workdir",
    "config_differences",
    "convert",
    "create_train_state",
    "distill_loss",
    "eval_step",
    "feature_loss",
    "finished_run",
    "finished_summary",
    "evaluate",
    "evaluate_workdir",
    "global_batch",
    "has_checkpoints",
    "inference_model",
    "jit_train_step",
    "load_params",
    "load_teacher",
    "make_inputs",
    "make_mesh",
    "model_overrides",
    "move_aside",
    "params_checksum",
    "read_json",
    "restore",
    "run_files",
    "save_params",
    "shard_state",
    "train",
    "train_step",
    "uses_adaptive_lr",
    "validate_config",
]
