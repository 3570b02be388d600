"""Fused kernels for the adder operation, reached only through ``addervit_jax.ops``.

Installed as ``addervit_jax.kernels``. The Pallas GPU kernels (SPEC section 7) and the native CPU
kernel land here with their own issues; ``ops.adder(..., backend="auto")`` uses the pure-JAX
formulation until then.
"""
