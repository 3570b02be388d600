"""The adder's backends, found by name: one module of this package per backend.

Every backend module provides the same small protocol, for 2-D operands ``x`` ``(L, D_in)``,
``w`` ``(D_in, D_out)``, cotangent ``g`` ``(L, D_out)`` and an optional stretch ``e`` ``(D_in,)``
(``u = x * e``; the rules are those of :mod:`addervit_jax.adder.rules`):

======================================================== ========================================
``forward(x, w, e, *, interpret)``                       ``y[l, d] = -sum_i |u[l, i] - w[i, d]|``
``x_grad(x, w, g, e, *, grad, clip_scale, interpret)``   dL/du of the rule ``grad``
``w_grad_exact(x, w, g, e, *, interpret)``               dL/dw of the ``"exact"`` rule
``available() -> bool``                                  whether it runs here (e.g. it built)
``sad(a, b, *, negate)`` (``xla``, ``cpu_native``)       ``sum_k |a[l, k] - b[k, n]|`` of uint8
                                                         codes, int32, ``negate``: minus it
``adder_int8_layer(...)`` (``cpu_native``)               the int8 adder layer in one pass:
                                                         ``mask * N(-scale * sad(codes(x * e), w))``
                                                         ``+ bias``
``ORDER``                                                its place in :data:`NAMES`
``CUSTOM_CALL``                                          whether it is a kernel computing in float32
``AUTODIFF``                                             whether its forward is differentiated by
                                                         plain autodiff instead of the rules
======================================================== ========================================

``forward`` returns ``result_type(x, w)``; ``x_grad`` and ``w_grad_exact`` return at least
float32 (the caller casts). ``interpret`` is Pallas' interpret mode, ignored by the others. A
``CUSTOM_CALL`` backend runs per device under ``jax.shard_map`` (``adder.shard_rows``: a custom
call has no partitioning rule) and hands float64 operands to ``"xla"``. An ``AUTODIFF`` backend
(``naive``) provides only ``forward`` and ``available``. ``adder_int8_layer(x, e, w, grid, mask,
bias, *, norm, epsilon)`` takes float32 ``x`` ``(L, D_in)`` and ``e``, uint8 codes ``w``,
``grid = (low, scale)`` (``codes``: ``quantized.int8_codes`` on that grid), ``mask`` and ``bias``
``(D_out,)``, with ``N`` the LayerNorm without affine parameters (``norm``) or the identity, and
returns float32; for a backend without it (or without ``sad``), :mod:`addervit_jax.adder.quantized`
composes the layer in XLA.

Adding a backend is adding one module here. (What only a GPU needs, the Pallas Triton backend, is
imported when a kernel is first built: ``kernels/compat.py``.)
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

__all__ = ["NAMES", "get"]


_MODULES = {
    m.name: importlib.import_module(f"{__name__}.{m.name}")
    for m in pkgutil.iter_modules(__path__)
    if not m.name.startswith("_")
}

#: every backend, in their ORDER: ("xla", "pallas", "cpu_native", "naive")
NAMES = tuple(sorted(_MODULES, key=lambda name: (_MODULES[name].ORDER, name)))


def get(name: str) -> ModuleType:
    """The backend module ``name`` (one of :data:`NAMES`)."""
    return _MODULES[name]
