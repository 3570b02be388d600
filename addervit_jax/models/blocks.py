"""The attention and feed-forward blocks that SimpleViT and Swin share.

``Attention`` is multi-head attention with a site kind for q, k, v and the output projection
and dot or L1 scores; ``FeedForward`` is the MLP of a transformer block.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from addervit_jax import layers, ops
from addervit_jax.models.options import _linear


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
        out = rearrange(self.attend(q, k, v, bias), "b h n d -> b n (h d)")
        return out if self.to_out is None else self.to_out(out)

    def attend(self, q, k, v, bias=None):
        """``(b, h, n, d)`` queries, keys and values -> ``(b, h, n, d)``: the scores, softmax
        and attention-weighted values (what stays float in an int8 model)."""
        s = self.scores(q, k)
        if bias is not None:
            s = s + bias
        attn = jax.nn.softmax(s, axis=-1)
        with layers.similarity_scope("attention_values"):
            out = jnp.einsum("bhnm,bhmd->bhnd", attn, v)
        if self.attn == "l1_identity":
            out = out + v  # (A + I) v
        return out


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
