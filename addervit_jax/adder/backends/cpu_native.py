"""Native CPU kernels (C++ through the XLA FFI, compiled on first use): ``kernels/cpu_native.py``,
chosen by ``"auto"`` on a CPU where they build."""

from __future__ import annotations

from addervit_jax.kernels import cpu_native as _kernels

ORDER = 2
CUSTOM_CALL = True
AUTODIFF = False


def available() -> bool:
    return _kernels.available()


def forward(x, w, e=None, *, interpret: bool = False):
    del interpret
    return _kernels.forward(x, w, e)


def x_grad(x, w, g, e=None, *, grad: str, clip_scale: float, interpret: bool = False):
    del interpret
    return _kernels.x_grad(x, w, g, e, grad=grad, clip_scale=clip_scale)


def w_grad_exact(x, w, g, e=None, *, interpret: bool = False):
    del interpret
    return _kernels.w_grad_exact(x, w, g, e)


def sad(a, b, *, negate: bool = False):
    return _kernels.sad(a, b, negate=negate)


def adder_int8_layer(x, e, w, grid, mask, bias, *, norm: bool, epsilon: float):
    return _kernels.adder_int8_layer(x, e, w, grid, mask, bias, norm=norm, epsilon=epsilon)


def int8_matmul(x, w):
    return _kernels.int8_matmul(x, w)


def ternary_matmul(x, packed, n: int):
    return _kernels.ternary_matmul(x, packed, n)


def int8_dense(x, w, col, bias):
    return _kernels.int8_dense(x, w, col, bias)


def ternary_dense(x, packed, col, bias, *, n: int):
    return _kernels.ternary_dense(x, packed, n, col, bias)


def int8_matmul_available() -> bool:
    """Whether this build has the int8 matmul (oneDNN: ``kernels.cpu_native.onednn_flags``)."""
    return _kernels.int8_matmul_path() is not None
