"""Datasets, batch order and augmentation (SPEC section 5).

Three layers, each with one job:

* **Loading.** :func:`load` returns a whole split as uint8 NHWC ``images`` and int32 ``labels`` in
  host memory. ``digits`` is scikit-learn's bundled 8x8 set, so a fresh machine trains a real model
  without a download; every other dataset is read with ``tfds.data_source`` (ArrayRecord, random
  access, no TensorFlow) from ``data_dir`` or ``$TFDS_DATA_DIR``. Decoding (PNG through Pillow for
  CIFAR) is the slow part, so a split is decoded once per process (an in-process cache) and, for
  TFDS datasets, once per machine (an ``.npz`` cache outside ``data_dir``, which may be read-only).
  ``imagenet2012`` does not fit in memory: :func:`stream_batches` reads it with Grain worker
  processes instead.
* **Order.** :func:`train_batches` and :func:`stream_batches` yield ``(step, batch)`` where the
  batch is a pure function of ``(seed, step)``: epoch ``e = step // steps_per_epoch`` is the
  permutation ``np.random.default_rng([seed, e]).permutation(N)`` cut into full batches (the
  remainder is dropped). Resuming from a checkpoint at step ``k`` is ``start_step=k``, with no
  iterator state to save. :func:`eval_batches` visits every example exactly once, in order, and
  pads the last batch with a ``mask`` (the PyTorch original shuffled validation and dropped the
  last batch, so its accuracies were over a random 99% of the set; SPEC section 9).
* **Augmentation.** :func:`preprocess` runs on the accelerator under ``jax.jit``: random crop with
  zero padding, horizontal flip, optional RandAugment, then normalisation by the dataset's channel
  statistics. All randomness comes from the ``key`` it is given.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "DATASETS",
    "RANDAUGMENT_OPS",
    "DatasetInfo",
    "InMemoryData",
    "clear_cache",
    "eval_batches",
    "load",
    "preprocess",
    "rand_augment",
    "steps_per_epoch",
    "is_streamed",
    "num_examples",
    "stream_batches",
    "stream_eval_batches",
    "train_batches",
]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the augmentation need to know about a dataset.

    ``image_shape`` is ``(H, W, C)`` of the arrays the pipeline yields (for ``imagenet2012`` the
    size after :func:`stream_batches` resizes). ``mean``/``std`` are per-channel statistics in
    ``[0, 1]`` pixel units. ``flip`` says whether a mirrored image keeps its label (not for digits).
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        # Mean and (population) std of the 1,437-image "train" split defined below, pixels scaled
        # to [0, 1] after the 0..16 -> 0..255 conversion; computed once with NumPy in float64.
        DatasetInfo("digits", 10, (8, 8, 1), (0.3055,), (0.3759,), flip=False),
        # CIFAR-10/100: per-channel mean and std over all pixels of the 50,000 training images,
        # the values used across the CIFAR literature (e.g. the timm and pytorch-cifar100
        # constants; std over pixels, not the 0.2023/0.1994/0.2010 of a per-image average).
        DatasetInfo(
            "cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True
        ),
        DatasetInfo(
            "cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True
        ),
        # MNIST: the constants of the PyTorch MNIST example (pytorch/examples, mnist/main.py).
        DatasetInfo("mnist", 10, (28, 28, 1), (0.1307,), (0.3081,), flip=False),
        # Fashion-MNIST: the same statistics computed on its 60,000 training images. Garments
        # keep their class when mirrored, so flips are a valid augmentation (as in Zhong et al.,
        # "Random Erasing Data Augmentation", AAAI 2020, which flips Fashion-MNIST).
        DatasetInfo("fashion_mnist", 10, (28, 28, 1), (0.2860,), (0.3530,), flip=True),
        # ImageNet: the torchvision / pytorch/examples imagenet constants.
        DatasetInfo(
            "imagenet2012", 1000, (224, 224, 3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), True
        ),
    )
}

# Datasets that cannot be held in host memory as uint8 arrays; they go through stream_batches.
_STREAMED = frozenset({"imagenet2012"})

# sklearn's digits have no official split: a fixed permutation (seed 0) gives 80% train (1,437)
# and 20% test (360), the same on every machine.
_DIGITS_SEED = 0
_DIGITS_TRAIN = 1437

# When load() decodes in worker processes. One process decodes CIFAR-10 at ~2,600 images/s on the
# 2-vCPU development machine (18-19 s for the 50,000 training images); two workers there were
# slower (23-28 s): two processes got only 1.2x the throughput of one, and starting interpreters
# and shipping the arrays back ate that. So workers are only used with 4 or more cores, and only
# for splits large enough to amortise their ~2 s start-up.
_POOL_MIN_CORES = 4
_POOL_MIN_EXAMPLES = 16384
_POOL_MAX_WORKERS = 8


@dataclasses.dataclass
class InMemoryData:
    """A decoded split: ``images`` uint8 ``(N, H, W, C)``, ``labels`` int32 ``(N,)``.

    The arrays are read-only because :func:`load` shares them between callers through its cache.
    """

    images: np.ndarray
    labels: np.ndarray
    info: DatasetInfo

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_MEMORY: dict[tuple[str, str, str | None], InMemoryData] = {}
_MEMORY_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget the splits :func:`load` holds in memory (the on-disk cache is left alone)."""
    with _MEMORY_LOCK:
        _MEMORY.clear()


