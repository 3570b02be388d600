"""data: loading, batch order, resumption, streaming, augmentation, the trainer's inputs.

Order and augmentation are tested on synthetic arrays whose labels are example indices, so "every
example once" is an exact check. Loading is tested on sklearn's digits and on the real CIFAR-10
copy in ../shared/datasets/tfds (or $TFDS_DATA_DIR), skipped where that copy is absent.
"""

import os
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from addervit_jax import data

ROOT = pathlib.Path(__file__).resolve().parents[1]
CIFAR_SLICE = "train[:512]"
# README of ../shared/datasets: per-channel means of the full 50,000-image copy.
CIFAR_COPY_MEAN = (0.4913, 0.4821, 0.4465)


@pytest.fixture(scope="module")
def tfds_dir():
    path = pathlib.Path(os.environ.get("TFDS_DATA_DIR") or ROOT.parent / "shared/datasets/tfds")
    if not (path / "cifar10").is_dir():
        pytest.skip(f"CIFAR-10 in TFDS format not found at {path}/cifar10")
    return str(path)


@pytest.fixture(scope="module")
def cifar(tfds_dir, tmp_path_factory):
    return data.load(
        "cifar10", CIFAR_SLICE, data_dir=tfds_dir, cache_dir=str(tmp_path_factory.mktemp("c"))
    )


def _indexed(n, shape=(4, 4, 3), seed=0):
    """Random images whose label is their index, so a batch's labels say which examples it holds."""
    images = np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
    return data.InMemoryData(images, np.arange(n, dtype=np.int32), data.DATASETS["cifar10"])


def _take(iterator, k):
    return [next(iterator) for _ in range(k)]


def _rows(images, labels):
    """Examples as a sorted list of bytes, to compare datasets as multisets."""
    return sorted(
        img.tobytes() + int(lab).to_bytes(1, "little")
        for img, lab in zip(images, labels, strict=True)
    )


# ---------------------------------------------------------------------------------------------
# Table and digits
# ---------------------------------------------------------------------------------------------


def test_dataset_table_is_consistent():
    assert set(data.DATASETS) == {
        "digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagenet2012"
    }  # fmt: skip
    for name, info in data.DATASETS.items():
        assert info.name == name
        assert len(info.mean) == len(info.std) == info.image_shape[2]
        assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)
    assert not data.DATASETS["digits"].flip and not data.DATASETS["mnist"].flip
    assert data.DATASETS["cifar10"].flip


def test_digits_shapes_and_values():
    train, test = data.load("digits", "train"), data.load("digits", "test")
    assert train.images.shape == (1437, 8, 8, 1) and test.images.shape == (360, 8, 8, 1)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
    assert set(np.unique(train.labels)) == set(range(10))
    allowed = np.round(np.arange(17) * 255 / 16).astype(np.uint8)
    assert np.isin(train.images, allowed).all() and train.images.max() == 255
    assert not train.images.flags.writeable  # shared through the cache


def test_digits_splits_partition_the_1797_images():
    from sklearn.datasets import load_digits

    raw = load_digits()
    full = np.round(raw.images * 255 / 16).astype(np.uint8)[..., None]
    train, test = data.load("digits", "train"), data.load("digits", "test")
    both = np.concatenate([train.images, test.images]), np.concatenate([train.labels, test.labels])
    assert len(both[1]) == 1797
    assert _rows(*both) == _rows(full, raw.target)  # same multiset: disjoint and covering


def test_digits_split_is_fixed_and_slices_like_tfds():
    train = data.load("digits", "train")
    data.clear_cache()
    again = data.load("digits", "train")
    assert again is not train
    np.testing.assert_array_equal(again.images, train.images)
    tenth = data.load("digits", "train[:10%]")
    np.testing.assert_array_equal(tenth.images, train.images[:144])
    np.testing.assert_array_equal(
        data.load("digits", "test[-60:]").labels, data.load("digits", "test").labels[-60:]
    )
    assert len(data.load("digits", "train+test")) == 1797
    with pytest.raises(ValueError, match="digits"):
        data.load("digits", "validation")


