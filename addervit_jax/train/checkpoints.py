"""What a run leaves on disk and reads back: Orbax checkpoints with a checksum of their arrays
(:class:`Checkpoints`), the params-only file of a finished run (:func:`save_params`,
:func:`load_params`), :func:`restore` of a run directory from either, and the lock that gives a
run directory to one process at a time (:class:`RunLock`).

Every file records a sha256 of the arrays it holds (names, dtypes, shapes, bytes), verified when
it is read: a damaged file is never trained from or evaluated silently.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import json
import logging
import os
import pathlib
import sys
import threading
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from addervit_jax.train.state import TrainState, create_train_state, make_mesh, shard_state

__all__ = [
    "PARAMS_FILE",
    "Checkpoints",
    "RunDirectoryBusy",
    "RunLock",
    "load_params",
    "read_json",
    "restore",
    "save_params",
]

PARAMS_FILE = "params.msgpack"


def read_json(path: pathlib.Path) -> dict:
    """A run's JSON file (``config.json``, ``summary.json``, ...) as a dict; a file that is not a
    JSON object raises ``ValueError`` naming it, not a bare ``JSONDecodeError``."""
    try:
        value = json.loads(pathlib.Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is damaged: not JSON ({err.msg}, line {err.lineno} column {err.colno})"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is damaged: not UTF-8 text") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is damaged: a JSON {type(value).__name__}, not an object")
    return value


def _flat(tree) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="."): x for path, x in leaves}


def _unflat(template, flat: dict[str, Any]):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = [jax.tree_util.keystr(path, simple=True, separator=".") for path, _ in leaves]
    return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in keys])


def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # FSDP over several processes
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _digest(flat: dict[str, Any]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a tree's arrays, in name order."""
    h = hashlib.sha256()
    for name in sorted(flat):
        a = np.ascontiguousarray(_host(flat[name]))
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# The parts of a state a checkpoint holds: ``rest``, the model's non-trainable variables (running
# batch statistics), since 2026-12-06; a checkpoint written before holds the first four and its
# ``rest`` is rebuilt from the config (they were constants then).
_CHECKPOINTED = ("step", "params", "opt_state", "rng", "rest")
_BEFORE_REST = ("step", "params", "opt_state", "rng")


def _checkpointed(state: TrainState, parts=_CHECKPOINTED) -> dict:
    """The parts of a state a checkpoint holds, saved by Orbax as they are (the NNX states
    included); the graph and the optimiser are rebuilt from the config."""
    return {name: getattr(state, name) for name in parts}


_quiet_lock = threading.Lock()


def _quiet_closed_loop_callbacks() -> None:
    """Keep the echo of a failed restore from burying its one-line verdict (once per process).

    When TensorStore fails one read of a checkpoint, Orbax ends the restore and closes its event
    loop while the other reads are still in flight; each of those then calls
    ``loop.call_soon_threadsafe`` on the closed loop from a TensorStore thread, and Python prints
    the ``RuntimeError('Event loop is closed')`` through ``sys.unraisablehook``: hundreds of
    tracebacks (197 for a tiny run's two emptied checkpoints; a probe of a larger run counted
    about 18,000 lines) above the reason that matters. The hook installed here drops exactly
    those (that error, raised in asyncio's ``_check_closed``) and hands everything else to the
    hook that was there before; the filter of :class:`_UnretrievedReads` goes on the asyncio
    logger at the same time.
    """
    with _quiet_lock:
        previous = sys.unraisablehook
        if getattr(previous, "_addervit_quiet", False):
            return

        def hook(unraisable):
            err, tb = unraisable.exc_value, unraisable.exc_traceback
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            if (
                isinstance(err, RuntimeError)
                and str(err) == "Event loop is closed"
                and tb is not None
                and tb.tb_frame.f_code.co_name == "_check_closed"
            ):
                return
            previous(unraisable)

        hook._addervit_quiet = True
        sys.unraisablehook = hook
        logging.getLogger("asyncio").addFilter(_UnretrievedReads())


