"""``AdderOptions``: how an adder similarity runs, one frozen value checked once.

The four settings of an adder (its backward rule ``grad`` with ``clip_scale``, the ``backend`` and
Pallas' ``interpret`` mode) travel together from a model's config through its layers to the op as
one :class:`AdderOptions`. It is checked when it is made, so that nothing downstream checks again,
and it is hashable, so that the op can hand it to ``jax.custom_vjp`` as one static argument.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from addervit_jax.adder import backends
from addervit_jax.adder.rules import GRAD_RULES

__all__ = ["BACKENDS", "AdderOptions"]

# "naive" is the broadcast formula with plain autodiff, a baseline for comparisons only: "auto"
# never selects it.
BACKENDS = ("auto", *backends.NAMES)


@dataclasses.dataclass(frozen=True)
class AdderOptions:
    """The backward rule and the backend of an adder similarity (``addervit_jax.ops.adder``).

    Attributes:
      grad: the backward rule, ``"clipped"``, ``"addernet"`` or ``"exact"``
        (:mod:`addervit_jax.adder.rules`).
      clip_scale: the factor inside ``hardtanh`` of the ``"clipped"`` input gradient (4 in the
        *Exploration of AdderViT* study); a positive, finite Python number, stored as a float.
        Other rules ignore it.
      backend: ``"auto"``, or one of :mod:`addervit_jax.adder.backends` (``"xla"``, ``"pallas"``,
        ``"cpu_native"``, ``"naive"``); see :func:`addervit_jax.adder.adder`.
      interpret: run the Pallas kernels in interpret mode (on a CPU, for tests; slow).

    Invalid values raise on construction (``ValueError``, or ``TypeError`` for a value of the
    wrong type), naming the attribute.
    """

    grad: str = "clipped"
    clip_scale: float = 4.0
    backend: str = "auto"
    interpret: bool = False

    def __post_init__(self):
        if self.grad not in GRAD_RULES:
            raise ValueError(
                f"AdderOptions: unknown grad={self.grad!r}; expected one of {GRAD_RULES}"
            )
        scale = self.clip_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float | np.number):
            raise TypeError(
                f"AdderOptions: clip_scale must be a Python number (it selects the backward rule "
                f"at trace time), got {type(scale).__name__}"
            )
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"AdderOptions: clip_scale must be positive and finite, got {scale}")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"AdderOptions: unknown backend={self.backend!r}; expected one of {BACKENDS}"
            )
        if not isinstance(self.interpret, bool | np.bool_):
            raise TypeError(
                f"AdderOptions: interpret must be a bool, got {type(self.interpret).__name__}"
            )
        object.__setattr__(self, "clip_scale", float(scale))
        object.__setattr__(self, "interpret", bool(self.interpret))

    @classmethod
    def of(cls, options: AdderOptions | None = None, **fields) -> AdderOptions:
        """``options`` (default ``AdderOptions()``) with the ``fields`` that are not None
        replaced: how the op and the layers combine an ``options`` value with keyword settings."""
        if options is not None and not isinstance(options, AdderOptions):
            raise TypeError(
                f"options must be an AdderOptions, got {type(options).__name__}: {options!r}"
            )
        given = {k: v for k, v in fields.items() if v is not None}
        return dataclasses.replace(options or cls(), **given)
