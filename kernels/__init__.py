"""Fused kernels for the adder operation, reached only through ``addervit_jax.ops.adder``.

Installed as ``addervit_jax.kernels``: the Pallas GPU kernels (``adder_pallas.py``, Triton
backend), each beside its plain ``jnp`` ``*_reference``, and the native CPU kernels
(``cpu_native.py`` and ``cpu_native.cc``, XLA FFI). The native float kernels have the Pallas
kernels' signatures and semantics, so ``adder_pallas``'s references are theirs too (the tests
compare them); the integer ``sad`` has its NumPy ``sad_reference``, and ``adder_int8_layer`` is
compared with its composition in XLA (:func:`addervit_jax.adder.quantized.adder_int8_layer` on
the ``"xla"`` backend). ``compat.py`` bridges the supported JAX releases. The backends of
:mod:`addervit_jax.adder.backends` call them; the rules they compute are written in
:mod:`addervit_jax.adder.rules`.
"""
