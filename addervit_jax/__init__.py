"""addervit-jax: multiplication-free vision transformers in JAX.

``addervit_jax.ops`` holds the three similarity operations (``dense``, ``adder``, ``euclid``) and
the backward rules of AdderNet and the *Exploration of AdderViT* study.
"""

from addervit_jax import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
