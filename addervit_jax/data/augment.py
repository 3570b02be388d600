"""Augmentation on the accelerator: random crop, flip, RandAugment, normalisation.

:func:`preprocess` runs under ``jax.jit``: random crop with zero padding, horizontal flip, optional
RandAugment, then normalisation by the dataset's channel statistics. All randomness comes from the
``key`` it is given.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from addervit_jax.data.datasets import DatasetInfo

__all__ = ["RANDAUGMENT_OPS", "preprocess", "rand_augment"]


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