def _dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def _resolve_data_dir(data_dir: str | None) -> str:
    """``data_dir``, else ``$TFDS_DATA_DIR``, else TFDS's default (``~/tensorflow_datasets``).

    Local paths are made absolute (they key the caches); URLs such as ``gs://...`` pass through.
    """
    if not data_dir:
        data_dir = os.environ.get("TFDS_DATA_DIR")
    if not data_dir:
        from tensorflow_datasets.core import constants

        data_dir = constants.DATA_DIR
    if "://" in data_dir:
        return data_dir
    return os.path.abspath(os.path.expanduser(data_dir))


def _resolve_cache_dir(cache_dir: str | None) -> str | None:
    """``cache_dir``, else ``$ADDERVIT_CACHE_DIR``, else ``~/.cache/addervit_jax``; "" disables."""
    if cache_dir is None:
        cache_dir = os.environ.get(
            "ADDERVIT_CACHE_DIR", os.path.join("~", ".cache", "addervit_jax")
        )
    return os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else None


def _open_source(name: str, split: str, data_dir: str):
    """``tfds.data_source`` with errors that say where the data was looked for and how to fix it.

    TFDS itself answers a missing dataset with a misleading "TFRecord is not supported", so the
    directory is checked first.
    """
    import tensorflow_datasets as tfds
    from etils import epath

    dataset_dir = epath.Path(data_dir) / name
    prepared = dataset_dir.is_dir() and any(
        (version / "dataset_info.json").is_file() for version in dataset_dir.iterdir()
    )
    if not prepared:
        message = (
            f"dataset {name!r} not found in the TFDS data directory {data_dir!r} (searched "
            f"{dataset_dir}/<version>/dataset_info.json). Select the directory that holds it with "
            "the TFDS_DATA_DIR environment variable or --config.data_dir."
        )
        if name == "imagenet2012":
            message += (
                " imagenet2012 needs a manual download: put ILSVRC2012_img_train.tar and "
                f"ILSVRC2012_img_val.tar in {data_dir}/downloads/manual and prepare it once with "
                f"tfds.builder('imagenet2012', data_dir={data_dir!r})"
                ".download_and_prepare(file_format='array_record')."
            )
        else:
            message += (
                f" To download it: tfds.builder({name!r}, data_dir={data_dir!r})"
                ".download_and_prepare(file_format='array_record')."
            )
        raise FileNotFoundError(message)
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except NotImplementedError as err:
        raise RuntimeError(
            f"dataset {name!r} in {data_dir!r} is not in ArrayRecord format, which random access "
            "without TensorFlow needs; prepare it again with "
            "download_and_prepare(file_format='array_record')"
        ) from err
    except ValueError as err:
        raise ValueError(f"dataset {name!r} in {data_dir!r}, split {split!r}: {err}") from err


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as uint8 (N, 8, 8, 1): values 0..16 scaled to 0..255 and rounded."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(_DIGITS_SEED).permutation(len(labels))
    parts = {"train": order[:_DIGITS_TRAIN], "test": order[_DIGITS_TRAIN:]}
    if split in parts:
        index = parts[split]
    else:
        # The same slicing syntax ("train[:10%]", "test[-50:]", "train+test") as TFDS splits.
        import tensorflow_datasets as tfds

        infos = {
            k: tfds.core.SplitInfo(name=k, shard_lengths=[len(v)], num_bytes=0)
            for k, v in parts.items()
        }
        try:
            instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
        except (ValueError, AssertionError) as err:
            raise ValueError(f"dataset 'digits': bad split {split!r}: {err}") from err
        index = np.concatenate([parts[i.splitname][i.from_ : i.to] for i in instructions])
    return images[index], labels[index]


