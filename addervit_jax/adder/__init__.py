"""The adder similarity ``y[..., d] = -sum_i |x[..., i] - w[i, d]|`` (AdderNet's L1 distance), its
backward rules and its backends. Users reach it as ``addervit_jax.ops.adder``.

* :mod:`.rules`: the backward rules ``"clipped"``, ``"addernet"``, ``"exact"``, written out once;
* :mod:`.options`: :class:`AdderOptions`, the rule and the backend as one checked value;
* :mod:`.op`: :func:`adder` and :func:`adder_scores` (L1 attention logits), one custom_vjp over
  every backend;
* :mod:`.quantized`: :func:`adder_int8` on 8-bit codes (int8 inference), :func:`adder_int8_layer`
  (an int8 adder layer's whole forward) and :func:`int8_codes`;
* :mod:`.selfcheck`: the once-per-process check of a Pallas kernel that ``"auto"`` chose on a GPU;
* :mod:`.backends`: one module per backend (``xla``, ``pallas``, ``cpu_native``, ``naive``), each
  with the same protocol; the Pallas and native kernels themselves live in ``kernels/`` (installed
  as ``addervit_jax.kernels``), the Pallas ones each beside its ``*_reference``.
"""

from addervit_jax.adder.op import (
    adder,
    adder_scores,
    check_operands,
    resolve_backend,
    shard_rows,
)
from addervit_jax.adder.options import BACKENDS, AdderOptions
from addervit_jax.adder.quantized import LEVELS as INT8_LEVELS
from addervit_jax.adder.quantized import adder_int8, adder_int8_layer, int8_codes
from addervit_jax.adder.rules import GRAD_RULES

__all__ = [
    "BACKENDS",
    "AdderOptions",
    "GRAD_RULES",
    "INT8_LEVELS",
    "adder",
    "adder_int8",
    "adder_int8_layer",
    "adder_scores",
    "check_operands",
    "int8_codes",
    "resolve_backend",
    "shard_rows",
]
