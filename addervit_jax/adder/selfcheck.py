"""The once-per-process check of a kernel that ``backend="auto"`` chose on a GPU.

The Pallas kernels are tested on machines without a GPU (interpret mode, and lowering for CUDA:
tests/test_kernels.py); whether Triton compiles them for a given GPU and driver, and what they
compute there, shows only when they run. So before ``"auto"`` runs a kernel on a GPU,
:func:`kernel_backend` runs it once on a small input and compares it with the ``"xla"`` backend's
function of the same name. A kernel that fails to compile or run, or disagrees, is replaced by that
``"xla"`` function for the rest of the process, after one warning that names the kernel and the
error. A backend asked for by name is never checked: it runs, or raises.
"""

from __future__ import annotations

import functools
import warnings

import jax
import numpy as np

from addervit_jax.adder import backends

__all__ = ["kernel_backend"]

# (L, D_in, D_out) of the check: none a power of two, so the Pallas wrapper's padding to whole
# blocks is checked too; small enough to compile and run in well under a second.
SHAPE = (24, 40, 20)
# max |kernel - xla| / max |xla| allowed. Both sum in float32, in different orders (rounding of a
# 40-term float32 sum: ~1e-6 of it); 16-bit results are rounded to 8 or 11 bits of mantissa.
TOL = 1e-4
TOL_16BIT = 1e-2


@functools.cache
def kernel_backend(backend: str, kernel: str, *, dtype, stretched: bool, **options) -> str:
    """``backend`` if its ``kernel`` works here, else ``"xla"`` after one ``RuntimeWarning``.

    Args:
      backend: the backend ``"auto"`` chose (``"pallas"``).
      kernel: the protocol function of :mod:`.backends`: ``"forward"``, ``"x_grad"`` or
        ``"w_grad_exact"``.
      dtype: the operands' dtype.
      stretched: whether the op has a stretch ``e``.
      **options: the kernel's static options (``interpret``; ``grad`` and ``clip_scale`` for
        ``x_grad``).

    The kernel works if it compiles and runs on the default device on fixed random operands of
    :data:`SHAPE` and agrees with ``"xla"`` to :data:`TOL` (:data:`TOL_16BIT` for 16-bit
    operands). Any exception counts as a failure; the warning gives its text, or the largest
    difference for a wrong result. Cached per process and arguments: each kernel is checked, and
    warned about, once.
    """
    dtype = np.dtype(dtype)
    try:
        args = _operands(kernel, dtype, stretched)
        got = _result(backend, kernel, args, options)
        want = _result("xla", kernel, args, options)
        error = _disagreement(got, want, TOL_16BIT if dtype.itemsize == 2 else TOL)
    except Exception as err:  # a kernel that does not compile or run, whatever the reason
        error = f"The kernel failed to compile or run: {type(err).__name__}: {err}"
    if error is None:
        return backend
    described = ", ".join(f"{k}={v!r}" for k, v in options.items())
    operands = f"{dtype.name} operands{', stretched' if stretched else ''}"
    warnings.warn(
        f"adder: backend='auto' chose the {backend!r} kernel {kernel} ({described}; {operands}), "
        f"which failed its check (addervit_jax/adder/selfcheck.py): this process runs the 'xla' "
        f"backend's {kernel} in its place (backend={backend!r} runs the kernel anyway). {error}",
        RuntimeWarning,
        stacklevel=2,
    )
    return "xla"


def _operands(kernel: str, dtype: np.dtype, stretched: bool) -> tuple:
    """The kernel's positional operands: ``(x, w, e)`` or ``(x, w, g, e)``, NumPy arrays."""
    length, d_in, d_out = SHAPE
    rng = np.random.default_rng(0)
    x = rng.normal(size=(length, d_in)).astype(dtype)
    w = rng.normal(size=(d_in, d_out)).astype(dtype)
    g = rng.normal(size=(length, d_out)).astype(dtype)
    e = rng.uniform(0.5, 1.5, size=d_in).astype(dtype) if stretched else None
    return (x, w, e) if kernel == "forward" else (x, w, g, e)


def _result(backend: str, kernel: str, args: tuple, options: dict) -> np.ndarray:
    """``backend``'s ``kernel`` on ``args``, run now, as float64."""
    fn = functools.partial(getattr(backends.get(backend), kernel), **options)
    # Compiled ahead of time and called with NumPy arrays: it runs now even while the caller's
    # jax.jit traces (an operation would give a tracer there, and jax.ensure_compile_time_eval
    # would also fold the kernel body's own constants, which pallas_call refuses). No mesh: this
    # checks the kernel, not the caller's sharding.
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        out = jax.jit(fn).lower(*args).compile()(*args)
    return np.asarray(out).astype(np.float64)


def _disagreement(got: np.ndarray, want: np.ndarray, tol: float) -> str | None:
    """None if ``got`` is ``want`` to ``tol`` relative to ``max |want|``, else what differs."""
    if got.shape != want.shape:
        return f"The kernel's result has shape {got.shape}, the 'xla' backend's {want.shape}"
    diff, scale = np.max(np.abs(got - want)), np.max(np.abs(want))
    if diff <= tol * scale:  # False for NaN
        return None
    return (
        f"The kernel's result differs from the 'xla' backend's by up to {diff:.3g} "
        f"({diff / scale:.2g} of max |xla| = {scale:.3g}; tolerance {tol:g})"
    )
