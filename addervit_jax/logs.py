"""What a training run writes: a progress bar, metrics as JSON lines, a summary and PNG curves.

Files in the work directory:
  metrics.jsonl   one object per line: {"step", "split": "train"|"eval", "loss", "accuracy", ...}
                  (a resumed run appends to it, so the curves cover the whole run)
  events.out.tfevents.*
                  the same metrics as TensorBoard scalars ``train/loss``, ``eval/accuracy``, ...,
                  where ``tensorboardX`` is installed (the ``tensorboard`` extra; it writes event
                  files without TensorFlow): ``tensorboard --logdir runs``. A resumed run adds a
                  file.
  summary.json    the final summary returned by ``train.train``
  curves.png      training loss and train/eval accuracy against the step

Both JSON files are strict JSON: a number that is not finite (a NaN loss) is written as ``null``.
"""

from __future__ import annotations

import json
import math
import pathlib
import warnings

import numpy as np
from tqdm import tqdm

__all__ = ["RunLog", "dumps", "plot_curves", "read_metrics", "tensorboard_writer", "write_summary"]


def _to_python(metrics: dict) -> dict:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    """``json.dumps`` that writes strict JSON: NaN and infinities become ``null`` (Python's
    default writes the bare ``NaN`` that other JSON readers refuse)."""
    return json.dumps(_finite_or_none(value), allow_nan=False, **kwargs)


def write_summary(workdir: pathlib.Path, summary: dict) -> None:
    (pathlib.Path(workdir) / "summary.json").write_text(dumps(summary, indent=2) + "\n")


def tensorboard_writer(workdir: pathlib.Path, start_step: int = 0):
    """A ``tensorboardX.SummaryWriter`` into ``workdir``, or None where tensorboardX is missing.
    From ``start_step`` on (a resumed run), TensorBoard drops the points of earlier files."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(logdir=str(workdir), purge_step=start_step or None)


class RunLog:
    def __init__(
        self, workdir: pathlib.Path, *, total_steps: int, start_step: int, enabled: bool = True
    ):
        self.workdir, self.enabled = pathlib.Path(workdir), enabled
        self._step = start_step
        self._bar = (
            tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            if enabled
            else None
        )
        self._best = None
        if enabled:
            _drop_partial_last_line(self.workdir / "metrics.jsonl")
            # a resumed run's best evaluation so far: the sessions before this one, up to the
            # step it resumes from (a killed session may have logged later steps, run again now)
            earlier = [
                r["accuracy"]
                for r in read_metrics(self.workdir)
                if r["split"] == "eval" and r["step"] <= start_step
            ]
            self._best = max(earlier, default=None)
        self._file = open(self.workdir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self._events = tensorboard_writer(self.workdir, start_step) if enabled else None

    def header(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def _write(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(dumps(record) + "\n")
            self._file.flush()
        if self._events is not None:
            for name, value in record.items():
                if name not in ("step", "split"):
                    self._events.add_scalar(f"{record['split']}/{name}", value, record["step"])

    def train(self, step: int, metrics: dict, *, images_per_second: float) -> None:
        record = {"step": step, "split": "train", **_to_python(metrics)}
        record["images_per_second"] = images_per_second
        self._write(record)
        if self._bar is not None:
            self._bar.update(step - self._step)
            self._bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                acc=f"{record['accuracy']:.3f}",
                img_s=f"{images_per_second:.0f}",
            )
        self._step = step

    def eval(self, step: int, result: dict) -> None:
        record = {"step": step, "split": "eval", **result}
        self._write(record)
        if self._best is None or result["accuracy"] > self._best:
            self._best = result["accuracy"]
        if self.enabled:
            tqdm.write(
                f"step {step}: eval accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f} "
                f"({result['count']} images)"
            )

    def best_eval_accuracy(self) -> float | None:
        return self._best

    def finish(self, summary: dict) -> None:
        if not self.enabled:
            return
        self.close()
        write_summary(self.workdir, summary)
        plot_curves(read_metrics(self.workdir), self.workdir / "curves.png", title=_title(summary))
        print(
            f"{summary['status']}: {summary['variant']} on {summary['dataset']}, step "
            f"{summary['steps']}, eval accuracy {summary['eval_accuracy']:.4f}, "
            f"{summary['images_per_second']:.0f} images/s; wrote {self.workdir}",
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._events is not None:
            self._events.close()
            self._events = None


def _drop_partial_last_line(path: pathlib.Path) -> None:
    """Cut a last line that a killed process left without its newline (a partial record), so
    that a resumed run appends whole lines."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        content = f.read()
        if not content or content.endswith(b"\n"):
            return
        keep = content.rfind(b"\n") + 1
        f.truncate(keep)
    warnings.warn(
        f"{path}: dropped a partial last line ({len(content) - keep} bytes) left by an "
        "interrupted write",
        stacklevel=3,
    )


def _title(summary: dict) -> str:
    return f"{summary['variant']} on {summary['dataset']}"


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    """The records of ``metrics.jsonl``, one per (split, step), in file order.

    A run killed without a signal (no final checkpoint) and resumed repeats the steps after its
    last checkpoint; the later record of a step is the one the resumed run continued from.
    """
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not a JSON record ({err.msg})") from None
    latest = {(r["split"], r["step"]): i for i, r in enumerate(records)}
    return [r for i, r in enumerate(records) if latest[(r["split"], r["step"])] == i]


def plot_curves(records: list[dict], path: pathlib.Path, *, title: str = "") -> None:
    """Loss (left) and accuracy (right) against the step, train and eval."""
    # a Figure without pyplot: no global backend switch, so a notebook's inline plots keep working
    from matplotlib.figure import Figure

    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for rows, label, style in ((train, "train", "-"), (evals, "eval", "o-")):
        if rows:
            steps = [r["step"] for r in rows]
            ax_loss.plot(steps, [r["loss"] for r in rows], style, label=label, markersize=3)
            ax_acc.plot(steps, [r["accuracy"] for r in rows], style, label=label, markersize=3)
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title=f"{title}: loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title=f"{title}: accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
