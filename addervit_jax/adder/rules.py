"""The backward rules of the adder similarity: the one place their formulas are written.

``y[l, d] = -sum_i |u[l, i] - w[i, d]|`` with ``u = x * E`` (the stretch, or ``u = x``) is not
differentiable at ``u == w`` and its true gradient, a sign, trains badly, so its backward pass is a
choice (``grad``); ``g[l, d]`` is the cotangent of ``y[l, d]`` and ``hardtanh(z) = clip(z, -1, 1)``:

* ``"exact"``:    dL/dw[i, d] = sum_l g[l,d] * sign(u[l,i] - w[i,d]),
                  dL/du[l, i] = sum_d g[l,d] * sign(w[i,d] - u[l,i]);
* ``"addernet"``: dL/dw[i, d] = sum_l g[l,d] * (u[l,i] - w[i,d]),
                  dL/du[l, i] = sum_d g[l,d] * hardtanh(w[i,d] - u[l,i]);
* ``"clipped"``:  dL/dw[i, d] = sum_l g[l,d] * (u[l,i] - w[i,d]),
                  dL/du[l, i] = sum_d g[l,d] * hardtanh(clip_scale * (w[i,d] - u[l,i])).

``"addernet"`` is AdderNet's full-precision gradient for the weights with a HardTanh-clipped input
gradient (Chen et al., "AdderNet: Do we really need multiplications in deep learning?", CVPR
2020). ``"clipped"`` is the fix of the *Exploration of AdderViT* study (its Problem 1): scaling by
4 before the clip brings the input gradient closer to the true sign while keeping it bounded.
dL/dx = dL/du * E and dL/dE = sum_l dL/du * x follow by the chain rule.

Every input rule is ``dL/du[l, i] = sum_d g[l, d] * s(w[i, d] - u[l, i])`` with the rule's
*surrogate* ``s`` (:func:`surrogate`), which is what every backend's ``x_grad`` computes. For the
L1 attention scores (``adder_scores``) both operands are activations and both get the input rule.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["GRAD_RULES", "compute_dtype", "surrogate"]

GRAD_RULES = ("clipped", "addernet", "exact")


def compute_dtype(*dtypes) -> jnp.dtype:
    """The precision every backend sums in: at least float32 (bfloat16/float16 inputs accumulate
    in float32), float64 stays float64."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def surrogate(grad: str, clip_scale: float) -> Callable[[jax.Array], jax.Array]:
    """The input rule's ``s``: ``sign`` (exact), ``hardtanh`` (addernet), ``hardtanh(c * .)``."""
    if grad not in GRAD_RULES:
        raise ValueError(f"unknown grad={grad!r}; expected one of {GRAD_RULES}")
    if grad == "exact":
        return jnp.sign
    scale = 1.0 if grad == "addernet" else float(clip_scale)
    if scale == 1.0:
        return lambda z: jnp.clip(z, -1.0, 1.0)
    return lambda z: jnp.clip(scale * z, -1.0, 1.0)
