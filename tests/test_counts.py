"""Operation counts of a tiny model against a hand count."""

import pytest
from flax import nnx

from addervit_jax import counts, models

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