def _decode_range(
    name: str, split: str, data_dir: str, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decode examples ``start:stop`` of a split (runs in a pool worker for large splits)."""
    source = _open_source(name, split, data_dir)
    examples = source.__getitems__(list(range(start, stop)))
    if not examples:
        return np.zeros((0, *DATASETS[name].image_shape), np.uint8), np.zeros(0, np.int32)
    images = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
    labels = np.asarray([e["label"] for e in examples], np.int32)
    return images, labels


def _decode_split(
    name: str, split: str, data_dir: str, num_examples: int, num_workers: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a whole split, in ``num_workers`` processes when that is worth it.

    Threads do not help: TFDS's example parsing holds the GIL (measured: 2 threads ran no faster
    than 1). The workers are fresh interpreters (``python -c``), not a ``multiprocessing`` pool:
    forking a process that runs JAX can deadlock, and spawning re-imports the caller's main
    script, which breaks scripts without an ``if __name__ == "__main__"`` guard. If a worker
    fails, the split is decoded here instead, so the result never depends on the pool.
    """
    if num_workers <= 1 or num_examples == 0:
        return _decode_range(name, split, data_dir, 0, num_examples)
    bounds = np.linspace(0, num_examples, num_workers + 1).astype(int)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    command = "from addervit_jax.data import _decode_worker; _decode_worker()"
    with tempfile.TemporaryDirectory(prefix="addervit-decode-") as tmp:
        outputs = [os.path.join(tmp, f"{i}.npz") for i in range(num_workers)]
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", command, name, split, data_dir, str(lo), str(hi), out],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for lo, hi, out in zip(bounds[:-1], bounds[1:], outputs, strict=True)
        ]
        try:
            errors = [w.communicate()[1] for w in workers]
        finally:  # on an interrupt, do not leave orphans decoding into a deleted directory
            for w in workers:
                if w.poll() is None:
                    w.kill()
        if any(w.returncode for w in workers):
            tail = next(e for w, e in zip(workers, errors, strict=True) if w.returncode)
            warnings.warn(
                "parallel decoding failed, decoding in this process instead: "
                + tail.decode(errors="replace")[-2000:],
                stacklevel=3,
            )
            return _decode_range(name, split, data_dir, 0, num_examples)
        parts = []
        for out in outputs:
            with np.load(out) as arrays:
                parts.append((arrays["images"], arrays["labels"]))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _decode_worker() -> None:
    """Entry point of a decoding worker: ``name split data_dir start stop output.npz``."""
    name, split, data_dir, start, stop, output = sys.argv[1:]
    images, labels = _decode_range(name, split, data_dir, int(start), int(stop))
    np.savez(output, images=images, labels=labels)


