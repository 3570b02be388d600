"""SimpleViT and Swin with every linear site (and the attention scores) chosen by config.

``build(variant, *, num_classes=10, image_size=32, rngs, **overrides)`` builds any named variant of
the *Exploration of AdderViT* study (and ``all_adder``, beyond it): an NNX module mapping float
images ``(B, H, W, C)`` to logits ``(B, num_classes)``. ``VARIANTS`` lists them with their configs.
``quantize(model, batches)`` is a trained model's int8 form for inference (its adder sites on 8-bit
integers).

Site kinds are those of ``layers.make_linear`` (``multi | multi_ln | adder | adder_orig |
euclid``); the attention scores (``"dot"``, ``"l1"``, ``"l1_identity"``) are described in
:class:`Attention`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from addervit_jax import layers, ops

__all__ = [
    "VARIANTS",
    "SimpleViT",
    "SimpleViTConfig",
    "Swin",
    "SwinConfig",
    "Variant",
    "build",
    "quantize",
]

ATTENTION_SCORES = ("dot", "l1", "l1_identity")


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Attention and feed-forward blocks, shared by both models
# ---------------------------------------------------------------------------------------------


def _linear(kind, d_in, d_out, cfg, rngs, use_bias=True):
    return layers.make_linear(
        kind, d_in, d_out, rngs=rngs, use_bias=use_bias, **cfg.site_options(kind)
    )


class Attention(nnx.Module):
    """Multi-head attention with separate q/k/v sites, dot or L1 scores, optional projection.

    ``bias(n)`` (Swin's relative position bias and shift mask) is added to the scores when given.
    The attention scores (``attn``):

    * ``"dot"``: ``softmax(q k^T / sqrt(d))``.
    * ``"l1"``: ``softmax(-t * sum_d |q_d - k_d|)`` (``ops.adder_scores``: q and k get the same
      backward rule, the model's ``grad``/``clip_scale``), with a per-head temperature ``t``,
      learned by default and initialised at ``1 / sqrt(dim_head)`` (the L1 distances of
      unit-variance vectors spread like dot products, by about ``sqrt(d)``).
    * ``"l1_identity"``: adder attention with an identity mapping, after Shu et al., "Adder
      Attention for Vision Transformer" (NeurIPS 2021): the L1 map ``A`` of ``"l1"`` loses rank
      (its rows are nearly equal, so ``A v`` averages the tokens away), and ``A + I`` keeps full
      rank (``A`` is row-stochastic, its eigenvalues lie in the unit disc, so ``-1`` is the only
      one that could cancel ``I``). The output is ``(A + I) v = A v + v``. ``t`` starts at
      ``1 / sqrt((2 - 4 / pi) * dim_head)``, which gives the scores unit variance for
      independent unit-variance q and k (``|z|`` of ``z ~ N(0, 2)`` has variance
      ``2 - 4 / pi``) as ``1 / sqrt(d)`` does for dot products. This is our reading of the
      paper's abstract and method; its exact score scaling (in its supplement) was not available
      to check, so this is our variance-matched scale, not necessarily theirs.
    """

    def __init__(self, dim, heads, dim_head, cfg, *, qkv_bias, proj, rngs):
        inner = heads * dim_head
        self.heads, self.attn = heads, cfg.attn
        self.score_options = cfg.adder_options
        self.to_q = _linear(cfg.qkv, dim, inner, cfg, rngs, qkv_bias)
        self.to_k = _linear(cfg.qkv, dim, inner, cfg, rngs, qkv_bias)
        self.to_v = _linear(cfg.qkv, dim, inner, cfg, rngs, qkv_bias)
        self.to_out = None if proj is None else _linear(proj[0], inner, dim, cfg, rngs, proj[1])
        self.scale = 1.0 / math.sqrt(dim_head)
        if cfg.attn != "dot":
            spread = 1.0 if cfg.attn == "l1" else 2.0 - 4.0 / math.pi
            temperature = jnp.full((heads,), 1.0 / math.sqrt(spread * dim_head))
            self.temperature = (
                nnx.Param(temperature) if cfg.learn_temperature else nnx.Variable(temperature)
            )

    def scores(self, q, k):
        """``(b, h, n, d), (b, h, m, d) -> (b, h, n, m)`` similarity logits."""
        if self.attn == "dot":
            with layers.similarity_scope("scores_dot"):
                return jnp.einsum("bhnd,bhmd->bhnm", q, k) * self.scale

        def l1(q, k):  # one (n, d) x (m, d) score matrix per batch element and head
            return ops.adder_scores(q, k, options=self.score_options)

        with layers.similarity_scope("scores_l1"):
            # per device over the batch under a mesh (each example has its own keys)
            s = ops.shard_rows(jax.vmap(jax.vmap(l1)), (q, k))
        return s * self.temperature[...][:, None, None]

    def __call__(self, x, bias=None):
        q, k, v = (
            rearrange(f(x), "b n (h d) -> b h n d", h=self.heads)
            for f in (self.to_q, self.to_k, self.to_v)
        )
        s = self.scores(q, k)
        if bias is not None:
            s = s + bias
        attn = jax.nn.softmax(s, axis=-1)
        with layers.similarity_scope("attention_values"):
            out = jnp.einsum("bhnm,bhmd->bhnd", attn, v)
        if self.attn == "l1_identity":
            out = out + v  # (A + I) v
        out = rearrange(out, "b h n d -> b n (h d)")
        return out if self.to_out is None else self.to_out(out)


class FeedForward(nnx.Module):
    """Two layers with GELU between (``layers=2``) or one ``dim -> dim`` layer (``layers=1``)."""

    def __init__(self, dim, hidden, cfg, *, kind, layers=2, rngs):
        if layers == 2:
            self.fc1 = _linear(kind, dim, hidden, cfg, rngs)
            self.fc2 = _linear(kind, hidden, dim, cfg, rngs)
        else:
            self.fc1, self.fc2 = _linear(kind, dim, dim, cfg, rngs), None

    def __call__(self, x):
        x = self.fc1(x)
        if self.fc2 is not None:
            x = self.fc2(jax.nn.gelu(x))
        return x


# ---------------------------------------------------------------------------------------------
# SimpleViT
# ---------------------------------------------------------------------------------------------


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

    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.cfg.patch_size
        _check_images(images, self.cfg.channels, p)
        h, w = images.shape[1] // p, images.shape[2] // p
        x = rearrange(images, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=p, p2=p)
        x = self.embed_norm(self.embed(self.patch_norm(x)))
        x = x + posemb_sincos_2d(h, w, self.cfg.dim).astype(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(self.norm(x), axis=1))


# ---------------------------------------------------------------------------------------------
# Swin
# ---------------------------------------------------------------------------------------------


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

    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.cfg
        _check_images(images, cfg.channels, cfg.patch_size, size=cfg.image_size)
        p = cfg.patch_size
        x = rearrange(images, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=p, p2=p)
        x = self.embed_norm(self.embed(x))
        for block in self.stages:
            x = block(x)
        return self.head(jnp.mean(self.norm(x), axis=1))


def _check_images(images, channels, patch, size=None) -> None:
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[3] != channels:
        raise ValueError(f"expected images of shape (B, H, W, {channels}), got {shape}")
    if shape[1] % patch or shape[2] % patch:
        raise ValueError(f"image height and width {shape[1:3]} must be multiples of patch {patch}")
    if size is not None and shape[1:3] != (size, size):
        raise ValueError(f"this Swin was built for {size}x{size} images, got {shape[1:3]}")


# ---------------------------------------------------------------------------------------------
# Named variants
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# int8 inference
# ---------------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for a site while :func:`quantize` runs the model: keeps the site's inputs."""

    def __init__(self, layer: nnx.Module, inputs: list):
        self.layer, self.inputs = layer, inputs

    def __call__(self, x):
        self.inputs.append(np.asarray(x, np.float32).reshape(-1, x.shape[-1]))
        return self.layer(x)


def _replace(model: nnx.Module, path: tuple, new) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def quantize(
    model: nnx.Module,
    batches,
    *,
    max_tokens: int = 8192,
    clip_fractions: tuple[float, ...] = layers.Int8AdderDense.CLIP_FRACTIONS,
    backend: str = "auto",
    seed: int = 0,
) -> nnx.Module:
    """A copy of ``model`` whose adder sites (every ``AdderDense``, ``adder`` and ``adder_orig``)
    run on 8-bit integers (``layers.Int8AdderDense``), calibrated on ``batches``.

    ``batches`` is an iterable of preprocessed image arrays ``(B, H, W, C)``, e.g. a few training
    batches without augmentation; the model runs on them once, eagerly, and each site is
    calibrated (``Int8AdderDense.calibrate``) on at most ``max_tokens`` of its inputs, drawn with
    ``seed``. Sites are calibrated on the float model's activations. Everything else stays as it
    is: multiplication, ``multi_ln`` and euclid sites, the LayerNorms, and the L1 attention
    scores of ``attn="l1"``/``"l1_identity"`` (products of two activations, for which a shared
    grid would have to be found per example). ``model`` itself is not changed.
    """
    model = nnx.clone(model)
    sites = [
        (path, module)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, layers.AdderDense)
    ]
    if not sites:
        raise ValueError(f"quantize: {type(model).__name__} has no adder sites to quantise")
    recorded = {path: [] for path, _ in sites}
    for path, layer in sites:
        _replace(model, path, _Recorder(layer, recorded[path]))
    seen = 0
    for images in batches:
        model(jnp.asarray(images))
        seen += 1
    if not seen:
        raise ValueError("quantize: batches is empty; give at least one batch of images")
    rng = np.random.default_rng(seed)
    for path, layer in sites:
        x = np.concatenate(recorded.pop(path))
        if x.shape[0] > max_tokens:
            x = x[np.sort(rng.choice(x.shape[0], max_tokens, replace=False))]
        quantized = layers.Int8AdderDense.calibrate(
            layer, x, clip_fractions=clip_fractions, backend=backend
        )
        _replace(model, path, quantized)
    return model
