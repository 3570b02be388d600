"""Batch order: which examples each training step and each evaluation batch holds.

One object, :class:`BatchOrder`, answers this for the in-memory iterators below and for the
streamed ones of :mod:`addervit_jax.data.stream`, so the two paths cannot drift apart.

* **Training.** Step ``s`` is slice ``s % steps_per_epoch`` of epoch ``e = s // steps_per_epoch``,
  whose order is ``np.random.default_rng([seed, e]).permutation(N)`` cut into full batches (the
  remainder is dropped). A batch is a pure function of ``(seed, step)``: resuming from a checkpoint
  at step ``k`` is ``start_step=k``, with no iterator state to save.
* **Evaluation.** Every example exactly once, in order; the last batch is padded by repeating the
  last example (a real image, so padding cannot produce values the model never sees) and carries a
  ``mask``, False on padding, by which metrics must be weighted. (The PyTorch original shuffled
  validation and dropped the last batch, so its accuracies were over a random 99% of the set.)
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from addervit_jax.data.datasets import InMemoryData

__all__ = ["BatchOrder", "eval_batches", "steps_per_epoch", "train_batches"]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch; training drops the remainder so every step has ``batch_size``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return num_examples // batch_size


class BatchOrder:
    """The example indices of every training step and every evaluation batch of one split.

    ``train(step)`` and ``eval(number)`` are pure functions of the constructor's arguments and
    their own; the permutation of the current epoch is kept between calls (one tuple replaced
    whole, so reader threads may share an instance) and dropped when pickled (Grain sends the
    order to its worker processes).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
        self.num_examples, self.batch_size, self.seed = int(num_examples), int(batch_size), seed
        self._epoch_order: tuple[int, np.ndarray | None] = (-1, None)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.num_examples, self.batch_size)

    @property
    def num_eval_batches(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def check_start(self, start_step: int) -> None:
        """Raise unless training can start at ``start_step`` (and an epoch has a full batch)."""
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the {self.num_examples} examples of "
                "the split, so an epoch would have no full batch; lower the batch size"
            )
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")

    def train(self, step: int) -> np.ndarray:
        """The indices of training step ``step``: ``batch_size`` distinct examples."""
        spe = self.steps_per_epoch
        epoch, order = self._epoch_order
        if epoch != step // spe:
            epoch = step // spe
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            self._epoch_order = (epoch, order)
        start = (step % spe) * self.batch_size
        return order[start : start + self.batch_size]

    def eval(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        """The indices of evaluation batch ``number`` (padded with the last one) and its mask."""
        index = np.arange(number * self.batch_size, (number + 1) * self.batch_size)
        mask = index < self.num_examples
        return np.minimum(index, self.num_examples - 1), mask

    def __getstate__(self):
        return {**self.__dict__, "_epoch_order": (-1, None)}


def train_batches(
    data: InMemoryData, *, batch_size: int, seed: int, start_step: int = 0
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Infinite ``(step, {"image": uint8 (B,H,W,C), "label": int32 (B,)})`` from ``start_step``,
    in the :class:`BatchOrder` of ``(seed, step)``: ``start_step=k`` yields what the uninterrupted
    iterator yields from step ``k`` on."""
    order = BatchOrder(len(data), batch_size, seed)
    order.check_start(start_step)
    return _train_batches(data, order, start_step)


def _train_batches(data: InMemoryData, order: BatchOrder, step: int):
    while True:
        index = order.train(step)
        yield step, {"image": data.images[index], "label": data.labels[index]}
        step += 1


def eval_batches(data: InMemoryData, *, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once, in order, in batches of ``batch_size`` with a ``"mask"``
    (bool ``(B,)``, False on the padding of the last batch; see :class:`BatchOrder`)."""
    order = BatchOrder(len(data), batch_size)
    return _eval_batches(data, order)


def _eval_batches(data: InMemoryData, order: BatchOrder):
    for number in range(order.num_eval_batches):
        index, mask = order.eval(number)
        yield {"image": data.images[index], "label": data.labels[index], "mask": mask}
