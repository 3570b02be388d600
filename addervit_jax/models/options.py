"""The options of the models' linear sites, checked once and routed to ``layers.make_linear``.

``LinearOptions`` holds the options of the distance-based sites and of the L1 attention scores;
both model configs extend it. The ``_check_*`` functions validate a config's fields (and
``_check_images`` a model's input); ``_linear`` builds one site of a model with the options its
kind honours.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from addervit_jax import layers, ops

ATTENTION_SCORES = ("dot", "l1", "l1_identity")


@dataclasses.dataclass(frozen=True)
class LinearOptions:
    """Options of the distance-based sites and of L1 attention scores.

    ``None`` (the default) leaves each site its own default (``layers.make_linear``). A value set
    explicitly goes to every site whose kind honours it (``layers.SITE_OPTIONS``; the L1 scores
    honour ``grad``, ``clip_scale``, ``backend`` and ``interpret``) and must be honoured by at
    least one site of the model: otherwise the config raises, naming the option and the sites,
    so that no study trains a different model than its label says.
    """

    grad: str | None = None
    clip_scale: float | None = None
    stretch: bool | None = None
    mask: bool | None = None
    norm: str | None = None
    backend: str | None = None
    interpret: bool | None = None  # the Pallas kernels in interpret mode (CPU debugging)
    weight_bits: int | None = None  # shift sites: DeepShift's bits per weight (layers.ShiftDense)

    def set_options(self) -> dict[str, Any]:
        """The options given explicitly (not None)."""
        names = (f.name for f in dataclasses.fields(LinearOptions))
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def adder_options(self) -> ops.AdderOptions:
        """``grad``, ``clip_scale``, ``backend`` and ``interpret`` as the one value the adder
        sites and the L1 scores receive (unset ones: ``AdderOptions``' defaults)."""
        return ops.AdderOptions.of(**{name: getattr(self, name) for name in _ADDER_FIELDS})

    def site_options(self, kind: str) -> dict[str, Any]:
        """What a site of ``kind`` receives: the explicitly set options it honours, with the
        adder settings as one ``options`` value."""
        given = {k: v for k, v in self.set_options().items() if k in _honoured(kind)}
        if "options" not in _honoured(kind):
            return given
        return {k: v for k, v in given.items() if k not in _ADDER_FIELDS} | {
            "options": self.adder_options
        }


# The adder settings (ops.AdderOptions' fields), which the L1 attention scores honour.
_ADDER_FIELDS = tuple(f.name for f in dataclasses.fields(ops.AdderOptions))
_SCORE_OPTIONS = frozenset({"options", *_ADDER_FIELDS})


def _honoured(kind: str) -> frozenset:
    return _SCORE_OPTIONS if kind == "scores_l1" else layers.SITE_OPTIONS[kind]


def _check_sizes(cfg, fields) -> None:
    for field in fields:
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{type(cfg).__name__}: {field}={value!r} must be a positive integer")


def _check_kinds(cfg, fields) -> None:
    for field in fields:
        kind = getattr(cfg, field)
        if kind not in layers.LINEAR_KINDS:
            raise ValueError(
                f"{type(cfg).__name__}: {field}={kind!r} is not a linear kind; expected one of "
                f"{layers.LINEAR_KINDS}"
            )


def _check_attn(cfg) -> None:
    if cfg.attn not in ATTENTION_SCORES:
        raise ValueError(
            f"{type(cfg).__name__}: attn={cfg.attn!r}; expected one of {ATTENTION_SCORES}"
        )


def _check_options(cfg, fields) -> None:
    """The adder settings must make an ``AdderOptions`` (it raises, naming the bad one), and
    every explicitly set option must be honoured by at least one site (LinearOptions)."""
    _ = cfg.adder_options
    sites = {f: getattr(cfg, f) for f in fields if getattr(cfg, f) != "none"}
    kinds = set(sites.values()) | ({"scores_l1"} if cfg.attn != "dot" else set())
    for option, value in cfg.set_options().items():
        if not any(option in _honoured(kind) for kind in kinds):
            described = ", ".join(f"{f}={k!r}" for f, k in sites.items())
            raise ValueError(
                f"{type(cfg).__name__}: {option}={value!r} is honoured by no site of this model "
                f"({described}, attn={cfg.attn!r}); see layers.SITE_OPTIONS"
            )


def _check_images(images, channels, patch, size=None) -> None:
    shape = tuple(images.shape)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        # uint8 pixels would be embedded as 0..255 without normalisation: a silently wrong model
        raise ValueError(
            f"expected float images, got {images.dtype}: preprocess them first "
            "(data.preprocess: scale to [0, 1] and normalise by the dataset's mean and std)"
        )
    if len(shape) != 4 or shape[3] != channels:
        raise ValueError(f"expected images of shape (B, H, W, {channels}), got {shape}")
    if shape[1] % patch or shape[2] % patch:
        raise ValueError(f"image height and width {shape[1:3]} must be multiples of patch {patch}")
    if size is not None and shape[1:3] != (size, size):
        raise ValueError(f"this Swin was built for {size}x{size} images, got {shape[1:3]}")


def _linear(kind, d_in, d_out, cfg, rngs, use_bias=True):
    return layers.make_linear(
        kind, d_in, d_out, rngs=rngs, use_bias=use_bias, **cfg.site_options(kind)
    )
