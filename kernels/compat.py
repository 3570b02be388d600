"""The one place where the supported JAX releases (pyproject.toml's range) differ for the kernels.

* Lowering a Pallas GPU kernel on a machine without a GPU: JAX 0.10 lowers for
  ``lowering_platforms=("cuda",)`` from the CPU alone; JAX 0.12 refuses ("No supported GPU devices
  found, please specify an abstract GPU device using AbstractDevice"). Both lower inside an
  abstract mesh whose abstract device is a CUDA GPU (``jax.sharding.AbstractDevice``,
  ``AbstractMesh`` and ``use_abstract_mesh`` have the same signatures in both), so
  :func:`lower_for_cuda` always does that.
* The Pallas Triton backend (``jax.experimental.pallas.triton``): deprecated in JAX 0.12 in favour
  of Mosaic GPU, and only GPUs need it, so it is imported on first use through
  :func:`pallas_triton`, never at ``import addervit_jax``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import jax

#: the GPU that :func:`lower_for_cuda` lowers for unless told otherwise
DEFAULT_DEVICE_KIND = "NVIDIA H100 80GB HBM3"


@functools.cache
def pallas_triton() -> ModuleType:
    """``jax.experimental.pallas.triton``, imported when a kernel is first built."""
    from jax.experimental.pallas import triton

    return triton


def lower_for_cuda(
    fn: Callable, *args, device_kind: str = DEFAULT_DEVICE_KIND
) -> jax.stages.Lowered:
    """``jax.jit(fn)`` lowered for CUDA at ``args`` (arrays or ``jax.ShapeDtypeStruct``), no GPU."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh(
        (1,), ("_",), (jax.sharding.AxisType.Explicit,), abstract_device=device
    )
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
