"""Operation counts of a tiny model against a hand count; FFN widths at equal energy."""

import pytest
from flax import nnx

from addervit_jax import configs, counts, layers, models

TINY = {
    "image_size": 4,
    "patch_size": 2,
    "channels": 1,
    "dim": 8,
    "depth": 1,
    "heads": 2,
    "dim_head": 4,
    "mlp_dim": 16,
    "num_classes": 3,
}
# By hand, per image: 4 tokens of 2x2x1 = 4 features.
EMBED = 4 * 4 * 8  # patch embedding 4 -> 8 on 4 tokens
QKV = 3 * 4 * 8 * 8  # q, k, v: 8 -> 8 on 4 tokens
PROJ = 4 * 8 * 8
FFN = 4 * 8 * 16 + 4 * 16 * 8
HEAD = 8 * 3  # after mean pooling
SCORES = 2 * 4 * 4 * 4  # heads x queries x keys x dim_head
VALUES = 2 * 4 * 4 * 4


def _counts(variant):
    model = models.build(variant, rngs=nnx.Rngs(0), **TINY)
    return counts.count_ops(model, (4, 4, 1))


def test_hand_count_multi():
    c = _counts("multi")
    assert c.similarity == {
        "multi": (EMBED + QKV + PROJ + FFN + HEAD,) * 2,
        "scores_dot": (SCORES, SCORES),
        "attention_values": (VALUES, VALUES),
    }


def test_hand_count_adder_and_euclid_sites():
    c = _counts("qkv_2ffn")
    assert c.similarity["multi"] == (EMBED + PROJ + HEAD,) * 2
    assert c.similarity["adder"] == (0, 2 * (QKV + FFN))
    c = _counts("euclider")
    assert c.similarity["euclid"] == (QKV + FFN, 2 * (QKV + FFN))


def test_all_adder_has_no_multiplications_in_linear_and_score_sites():
    c = _counts("all_adder")
    assert c.similarity == {
        "adder": (0, 2 * (EMBED + QKV + PROJ + FFN + HEAD)),
        "scores_l1": (0, 2 * SCORES),
        "attention_values": (VALUES, VALUES),
    }
    assert c.other_mults > 0  # norms, E and F still multiply, and are counted


def test_energy_uses_published_45nm_costs():
    c = _counts("qkv_2ffn")
    expected = 3.7 * c.total_mults + 0.9 * c.total_adds
    assert c.energy_pj() == pytest.approx(expected)
    assert c.energy_pj("int8", similarity_only=True) == pytest.approx(
        0.2 * c.similarity_mults + 0.03 * c.similarity_adds
    )
    assert "similarity total" in c.table()
    with pytest.raises(ValueError, match="fp64"):
        c.energy_pj("fp64")


def test_adder_removes_most_multiplications_of_the_default_model():
    multi = counts.count_ops(models.build("multi", rngs=nnx.Rngs(0)), (32, 32, 3))
    adder = counts.count_ops(models.build("qkv_2ffn", rngs=nnx.Rngs(0)), (32, 32, 3))
    assert adder.total_mults < 0.3 * multi.total_mults
    assert adder.energy_pj() < multi.energy_pj()


CIFAR10 = configs.load("cifar10").model.to_dict()  # SimpleViT 32x32x3, patch 4, dim 128, MLP 256


def _abstract(variant, **model):  # counted as a built model is, without initialising weights
    return nnx.eval_shape(lambda: models.build(variant, rngs=nnx.Rngs(0), **model))


def _energy(variant, image_shape, **model):
    model = models.build(variant, rngs=nnx.Rngs(0), **model)
    return counts.count_ops(model, image_shape).energy_pj()


def test_equal_energy_mlp_dim_of_qkv_2ffn_spends_multis_energy():
    def build(mlp_dim):
        return _abstract("qkv_2ffn", **{**CIFAR10, "mlp_dim": mlp_dim})

    width = counts.equal_energy_mlp_dim(build, _abstract("multi", **CIFAR10), (32, 32, 3))
    budget = _energy("multi", (32, 32, 3), **CIFAR10)
    assert width % 8 == 0
    assert width > 3 * CIFAR10["mlp_dim"]  # an adder term costs 0.4x a multiply-accumulate
    assert _energy("qkv_2ffn", (32, 32, 3), **{**CIFAR10, "mlp_dim": width}) <= budget
    assert _energy("qkv_2ffn", (32, 32, 3), **{**CIFAR10, "mlp_dim": width + 8}) > budget


def test_equal_energy_mlp_dim_of_the_reference_is_its_own():
    def build(mlp_dim):
        return _abstract("multi", **{**CIFAR10, "mlp_dim": mlp_dim})

    reference = _abstract("multi", **CIFAR10)
    assert counts.equal_energy_mlp_dim(build, reference, (32, 32, 3)) == CIFAR10["mlp_dim"]
    assert counts.equal_energy_mlp_dim(build, reference, (32, 32, 3), multiple=96) == 192


