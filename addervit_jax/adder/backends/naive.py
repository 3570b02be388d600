"""The broadcast formula with plain autodiff: a baseline for speed and memory, never chosen by
``"auto"``.

The "Adder" of the original *Exploration of AdderViT* code, kept as the baseline of the speed
table (``ops.adder(..., backend="naive")``): it materialises the ``(L, D_in, D_out)`` difference
tensor in the forward and again in the backward, and its gradient is autodiff's derivative of
``|.|`` (``sign``, 0 at 0), i.e. the ``"exact"`` rule whatever ``grad`` says. Computed in at least
float32, returned in ``result_type(x, w)``; takes ``x`` of any rank ``(..., D_in)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from addervit_jax.adder.rules import compute_dtype

ORDER = 3
CUSTOM_CALL = False
AUTODIFF = True


def available() -> bool:
    return True


def forward(x, w, e=None, *, interpret: bool = False) -> jax.Array:
    """``-sum_i |u[..., i, None] - w[i, :]|`` by broadcasting (``u = x * e`` in ``x``'s dtype)."""
    del interpret
    u = x if e is None else (x * e).astype(x.dtype)
    dtype = compute_dtype(u, w)
    diff = u.astype(dtype)[..., :, None] - w.astype(dtype)
    return (-jnp.sum(jnp.abs(diff), axis=-2)).astype(jnp.result_type(u, w))
