"""Swin Transformer (Liu et al. 2021), the study's "weakened" Swin-T, with a kind for each
linear site: (shifted-)window attention with a relative position bias, and patch merging."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from addervit_jax.models.blocks import Attention, FeedForward
from addervit_jax.models.options import (
    LinearOptions,
    _check_attn,
    _check_images,
    _check_kinds,
    _check_options,
    _check_sizes,
    _linear,
)


@dataclasses.dataclass(frozen=True)
class SwinConfig(LinearOptions):
    """The study's "weakened" Swin-T (hidden 80, depths (2, 2, 6, 2), heads (3, 6, 12, 24), head
    dim 32, relative position bias). For 32x32 inputs: patch 2 and window 4, clamped to each
    stage's resolution; the 224px setting is ``image_size=224, patch_size=4, window_size=7``.
    ``qkv``, ``ffn`` (both MLP layers) and ``merge`` (patch merging) take a site kind."""

    image_size: int = 32
    patch_size: int = 2
    channels: int = 3
    num_classes: int = 10
    embed_dim: int = 80
    depths: tuple[int, ...] = (2, 2, 6, 2)
    heads: tuple[int, ...] = (3, 6, 12, 24)
    head_dim: int = 32
    window_size: int = 4
    mlp_ratio: float = 4.0
    embed: str = "multi"
    qkv: str = "multi"
    proj: str = "multi"
    ffn: str = "multi"
    merge: str = "multi"
    head: str = "multi"
    attn: str = "dot"
    learn_temperature: bool = True

    def __post_init__(self):
        _check_sizes(
            self,
            (
                "image_size",
                "patch_size",
                "channels",
                "num_classes",
                "embed_dim",
                "head_dim",
                "window_size",
            ),
        )
        for field in ("depths", "heads"):
            values = getattr(self, field)
            if not isinstance(values, tuple | list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values
            ):
                raise ValueError(f"Swin: {field}={values!r} must be a tuple of positive integers")
        if not (isinstance(self.mlp_ratio, int | float) and self.mlp_ratio > 0):
            raise ValueError(f"Swin: mlp_ratio={self.mlp_ratio!r} must be a positive number")
        _check_kinds(self, ("embed", "qkv", "proj", "ffn", "merge", "head"))
        _check_attn(self)
        _check_options(self, ("embed", "qkv", "proj", "ffn", "merge", "head"))
        if len(self.depths) != len(self.heads):
            raise ValueError(
                f"Swin: depths={self.depths} and heads={self.heads} must have the same length"
            )
        grid = self.image_size // self.patch_size
        if self.image_size % self.patch_size or grid % 2 ** (len(self.depths) - 1):
            raise ValueError(
                f"Swin: image_size={self.image_size} / patch_size={self.patch_size} must be an "
                f"integer divisible by 2**{len(self.depths) - 1} (one halving per patch merging)"
            )
        for stage in range(len(self.depths)):
            side = grid // 2**stage
            window = min(self.window_size, side)
            if side % window:
                raise ValueError(
                    f"Swin: stage {stage} resolution {side} is not divisible by its window "
                    f"{window} (window_size={self.window_size})"
                )


def relative_position_index(window: int) -> np.ndarray:
    """``(w*w, w*w)`` index into the ``((2w-1)^2, heads)`` relative position bias table."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(
        2, -1
    )
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(side: int, window: int, shift: int) -> np.ndarray:
    """``(num_windows, w*w, w*w)`` additive mask: -100 between tokens that the cyclic shift put
    in one window but that are not neighbours in the image (Liu et al. 2021, Sec. 3.2)."""
    regions = np.zeros((side, side), np.int32)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, rows in enumerate(bounds):
        for j, cols in enumerate(bounds):
            regions[rows, cols] = 3 * i + j
    windows = rearrange(regions, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=window, ww=window)
    return np.where(windows[:, :, None] != windows[:, None, :], -100.0, 0.0).astype(np.float32)


