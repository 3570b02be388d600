"""SimpleViT and Swin with every linear site (and the attention scores) chosen by config.

``build(variant, *, num_classes=10, image_size=32, rngs, **overrides)`` builds any named variant of
the *Exploration of AdderViT* study (and ``all_adder``, beyond it): an NNX module mapping float
images ``(B, H, W, C)`` to logits ``(B, num_classes)``. ``VARIANTS`` lists them with their configs.
``quantize(model, batches)`` is a trained model's int8 form for inference (its adder,
multiplication, ternary and shift sites on integers; ``float_sites`` lists what stays float).

Site kinds are those of ``layers.make_linear`` (``multi | multi_ln | adder | adder_orig |
euclid | ternary | shift``); the attention scores (``"dot"``, ``"l1"``, ``"l1_identity"``) are
described in :class:`Attention`.

One job per module:

* ``options``: ``LinearOptions`` (the options of the sites), the config checks, and ``_linear``,
  the routing of a site's options to ``layers.make_linear``;
* ``blocks``: ``Attention`` and ``FeedForward``, shared by both models;
* ``simple_vit``: ``SimpleViTConfig`` and ``SimpleViT``;
* ``swin``: ``SwinConfig`` and ``Swin``, with its window attention and patch merging;
* ``variants``: the named variants, ``VARIANTS``, ``config`` and ``build``;
* ``int8``: the int8 inference path, ``Int8AdderDense``, ``Int8DenseMulti``, ``Int8Ternary``,
  ``quantize``, ``float_sites`` and ``NO_INT8_FORM`` (why shift and euclid sites have none).
"""

from addervit_jax.models.blocks import Attention, FeedForward
from addervit_jax.models.int8 import (
    INT8_KINDS,
    INT8_SITES,
    NO_INT8_FORM,
    Int8AdderDense,
    Int8Codes,
    Int8DenseMulti,
    Int8Ternary,
    float_sites,
    quantize,
)
from addervit_jax.models.options import ATTENTION_SCORES, LinearOptions
from addervit_jax.models.simple_vit import SimpleViT, SimpleViTConfig, ViTBlock, posemb_sincos_2d
from addervit_jax.models.swin import (
    PatchMerging,
    Swin,
    SwinBlock,
    SwinConfig,
    relative_position_index,
    shifted_window_mask,
)
from addervit_jax.models.variants import VARIANTS, Variant, build, config

__all__ = [
    "ATTENTION_SCORES",
    "INT8_KINDS",
    "INT8_SITES",
    "NO_INT8_FORM",
    "VARIANTS",
    "Attention",
    "FeedForward",
    "Int8AdderDense",
    "Int8Codes",
    "Int8DenseMulti",
    "Int8Ternary",
    "LinearOptions",
    "PatchMerging",
    "SimpleViT",
    "SimpleViTConfig",
    "Swin",
    "SwinBlock",
    "SwinConfig",
    "Variant",
    "ViTBlock",
    "build",
    "config",
    "float_sites",
    "posemb_sincos_2d",
    "quantize",
    "relative_position_index",
    "shifted_window_mask",
]