def test_digits_statistics_are_those_of_the_train_split():
    x = data.load("digits", "train").images / 255.0
    info = data.DATASETS["digits"]
    np.testing.assert_allclose(x.mean(), info.mean[0], atol=5e-5)
    np.testing.assert_allclose(x.std(), info.std[0], atol=5e-5)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'.*cifar10.*imagenet2012"):
        data.load("cifar11", "train")


def test_missing_dataset_says_where_it_looked(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        data.load("cifar100", "train", data_dir=str(tmp_path), cache_dir="")
    message = str(err.value)
    assert str(tmp_path) in message and "TFDS_DATA_DIR" in message and "data_dir" in message
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "from_env"))
    with pytest.raises(FileNotFoundError, match="from_env"):
        data.load("mnist", "train", cache_dir="")
    with pytest.raises(FileNotFoundError, match="manual download"):
        data.stream_batches("imagenet2012", "train", batch_size=8, seed=0)
    with pytest.raises(ValueError, match="stream_batches"):
        data.load("imagenet2012", "train")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 from the shared TFDS directory
# ---------------------------------------------------------------------------------------------


def test_cifar10_slice_loads(cifar):
    assert cifar.images.shape == (512, 32, 32, 3) and cifar.images.dtype == np.uint8
    assert cifar.labels.shape == (512,) and cifar.labels.dtype == np.int32
    assert set(np.unique(cifar.labels)) == set(range(10))
    mean = cifar.images.reshape(-1, 3).mean(0) / 255.0
    np.testing.assert_allclose(mean, CIFAR_COPY_MEAN, atol=0.03)  # a 1% sample of the set
    assert cifar.info is data.DATASETS["cifar10"]


def test_disk_cache_round_trips_and_leaves_data_dir_alone(tfds_dir, tmp_path, monkeypatch):
    before = sorted(p for p in pathlib.Path(tfds_dir).rglob("*"))
    split = "train[100:164]"
    first = data.load("cifar10", split, data_dir=tfds_dir, cache_dir=str(tmp_path))
    (entry,) = list(tmp_path.rglob("*.npz"))
    assert entry.parent == tmp_path / "cifar10" / "3.0.2"
    data.clear_cache()

    def no_decoding(*args):
        raise AssertionError("decoded again despite the disk cache")

    monkeypatch.setattr(data.datasets, "_decode_split", no_decoding)
    second = data.load("cifar10", split, data_dir=tfds_dir, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)
    assert sorted(pathlib.Path(tfds_dir).rglob("*")) == before