class SwinBlock(nnx.Module):
    def __init__(self, cfg: SwinConfig, dim, heads, side, shifted, *, rngs):
        self.window = min(cfg.window_size, side)
        # no shift when one window covers the whole stage
        self.shift = self.window // 2 if shifted and side > self.window else 0
        self.side, self.heads = side, heads
        self.attn_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = Attention(
            dim, heads, cfg.head_dim, cfg, qkv_bias=True, proj=(cfg.proj, True), rngs=rngs
        )
        table = jax.random.truncated_normal(
            rngs.params(), -2.0, 2.0, ((2 * self.window - 1) ** 2, heads)
        )
        self.position_bias = nnx.Param(0.02 * table)
        self.ffn_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.ffn = FeedForward(dim, int(dim * cfg.mlp_ratio), cfg, kind=cfg.ffn, rngs=rngs)

    def __call__(self, x):  # x: (b, side * side, dim)
        ws, s = self.window, self.shift
        h = rearrange(self.attn_norm(x), "b (y x) c -> b y x c", y=self.side)
        if s:
            h = jnp.roll(h, (-s, -s), axis=(1, 2))
        h = rearrange(h, "b (ny wy) (nx wx) c -> (b ny nx) (wy wx) c", wy=ws, wx=ws)
        bias = self.position_bias[...][relative_position_index(ws)].transpose(2, 0, 1)
        if s:  # (windows, heads, n, n), repeated for each image: h is ordered (b, window)
            bias = bias + shifted_window_mask(self.side, ws, s)[:, None]
            bias = jnp.tile(bias, (x.shape[0], 1, 1, 1))
        h = self.attn(h, bias)
        h = rearrange(
            h,
            "(b ny nx) (wy wx) c -> b (ny wy) (nx wx) c",
            ny=self.side // ws,
            nx=self.side // ws,
            wy=ws,
        )
        if s:
            h = jnp.roll(h, (s, s), axis=(1, 2))
        x = x + rearrange(h, "b y x c -> b (y x) c")
        return x + self.ffn(self.ffn_norm(x))


class PatchMerging(nnx.Module):
    """2x2 neighbouring tokens concatenated (4C), LayerNorm, then a ``merge`` site 4C -> 2C."""

    def __init__(self, cfg: SwinConfig, dim, side, *, rngs):
        self.side = side
        self.norm = nnx.LayerNorm(4 * dim, rngs=rngs)
        self.reduction = _linear(cfg.merge, 4 * dim, 2 * dim, cfg, rngs, use_bias=False)

    def __call__(self, x):
        x = rearrange(x, "b (y p x q) c -> b (y x) (q p c)", y=self.side // 2, p=2, q=2)
        return self.reduction(self.norm(x))


class Swin(nnx.Module):
    """Swin Transformer: patch embedding, stages of (shifted-)window blocks with patch merging,
    final LN, mean pool, head. Input images must have the configured size."""

    def __init__(self, cfg: SwinConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        patch_dim = cfg.channels * cfg.patch_size**2
        self.embed = _linear(cfg.embed, patch_dim, cfg.embed_dim, cfg, rngs)
        self.embed_norm = nnx.LayerNorm(cfg.embed_dim, rngs=rngs)
        side, dim = cfg.image_size // cfg.patch_size, cfg.embed_dim
        stages = []
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.heads, strict=True)):
            blocks = [
                SwinBlock(cfg, dim, heads, side, shifted=bool(j % 2), rngs=rngs)
                for j in range(depth)
            ]
            if i < len(cfg.depths) - 1:
                blocks.append(PatchMerging(cfg, dim, side, rngs=rngs))
                side, dim = side // 2, dim * 2
            stages.extend(blocks)
        self.stages = nnx.List(stages)
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = _linear(cfg.head, dim, cfg.num_classes, cfg, rngs)

    def __call__(self, images: jax.Array, *, return_features: bool = False):
        """Logits ``(B, classes)``; with ``return_features``, also the output tokens of every
        block and patch merging, in depth order (what feature distillation matches)."""
        cfg = self.cfg
        _check_images(images, cfg.channels, cfg.patch_size, size=cfg.image_size)
        p = cfg.patch_size
        x = rearrange(images, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=p, p2=p)
        x = self.embed_norm(self.embed(x))
        features = []
        for block in self.stages:
            x = block(x)
            features.append(x)
        logits = self.head(jnp.mean(self.norm(x), axis=1))
        return (logits, features) if return_features else logits
