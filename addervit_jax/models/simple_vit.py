"""SimpleViT (lucidrains' simple_vit, the study's base) with a kind for each linear site: its
config, the fixed 2-D sin-cos position embedding, its pre-LN block and the model."""

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
class SimpleViTConfig(LinearOptions):
    """SimpleViT (lucidrains' simple_vit, the study's base) with a kind for each linear site.

    Defaults suit 32x32 inputs; the study's 128px setting is ``image_size=128, patch_size=16``.
    ``proj="none"`` removes the attention output projection (the study's "wopout"), which needs
    ``heads * dim_head == dim``. ``ffn_layers=1`` is one ``dim -> dim`` layer without activation.
    """

    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    num_classes: int = 10
    dim: int = 128
    depth: int = 4
    heads: int = 4
    dim_head: int = 32
    mlp_dim: int = 256
    embed: str = "multi"
    qkv: str = "multi"
    proj: str = "multi"
    ffn: str = "multi"
    ffn_layers: int = 2
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
                "dim",
                "depth",
                "heads",
                "dim_head",
                "mlp_dim",
            ),
        )
        _check_kinds(self, ("embed", "qkv", "ffn", "head"))
        if self.proj != "none":
            _check_kinds(self, ("proj",))
        elif self.heads * self.dim_head != self.dim:
            raise ValueError(
                f"SimpleViT: proj='none' (wopout) adds the attention heads straight into the "
                f"residual stream, so heads * dim_head must equal dim; got heads={self.heads} * "
                f"dim_head={self.dim_head} = {self.heads * self.dim_head} != dim={self.dim}"
            )
        if self.ffn_layers not in (1, 2):
            raise ValueError(f"SimpleViT: ffn_layers must be 1 or 2, got {self.ffn_layers}")
        _check_attn(self)
        _check_options(self, ("embed", "qkv", "proj", "ffn", "head"))
        if self.dim % 4:
            raise ValueError(f"SimpleViT: dim={self.dim} must be divisible by 4 (2-D sin-cos)")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"SimpleViT: image_size={self.image_size} is not divisible by "
                f"patch_size={self.patch_size}"
            )


def posemb_sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding ``(h * w, dim)`` of simple_vit."""
    y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1))
    y = y.reshape(-1, 1) * omega
    x = x.reshape(-1, 1) * omega
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class ViTBlock(nnx.Module):
    def __init__(self, cfg: SimpleViTConfig, *, rngs):
        self.attn_norm = nnx.LayerNorm(cfg.dim, rngs=rngs)
        proj = None if cfg.proj == "none" else (cfg.proj, cfg.proj != "multi")
        # simple_vit's q/k/v and output projection have no bias; the study's adder layer has b.
        self.attn = Attention(
            cfg.dim, cfg.heads, cfg.dim_head, cfg, qkv_bias=cfg.qkv != "multi", proj=proj, rngs=rngs
        )
        self.ffn_norm = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.ffn = FeedForward(
            cfg.dim, cfg.mlp_dim, cfg, kind=cfg.ffn, layers=cfg.ffn_layers, rngs=rngs
        )

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class SimpleViT(nnx.Module):
    """Patch LN -> linear -> LN, 2-D sin-cos positions, pre-LN blocks, final LN, mean pool, head.

    Works for any batch size and any image size divisible by the patch size.
    """

    def __init__(self, cfg: SimpleViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        patch_dim = cfg.channels * cfg.patch_size**2
        self.patch_norm = nnx.LayerNorm(patch_dim, rngs=rngs)
        self.embed = _linear(cfg.embed, patch_dim, cfg.dim, cfg, rngs)
        self.embed_norm = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.blocks = nnx.List([ViTBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.head = _linear(cfg.head, cfg.dim, cfg.num_classes, cfg, rngs)

    def __call__(self, images: jax.Array, *, return_features: bool = False):
        """Logits ``(B, classes)``; with ``return_features``, also every block's output tokens
        ``(B, N, dim)``, in depth order (what feature distillation matches)."""
        p = self.cfg.patch_size
        _check_images(images, self.cfg.channels, p)
        h, w = images.shape[1] // p, images.shape[2] // p
        x = rearrange(images, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=p, p2=p)
        x = self.embed_norm(self.embed(self.patch_norm(x)))
        x = x + posemb_sincos_2d(h, w, self.cfg.dim).astype(x.dtype)
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        logits = self.head(jnp.mean(self.norm(x), axis=1))
        return (logits, features) if return_features else logits