def test_unreadable_cache_is_replaced(tfds_dir, tmp_path):
    split = "train[:16]"
    fresh = data.load("cifar10", split, data_dir=tfds_dir, cache_dir="")
    data.clear_cache()
    data.load("cifar10", split, data_dir=tfds_dir, cache_dir=str(tmp_path))
    (entry,) = list(tmp_path.rglob("*.npz"))
    entry.write_bytes(b"not an npz file")
    data.clear_cache()
    with pytest.warns(UserWarning, match="unreadable dataset cache"):
        again = data.load("cifar10", split, data_dir=tfds_dir, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(again.images, fresh.images)


def test_parallel_decoding_matches_serial(tfds_dir, cifar):
    images, labels = data.datasets._decode_split(
        "cifar10", "train[:300]", tfds_dir, 300, num_workers=2
    )
    np.testing.assert_array_equal(images, cifar.images[:300])
    np.testing.assert_array_equal(labels, cifar.labels[:300])


def _assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for (step, batch), (want_step, want) in zip(got, expected, strict=True):
        assert step == want_step
        assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
        np.testing.assert_array_equal(batch["image"], want["image"])
        np.testing.assert_array_equal(batch["label"], want["label"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_yields_the_in_memory_order(tfds_dir, num_workers):
    in_memory = data.load("cifar10", "train[:256]", data_dir=tfds_dir, cache_dir="")
    expected = _take(data.train_batches(in_memory, batch_size=32, seed=5), 11)
    stream = data.stream_batches(
        "cifar10", "train[:256]", batch_size=32, seed=5, data_dir=tfds_dir, num_workers=num_workers
    )
    got = _take(stream, 11)  # 8 steps per epoch: crosses into the second epoch
    stream.close()
    _assert_same_batches(got, expected)


def test_stream_resumes_at_any_step(tfds_dir):
    in_memory = data.load("cifar10", "train[:256]", data_dir=tfds_dir, cache_dir="")
    expected = _take(data.train_batches(in_memory, batch_size=32, seed=5), 11)
    kwargs = dict(batch_size=32, seed=5, data_dir=tfds_dir, num_workers=0)
    resumed = data.stream_batches("cifar10", "train[:256]", start_step=6, **kwargs)
    got = _take(resumed, 5)
    resumed.close()
    _assert_same_batches(got, expected[6:])


def test_inputs_in_memory_and_streamed_are_the_same_batches(tfds_dir):
    kwargs = dict(
        train_split="train[:200]", eval_split="train[200:270]", batch_size=32, seed=7,
        data_dir=tfds_dir, num_workers=0,
    )  # fmt: skip
    in_memory = data.make_inputs("cifar10", stream=False, **kwargs)
    streamed = data.make_inputs("cifar10", stream=True, **kwargs)
    for inputs in (in_memory, streamed):
        assert (inputs.num_train, inputs.num_eval, inputs.steps_per_epoch) == (200, 70, 6)
        assert inputs.info is data.DATASETS["cifar10"]
    _assert_same_batches(
        _take(streamed.train_batches(5), 4), _take(in_memory.train_batches(5), 4)
    )  # crosses from the first epoch into the second
    got, want = list(streamed.eval_batches()), list(in_memory.eval_batches())
    assert len(got) == len(want) == 3
    for a, b in zip(got, want, strict=True):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(a[key], b[key])


def test_resize_center_crop_keeps_the_middle():
    image = np.repeat(np.array([0, 128, 255], np.uint8), 32)[None, :, None]  # thirds, 96 wide
    image = np.broadcast_to(image, (64, 96, 3)).copy()
    out = data.stream._resize_center_crop(image, 32)  # -> 32x48, then the middle 32 columns
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(
        out[:, [0, 16, 31]], np.broadcast_to([0, 128, 255], (32, 3))[..., None].repeat(3, -1)
    )
    np.testing.assert_array_equal(
        data.stream._resize_center_crop(image[:32, :32], 32), image[:32, :32]
    )
    assert data.stream._resize_center_crop(image[..., :1], 16).shape == (16, 16, 1)


# ---------------------------------------------------------------------------------------------
# Batch order
# ---------------------------------------------------------------------------------------------


def test_steps_per_epoch_drops_the_remainder():
    assert data.steps_per_epoch(103, 10) == 10
    assert data.steps_per_epoch(100, 10) == 10
    assert data.steps_per_epoch(9, 10) == 0
    with pytest.raises(ValueError):
        data.steps_per_epoch(10, 0)


def test_train_batches_are_a_function_of_seed_and_step():
    ds = _indexed(103)
    a = _take(data.train_batches(ds, batch_size=10, seed=1), 25)
    b = _take(data.train_batches(ds, batch_size=10, seed=1), 25)
    c = _take(data.train_batches(ds, batch_size=10, seed=2), 25)
    assert [s for s, _ in a] == list(range(25))
    for (_, x), (_, y) in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert any((x["label"] != z["label"]).any() for (_, x), (_, z) in zip(a, c, strict=True))
    step, batch = a[0]
    assert batch["image"].shape == (10, 4, 4, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (10,) and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["image"], ds.images[batch["label"]])


@pytest.mark.parametrize("start", [1, 9, 10, 17, 23])
def test_train_batches_resume_exactly(start):
    ds = _indexed(103)
    full = _take(data.train_batches(ds, batch_size=10, seed=3), 30)
    resumed = _take(data.train_batches(ds, batch_size=10, seed=3, start_step=start), 30 - start)
    for (s, x), (t, y) in zip(full[start:], resumed, strict=True):
        assert s == t
        np.testing.assert_array_equal(x["label"], y["label"])
        np.testing.assert_array_equal(x["image"], y["image"])


def test_every_example_once_per_epoch():
    ds = _indexed(103)
    batches = _take(data.train_batches(ds, batch_size=10, seed=4), 30)
    epochs = [
        np.concatenate([b["label"] for _, b in batches[e * 10 : (e + 1) * 10]]) for e in range(3)
    ]
    for e, labels in enumerate(epochs):
        assert len(np.unique(labels)) == 100  # 10 full batches, 3 examples dropped
        np.testing.assert_array_equal(labels, np.random.default_rng([4, e]).permutation(103)[:100])
    assert (
        len({tuple(np.setdiff1d(np.arange(103), lab)) for lab in epochs}) > 1
    )  # dropped ones vary


def test_batch_order_survives_pickling_mid_epoch():
    import pickle

    order = data.BatchOrder(103, 10, seed=6)
    expected = [order.train(s).copy() for s in range(25)]
    fresh = data.BatchOrder(103, 10, seed=6)
    fresh.train(13)  # holds epoch 1's permutation when pickled
    copy = pickle.loads(pickle.dumps(fresh))
    for s in (14, 3, 24, 13):
        np.testing.assert_array_equal(copy.train(s), expected[s])
    with pytest.raises(ValueError, match="seed must be >= 0"):
        data.BatchOrder(10, 2, seed=-1)
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        order.check_start(-1)


def test_train_batches_rejects_batch_larger_than_split():
    with pytest.raises(ValueError, match="larger than the 7 examples"):
        data.train_batches(_indexed(7), batch_size=8, seed=0)


@pytest.mark.parametrize("n, batch_size", [(103, 10), (100, 10), (7, 16)])
def test_eval_batches_cover_every_example_once(n, batch_size):
    ds = _indexed(n)
    batches = list(data.eval_batches(ds, batch_size=batch_size))
    assert len(batches) == -(-n // batch_size)
    for b in batches:
        assert b["image"].shape == (batch_size, 4, 4, 3) and b["mask"].dtype == bool
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, np.arange(n))  # in order, each once
    assert batches[-1]["mask"].sum() == n - (len(batches) - 1) * batch_size
    assert all(b["mask"].all() for b in batches[:-1])


# ---------------------------------------------------------------------------------------------
# preprocess
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "digits"])
def test_normalisation_of_a_constant_image(name):
    info = data.DATASETS[name]
    v = 200
    images = np.full((2, *info.image_shape), v, np.uint8)
    out = data.preprocess(None, images, info, train=False)
    assert out.dtype == np.float32 and out.shape == images.shape
    expected = (v / 255.0 - np.asarray(info.mean)) / np.asarray(info.std)
    np.testing.assert_allclose(out, np.broadcast_to(expected, images.shape), rtol=1e-6)


def _unnormalise(x, info):
    return np.asarray(x) * np.asarray(info.std) + np.asarray(info.mean)


def test_preprocess_is_deterministic_per_key_under_jit():
    ds = _indexed(16, (32, 32, 3))
    fn = jax.jit(lambda k, x: data.preprocess(k, x, ds.info, train=True))
    a = fn(jax.random.key(0), ds.images)
    b = fn(jax.random.key(0), ds.images)
    c = fn(jax.random.key(1), ds.images)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_no_crop_and_no_flip_is_the_identity():
    ds = _indexed(8, (32, 32, 3))
    train = data.preprocess(
        jax.random.key(0), ds.images, ds.info, train=True, crop_padding=0, flip=False
    )
    np.testing.assert_array_equal(train, data.preprocess(None, ds.images, ds.info, train=False))


def test_flip_mirrors_some_images_and_keeps_the_rest():
    ds = _indexed(32, (32, 32, 3))
    out = data.preprocess(jax.random.key(2), ds.images, ds.info, train=True, crop_padding=0)
    plain = np.asarray(data.preprocess(None, ds.images, ds.info, train=False))
    flipped = [np.array_equal(o, p[:, ::-1]) for o, p in zip(np.asarray(out), plain, strict=True)]
    kept = [np.array_equal(o, p) for o, p in zip(np.asarray(out), plain, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)


def test_random_crop_is_a_zero_filled_shift_within_the_padding():
    ds = _indexed(16, (32, 32, 3))
    out = data.preprocess(jax.random.key(3), ds.images, ds.info, train=True, flip=False)
    pixels = np.rint(_unnormalise(out, ds.info) * 255).astype(int)
    shifts = []
    for image, crop in zip(ds.images, pixels, strict=True):
        padded = np.pad(image, ((4, 4), (4, 4), (0, 0))).astype(int)
        found = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if np.array_equal(padded[dy : dy + 32, dx : dx + 32], crop)
        ]
        assert found, "crop is not a shifted copy of the image"
        shifts.append(found[0])
    assert len(set(shifts)) > 1


def test_randaugment_runs_under_jit_and_is_deterministic_per_key():
    ds = _indexed(16, (32, 32, 3))
    fn = jax.jit(lambda k, x: data.preprocess(k, x, ds.info, train=True, randaugment=(2, 14)))
    a, b, c = (
        fn(jax.random.key(0), ds.images),
        fn(jax.random.key(0), ds.images),
        fn(jax.random.key(1), ds.images),
    )
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    pixels = _unnormalise(a, ds.info) * 255
    np.testing.assert_allclose(pixels, np.rint(pixels), atol=1e-3)  # still uint8 values
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3


def test_randaugment_argument_checks():
    images = np.zeros((2, 8, 8, 3), np.float32)
    np.testing.assert_array_equal(data.rand_augment(jax.random.key(0), images, 0, 14), images)
    with pytest.raises(ValueError, match="magnitude"):
        data.rand_augment(jax.random.key(0), images, 2, 31)


# Each op at a fixed signed value (the study's magnitude 14 of 31 where it applies) against PIL,
# which is what torchvision's RandAugment calls on PIL images: (value, PIL op, largest allowed
# |difference|, share of pixels that must match exactly). Color and contrast differ by one grey
# level where PIL rounds the luma that torchvision truncates; rotate differs on a few pixels where
# PIL's fixed-point nearest-neighbour rounding breaks ties the other way.
_IMAGE = np.random.default_rng(7).integers(30, 220, (32, 32, 3), dtype=np.uint8)


def _affine(coefficients):
    return lambda im: im.transform(im.size, Image.AFFINE, coefficients)


_PIL_CASES = {
    "identity": (0.0, lambda im: im, 0, 1.0),
    "brightness": (0.42, lambda im: ImageEnhance.Brightness(im).enhance(1.42), 0, 1.0),
    "color": (-0.42, lambda im: ImageEnhance.Color(im).enhance(0.58), 1, 0.75),
    "contrast": (0.42, lambda im: ImageEnhance.Contrast(im).enhance(1.42), 1, 0.85),
    "sharpness": (0.42, lambda im: ImageEnhance.Sharpness(im).enhance(1.42), 0, 1.0),
    "posterize": (6.0, lambda im: ImageOps.posterize(im, 6), 0, 1.0),
    "solarize": (136.0, lambda im: ImageOps.solarize(im, 136), 0, 1.0),
    "auto_contrast": (0.0, ImageOps.autocontrast, 0, 1.0),
    "equalize": (0.0, ImageOps.equalize, 0, 1.0),
    "translate_x": (-6.9, _affine((1, 0, 6, 0, 1, 0)), 0, 1.0),  # int(-6.9) = -6 pixels
    "translate_y": (6.9, _affine((1, 0, 0, 0, 1, -6)), 0, 1.0),
    "shear_x": (0.14, _affine((1, 0.14, 0, 0, 1, 0)), 0, 1.0),
    "shear_y": (-0.14, _affine((1, 0, 0, -0.14, 1, 0)), 0, 1.0),
    "rotate": (14.0, lambda im: im.rotate(14.0), 255, 0.99),
}


def test_every_randaugment_op_has_a_pil_check():
    assert set(_PIL_CASES) == set(data.RANDAUGMENT_OPS)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("op", sorted(_PIL_CASES))
def test_randaugment_op_matches_pil(op, channels):
    value, pil_op, tolerance, fraction = _PIL_CASES[op]
    image = _IMAGE[..., :channels]
    fn = jax.jit(data.augment._randaugment_op(op, value))
    ours = np.asarray(fn(image.astype(np.float32), 1.0)).astype(int)
    theirs = np.asarray(pil_op(Image.fromarray(image.squeeze(-1) if channels == 1 else image)))
    theirs = theirs.reshape(image.shape).astype(int)
    assert np.abs(ours - theirs).max() <= tolerance
    assert (ours == theirs).mean() >= fraction


def test_rotate_by_90_degrees_is_rot90():
    fn = jax.jit(data.augment._randaugment_op("rotate", 90.0))
    np.testing.assert_array_equal(fn(_IMAGE.astype(np.float32), 1.0), np.rot90(_IMAGE, 1))
