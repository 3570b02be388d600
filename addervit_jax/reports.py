"""The head of every result file under ``experiments/results``: the command that reproduces it,
the hardware that made it and the date, as Markdown bullet lines.

    - command: `python experiments/op_counts.py --variants multi`
    - hardware: cpu (Intel(R) Xeon(R) Processor, 2 cores), jax 0.10.2
    - date: 2025-01-31

A script adds its own bullets (recipe, model, timing method) after these.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import shlex
import sys

from addervit_jax import timing

__all__ = ["command_line", "header_lines", "today", "unwritable"]


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces a result: ``python experiments/<script> <args>``, the
    arguments being ``argv`` (None: this process's ``sys.argv[1:]``), shell-quoted."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", f"experiments/{script}", *args])


def today() -> str:
    """Today's date as ``YYYY-MM-DD``."""
    return datetime.date.today().isoformat()


def header_lines(
    command: str,
    hardware: str | None = None,
    *,
    hardware_label: str = "hardware",
    date: str | None = None,
) -> list[str]:
    """``- command: `COMMAND```, ``- HARDWARE_LABEL: HARDWARE`` and ``- date: DATE``.

    ``hardware`` defaults to :func:`timing.describe_device` (pass it to add words, e.g. "(the
    counts do not depend on it)", or to name the hardware of other processes); ``date`` to
    :func:`today` (pass the one a JSON record beside the report carries).
    """
    hardware = timing.describe_device() if hardware is None else hardware
    return [
        f"- command: `{command}`",
        f"- {hardware_label}: {hardware}",
        f"- date: {today() if date is None else date}",
    ]


def unwritable(out: str) -> str | None:
    """Why the results directory ``out`` cannot be created or written into, or None: checked
    before a long computation whose results go there."""
    path = pathlib.Path(out)
    if not out.strip():
        return "is empty"
    if path.exists() and not path.is_dir():
        return "is a file, not a directory"
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