def _cache_path(cache_dir: str, name: str, version: str, split: str, data_dir: str) -> str:
    """``<cache_dir>/<name>/<version>/<split>-<hash>.npz``.

    The hash covers the split string and the data directory, so two copies of one dataset version
    with different pixels (the CI copy of CIFAR-10 went through JPEG) never share an entry.
    """
    digest = hashlib.sha256(f"{split}\0{data_dir}".encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", split).strip("_")[:60]
    return os.path.join(cache_dir, name, version, f"{slug}-{digest}.npz")


def _read_cache(path: str, info: DatasetInfo, num_examples: int):
    try:
        with np.load(path) as arrays:
            images, labels = arrays["images"], arrays["labels"]
    except FileNotFoundError:
        return None
    except Exception as err:  # a truncated or foreign file: decode again and overwrite it
        warnings.warn(f"ignoring unreadable dataset cache {path}: {err}", stacklevel=3)
        return None
    if (
        images.dtype != np.uint8
        or images.shape != (num_examples, *info.image_shape)
        or labels.dtype != np.int32
        or labels.shape != (num_examples,)
    ):
        warnings.warn(f"ignoring dataset cache {path}: shapes do not match the split", stacklevel=3)
        return None
    return images, labels


def _write_cache(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write atomically (temporary file + rename) so a concurrent reader never sees half a file."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, images=images, labels=labels)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as err:
        warnings.warn(f"could not write the dataset cache {path}: {err}", stacklevel=3)


def load(
    name: str, split: str, *, data_dir: str | None = None, cache_dir: str | None = None
) -> InMemoryData:
    """Decode a split of ``name`` into memory (cached per process and, for TFDS, on disk).

    Args:
      name: a key of :data:`DATASETS` other than ``imagenet2012`` (use :func:`stream_batches`).
      split: ``"train"``, ``"test"``, or a TFDS slice such as ``"train[:45000]"``,
        ``"train[45000:]"``, ``"train[:10%]"``. ``digits`` has ``train`` (1,437 images) and
        ``test`` (360), a fixed seeded 80/20 split, and accepts the same slice syntax.
      data_dir: the TFDS data directory; default ``$TFDS_DATA_DIR``, then TFDS's default. Only
        read, never written.
      cache_dir: where decoded splits are kept as ``.npz``; default ``$ADDERVIT_CACHE_DIR``, then
        ``~/.cache/addervit_jax``. An empty string disables the disk cache.

    Returns:
      :class:`InMemoryData` with read-only uint8 ``(N, H, W, C)`` images and int32 labels.
    """
    info = _dataset_info(name)
    if name in _STREAMED:
        raise ValueError(
            f"dataset {name!r} is too large to decode into memory; read it with "
            "data.stream_batches (Grain worker processes) instead of data.load"
        )
    resolved_dir = None if name == "digits" else _resolve_data_dir(data_dir)
    key = (name, split, resolved_dir)
    with _MEMORY_LOCK:
        if key in _MEMORY:
            return _MEMORY[key]

    if name == "digits":
        images, labels = _digits(split)
    else:
        source = _open_source(name, split, resolved_dir)
        num_examples = len(source)
        version = str(source.dataset_info.version)
        del source
        disk_dir = _resolve_cache_dir(cache_dir)
        path = disk_dir and _cache_path(disk_dir, name, version, split, resolved_dir)
        cached = path and _read_cache(path, info, num_examples)
        if cached:
            images, labels = cached
        else:
            cores = os.cpu_count() or 1
            workers = 1
            if cores >= _POOL_MIN_CORES and num_examples >= _POOL_MIN_EXAMPLES:
                workers = min(cores, _POOL_MAX_WORKERS)
            images, labels = _decode_split(name, split, resolved_dir, num_examples, workers)
            if images.shape[1:] != info.image_shape:
                raise ValueError(
                    f"dataset {name!r}: decoded images have shape {images.shape[1:]}, expected "
                    f"{info.image_shape}"
                )
            if path:
                _write_cache(path, images, labels)

    images = np.ascontiguousarray(images, np.uint8)
    labels = np.ascontiguousarray(labels, np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    data = InMemoryData(images=images, labels=labels, info=info)
    with _MEMORY_LOCK:
        return _MEMORY.setdefault(key, data)


# ---------------------------------------------------------------------------------------------
# Batch order
# ---------------------------------------------------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch; training drops the remainder so every step has ``batch_size``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return num_examples // batch_size


def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The example order of one epoch: a pure function of ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _check_order_args(num_examples: int, batch_size: int, seed: int, start_step: int) -> int:
    spe = steps_per_epoch(num_examples, batch_size)
    if spe == 0:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {num_examples} examples of the split, "
            "so an epoch would have no full batch; lower the batch size"
        )
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
    return spe


def train_batches(
    data: InMemoryData, *, batch_size: int, seed: int, start_step: int = 0
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Infinite ``(step, {"image": uint8 (B,H,W,C), "label": int32 (B,)})`` from ``start_step``.

    Step ``s`` holds slice ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``'s
    permutation ``np.random.default_rng([seed, epoch]).permutation(N)``, so
    ``train_batches(..., start_step=k)`` yields what the uninterrupted iterator yields from step
    ``k`` on: a checkpoint only needs its step to resume the data position.
    """
    spe = _check_order_args(len(data.labels), batch_size, seed, start_step)
    return _train_batches(data, batch_size, seed, start_step, spe)


def _train_batches(data: InMemoryData, batch_size: int, seed: int, step: int, spe: int):
    epoch, order = -1, None
    while True:
        if step // spe != epoch:
            epoch = step // spe
            order = _epoch_permutation(seed, epoch, len(data.labels))
        index = order[(step % spe) * batch_size : (step % spe + 1) * batch_size]
        yield step, {"image": data.images[index], "label": data.labels[index]}
        step += 1


def eval_batches(data: InMemoryData, *, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once, in order, in batches of ``batch_size``.

    The last batch is padded by repeating the last example (a real image, so padding cannot
    produce values the model never sees), and each batch carries ``"mask"``: bool ``(B,)``,
    False on padding. Metrics must be weighted by the mask.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return _eval_batches(data, batch_size)


def _eval_batches(data: InMemoryData, batch_size: int):
    n = len(data.labels)
    for start in range(0, n, batch_size):
        valid = min(batch_size, n - start)
        index = np.minimum(np.arange(start, start + batch_size), n - 1)
        yield {
            "image": data.images[index],
            "label": data.labels[index],
            "mask": np.arange(batch_size) < valid,
        }


# ---------------------------------------------------------------------------------------------
# Streaming (Grain) for datasets that do not fit in memory
# ---------------------------------------------------------------------------------------------


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


class _StreamBatch:
    """Grain map: step -> the decoded batch ``{"image", "label"}`` of that step.

    The indices are those :func:`train_batches` takes at the same step, so the two iterators agree
    example for example. Whole batches are the unit of work, so a worker reads a batch's records
    in one ArrayRecord call. Picklable (Grain sends it to spawned workers); each process opens its
    own data source.
    """

    def __init__(self, name, split, data_dir, batch_size, seed, num_examples, image_size):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.batch_size, self.seed, self.num_examples = batch_size, seed, num_examples
        self.image_size = image_size
        self._source = None
        self._epoch_order = (-1, None)  # one tuple, replaced whole: safe across reader threads

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_source=None, _epoch_order=(-1, None))
        return state

    def _index(self, step: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The example indices of batch ``step`` and its validity mask (None: all valid)."""
        spe = self.num_examples // self.batch_size
        epoch, order = self._epoch_order
        if epoch != step // spe:
            epoch = step // spe
            order = _epoch_permutation(self.seed, epoch, self.num_examples)
            self._epoch_order = (epoch, order)
        start = (step % spe) * self.batch_size
        return order[start : start + self.batch_size], None

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        index, mask = self._index(step)
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


class _StreamEvalBatch(_StreamBatch):
    """Grain map: batch number -> examples in order, the last batch padded, with a ``mask``."""

    def _index(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        index = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        mask = index < self.num_examples
        return np.minimum(index, self.num_examples - 1), mask


def is_streamed(name: str) -> bool:
    """Whether ``name`` is read with the streaming functions instead of :func:`load`."""
    return _dataset_info(name).name in _STREAMED


def num_examples(name: str, split: str, *, data_dir: str | None = None) -> int:
    """Examples in a split, without decoding it."""
    if name == "digits":
        return len(_digits(split)[1])
    return len(_open_source(name, split, _resolve_data_dir(data_dir)))


def stream_eval_batches(
    name: str,
    split: str,
    *,
    batch_size: int,
    data_dir: str | None = None,
    image_size: int | None = None,
    num_workers: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Like :func:`eval_batches` (every example once, in order, padded last batch with a
    ``mask``), decoding in Grain worker processes as :func:`stream_batches` does."""
    info = _dataset_info(name)
    resolved_dir = _resolve_data_dir(data_dir)
    total = len(_open_source(name, split, resolved_dir))
    size = image_size or info.image_shape[0]
    decode = _StreamEvalBatch(name, split, resolved_dir, batch_size, 0, total, size)
    num_batches = -(-total // batch_size)
    for _, batch in _stream(_grain_dataset(decode, 0, num_batches, num_workers), 0):
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
    """Like :func:`train_batches`, but reading and decoding in Grain worker processes.

    For datasets too large to decode into memory (``imagenet2012``). The order is the same pure
    function of ``(seed, step)`` as :func:`train_batches` (same permutation, same batches), so
    ``start_step`` resumes exactly, and for any ``num_workers`` the output is identical: Grain
    hands whole batches to workers round-robin and interleaves them back in order.

    Args:
      image_size: images are resized (shorter side, bicubic) and centre-cropped to
        ``image_size x image_size``; default ``DATASETS[name].image_shape[0]`` (224 for ImageNet,
        the native size for the others, which are then left untouched).
      num_workers: worker processes; 0 decodes in this process. Default: one per CPU core.
    """
    info = _dataset_info(name)
    resolved_dir = _resolve_data_dir(data_dir)
    source = _open_source(name, split, resolved_dir)
    num_examples = len(source)
    del source
    _check_order_args(num_examples, batch_size, seed, start_step)
    size = image_size or info.image_shape[0]
    decode = _StreamBatch(name, split, resolved_dir, batch_size, seed, num_examples, size)
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


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------
#
# RandAugment (Cubuk et al., "RandAugment: Practical automated data augmentation with a reduced
# search space", CVPR-W 2020) as torchvision.transforms.RandAugment implements it, which the study
# used as RandAugment(2, 14): ``num_ops`` ops drawn uniformly with replacement from the 14 below,
# each at magnitude bin ``magnitude`` of ``num_magnitude_bins`` (31: bins 0..30, so 14 is 14/30 of
# each op's maximum), signed ops negated with probability 1/2. Images are uint8-valued floats in
# 0..255 and every op truncates back to integers, as torchvision does on uint8 tensors. Geometric
# ops sample the nearest pixel and fill with 0 (torchvision's defaults).

RANDAUGMENT_OPS = (
    "identity",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "auto_contrast",
    "equalize",
)


def _randaugment_magnitudes(
    magnitude: float, num_bins: int, height: int, width: int
) -> dict[str, float]:
    """The value each op takes at ``magnitude``: torchvision's ``_augmentation_space`` entry."""
    frac = magnitude / (num_bins - 1)
    return {
        "identity": 0.0,
        "shear_x": 0.3 * frac,
        "shear_y": 0.3 * frac,
        "translate_x": 150.0 / 331.0 * width * frac,
        "translate_y": 150.0 / 331.0 * height * frac,
        "rotate": 30.0 * frac,
        "brightness": 0.9 * frac,
        "color": 0.9 * frac,
        "contrast": 0.9 * frac,
        "sharpness": 0.9 * frac,
        "posterize": float(8 - int(np.round(magnitude / ((num_bins - 1) / 4)))),
        "solarize": 255.0 * (1.0 - frac),
        "auto_contrast": 0.0,
        "equalize": 0.0,
    }


_SIGNED_OPS = frozenset(
    {"shear_x", "shear_y", "translate_x", "translate_y", "rotate"}
    | {"brightness", "color", "contrast", "sharpness"}
)


def _to_uint8_range(x: jax.Array) -> jax.Array:
    """Clamp and truncate, as ``tensor.clamp(0, 255).to(torch.uint8)``."""
    return jnp.floor(jnp.clip(x, 0.0, 255.0))


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
    return _to_uint8_range(factor * image + (1.0 - factor) * other)


def _grayscale(image: jax.Array) -> jax.Array:
    """ITU-R 601-2 luma as torchvision's ``rgb_to_grayscale`` (truncated), ``(H, W, 1)``."""
    if image.shape[-1] == 1:
        return image
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    return jnp.floor(0.2989 * r + 0.587 * g + 0.114 * b)[..., None]


def _sample_nearest(image: jax.Array, src_x: jax.Array, src_y: jax.Array) -> jax.Array:
    """``out[y, x] = image[round(src_y), round(src_x)]``, 0 where that falls outside the image."""
    h, w, _ = image.shape
    xi = jnp.round(src_x).astype(jnp.int32)
    yi = jnp.round(src_y).astype(jnp.int32)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    out = image[jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)]
    return jnp.where(inside[..., None], out, 0.0)


def _pixel_grid(image: jax.Array) -> tuple[jax.Array, jax.Array]:
    h, w, _ = image.shape
    y, x = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
    )
    return x, y


def _shear_x(image: jax.Array, v: jax.Array) -> jax.Array:
    # torchvision shears about the top-left corner of pixel (0, 0), i.e. index -0.5.
    x, y = _pixel_grid(image)
    return _sample_nearest(image, x + v * (y + 0.5), y)


def _shear_y(image: jax.Array, v: jax.Array) -> jax.Array:
    x, y = _pixel_grid(image)
    return _sample_nearest(image, x, y + v * (x + 0.5))


def _translate_x(image: jax.Array, v: jax.Array) -> jax.Array:
    # torchvision passes int(magnitude): whole pixels, truncated towards zero.
    x, y = _pixel_grid(image)
    return _sample_nearest(image, x - jnp.trunc(v), y)


def _translate_y(image: jax.Array, v: jax.Array) -> jax.Array:
    x, y = _pixel_grid(image)
    return _sample_nearest(image, x, y - jnp.trunc(v))


def _rotate(image: jax.Array, degrees: jax.Array) -> jax.Array:
    """Counter-clockwise by ``degrees`` about the image centre, as ``torchvision.F.rotate``."""
    h, w, _ = image.shape
    x, y = _pixel_grid(image)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    theta = jnp.deg2rad(degrees)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    dx, dy = x - cx, y - cy
    return _sample_nearest(image, cx + cos * dx - sin * dy, cy + sin * dx + cos * dy)


def _brightness(image: jax.Array, v: jax.Array) -> jax.Array:
    return _blend(image, jnp.zeros_like(image), 1.0 + v)


def _color(image: jax.Array, v: jax.Array) -> jax.Array:
    if image.shape[-1] == 1:  # torchvision leaves a grayscale image's saturation alone
        return image
    return _blend(image, _grayscale(image), 1.0 + v)


def _contrast(image: jax.Array, v: jax.Array) -> jax.Array:
    return _blend(image, jnp.mean(_grayscale(image)), 1.0 + v)


def _sharpness(image: jax.Array, v: jax.Array) -> jax.Array:
    """Blend with the image smoothed by [[1,1,1],[1,5,1],[1,1,1]]/13; the border is kept."""
    h, w, _ = image.shape
    if h <= 2 or w <= 2:
        return image
    padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)))
    total = sum(padded[i : i + h, j : j + w] for i in range(3) for j in range(3))
    smooth = jnp.round((total + 4.0 * image) / 13.0)
    interior = jnp.zeros((h, w, 1), bool).at[1:-1, 1:-1].set(True)
    return _blend(image, jnp.where(interior, smooth, image), 1.0 + v)


