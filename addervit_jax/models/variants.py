"""The named variants of the *Exploration of AdderViT* study (and, beyond it, ``all_adder`` and
the ternary and shift families at ``qkv_2ffn``'s sites): ``VARIANTS``, and ``config``/``build`` to
make one by name."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from flax import nnx

from addervit_jax.models.simple_vit import SimpleViT, SimpleViTConfig
from addervit_jax.models.swin import Swin, SwinConfig


class Variant(NamedTuple):
    """A named model of the study: its family, its config fields, and whether training applies
    AdderNet's adaptive learning rate to its adder weights (False for "noupdtm")."""

    family: str  # "simple_vit" or "swin"
    model: dict[str, Any]
    adaptive_lr: bool = True


_QKV_ADDER = {"qkv": "adder", "ffn": "adder"}
VARIANTS: dict[str, Variant] = {
    "multi": Variant("simple_vit", {}),
    # the control of the per-site normalisation: qkv_2ffn's sites, multiplication + F * N(.) + b
    "multi_ln": Variant("simple_vit", {"qkv": "multi_ln", "ffn": "multi_ln", "ffn_layers": 2}),
    "qkv_2ffn": Variant("simple_vit", {**_QKV_ADDER, "ffn_layers": 2}),
    "qkv_1ffn": Variant("simple_vit", {**_QKV_ADDER, "ffn_layers": 1}),
    "qkv_1ffn_noupdtm": Variant("simple_vit", {**_QKV_ADDER, "ffn_layers": 1}, adaptive_lr=False),
    "qkv_2ffn_wopout": Variant("simple_vit", {**_QKV_ADDER, "ffn_layers": 2, "proj": "none"}),
    "qkv_1ffn_addpout": Variant("simple_vit", {**_QKV_ADDER, "ffn_layers": 1, "proj": "adder"}),
    "adder": Variant("simple_vit", {"qkv": "adder_orig", "ffn": "adder_orig", "ffn_layers": 2}),
    "euclider": Variant("simple_vit", {"qkv": "euclid", "ffn": "euclid", "ffn_layers": 2}),
    # the other multiplication-free families at qkv_2ffn's sites: BitNet b1.58's ternary layer
    # and DeepShift-Q's power-of-two layer (layers.TernaryDense, layers.ShiftDense)
    "qkv_2ffn_ternary": Variant(
        "simple_vit", {"qkv": "ternary", "ffn": "ternary", "ffn_layers": 2}, adaptive_lr=False
    ),
    "qkv_2ffn_shift": Variant(
        "simple_vit", {"qkv": "shift", "ffn": "shift", "ffn_layers": 2}, adaptive_lr=False
    ),
    "all_adder": Variant(
        "simple_vit",
        {
            "embed": "adder",
            "qkv": "adder",
            "proj": "adder",
            "ffn": "adder",
            "head": "adder",
            "attn": "l1",
        },
    ),
    "swin_multi": Variant("swin", {}),
    "swin_adder": Variant("swin", {"qkv": "adder", "ffn": "adder", "merge": "adder"}),
    "swin_euclider": Variant("swin", {"qkv": "euclid", "ffn": "euclid", "merge": "euclid"}),
}

_FAMILIES = {"simple_vit": (SimpleViTConfig, SimpleViT), "swin": (SwinConfig, Swin)}


def config(variant: str, **overrides) -> SimpleViTConfig | SwinConfig:
    """The config of a named variant with ``overrides`` applied (validated)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    spec = VARIANTS[variant]
    config_cls, _ = _FAMILIES[spec.family]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(
            f"variant {variant!r} ({config_cls.__name__}) has no field(s) {unknown}; "
            f"fields: {sorted(fields)}"
        )
    return config_cls(**{**spec.model, **overrides})


def build(
    variant: str, *, num_classes: int = 10, image_size: int = 32, rngs: nnx.Rngs, **overrides
) -> SimpleViT | Swin:
    """Build a named variant: an NNX module mapping images ``(B, H, W, C)`` to ``(B, classes)``."""
    cfg = config(variant, num_classes=num_classes, image_size=image_size, **overrides)
    _, model_cls = _FAMILIES[VARIANTS[variant].family]
    return model_cls(cfg, rngs=rngs)
