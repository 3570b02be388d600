"""The experiment scripts run end to end on tiny settings and report what the library measures."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from addervit_jax import models, profile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))

import op_counts  # noqa: E402
import speed_table  # noqa: E402


def test_op_counts_match_profile(tmp_path, capsys):
    op_counts.main(["--variants", "multi", "qkv_2ffn", "--out", str(tmp_path)])
    assert "| qkv_2ffn | 32x32x3 |" in capsys.readouterr().out
    assert "op_counts.py --variants multi qkv_2ffn" in (tmp_path / "op_counts.md").read_text()
    record = json.loads((tmp_path / "op_counts.json").read_text())
    rows = {r["variant"]: r for r in record["rows"]}
    assert list(rows) == ["multi", "qkv_2ffn"]
    energies = {}
    for variant, row in rows.items():
        model = models.build(variant, rngs=nnx.Rngs(0))
        counts = profile.count_ops(model, (32, 32, 3))
        assert row["similarity"] == {k: list(v) for k, v in counts.similarity.items()}
        assert row["similarity_mults"] == counts.similarity_mults
        assert row["similarity_adds"] == counts.similarity_adds
        assert row["total_mults"] == counts.total_mults
        assert row["total_adds"] == counts.total_adds
        assert row["energy_pj"] == pytest.approx(3.7 * counts.total_mults + 0.9 * counts.total_adds)
        assert row["params"] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        energies[variant] = row["energy_pj"]
    # a multiply-accumulate model: one addition per multiplication in every similarity site
    assert rows["multi"]["similarity_adds"] == rows["multi"]["similarity_mults"]
    assert rows["multi"]["energy_relative"] == 1.0
    assert rows["qkv_2ffn"]["energy_relative"] == pytest.approx(
        energies["qkv_2ffn"] / energies["multi"]
    )
    assert rows["qkv_2ffn"]["total_mults"] < 0.3 * rows["multi"]["total_mults"]
    # per block, the adder sites add q/k/v biases and every adder layer its stretch E and mask F:
    # 3 * (128 + 128 + 128) + (128 + 256) + (256 + 128) = 1,920, times depth 4
    assert rows["qkv_2ffn"]["params"] - rows["multi"]["params"] == 4 * 1920


TINY = {
    "image_size": 16,
    "patch_size": 4,
    "dim": 32,
    "depth": 1,
    "heads": 2,
    "dim_head": 16,
    "mlp_dim": 64,
    "num_classes": 10,
}


def _train_memory(backend, batch):
    step, _, params, opt_state = speed_table.build_steps(
        "qkv_2ffn", backend, TINY, optax.adamw(1e-3)
    )
    images, labels = jnp.zeros((batch, 16, 16, 3)), jnp.zeros((batch,), jnp.int32)
    _, memory = speed_table.compile_step(step, (params, opt_state, images, labels))
    return memory["total"]


def test_speed_table_rows_times_memory_and_oom(tmp_path):
    naive, xla = _train_memory("naive", 8), _train_memory("xla", 8)
    assert naive > xla  # the broadcast formula needs more memory than the project's op
    limit_gib = (naive + xla) / 2 / 2**30  # room for every row but naive adder's train step
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    argv = [*flags, "--batch=8", "--steps=2", "--warmup=1", f"--memory-limit-gib={limit_gib}"]
    speed_table.main([*argv, "--out", str(tmp_path)])
    record = json.loads((tmp_path / "speed_table.json").read_text())
    rows = {r["name"]: r for r in record["rows"]}
    assert list(rows)[:3] == ["multi", "naive adder", "adder xla"]
    assert record["batch"] == 8 and record["model"]["dim"] == 32
    assert rows["naive adder"]["memory"]["total"] == naive
    assert rows["adder xla"]["memory"]["total"] == xla
    assert rows["naive adder"]["train"]["status"] == "OOM"
    assert rows["naive adder"]["infer"]["status"] == "ok"
    for name, row in rows.items():
        assert row["infer"]["ms"] > 0 and row["infer"]["ratio"] > 0, name
        if name != "naive adder":
            assert row["train"]["status"] == "ok", name
            assert row["train"]["ms"] > 0 and row["train"]["ratio"] > 0, name
    assert rows["multi"]["train"]["ratio"] == 1.0
    table = (tmp_path / "speed_table.md").read_text()
    assert "| naive adder | OOM | OOM |" in table
    assert "speed_table.py --image-size=16" in table