def _posterize(bits: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
    step = float(2 ** (8 - bits))
    return lambda image, v: jnp.floor(image / step) * step


def _solarize(threshold: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
    return lambda image, v: jnp.where(image >= threshold, 255.0 - image, image)


def _auto_contrast(image: jax.Array, v: jax.Array) -> jax.Array:
    """Stretch each channel to 0..255; a constant channel is left as it is."""
    lo = jnp.min(image, axis=(0, 1), keepdims=True)
    hi = jnp.max(image, axis=(0, 1), keepdims=True)
    flat = hi == lo
    scale = jnp.where(flat, 1.0, 255.0 / jnp.where(flat, 1.0, hi - lo))
    return _to_uint8_range((image - jnp.where(flat, 0.0, lo)) * scale)


def _equalize_channel(channel: jax.Array) -> jax.Array:
    """PIL's ``ImageOps.equalize`` for one channel (torchvision's ``_scale_channel``)."""
    values = channel.astype(jnp.int32)
    hist = jnp.zeros(256, jnp.int32).at[values.ravel()].add(1)
    # The histogram minus its last non-empty bin, which is the bin of the maximum value.
    step = (values.size - hist[jnp.max(values)]) // 255
    lut = (jnp.cumsum(hist) + step // 2) // jnp.maximum(step, 1)
    lut = jnp.clip(jnp.concatenate([jnp.zeros(1, jnp.int32), lut[:-1]]), 0, 255)
    return jnp.where(step == 0, channel, lut[values].astype(channel.dtype))


def _equalize(image: jax.Array, v: jax.Array) -> jax.Array:
    return jax.vmap(_equalize_channel, in_axes=2, out_axes=2)(image)


def _randaugment_op(name: str, value: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``op(image, sign)`` for one RandAugment op at a fixed magnitude ``value``."""
    if name == "posterize":
        return _posterize(int(value))
    if name == "solarize":
        return _solarize(value)
    fn = {
        "identity": lambda image, v: image,
        "shear_x": _shear_x,
        "shear_y": _shear_y,
        "translate_x": _translate_x,
        "translate_y": _translate_y,
        "rotate": _rotate,
        "brightness": _brightness,
        "color": _color,
        "contrast": _contrast,
        "sharpness": _sharpness,
        "auto_contrast": _auto_contrast,
        "equalize": _equalize,
    }[name]
    return lambda image, sign: fn(image, sign * value)


def rand_augment(
    key: jax.Array,
    images: jax.Array,
    num_ops: int,
    magnitude: float,
    *,
    num_magnitude_bins: int = 31,
) -> jax.Array:
    """torchvision's ``RandAugment(num_ops, magnitude, num_magnitude_bins)``, per image, in JAX.

    ``images`` are float ``(B, H, W, C)`` holding uint8 values 0..255; the result does too. Each
    image draws its own ops and signs from ``key``. All 14 ops of :data:`RANDAUGMENT_OPS` are
    implemented. Under ``vmap`` the ``lax.switch`` over ops evaluates every branch and selects,
    so one RandAugment op costs about 14 cheap image ops; negligible next to a ViT step.
    """
    if not 0 <= magnitude <= num_magnitude_bins - 1:
        raise ValueError(
            f"RandAugment magnitude must be in [0, {num_magnitude_bins - 1}] (bins of "
            f"num_magnitude_bins={num_magnitude_bins}), got {magnitude}"
        )
    if num_ops < 0:
        raise ValueError(f"RandAugment num_ops must be >= 0, got {num_ops}")
    _, h, w, _ = images.shape
    values = _randaugment_magnitudes(magnitude, num_magnitude_bins, h, w)
    branches = [_randaugment_op(name, values[name]) for name in RANDAUGMENT_OPS]
    signed = jnp.asarray([name in _SIGNED_OPS for name in RANDAUGMENT_OPS])

    def one_image(key, image):
        for op_key in jax.random.split(key, num_ops):
            k_op, k_sign = jax.random.split(op_key)
            index = jax.random.randint(k_op, (), 0, len(branches))
            negate = signed[index] & jax.random.bernoulli(k_sign)
            image = lax.switch(index, branches, image, jnp.where(negate, -1.0, 1.0))
        return image

    return jax.vmap(one_image)(jax.random.split(key, images.shape[0]), images)


def _random_crop(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
    """torchvision ``RandomCrop(size, padding)``: zero-pad, crop at a random offset per image."""
    b, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)
    crop = lambda image, o: lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c))  # noqa: E731
    return jax.vmap(crop)(padded, offsets)


def _random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1], images)


def preprocess(
    key: jax.Array | None,
    images: jax.Array,
    info: DatasetInfo,
    *,
    train: bool,
    crop_padding: int = 4,
    flip: bool | None = None,
    randaugment: tuple[int, int] | None = None,
) -> jax.Array:
    """uint8 ``(B, H, W, C)`` -> normalised float32, with training augmentation drawn from ``key``.

    With ``train=True``, in torchvision's order for the study's recipe: random crop after
    ``crop_padding`` zero pixels on each side (0 disables), horizontal flip with probability 1/2
    (``flip=None`` means ``info.flip``), then ``randaugment=(num_ops, magnitude)`` if given, with
    ``magnitude`` a bin of 31 as in torchvision (the study's ``RandAugment(2, 14)`` is ``(2, 14)``;
    see :func:`rand_augment`). Then ``(x / 255 - mean) / std``. ``train=False`` only normalises and
    ``key`` may be None. Pure and jittable; the same key gives the same output. It is jitted
    itself (inlined when called under an outer ``jit``), because op-by-op dispatch of RandAugment
    takes seconds per batch.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != len(info.mean):
        raise ValueError(
            f"preprocess: expected images of shape (B, H, W, {len(info.mean)}) for dataset "
            f"{info.name!r}, got {images.shape}"
        )
    if images.dtype != jnp.uint8:
        raise TypeError(f"preprocess: expected uint8 images, got {images.dtype}")
    if train and key is None:
        raise ValueError("preprocess: train=True needs a PRNG key for the augmentation")
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    return _preprocess(
        key if train else None,
        images,
        info,
        train=bool(train),
        crop_padding=int(crop_padding) if train else 0,
        flip=bool(info.flip if flip is None else flip) and bool(train),
        randaugment=tuple(randaugment) if train and randaugment is not None else None,
    )


@functools.partial(
    jax.jit, static_argnames=("info", "train", "crop_padding", "flip", "randaugment")
)
def _preprocess(key, images, info, *, train, crop_padding, flip, randaugment):
    x = images.astype(jnp.float32)
    if train:
        k_crop, k_flip, k_augment = jax.random.split(key, 3)
        if crop_padding > 0:
            x = _random_crop(k_crop, x, crop_padding)
        if flip:
            x = _random_flip(k_flip, x)
        if randaugment is not None:
            x = rand_augment(k_augment, x, *randaugment)
    mean = jnp.asarray(info.mean, jnp.float32)
    std = jnp.asarray(info.std, jnp.float32)
    return (x / 255.0 - mean) / std
