"""Fused Pallas GPU kernels (Triton backend): ``kernels/adder_pallas.py``, chosen by ``"auto"`` on
a GPU; ``interpret=True`` runs them on a CPU (for tests; slow)."""

from __future__ import annotations

from addervit_jax.kernels import adder_pallas as _kernels

ORDER = 1
CUSTOM_CALL = True
AUTODIFF = False


def available() -> bool:
    return True


def forward(x, w, e=None, *, interpret: bool = False):
    return _kernels.forward(x, w, e, interpret=interpret)


def x_grad(x, w, g, e=None, *, grad: str, clip_scale: float, interpret: bool = False):
    return _kernels.x_grad(x, w, g, e, grad=grad, clip_scale=clip_scale, interpret=interpret)


def w_grad_exact(x, w, g, e=None, *, interpret: bool = False):
    return _kernels.w_grad_exact(x, w, g, e, interpret=interpret)
