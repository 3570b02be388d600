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
``ternary``          0                 terms (int8)     add or subtract an int8 code
``shift``            0                 terms            shift (one per term), accumulate
``scores_dot``       terms             terms            ``q . k``
``scores_l1``        0                 2 * terms        ``-sum |q - k|``
``attention_values`` terms             terms            ``softmax(s) @ v``
==================== ================= ================ =====================================

This is the convention of the AdderNet papers (an adder layer costs twice the additions of a
multiply-accumulate and no multiplications). A ternary term (BitNet b1.58, ``layers.TernaryDense``)
adds or subtracts an 8-bit activation code, or nothing where its weight is 0; a shift term
(DeepShift, ``layers.ShiftDense``) shifts its input by the weight's exponent and adds it.
``count_ops`` counts shapes, so it counts every ternary term (what a dense kernel computes, our
``models.int8.Int8Ternary`` and BitNet's GEMM alike, and the upper bound);
``count_ops(..., zero_weights={"ternary": layers.zero_weight_fraction(model)})`` leaves out the
terms of the zero weights of a trained model. The weights' quantisation (under
``layers.offline_scope``) is done once before inference and not counted per image. Every other
operation (normalisation, softmax, GELU, the stretch E and mask F, residual additions) is counted
from its primitive: ``mul``/``div``/
``integer_pow`` as multiplications, ``add``/``sub``/``reduce_sum`` as additions, transcendental and
comparison primitives under ``other`` (listed, not priced).