class _UnretrievedReads(logging.Filter):
    """Drops asyncio's "Future/Task exception was never retrieved" for the reads a failed restore
    left behind (their text names Orbax or TensorStore), each holding the error the restore
    already reported; they come whenever the garbage collector reaches them, even at exit."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            "exception was never retrieved" in message
            and ("orbax" in message or "tensorstore" in message)
        )


@contextlib.contextmanager
def _failed_reads_quiet():
    """While restores are tried: the closed-loop callbacks dropped and asyncio's reports of the
    failed reads filtered, both for good (:func:`_quiet_closed_loop_callbacks`), and the failed
    reads collected before leaving, so that their echo, if any, comes before the verdict."""
    _quiet_closed_loop_callbacks()
    try:
        yield
    finally:
        gc.collect()


class Checkpoints:
    """Orbax checkpoints of (params, optimiser state, step, rng, non-trainable variables) plus the
    data position, which is the step: the batch order is a function of (seed, step).

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
            "parts": list(_CHECKPOINTED),
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
        with _failed_reads_quiet():
            for step in sorted(self.manager.all_steps(), reverse=True):
                try:
                    state, meta = self._restore(step, template)
                except Exception as err:  # noqa: BLE001 - any unreadable checkpoint falls back
                    self.broken.append(step)
                    warnings.warn(
                        f"checkpoint at step {step} in {self.manager.directory} could not be "
                        f"restored ({type(err).__name__}: {str(err)[:200]}); trying the previous "
                        "one",
                        stacklevel=2,
                    )
                    continue
                self.good.add(step)
                return state, meta
        return None

    def _restore(self, step: int, template: TrainState) -> tuple[TrainState, dict]:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = dict(meta.meta)
        if meta.get("layout") != "tree" or "sha256" not in meta:
            raise ValueError(
                "it has no checksum and layout in its metadata (written by a version of "
                "addervit-jax before 2026-12, which this one does not read)"
            )
        parts = tuple(meta.get("parts", _BEFORE_REST))
        if parts not in (_CHECKPOINTED, _BEFORE_REST):
            raise ValueError(f"it holds the parts {parts}, not {_CHECKPOINTED}")
        target = _checkpointed(template, parts)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        ).state
        if _digest(_flat(restored)) != meta["sha256"]:
            raise ValueError("its arrays do not match the checksum written with them")
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


class RunDirectoryBusy(RuntimeError):
    """Another process is training in this run directory."""


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
        intact = checksum is not None and checksum == _variables_digest(tree)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ValueError(f"{path} is damaged: it does not load ({type(err).__name__})") from err
    if checksum is None:
        raise ValueError(f"{path} has no checksum: it is not a params file of addervit-jax")
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


def params_checksum(params) -> float:
    """Sum of |p| over all parameters (float64 on the host): equal runs give equal checksums;
    ``summary.json`` records it as ``params_checksum``."""
    total = jax.jit(
        lambda p: sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(p)),
        out_shardings=NamedSharding(make_mesh(), P()),
    )(params)
    return float(np.asarray(total.addressable_data(0)))


def restore(workdir: str | os.PathLike) -> tuple[TrainState, dict, ml_collections.ConfigDict]:
    """A run's state: (state, metadata with the step and the ``source`` file, config).

    **The final state of a finished run is its ``params.msgpack``**: for a run whose
    ``summary.json`` says ``"finished"`` that file is read, verified by the checksum saved in it
    and against the summary's ``params_checksum``, and never a checkpoint; a missing, damaged or
    foreign file is an error naming it, never an older state. Evaluation, distillation teachers
    and conversion sources all read runs through here. An unfinished run gives its newest
    checkpoint that restores (an older one with a warning naming the damaged steps), or, where
    it has none, its ``params.msgpack``. The optimiser state of a state read from
    ``params.msgpack`` is fresh."""
    workdir = pathlib.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{workdir} is not a training run: no config.json")
    config = ml_collections.ConfigDict(read_json(config_path))
    template = shard_state(
        create_train_state(config, total_steps=1, steps_per_epoch=1), make_mesh(), False
    )
    summary_path = workdir / "summary.json"
    summary = read_json(summary_path) if summary_path.is_file() else {}
    if summary.get("status") == "finished":
        return (*_final_state(workdir, summary, template), config)
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
    step = summary.get("steps")
    state = load_params(params_path, template)
    state = shard_state(state.replace(step=jnp.asarray(step or 0, jnp.int32)), make_mesh(), False)
    return state, {"step": step, "source": PARAMS_FILE}, config


def _final_state(workdir: pathlib.Path, summary: dict, template: TrainState) -> tuple:
    """The finished run's ``params.msgpack`` as (state, metadata): :func:`restore`'s rule."""
    path = workdir / PARAMS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the final state of the finished run in {workdir} is that file"
        )
    state = load_params(path, template)  # ValueError naming the file if damaged
    recorded = summary.get("params_checksum")
    if recorded is not None:
        found = params_checksum(state.params)
        if not np.isclose(found, recorded, rtol=1e-5, atol=0.0):
            raise ValueError(
                f"{path} does not hold the parameters {workdir / 'summary.json'} records "
                f"(params_checksum {found:.6g}, recorded {recorded:.6g}): it was replaced"
            )
    step = summary.get("steps")
    state = shard_state(state.replace(step=jnp.asarray(step or 0, jnp.int32)), make_mesh(), False)
    return state, {"step": step, "source": PARAMS_FILE}
