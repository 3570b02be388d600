"""Fused kernels for the adder operation, reached only through ``addervit_jax.ops.adder``.

Installed as ``addervit_jax.kernels``: the Pallas GPU kernels (``adder_pallas.py``, Triton
backend) and the native CPU kernels (``cpu_native.py`` and ``cpu_native.cc``, XLA FFI), each kernel
beside its plain ``jnp`` ``*_reference``; ``compat.py`` bridges the supported JAX releases. The
backends of :mod:`addervit_jax.adder.backends` call them; the rules they compute are written in
:mod:`addervit_jax.adder.rules`.
"""
