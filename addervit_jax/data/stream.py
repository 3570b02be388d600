"""Streaming with Grain, for datasets that do not fit in host memory (``imagenet2012``).

:func:`stream_batches` and :func:`stream_eval_batches` yield the batches of the in-memory
iterators (the same :class:`~addervit_jax.data.order.BatchOrder`), but read and decode in Grain
worker processes, resizing to a fixed image size on the way.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator

import numpy as np

from addervit_jax.data.datasets import _dataset_info, _open_source, _resolve_data_dir
from addervit_jax.data.order import BatchOrder

__all__ = ["stream_batches", "stream_eval_batches"]


def _resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size`` (bicubic, as torchvision's ImageNet recipes), then centre crop."""
    from PIL import Image

    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    squeeze = image.shape[2] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    resized = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out = resized[top : top + size, left : left + size]
    return out[..., None] if squeeze else out


_STREAM_OPEN_LOCK = threading.Lock()


class _DecodeBatch:
    """Grain map: batch number -> the decoded batch ``{"image", "label"}`` (and ``"mask"`` for
    evaluation) that :class:`BatchOrder` assigns to it.

    Whole batches are the unit of work, so a worker reads a batch's records in one ArrayRecord
    call. Picklable (Grain sends it to spawned workers); each process opens its own data source.
    """

    def __init__(self, name, split, data_dir, order: BatchOrder, image_size: int, train: bool):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.order, self.image_size, self.train = order, image_size, train
        self._source = None

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def __call__(self, number: int) -> dict[str, np.ndarray]:
        if self.train:
            index, mask = self.order.train(number), None
        else:
            index, mask = self.order.eval(number)
        if self._source is None:
            # Two reader threads opening at once import TFDS's lazy modules concurrently, which
            # deadlocked a worker (observed under load); one opens, the other waits.
            with _STREAM_OPEN_LOCK:
                if self._source is None:
                    self._source = _open_source(self.name, self.split, self.data_dir)
        examples = self._source.__getitems__([int(i) for i in index])
        images = [np.asarray(e["image"], np.uint8) for e in examples]
        batch = {
            "image": np.stack([_resize_center_crop(x, self.image_size) for x in images]),
            "label": np.asarray([e["label"] for e in examples], np.int32),
        }
        if mask is not None:
            batch["mask"] = mask
        return batch


def stream_eval_batches(
    name: str,
    split: str,
    *,
    batch_size: int,
    data_dir: str | None = None,
    image_size: int | None = None,
    num_workers: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Like :func:`~addervit_jax.data.eval_batches` (every example once, in order, the last batch
    padded, with a ``mask``), decoding in Grain worker processes as :func:`stream_batches` does."""
    info = _dataset_info(name)
    resolved_dir = _resolve_data_dir(data_dir)
    total = len(_open_source(name, split, resolved_dir))
    size = image_size or info.image_shape[0]
    order = BatchOrder(total, batch_size)
    decode = _DecodeBatch(name, split, resolved_dir, order, size, train=False)
    for _, batch in _stream(_grain_dataset(decode, 0, order.num_eval_batches, num_workers), 0):
        yield batch


def stream_batches(
    name: str,
    split: str,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    data_dir: str | None = None,
    image_size: int | None = None,
    num_workers: int | None = None,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Like :func:`~addervit_jax.data.train_batches`, reading and decoding in Grain workers.

    For datasets too large to decode into memory (``imagenet2012``). The order is the same pure
    function of ``(seed, step)`` (one :class:`BatchOrder`), so ``start_step`` resumes exactly,
    and for any ``num_workers`` the output is identical: Grain hands whole batches to workers
    round-robin and interleaves them back in order.

    Args:
      image_size: images are resized (shorter side, bicubic) and centre-cropped to
        ``image_size x image_size``; default ``DATASETS[name].image_shape[0]`` (224 for ImageNet,
        the native size for the others, which are then left untouched).
      num_workers: worker processes; 0 decodes in this process. Default: one per CPU core.
    """
    info = _dataset_info(name)
    resolved_dir = _resolve_data_dir(data_dir)
    source = _open_source(name, split, resolved_dir)
    order = BatchOrder(len(source), batch_size, seed)
    del source
    order.check_start(start_step)
    size = image_size or info.image_shape[0]
    decode = _DecodeBatch(name, split, resolved_dir, order, size, train=True)
    # Steps up to sys.maxsize: the stream is infinite, like train_batches.
    return _stream(_grain_dataset(decode, start_step, sys.maxsize, num_workers), start_step)


def _grain_dataset(decode, start: int, stop: int, num_workers: int | None):
    """Grain pipeline mapping batch numbers ``start..stop-1`` through ``decode`` in workers."""
    import grain

    if num_workers is None:
        num_workers = os.cpu_count() or 1
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    # One reader thread per process: decoding holds the GIL, so more threads would only contend;
    # parallelism comes from the worker processes.
    dataset = (
        grain.MapDataset.range(start, stop)
        .map(decode)
        .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    )
    if num_workers > 0:
        # Grain's worker start-up reads an absl flag, which raises UnparsedFlagAccessError unless
        # the program parsed its flags (absl.app does; our CLI, pytest and notebooks do not).
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return dataset


def _stream(dataset, step: int):
    iterator = iter(dataset)
    try:
        for batch in iterator:
            # Worker outputs arrive as views of shared memory that is unlinked when they are
            # garbage collected; plain copies keep that lifetime inside this loop (a caller that
            # holds batches until interpreter exit would otherwise leak the segments).
            yield step, {k: np.array(v) for k, v in batch.items()}
            step += 1
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