Energies per operation at 45 nm are Horowitz's (M. Horowitz, "Computing's energy problem (and what
we can do about it)", ISSCC 2014): fp32 multiply 3.7 pJ and add 0.9 pJ, fp16 1.1 / 0.4 pJ, int32
3.1 / 0.1 pJ, int8 0.2 / 0.03 pJ, as AdderNet and its successors quote them. A shift costs 0.13 pJ
on 32-bit and 0.024 pJ on 8-bit operands (ShiftAddNet's 45 nm figures: You et al., "ShiftAddNet: A
Hardware-Inspired Deep Network", NeurIPS 2020, Table 1, as recalled and not checked: only its
abstract and a summary page were reachable, which give ratios, not these values); there is no float
shift (a float times ``2^p`` adds ``p`` to its exponent), so at fp32 and fp16 the 32-bit shift is
charged, an upper bound. A ternary site's arithmetic is int8 whatever the precision asked for (its
activations are 8-bit codes by construction), so its additions are priced as int8 additions at
every precision, as BitNet b1.58 prices them (int8 additions; arXiv 2402.17764, as recalled);
summing into a 32-bit accumulator would be the int32 addition, 0.1 pJ, 3.3x more.
``OpCounts.energy_pj`` is the model's arithmetic energy per image, the total of the similarity
sites and the other counted operations (``experiments/op_counts.py``'s energy column).

``equal_energy_mlp_dim(build, reference, image_shape)`` is the widest FFN hidden layer
(``mlp_dim``, a multiple of 8) at which ``build(mlp_dim)`` spends no more arithmetic energy per
image than ``reference``: the fair way to spend the energy an adder variant saves. An adder term
costs 2 x 0.9 = 1.8 pJ against a multiply-accumulate's 3.7 + 0.9 = 4.6 pJ in fp32, so at the
CIFAR-10 shape (``configs/cifar10.py``) ``qkv_2ffn`` spends 0.56x ``multi``'s energy at equal
width, and matches it at ``mlp_dim=864`` against ``multi``'s 256::

    def build(variant, **model):  # abstract: counted without initialising the weights
        return nnx.eval_shape(lambda: models.build(variant, rngs=nnx.Rngs(0), **model))

    counts.equal_energy_mlp_dim(
        lambda mlp_dim: build("qkv_2ffn", mlp_dim=mlp_dim), build("multi"), (32, 32, 3)
    )  # 864

It takes a ``build`` callable, not a variant name, so that this module stays below ``models``
(it traces any callable and imports nothing of the package).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend import core as jex_core

__all__ = [
    "ENERGY_PJ",
    "SHIFT_PJ",
    "SIMILARITY_SHIFTS",
    "SIMILARITY_SITES",
    "SITE_PRECISION",
    "OpCounts",
    "count_ops",
    "equal_energy_mlp_dim",
]

# (multiply, add) energy in picojoules at 45 nm, Horowitz (ISSCC 2014).
ENERGY_PJ = {"fp32": (3.7, 0.9), "fp16": (1.1, 0.4), "int32": (3.1, 0.1), "int8": (0.2, 0.03)}
# shift energy in picojoules at 45 nm, ShiftAddNet (NeurIPS 2020) Table 1 as recalled, unchecked
# (module docstring): 32-bit 0.13, 8-bit 0.024; floats have no shift (an exponent addition),
# charged the 32-bit shift
SHIFT_PJ = {"fp32": 0.13, "fp16": 0.13, "int32": 0.13, "int8": 0.024}

# site -> (multiplications per term, additions per term)
SIMILARITY_SITES = {
    "multi": (1, 1),
    "adder": (0, 2),
    "euclid": (1, 2),
    "ternary": (0, 1),
    "shift": (0, 1),
    "scores_dot": (1, 1),
    "scores_l1": (0, 2),
    "attention_values": (1, 1),
}
# site -> shifts per term
SIMILARITY_SHIFTS = {"shift": 1}
# sites whose arithmetic has a precision of its own, priced at it whatever the precision asked for
SITE_PRECISION = {"ternary": "int8"}
_OFFLINE = "offline_weights"  # layers.offline_scope: computed once on the weights, not per image

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
    """Operations per image: ``similarity[site] = (mults, adds)``, ``shifts[site]`` the shifts of
    the sites that shift (``shift``), the rest in ``other_*``."""

    similarity: dict[str, tuple[int, int]]
    other_mults: int
    other_adds: int
    other: dict[str, int]
    shifts: dict[str, int] = dataclasses.field(default_factory=dict)

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

    @property
    def total_shifts(self) -> int:
        return sum(self.shifts.values())

    def energy_pj(self, precision: str = "fp32", *, similarity_only: bool = False) -> float:
        """Arithmetic energy in picojoules of the multiplications, additions and shifts (45 nm;
        memory traffic excluded). The sites of ``SITE_PRECISION`` are priced at their own
        precision."""
        if precision not in ENERGY_PJ:
            raise ValueError(f"precision={precision!r}; expected one of {sorted(ENERGY_PJ)}")
        e_mul, e_add = ENERGY_PJ[precision]
        mults = self.similarity_mults if similarity_only else self.total_mults
        adds = self.similarity_adds if similarity_only else self.total_adds
        # (the model's own precision for every site but those of SITE_PRECISION, which are
        # taken out and priced apart: a model without them gets exactly e_mul * m + e_add * a)
        own = 0.0
        for site, (m, a) in self.similarity.items():
            if site in SITE_PRECISION:
                mults, adds = mults - m, adds - a
                own += _site_pj(m, a, self.shifts.get(site, 0), SITE_PRECISION[site])
        for site, n in self.shifts.items():
            if site not in SITE_PRECISION:
                own += SHIFT_PJ[precision] * n
        return e_mul * mults + e_add * adds + own

    def site_energy_pj(self, site: str, precision: str = "fp32") -> float:
        """The arithmetic energy of one similarity site (its own precision where it has one)."""
        m, a = self.similarity[site]
        return _site_pj(m, a, self.shifts.get(site, 0), SITE_PRECISION.get(site, precision))

    def table(self, precision: str = "fp32") -> str:
        """A Markdown table of the counts (millions) and energies (microjoules) per image; a
        site priced at its own precision says which, and the sites that shift say how many."""
        e_mul, e_add = ENERGY_PJ[precision]
        rows = [
            "| site | mults (M) | adds (M) | energy (uJ, " + precision + ") |",
            "|---|---:|---:|---:|",
        ]
        for site, (m, a) in sorted(self.similarity.items()):
            notes = [f"{self.shifts[site] / 1e6:.3f} M shifts"] if self.shifts.get(site) else []
            if site in SITE_PRECISION:
                notes.append(SITE_PRECISION[site])
            name = f"{site} ({', '.join(notes)})" if notes else site
            rows.append(
                f"| {name} | {m / 1e6:.3f} | {a / 1e6:.3f} | "
                f"{_uj(self.site_energy_pj(site, precision))} |"
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


def _site_pj(mults: int, adds: int, shifts: int, precision: str) -> float:
    e_mul, e_add = ENERGY_PJ[precision]
    return e_mul * mults + e_add * adds + SHIFT_PJ[precision] * shifts


def count_ops(
    model, image_shape: tuple[int, int, int], *, zero_weights: dict[str, float] | None = None
) -> OpCounts:
    """Trace ``model`` on one image of ``image_shape`` (H, W, C) and count its operations.

    ``model`` may be abstract, ``nnx.eval_shape(lambda: models.build(...))``: the counts depend on
    shapes only. An NNX model is counted as at inference, in evaluation mode (a batch norm is an
    affine map with its running statistics, not a reduction over the batch).

    ``zero_weights`` maps a similarity site to the fraction of its weights that are 0, whose
    terms are left out (a ternary term costs nothing where its weight is 0; measure it with
    ``layers.zero_weight_fraction(model)``). By default every term is counted."""
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C), got {tuple(image_shape)}")
    zero_weights = dict(zero_weights or {})
    for site, fraction in zero_weights.items():
        if site not in SIMILARITY_SITES or not 0.0 <= fraction <= 1.0:
            raise ValueError(
                f"zero_weights: {site}={fraction!r}; expected a site of {sorted(SIMILARITY_SITES)}"
                " and a fraction in [0, 1]"
            )
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    if isinstance(model, nnx.Module):
        # the weights enter as an argument, not as constants, so that an abstract model
        # (nnx.eval_shape) is counted without initialising them: ~10x faster than building one
        graphdef, state = nnx.split(model)

        def forward(state, images):
            model = nnx.merge(graphdef, state)
            model.eval()
            return model(images)

        closed = jax.make_jaxpr(forward)(state, images)
    else:
        closed = jax.make_jaxpr(lambda images: model(images))(images)
    counter = _Counter()
    counter.walk(closed.jaxpr, 1)
    kept = {site: 1.0 - zero_weights.get(site, 0.0) for site in counter.similarity}
    return OpCounts(
        similarity={
            site: tuple(v if kept[site] == 1.0 else round(v * kept[site]) for v in counts)
            for site, counts in counter.similarity.items()
        },
        other_mults=counter.mults,
        other_adds=counter.adds,
        other=dict(counter.other),
        shifts={
            site: round(SIMILARITY_SHIFTS[site] * counter.terms[site] * kept[site])
            for site in counter.similarity
            if site in SIMILARITY_SHIFTS
        },
    )


def equal_energy_mlp_dim(
    build: Callable[[int], Callable],
    reference: Callable,
    image_shape: tuple[int, int, int],
    *,
    multiple: int = 8,
    precision: str = "fp32",
) -> int:
    """The largest ``mlp_dim``, a multiple of ``multiple``, at which ``build(mlp_dim)`` costs at
    most the arithmetic energy per image of ``reference`` (``OpCounts.energy_pj(precision)``, the
    similarity sites and the other counted operations, on images of ``image_shape``).

    ``build`` may return an abstract model (``nnx.eval_shape``, see ``count_ops``). The energy
    must grow with ``mlp_dim``. It is affine in ``mlp_dim`` for SimpleViT, so the counts at two
    widths predict the answer and the counts at it and one multiple above confirm it (four
    builds in all); a search over multiples takes over where they do not. Raises
    ``ValueError`` if ``multiple`` or ``precision`` is invalid, if the energy does not grow with
    ``mlp_dim`` (an FFN without a hidden layer, e.g. SimpleViT's ``ffn_layers=1``), or if even
    ``mlp_dim=multiple`` costs more than ``reference``.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple={multiple!r} must be a positive integer")
    if precision not in ENERGY_PJ:
        raise ValueError(f"precision={precision!r}; expected one of {sorted(ENERGY_PJ)}")
    budget = count_ops(reference, image_shape).energy_pj(precision)
    energies: dict[int, float] = {}

    def energy(k: int) -> float:  # of mlp_dim = k * multiple
        if k not in energies:
            model = build(k * multiple)
            energies[k] = count_ops(model, image_shape).energy_pj(precision)
        return energies[k]

    if energy(1) > budget:
        raise ValueError(
            f"even mlp_dim=multiple={multiple} costs {energy(1) / 1e6:.3f} uJ per image "
            f"({precision}, image_shape={tuple(image_shape)}), more than the reference's "
            f"{budget / 1e6:.3f} uJ"
        )
    slope = energy(2) - energy(1)
    if slope <= 0:
        raise ValueError(
            f"build(mlp_dim) costs {energy(1) / 1e6:.3f} uJ per image at mlp_dim={multiple} and "
            f"{energy(2) / 1e6:.3f} uJ at mlp_dim={2 * multiple}: its energy does not grow with "
            "mlp_dim, so the model has no FFN hidden width (e.g. SimpleViT with ffn_layers=1, "
            "whose FFN is one dim -> dim layer)"
        )
    # Invariant of the search below: energy(lo) <= budget < energy(hi).
    guess = max(1, 1 + math.floor((budget - energy(1)) / slope))
    if energy(guess) <= budget:
        lo, step = guess, 1
        while energy(lo + step) <= budget:
            lo, step = lo + step, 2 * step
        hi = lo + step
    else:
        hi, step = guess, 1
        while hi - step > 1 and energy(hi - step) > budget:
            hi, step = hi - step, 2 * step
        lo = max(1, hi - step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if energy(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo * multiple


def _site(eqn) -> str | None:
    for scope in reversed(str(eqn.source_info.name_stack).split("/")):
        if scope.startswith("similarity_"):
            return scope.removeprefix("similarity_")
    return None


def _offline(eqn) -> bool:
    return _OFFLINE in str(eqn.source_info.name_stack).split("/")


def _size(var) -> int:
    return math.prod(var.aval.shape)


class _Counter:
    def __init__(self):
        self.similarity: dict[str, list[int]] = {}
        self.terms: Counter[str] = Counter()
        self.mults = 0
        self.adds = 0
        self.other: Counter[str] = Counter()

    def walk(self, jaxpr, times: int) -> None:
        for eqn in jaxpr.eqns:
            if _offline(eqn):
                continue
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
                self.terms[site] += times * terms
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
        self.terms.update(other.terms)
        for site, (m, a) in other.similarity.items():
            counts = self.similarity.setdefault(site, [0, 0])
            counts[0] += m
            counts[1] += a
