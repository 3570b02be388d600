"""The one object a trainer reads its data through: :class:`Inputs`, made by :func:`make_inputs`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from addervit_jax.data import datasets, order
from addervit_jax.data import stream as streaming

__all__ = ["Inputs", "make_inputs"]


@dataclasses.dataclass(frozen=True)
class Inputs:
    """A dataset's training and evaluation batches, whether held in memory or streamed.

    ``train_batches(start_step)`` yields ``(step, batch)`` from ``start_step`` on, forever, in the
    :class:`~addervit_jax.data.order.BatchOrder` of ``(seed, step)``; ``eval_batches()`` yields
    every evaluation example once, with a ``mask``. Both paths give the same batches.
    ``streamed``: read through Grain (images resized to the model's size) rather than held in
    memory (images of the dataset's size).
    """

    info: datasets.DatasetInfo
    batch_size: int
    num_train: int
    num_eval: int
    _train: Callable[[int], Iterator[tuple[int, dict[str, np.ndarray]]]] = dataclasses.field(
        repr=False
    )
    _eval: Callable[[], Iterator[dict[str, np.ndarray]]] = dataclasses.field(repr=False)
    streamed: bool = False

    @property
    def steps_per_epoch(self) -> int:
        return order.steps_per_epoch(self.num_train, self.batch_size)

    def train_batches(self, start_step: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        return self._train(start_step)

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        return self._eval()


def make_inputs(
    name: str,
    *,
    train_split: str,
    eval_split: str,
    batch_size: int,
    seed: int,
    data_dir: str | None = None,
    stream: bool | None = None,
    image_size: int | None = None,
    num_workers: int | None = None,
) -> Inputs:
    """In-memory batches for small datasets, Grain streaming for large ones.

    Args:
      stream: force streaming (True) or decoding into memory (False); default: streaming only for
        the datasets that do not fit in memory (``imagenet2012``).
      image_size, num_workers: for streaming only (see :func:`~addervit_jax.data.stream_batches`).

    Splits are decoded on first use (and cached per process by :func:`~addervit_jax.data.load`),
    so evaluating a checkpoint never decodes the training split. A split that selects no
    examples (``"train[0:0]"``) is refused here, before anything trains or evaluates on it.
    """
    info = datasets._dataset_info(name)
    sizes = (
        datasets.num_examples(name, train_split, data_dir=data_dir),
        datasets.num_examples(name, eval_split, data_dir=data_dir),
    )
    for field, split, size in (
        ("train_split", train_split, sizes[0]),
        ("eval_split", eval_split, sizes[1]),
    ):
        if size < 1:
            raise ValueError(f"{field}={split!r} selects no examples of {name}")
    if stream is None:
        stream = datasets.is_streamed(name)
    if not stream:

        def load(split):
            return datasets.load(name, split, data_dir=data_dir)

        def train(start):
            return order.train_batches(
                load(train_split), batch_size=batch_size, seed=seed, start_step=start
            )

        def evaluate():
            return order.eval_batches(load(eval_split), batch_size=batch_size)

    else:
        common = {"data_dir": data_dir, "image_size": image_size, "num_workers": num_workers}

        def train(start):
            return streaming.stream_batches(
                name, train_split, batch_size=batch_size, seed=seed, start_step=start, **common
            )

        def evaluate():
            return streaming.stream_eval_batches(name, eval_split, batch_size=batch_size, **common)

    return Inputs(info, batch_size, *sizes, train, evaluate, streamed=stream)
