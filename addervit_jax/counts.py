"""Count multiplications and additions per image, and estimate their energy.

``count_ops(model, image_shape)`` traces the model on one image and walks the jaxpr. Similarity
computations are the calls made under ``layers.similarity_scope``; each is counted by its formula,
with ``terms`` = output elements x reduction length:

==================== ================= ================ =====================================
site                 multiplications   additions        formula per term
==================== ================= ================ =====================================
``multi``            terms             terms            multiply-accumulate
``adder``            0                 2 * terms        subtract, accumulate (``|.|`` is free)
``euclid``           terms             2 * terms        subtract, square, accumulate
``scores_dot``       terms             terms            ``q . k``
``scores_l1``        0                 2 * terms        ``-sum |q - k|``
``attention_values`` terms             terms            ``softmax(s) @ v``
==================== ================= ================ =====================================

This is the convention of the AdderNet papers (an adder layer costs twice the additions of a
multiply-accumulate and no multiplications). Every other operation (normalisation, softmax, GELU,
the stretch E and mask F, residual additions) is counted from its primitive: ``mul``/``div``/
``integer_pow`` as multiplications, ``add``/``sub``/``reduce_sum`` as additions, transcendental and
comparison primitives under ``other`` (listed, not priced).

Energies per operation at 45 nm are Horowitz's (M. Horowitz, "Computing's energy problem (and what
we can do about it)", ISSCC 2014): fp32 multiply 3.7 pJ and add 0.9 pJ, fp16 1.1 / 0.4 pJ, int32
3.1 / 0.1 pJ, int8 0.2 / 0.03 pJ, as AdderNet and its successors quote them.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

__all__ = ["ENERGY_PJ", "SIMILARITY_SITES", "OpCounts", "count_ops"]

# (multiply, add) energy in picojoules at 45 nm, Horowitz (ISSCC 2014).
ENERGY_PJ = {"fp32": (3.7, 0.9), "fp16": (1.1, 0.4), "int32": (3.1, 0.1), "int8": (0.2, 0.03)}

# site -> (multiplications per term, additions per term)
SIMILARITY_SITES = {
    "multi": (1, 1),
    "adder": (0, 2),
    "euclid": (1, 2),
    "scores_dot": (1, 1),
    "scores_l1": (0, 2),
    "attention_values": (1, 1),
}

_MUL = {"mul", "div", "square"}
_ADD = {"add", "sub", "add_any"}
_FREE = {  # data movement, dtype and sign manipulation
    "reshape", "broadcast_in_dim", "transpose", "convert_element_type", "squeeze",
    "expand_dims", "slice", "dynamic_slice", "concatenate", "pad", "gather", "iota", "copy",
    "copy_p", "stop_gradient", "neg", "select_n", "rev", "dynamic_update_slice", "scatter",
    "pjit", "jit", "custom_jvp_call", "custom_vjp_call", "scan", "while", "cond",
    "sharding_constraint", "optimization_barrier",
}  # fmt: skip


@dataclasses.dataclass
class OpCounts:
    """Operations per image: ``similarity[site] = (mults, adds)``, the rest in ``other_*``."""

    similarity: dict[str, tuple[int, int]]
    other_mults: int
    other_adds: int
    other: dict[str, int]

    @property
    def similarity_mults(self) -> int:
        return sum(m for m, _ in self.similarity.values())

    @property
    def similarity_adds(self) -> int:
        return sum(a for _, a in self.similarity.values())

    @property
    def total_mults(self) -> int:
        return self.similarity_mults + self.other_mults

    @property
    def total_adds(self) -> int:
        return self.similarity_adds + self.other_adds

    def energy_pj(self, precision: str = "fp32", *, similarity_only: bool = False) -> float:
        """Arithmetic energy in picojoules of the multiplications and additions (45 nm; memory
        traffic excluded)."""
        if precision not in ENERGY_PJ:
            raise ValueError(f"precision={precision!r}; expected one of {sorted(ENERGY_PJ)}")
        e_mul, e_add = ENERGY_PJ[precision]
        if similarity_only:
            return e_mul * self.similarity_mults + e_add * self.similarity_adds
        return e_mul * self.total_mults + e_add * self.total_adds

    def table(self, precision: str = "fp32") -> str:
        """A Markdown table of the counts (millions) and energies (microjoules) per image."""
        e_mul, e_add = ENERGY_PJ[precision]
        rows = [
            "| site | mults (M) | adds (M) | energy (uJ, " + precision + ") |",
            "|---|---:|---:|---:|",
        ]
        for site, (m, a) in sorted(self.similarity.items()):
            rows.append(
                f"| {site} | {m / 1e6:.3f} | {a / 1e6:.3f} | {_uj(e_mul * m + e_add * a)} |"
            )
        sim_uj = _uj(self.energy_pj(precision, similarity_only=True))
        other_uj = _uj(e_mul * self.other_mults + e_add * self.other_adds)
        rows.append(
            f"| **similarity total** | {self.similarity_mults / 1e6:.3f} | "
            f"{self.similarity_adds / 1e6:.3f} | {sim_uj} |"
        )
        rows.append(
            f"| other (norms, softmax, GELU, E, F, residuals) | {self.other_mults / 1e6:.3f} | "
            f"{self.other_adds / 1e6:.3f} | {other_uj} |"
        )
        rows.append(
            f"| **total** | {self.total_mults / 1e6:.3f} | {self.total_adds / 1e6:.3f} | "
            f"{_uj(self.energy_pj(precision))} |"
        )
        return "\n".join(rows)


def _uj(pj: float) -> str:
    return f"{pj / 1e6:.2f}"


def count_ops(model, image_shape: tuple[int, int, int]) -> OpCounts:
    """Trace ``model`` on one image of ``image_shape`` (H, W, C) and count its operations."""
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C), got {tuple(image_shape)}")
    closed = jax.make_jaxpr(lambda images: model(images))(
        jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    )
    counter = _Counter()
    counter.walk(closed.jaxpr, 1)
    return OpCounts(
        similarity={site: tuple(v) for site, v in counter.similarity.items()},
        other_mults=counter.mults,
        other_adds=counter.adds,
        other=dict(counter.other),
    )


def _site(eqn) -> str | None:
    for scope in reversed(str(eqn.source_info.name_stack).split("/")):
        if scope.startswith("similarity_"):
            return scope.removeprefix("similarity_")
    return None


def _size(var) -> int:
    return math.prod(var.aval.shape)


class _Counter:
    def __init__(self):
        self.similarity: dict[str, list[int]] = {}
        self.mults = 0
        self.adds = 0
        self.other: Counter[str] = Counter()

    def walk(self, jaxpr, times: int) -> None:
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            site = _site(eqn)
            terms = None
            if site is not None and name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                reduce = math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract)
                terms = _size(eqn.outvars[0]) * reduce
            elif site is not None and name.startswith("custom_vjp_call"):
                # ops.adder: x (..., D_in) against w (..., D_in, D_out), and a stretch E
                # (D_in,) when given, whose product with x is fused into the op
                terms = _size(eqn.outvars[0]) * eqn.invars[0].aval.shape[-1]
                if len(eqn.invars) == 3:
                    self.mults += times * _size(eqn.invars[0])
            if terms is not None:
                if site not in SIMILARITY_SITES:
                    raise ValueError(f"unknown similarity site {site!r}")
                per_mul, per_add = SIMILARITY_SITES[site]
                counts = self.similarity.setdefault(site, [0, 0])
                counts[0] += times * per_mul * terms
                counts[1] += times * per_add * terms
                continue
            self._elementwise(eqn, name, times)
            self._recurse(eqn, name, times)

    def _elementwise(self, eqn, name, times) -> None:
        out = sum(_size(v) for v in eqn.outvars)
        if name in _MUL:
            self.mults += times * out
        elif name == "integer_pow":
            self.mults += times * out * max(abs(eqn.params["y"]) - 1, 1)
        elif name in _ADD:
            self.adds += times * out
        elif name == "reduce_sum":
            self.adds += times * (_size(eqn.invars[0]) - out)
        elif name == "dot_general":  # a matrix product outside any marked site
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            reduce = math.prod(eqn.invars[0].aval.shape[d] for d in lhs_contract)
            self.mults += times * out * reduce
            self.adds += times * out * reduce
        elif name not in _FREE:
            self.other[name] += times * out

    def _recurse(self, eqn, name, times) -> None:
        inner = times * eqn.params["length"] if name == "scan" else times
        for value in eqn.params.values():
            if isinstance(value, jex_core.ClosedJaxpr):
                self.walk(value.jaxpr, inner)
            elif isinstance(value, jex_core.Jaxpr):
                self.walk(value, inner)
            elif name == "cond" and isinstance(value, tuple):
                # the most expensive branch, as an upper bound
                branches = []
                for branch in value:
                    sub = _Counter()
                    sub.walk(branch.jaxpr, inner)
                    branches.append(sub)
                worst = max(branches, key=lambda c: c.mults + c.adds)
                self._merge(worst)

    def _merge(self, other: _Counter) -> None:
        self.mults += other.mults
        self.adds += other.adds
        self.other.update(other.other)
        for site, (m, a) in other.similarity.items():
            counts = self.similarity.setdefault(site, [0, 0])
            counts[0] += m
            counts[1] += a
