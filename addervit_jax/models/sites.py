"""A model's linear sites as objects to work on: find them by their path, record the inputs each
receives, in the order the forward pass calls them. The int8 conversion (``models.int8``) and
the conversion of a trained multiplication model (``train.convert``) calibrate or fit sites on
their own inputs with these.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from addervit_jax import layers

__all__ = ["LINEAR_SITES", "linear_sites", "module_at", "record_inputs", "replace"]

# the module types of ``layers.make_linear``'s kinds
LINEAR_SITES = (
    layers.Dense,
    layers.AdderDense,
    layers.EuclidDense,
    layers.NormedDense,
    layers.TernaryDense,
    layers.ShiftDense,
)


def linear_sites(model: nnx.Module, types: tuple[type, ...] = LINEAR_SITES) -> list[tuple]:
    """``(path, module)`` of every site of ``model`` that is one of ``types``."""
    return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, types)]


def module_at(model: nnx.Module, path: tuple):
    """The submodule at ``path`` (as ``nnx.iter_modules`` gives it)."""
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def replace(model: nnx.Module, path: tuple, new) -> None:
    """Put ``new`` at ``path`` in ``model`` (in place)."""
    parent = module_at(model, path[:-1])
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


class _Recorder:
    """Stands in for a site while :func:`record_inputs` runs the model: keeps the site's inputs
    and when it was first called."""

    def __init__(self, layer: nnx.Module, inputs: list, order: list, path: tuple):
        self.layer, self.inputs, self.order, self.path = layer, inputs, order, path

    def __call__(self, x):
        if self.path not in self.order:
            self.order.append(self.path)
        self.inputs.append(np.asarray(x, np.float32).reshape(-1, x.shape[-1]))
        return self.layer(x)


def record_inputs(model: nnx.Module, paths, batches) -> tuple[dict, list]:
    """Run ``model`` eagerly on every image array of ``batches`` and return the inputs the sites
    at ``paths`` received, ``{path: (tokens, D_in)}``, and those paths in the order the forward
    pass first called them (depth order). ``model`` is left as it was."""
    paths = list(paths)
    inputs = {path: [] for path in paths}
    order: list = []
    originals = {path: module_at(model, path) for path in paths}
    for path in paths:
        replace(model, path, _Recorder(originals[path], inputs[path], order, path))
    seen = 0
    try:
        for images in batches:
            model(jnp.asarray(images))
            seen += 1
    finally:
        for path in paths:
            replace(model, path, originals[path])
    if not seen:
        raise ValueError("record_inputs: batches is empty; give at least one batch of images")
    return {path: np.concatenate(x) for path, x in inputs.items()}, order
