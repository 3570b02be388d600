"""Datasets: what each one is (:data:`DATASETS`) and reading a split into memory (:func:`load`).

``digits`` is scikit-learn's bundled 8x8 set, so a fresh machine trains a real model without a
download; every other dataset is read with ``tfds.data_source`` (ArrayRecord, random access, no
TensorFlow) from ``data_dir`` or ``$TFDS_DATA_DIR``. Decoding (PNG through Pillow for CIFAR) is
the slow part, so a split is decoded once per process (an in-process cache) and, for TFDS
datasets, once per machine (an ``.npz`` cache outside ``data_dir``, which may be read-only).
``imagenet2012`` does not fit in memory: :mod:`addervit_jax.data.stream` reads it instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import warnings

import numpy as np

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "InMemoryData",
    "clear_cache",
    "is_streamed",
    "load",
    "num_examples",
]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the augmentation need to know about a dataset.

    ``image_shape`` is ``(H, W, C)`` of the arrays the pipeline yields (for ``imagenet2012`` the
    size after streaming resizes). ``mean``/``std`` are per-channel statistics in
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
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    command = "from addervit_jax.data.datasets import _decode_worker; _decode_worker()"
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
      name: a key of :data:`DATASETS` other than ``imagenet2012`` (it is streamed).
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


def is_streamed(name: str) -> bool:
    """Whether ``name`` is read with the streaming functions instead of :func:`load`."""
    return _dataset_info(name).name in _STREAMED


def num_examples(name: str, split: str, *, data_dir: str | None = None) -> int:
    """Examples in a split, without decoding it."""
    if name == "digits":
        return len(_digits(split)[1])
    return len(_open_source(name, split, _resolve_data_dir(data_dir)))
