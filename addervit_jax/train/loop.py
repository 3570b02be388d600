"""The one training loop: :func:`train` runs a config in a run directory to its end, on one CPU,
one GPU, or many devices and hosts, and leaves ``config.json``, ``metrics.jsonl``, checkpoints,
``params.msgpack`` and ``summary.json`` there.

A run is resumable at any step: the data order is a function of ``(seed, step)`` and the
augmentation key of ``fold_in(rng, step)``, so a run resumed from a checkpoint at step ``k``
computes exactly what the uninterrupted run computes from step ``k`` on (bit for bit on CPU),
and its summary counts the time, the images and the best evaluation of every session.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from addervit_jax import timing
from addervit_jax.train import convert
from addervit_jax.train.checkpoints import (
    PARAMS_FILE,
    Checkpoints,
    RunLock,
    params_checksum,
    read_json,
    save_params,
)
from addervit_jax.train.config import (
    check_inputs,
    make_inputs,
    uses_adaptive_lr,
    validate_config,
)
from addervit_jax.train.evaluation import evaluate, load_teacher
from addervit_jax.train.state import create_train_state, global_batch, make_mesh, shard_state
from addervit_jax.train.step import eval_step, jit_train_step
from addervit_jax.train.workdir import (
    TEACHER_FILE,
    check_recorded_sources,
    check_sources_outside,
    check_workdir,
    finished_summary,
    move_aside,
    run_files,
)

__all__ = ["RESUME_MODES", "ConversionInterrupted", "TrainingDiverged", "train"]

RESUME_MODES = (False, True, "auto")


class TrainingDiverged(RuntimeError):
    """The loss, a parameter or the evaluation loss became NaN or infinite; the last good
    checkpoint is kept, the state that is not finite is never saved, and ``summary.json`` says
    ``"status": "diverged"``."""


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


class ConversionInterrupted(Exception):
    """SIGTERM or SIGINT during the conversion of ``init_from``, before the run's first
    checkpoint: nothing of the run is saved; ``--resume`` converts again (``signal``: its
    number)."""

    def __init__(self, signum: int, workdir: pathlib.Path):
        self.signal = signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} while converting init_from, before "
            f"the first checkpoint of {workdir}: nothing of the run is saved yet; resume with "
            f"addervit train --workdir {workdir} --resume [same --config flags] to convert again"
        )


class _InterruptSignals(_StopSignals):
    """SIGTERM/SIGINT raise :class:`ConversionInterrupted` at once (no step to finish first)."""

    def __init__(self, workdir: pathlib.Path):
        super().__init__()
        self.workdir = workdir

    def _handle(self, signum, frame):
        raise ConversionInterrupted(signum, self.workdir)


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
        return {**self.totals(), "images_per_second": rate}


@functools.cache
def _all_finite(mesh):
    """A jitted ``tree -> bool``: whether every floating-point array of ``tree`` is finite."""

    def all_finite(tree):
        leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
        return functools.reduce(
            jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in leaves], jnp.bool_(True)
        )

    return jax.jit(all_finite, out_shardings=NamedSharding(mesh, P()))


def _finite(state, mesh) -> bool:
    """Whether the state a checkpoint holds (parameters, optimiser state, non-trainable
    variables) is finite: a last update can make it NaN while the loss of its step is finite."""
    ok = _all_finite(mesh)((state.params, state.opt_state, state.rest))
    return bool(np.asarray(ok.addressable_data(0)))


def _device_description() -> str:
    """The devices (with the CPU model on CPU), JAX version and process count, for summaries."""
    return f"{timing.describe_device()}, {jax.process_count()} process(es)"


def train(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
) -> dict:
    """Train ``config`` in ``workdir``; returns the summary (also written to summary.json).

    ``resume``: ``False`` starts a new run (and refuses a directory that holds one);
    ``True`` continues the run in ``workdir`` from its newest checkpoint that restores (the config
    may differ from the run's only in :data:`~addervit_jax.train.config.RESUMABLE_CHANGES`);
    ``"auto"`` takes the run to its end whatever state it is in: a finished run is read back
    (its summary returned, nothing trained), a run with checkpoints resumes, and a directory
    without either starts; a directory that holds a run of another config is refused, naming the
    fields that differ. ``True`` on a finished run reads it back too.

    A directory that holds a run (``config.json``, ``params.msgpack``, ``summary.json``,
    ``metrics.jsonl`` or checkpoints) is never written by a new run: without ``resume`` it is
    refused, unless ``overwrite`` (``--overwrite``), which moves that run aside to the sibling
    directory ``<workdir>.replaced-<date>-<time>`` (nothing is deleted) once every check has
    passed, then starts anew in an empty ``workdir``.
    """
    from addervit_jax import logs  # matplotlib and tqdm only when training

    if resume not in RESUME_MODES:
        raise ValueError(f"resume={resume!r}; expected one of {RESUME_MODES}")
    if overwrite not in (False, True):
        raise ValueError(f"overwrite={overwrite!r}; expected True or False")
    if overwrite and resume:
        raise ValueError(
            f"overwrite=True (--overwrite) starts a new run; it cannot be combined with "
            f"resume={resume!r} (--resume)"
        )
    if not os.fspath(workdir).strip():
        raise ValueError(
            f"workdir={os.fspath(workdir)!r} is empty: name the run directory (--workdir DIR), "
            "or leave --workdir out for a new one under ./runs"
        )
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
    auto = resume == "auto"
    if auto:
        resume = bool(run_files(workdir))
    check_workdir(config, workdir, resume, overwrite=overwrite, auto=auto)
    if resume:
        finished = finished_summary(workdir)
        if finished is not None:  # nothing to train, nothing written (no second final eval)
            print(f"{workdir}: finished before, read back", flush=True)
            return finished
    if overwrite:
        check_sources_outside(config, workdir)
    teacher, teacher_info = None, None
    if config.get("distill") is not None and config.distill.teacher is not None:
        teacher, teacher_info = load_teacher(config)  # fails here on a wrong teacher
    if config.get("init_from") is not None:
        convert.check_source(config)  # fails here on a run that cannot be converted
    if resume:
        check_recorded_sources(config, workdir, teacher_info)  # the same teacher and source
    inputs = make_inputs(config)  # fails here on a split that selects no examples
    check_inputs(config, inputs, warn=not resume)
    is_main = jax.process_index() == 0
    replace = overwrite and bool(run_files(workdir))
    _barrier("addervit: run directory checked")  # by every process, before any writes into it
    if replace:
        if is_main:
            move_aside(workdir)
        _barrier("addervit: the old run moved aside")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create --workdir {workdir}: {err.strerror or err}") from err
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
        if is_main:
            check_workdir(config, workdir, resume)  # again: it may have changed before the lock
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
            if teacher_info is not None and not (workdir / TEACHER_FILE).is_file():
                (workdir / TEACHER_FILE).write_text(json.dumps(teacher_info, indent=2) + "\n")
        return _train_in(config, workdir, resume, inputs, teacher, teacher_info, logs)


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
        step_fn = jit_train_step(config, state, mesh, inputs.info)
        eval_fn = jax.jit(lambda s, b: eval_step(s, b, info=inputs.info))

        def evaluate_all(s):
            return evaluate(s, inputs.eval_batches(), mesh=mesh, info=inputs.info, jitted=eval_fn)

        log = logs.RunLog(
            workdir, total_steps=total_steps, start_step=int(state.step), enabled=_is_main()
        )
        log.header(
            f"{config.variant} on {config.dataset} ({inputs.num_train} train / "
            f"{inputs.num_eval} eval images), {total_steps} steps of {config.batch_size}, "
            f"{_device_description()}"
        )
        head = {
            "variant": config.variant,
            "dataset": config.dataset,
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
        }

        def diverged(problem: str, step: int):
            _diverged(problem, step, config, checkpoints, log, {**head, **clock.summary()})

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
                        diverged(f"loss became {bad_loss}", done)
                    log.train(done, window, images_per_second=rate)
                    # A step's evaluation is written before its checkpoint, so that no kill
                    # loses it (after the checkpoint, a resumed run starts past the step); a
                    # stop signal saves first, its grace time being short.
                    stopping = stop.received is not None
                    if evaluate_now and not stopping:
                        log.eval(done, evaluate_all(state))
                    if save:
                        if not _finite(state, mesh):
                            diverged("the parameters or optimiser state became non-finite", done)
                        checkpoints.save(state, **clock.totals())
                    if evaluate_now and stopping:
                        log.eval(done, evaluate_all(state))
                    clock.restart()
                if stop.received is not None or preempted:
                    status = f"interrupted by {stop.name}" if stop.received else "preempted"
                    break

        # A last update can leave a NaN model behind a finite loss: a model that is not finite,
        # or whose evaluation loss is not, is never saved nor reported "finished".
        if not _finite(state, mesh):
            diverged("the parameters or optimiser state became non-finite", int(state.step))
        result = None
        if status == "finished":  # (an interrupted run saves first: its grace time is short)
            result = evaluate_all(state)
            if not math.isfinite(result["loss"]):
                diverged(f"the evaluation loss became {result['loss']}", int(state.step))
        checkpoints.save(state, **clock.totals())
        checkpoints.wait()
        save_params(state, workdir / PARAMS_FILE)
        if result is None:
            result = evaluate_all(state)
        else:
            log.eval(int(state.step), result)
        summary = {
            "variant": config.variant,
            "dataset": config.dataset,
            "steps": int(state.step),
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
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
        if (workdir / convert.CONVERSION_FILE).is_file():
            summary["conversion"] = read_json(workdir / convert.CONVERSION_FILE)
    log.finish(summary)
    checkpoints.close()
    if stop.received:
        summary["signal"] = stop.received
    return summary


def _is_main() -> bool:
    return jax.process_index() == 0


def _barrier(name: str) -> None:
    """Wait for every process of a multi-process run (nothing in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _start(config, workdir, resume, checkpoints, mesh, total_steps, inputs):
    """The state to train from (the newest checkpoint that restores, when resuming; the
    conversion of ``init_from``, when starting with one) and the clock of the run so far;
    refuses to resume when no checkpoint restores."""
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
        clock = _Clock(float(meta["train_seconds"]), int(meta["images_seen"]))
        return shard_state(state, mesh, config.fsdp), clock
    if checkpoints.broken:
        checkpoints.close()
        raise ValueError(
            f"--resume: no checkpoint in {directory} restores (steps {checkpoints.broken} are "
            f"damaged); delete {directory} to train again from step 0, or train into another "
            "--workdir"
        )
    if resume:
        print(f"no checkpoint in {directory} yet: starting from step 0", flush=True)
    if config.get("init_from") is not None:
        with _InterruptSignals(workdir):
            state = convert.convert(config, state, inputs, workdir)
        state = shard_state(state, mesh, config.fsdp)
    return state, _Clock()


def _diverged(problem: str, step: int, config, checkpoints: Checkpoints, log, head: dict):
    """Stop a run whose loss, state or evaluation is no longer finite: nothing of that step is
    saved, ``summary.json`` says ``"status": "diverged"``, and the message names the last good
    checkpoint."""
    checkpoints.wait()
    log.close()
    saved = checkpoints.manager.latest_step()
    kept = (
        f"the last good checkpoint, step {saved}, is kept in {checkpoints.directory}"
        if saved is not None
        else "no checkpoint had been written yet"
    )
    message = (
        f"{problem} by step {step} (variant {config.variant}, learning_rate "
        f"{config.learning_rate}); {kept}; the state of step {step} was not saved"
    )
    if _is_main():
        from addervit_jax import logs

        summary = {
            **head,
            "steps": step,
            "status": "diverged",
            "reason": message,
            "last_good_step": saved,
            "device": _device_description(),
            "workdir": str(log.workdir),
        }
        logs.write_summary(log.workdir, summary)
    raise TrainingDiverged(message)
