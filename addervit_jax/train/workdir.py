"""What a run directory holds and what a run may do with it: a new run never writes into a
directory that holds a run (:func:`run_files`), a resumed one only into a run of its config
(:func:`check_workdir`), a finished run is read back (:func:`finished_summary`), and
``overwrite`` moves the old run aside whole (:func:`move_aside`): nothing is deleted.
"""

from __future__ import annotations

import pathlib
import time

from addervit_jax.train.checkpoints import PARAMS_FILE, RunLock, read_json
from addervit_jax.train.config import config_differences

__all__ = [
    "CONVERSION_FILE",
    "RUN_FILES",
    "TEACHER_FILE",
    "check_recorded_sources",
    "check_sources_outside",
    "check_workdir",
    "finished_summary",
    "has_checkpoints",
    "move_aside",
    "run_files",
]

# What makes a directory hold a run, besides checkpoints: the params-only layout a repository
# keeps of a finished run has no checkpoints and is a run all the same.
RUN_FILES = ("config.json", PARAMS_FILE, "summary.json", "metrics.jsonl")


def has_checkpoints(workdir: pathlib.Path) -> bool:
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(directory.iterdir())


def run_files(workdir: pathlib.Path) -> list[str]:
    """The files of a run in ``workdir`` (``checkpoints/`` when it holds any); [] for none."""
    if not workdir.is_dir():
        return []
    found = [name for name in RUN_FILES if (workdir / name).exists()]
    return found + (["checkpoints/"] if has_checkpoints(workdir) else [])


def finished_summary(workdir: pathlib.Path) -> dict | None:
    """The summary of the finished run in ``workdir``, None where there is none."""
    summary_path = workdir / "summary.json"
    summary = read_json(summary_path) if summary_path.is_file() else None
    return summary if summary is not None and summary.get("status") == "finished" else None


def check_workdir(
    config, workdir: pathlib.Path, resume: bool, *, overwrite: bool = False, auto: bool = False
) -> None:
    """Refuse a run directory that this run cannot use, naming why and what to do instead
    (``auto``: the resume mode was decided by what the directory holds, ``resume="auto"``)."""
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir} is a file, not a directory")
    if not resume:
        found = run_files(workdir)
        if found and not overwrite:
            raise FileExistsError(
                f"{workdir} already holds a run ({', '.join(found)}); pass --resume to continue "
                "it, --overwrite to move it aside and start anew, or choose another --workdir"
            )
        return
    saved = workdir / "config.json"
    if not saved.is_file():
        if auto:
            raise ValueError(
                f"{workdir} holds {', '.join(run_files(workdir))} but no config.json: not a run "
                "that can be continued; choose another run directory"
            )
        raise FileNotFoundError(
            f"--resume: {workdir} holds no run to resume (no config.json); drop --resume to start "
            "a new run there"
        )
    differences = config_differences(read_json(saved), config)
    if differences and auto:
        raise ValueError(
            f"{workdir} holds a run of another config: {'; '.join(differences)}. Use another "
            "run directory, or delete that run to train this config there"
        )
    if differences:
        raise ValueError(
            f"--resume: the config differs from that of the run in {workdir}: "
            f"{'; '.join(differences)}. Resume with the run's config (its config.json), or start "
            "a new run in another --workdir"
        )


def check_sources_outside(config, workdir: pathlib.Path) -> None:
    """``overwrite`` moves ``workdir`` aside: refuse a teacher or ``init_from`` inside it."""
    here = workdir.resolve()
    for field, value in (
        ("distill.teacher", config.get("distill", {}).get("teacher")),
        ("init_from", config.get("init_from")),
    ):
        source = pathlib.Path(value).resolve() if value is not None else None
        if source is not None and here in (source, *source.parents):
            raise ValueError(
                f"--overwrite would move {field}={value!r} aside with the run in {workdir}; "
                "copy it elsewhere first, or choose another --workdir"
            )


#: a distilled run's record of its teacher (``load_teacher``'s description), written when it starts
TEACHER_FILE = "teacher.json"
#: a converted run's record of its conversion (``convert.convert``), with its source's checksum
CONVERSION_FILE = "conversion.json"


def check_recorded_sources(config, workdir: pathlib.Path, teacher: dict | None) -> None:
    """A resumed run's teacher (``teacher``: ``load_teacher``'s description of it now) and
    conversion source must be the runs it started from: their ``params_checksum`` against the
    one recorded in ``teacher.json`` / ``conversion.json`` (where recorded); a change is refused,
    naming the file, before anything is written."""
    recorded_path = workdir / TEACHER_FILE
    if teacher is not None and recorded_path.is_file():
        recorded = read_json(recorded_path).get("params_checksum")
        if recorded != teacher["params_checksum"]:
            raise ValueError(
                f"distill.teacher={teacher['workdir']!r} changed since this run started: its "
                f"params_checksum is {teacher['params_checksum']}, {recorded_path} recorded "
                f"{recorded}; put that teacher back, or start a new run"
            )
    conversion_path = workdir / CONVERSION_FILE
    source = config.get("init_from")
    if source is not None and conversion_path.is_file():
        recorded = read_json(conversion_path).get("source_params_checksum")
        summary_path = pathlib.Path(source) / "summary.json"
        now = read_json(summary_path).get("params_checksum") if summary_path.is_file() else None
        if recorded is not None and recorded != now:
            raise ValueError(
                f"init_from={source!r} changed since this run started: its params_checksum is "
                f"{now}, {conversion_path} recorded {recorded}; put that run back, or start a "
                "new run"
            )


def move_aside(workdir: pathlib.Path) -> pathlib.Path:
    """``overwrite``: move the run in ``workdir``, whole, to a new sibling
    ``<name>.replaced-<date>-<time>`` (under its lock: not while another process trains there)."""
    with RunLock(workdir):
        here = workdir.absolute()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside, n = here.with_name(f"{here.name}.replaced-{stamp}"), 1
        while aside.exists():
            aside, n = here.with_name(f"{here.name}.replaced-{stamp}-{n}"), n + 1
        try:
            here.rename(aside)
        except OSError as err:
            raise ValueError(
                f"--overwrite: cannot move the run in {workdir} aside to {aside}: "
                f"{err.strerror or err}"
            ) from err
    print(f"--overwrite: moved the run that was in {workdir} to {aside}", flush=True)
    return aside