@pytest.mark.parametrize(
    ("shape_of", "reference"),  # monotone in mlp_dim but not affine, so that the prediction from
    # mlp_dim 8 and 16 overshoots (deeper above 16) and undershoots (narrower above 16)
    [
        (lambda w: {"mlp_dim": w, "depth": 1 if w <= 16 else 2}, {"depth": 2, "mlp_dim": 32}),
        (lambda w: {"mlp_dim": w if w <= 16 else 16 + (w - 16) // 2}, {"mlp_dim": 64}),
    ],
    ids=["deeper_above_16", "narrower_above_16"],
)
def test_equal_energy_mlp_dim_searches_where_energy_is_not_affine(shape_of, reference):
    def build(mlp_dim):
        return _abstract("qkv_2ffn", **{**TINY, **shape_of(mlp_dim)})

    reference = _abstract("multi", **{**TINY, **reference})
    budget = counts.count_ops(reference, (4, 4, 1)).energy_pj()
    width = counts.equal_energy_mlp_dim(build, reference, (4, 4, 1))
    brute = 8
    while counts.count_ops(build(brute + 8), (4, 4, 1)).energy_pj() <= budget:
        brute += 8
    assert width == brute > 16


def test_equal_energy_mlp_dim_errors():
    def build(variant, **model):
        return lambda mlp_dim: _abstract(variant, **{**TINY, **model, "mlp_dim": mlp_dim})

    multi = _abstract("multi", **TINY)
    with pytest.raises(ValueError, match="does not grow with mlp_dim.*ffn_layers=1"):
        counts.equal_energy_mlp_dim(build("qkv_1ffn"), multi, (4, 4, 1))
    with pytest.raises(ValueError, match="even mlp_dim=multiple=8 costs"):
        counts.equal_energy_mlp_dim(build("multi", depth=2), multi, (4, 4, 1))
    with pytest.raises(ValueError, match="multiple=0"):
        counts.equal_energy_mlp_dim(build("multi"), multi, (4, 4, 1), multiple=0)
    with pytest.raises(ValueError, match="fp64"):
        counts.equal_energy_mlp_dim(build("multi"), multi, (4, 4, 1), precision="fp64")
    with pytest.raises(TypeError, match="no field"):  # Swin's FFN width is mlp_ratio * dim
        counts.equal_energy_mlp_dim(
            lambda mlp_dim: _abstract("swin_multi", mlp_dim=mlp_dim), multi, (4, 4, 1)
        )


def test_abstract_models_count_as_built_ones():
    for variant in ("qkv_2ffn", "all_adder", "euclider"):
        built = counts.count_ops(models.build(variant, rngs=nnx.Rngs(0), **TINY), (4, 4, 1))
        assert counts.count_ops(_abstract(variant, **TINY), (4, 4, 1)) == built


def test_hand_count_ternary_and_shift_sites():
    # a ternary term adds or subtracts an int8 code; a shift term shifts and adds
    c = _counts("qkv_2ffn_ternary")
    assert c.similarity["multi"] == (EMBED + PROJ + HEAD,) * 2
    assert c.similarity["ternary"] == (0, QKV + FFN) and c.shifts == {}
    c = _counts("qkv_2ffn_shift")
    assert c.similarity["shift"] == (0, QKV + FFN) and c.shifts == {"shift": QKV + FFN}
    assert c.total_shifts == QKV + FFN


def test_energy_prices_ternary_at_int8_and_shifts_at_their_cost():
    ternary = _counts("qkv_2ffn_ternary")
    terms = ternary.similarity["ternary"][1]
    for precision, (e_mul, e_add) in counts.ENERGY_PJ.items():
        expected = e_mul * ternary.total_mults + e_add * (ternary.total_adds - terms) + 0.03 * terms
        assert ternary.energy_pj(precision) == pytest.approx(expected)
    assert "ternary (int8)" in ternary.table()
    shift = _counts("qkv_2ffn_shift")
    expected = 3.7 * shift.total_mults + 0.9 * shift.total_adds + 0.13 * shift.total_shifts
    assert shift.energy_pj() == pytest.approx(expected)
    assert shift.energy_pj("int8", similarity_only=True) == pytest.approx(
        0.2 * shift.similarity_mults + 0.03 * shift.similarity_adds + 0.024 * shift.total_shifts
    )
    assert f"shift ({shift.total_shifts / 1e6:.3f} M shifts)" in shift.table()
    # the sites priced apart do not change the rest: the multi sites cost what they cost
    multi = shift.similarity["multi"]
    assert shift.site_energy_pj("multi") == pytest.approx(3.7 * multi[0] + 0.9 * multi[1])


def test_zero_ternary_weights_skip_their_terms_and_weight_quantisation_is_not_counted():
    model = models.build("qkv_2ffn_ternary", rngs=nnx.Rngs(0), **TINY)
    fraction = layers.zero_weight_fraction(model)
    assert 0.1 < fraction < 0.5  # absmean codes of Gaussian weights: about a third are 0
    c = counts.count_ops(model, (4, 4, 1), zero_weights={"ternary": fraction})
    assert c.similarity["ternary"] == (0, round((QKV + FFN) * (1 - fraction)))
    with pytest.raises(ValueError, match="zero_weights"):
        counts.count_ops(model, (4, 4, 1), zero_weights={"ternary": 1.5})
    # one token through a 64 -> 64 layer: quantising the 4,096 weights would cost thousands of
    # operations; quantising the 64 activations and rescaling 64 outputs costs a few hundred
    for kind in ("ternary", "shift"):
        layer = layers.make_linear(kind, 64, 64, rngs=nnx.Rngs(0))
        c = counts.count_ops(layer, (1, 1, 64))  # a callable on (1, 1, 1, 64)
        assert c.similarity[kind] == (0, 64 * 64)
        assert c.other_mults + c.other_adds < 400
