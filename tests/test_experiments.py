"""The experiment scripts run end to end on tiny settings and report what the library measures."""

import argparse
import datetime
import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from addervit_jax import configs, counts, layers, models, quantizers, reports, timing, train
from addervit_jax.shapes import parse_shape

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))

import bench_int8  # noqa: E402
import bench_ops  # noqa: E402
import first_run  # noqa: E402
import grad_rules  # noqa: E402
import int8_accuracy  # noqa: E402
import op_counts  # noqa: E402
import screen  # noqa: E402
import speed_table  # noqa: E402
import study  # noqa: E402
import study_cifar10  # noqa: E402
import study_cifar10_100ep  # noqa: E402
import variants  # noqa: E402

# a model and budget that train in seconds: these tests check the study machinery, not accuracy
TINY_RECIPE = [
    "randaugment=None",  # the digits recipe's RandAugment costs seconds of compilation
    "model.dim=16",
    "model.depth=1",
    "model.heads=2",
    "model.dim_head=8",
    "model.mlp_dim=32",
    "total_steps=4",
    "eval_every_steps=2",
    "log_every_steps=1",
]


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
        c = counts.count_ops(model, (32, 32, 3))
        assert row["similarity"] == {k: list(v) for k, v in c.similarity.items()}
        assert row["similarity_mults"] == c.similarity_mults
        assert row["similarity_adds"] == c.similarity_adds
        assert row["total_mults"] == c.total_mults
        assert row["total_adds"] == c.total_adds
        assert row["energy_pj"] == pytest.approx(3.7 * c.total_mults + 0.9 * c.total_adds)
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


def _memory(backend, batch, *, train=True):
    config = configs.load("cifar10")
    model = {f"model.{k}": v for k, v in TINY.items()}
    configs.override(
        config, {**model, "variant": "qkv_2ffn", "model.backend": backend, "batch_size": batch}
    )
    images, labels = jnp.zeros((batch, 16, 16, 3), jnp.uint8), jnp.zeros((batch,), jnp.int32)
    step, train_args, infer, infer_args = speed_table.build_steps(config, images, labels)
    fn, args = (step, train_args) if train else (infer, infer_args)
    _, memory = speed_table.compile_step(fn, args)
    return memory["total"]


def test_speed_table_rows_times_memory_and_oom(tmp_path):
    naive, xla = _memory("naive", 8), _memory("xla", 8)
    # the broadcast formula needs more memory than the project's op, in training more than in
    # inference
    fits = max(xla, _memory("naive", 8, train=False))
    assert naive > fits
    limit_gib = (naive + fits) / 2 / 2**30  # room for every row but naive adder's train step
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    argv = [*flags, "--batch=8", "--steps=2", "--warmup=1", f"--memory-limit-gib={limit_gib}"]
    speed_table.main([*argv, "--arms", "--out", str(tmp_path)])
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


def test_speed_table_times_the_studies_other_arms_and_variants_without_adder_sites(tmp_path):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    argv = [*flags, "--batch=4", "--steps=1", "--warmup=0", "--variant", "qkv_2ffn_ternary"]
    speed_table.main([*argv, "--arms", "qkv_2ffn, norm=batch", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "speed_table.json").read_text())
    rows = {r["name"]: r for r in record["rows"]}
    # no adder backend rows for a variant without adder sites: one row of its own
    assert list(rows) == ["multi", "qkv_2ffn, norm=batch", "qkv_2ffn_ternary"]
    assert rows["qkv_2ffn, norm=batch"]["overrides"] == {"model.norm": "batch"}
    for row in rows.values():
        assert row["train"]["ms"] > 0 and row["infer"]["ms"] > 0


def test_variant_study_aggregates_seeds_and_resumes(tmp_path, capsys):
    args = ["--variants", "multi", "qkv_2ffn", "--seeds", "0", "1", "--out", str(tmp_path)]
    args += ["--inference", "none"]
    variants.main([*args, "--set", *TINY_RECIPE])
    out = capsys.readouterr().out
    report = (tmp_path / "variants.md").read_text()
    assert "variants.py --variants multi qkv_2ffn" in report
    device = json.loads((tmp_path / "runs" / "multi_seed0" / "summary.json").read_text())["device"]
    assert device.startswith("cpu (") and "cores), jax " in device and "1 process(es)" in device
    assert f"hardware of the runs: {device}; report written on cpu (" in report
    rows = [line for line in report.splitlines() if line.startswith(("| multi |", "| qkv_2ffn |"))]
    assert len(rows) == 2 and all("| 2 |" in row and "±" in row for row in rows)
    assert (tmp_path / "variants.png").stat().st_size > 0
    record = json.loads((tmp_path / "variants.json").read_text())
    assert [(r["label"], r["seed"]) for r in record] == [
        ("multi", 0),
        ("multi", 1),
        ("qkv_2ffn", 0),
        ("qkv_2ffn", 1),
    ]
    # one shared recipe: every run trained the same steps; seeds differ, so do the weights
    assert {r["steps"] for r in record} == {4}
    assert record[0]["params_checksum"] != record[1]["params_checksum"]
    # the final accuracy column is the mean over seeds of each run's own final accuracy
    multi = [r["eval_accuracy"] for r in record if r["label"] == "multi"]
    assert f"| multi | 2 | {100 * sum(multi) / 2:.1f} ±" in report
    assert out.count("[1/4]") == 1

    # the same command again reads the finished runs back instead of training them
    variants.main([*args, "--set", *TINY_RECIPE])
    assert capsys.readouterr().out.count("finished before, read back") == 4
    assert json.loads((tmp_path / "variants.json").read_text()) == record

    # by the trainer's own rule, a change of what is logged reads the runs back too ...
    variants.main([*args, "--set", *TINY_RECIPE[:-1], "log_every_steps=2"])
    assert capsys.readouterr().out.count("finished before, read back") == 4
    # ... and another recipe into the same directory would report the old runs: refused
    another = (
        r"multi_seed0 holds a run of another config: learning_rate: .*Use another run directory"
    )
    with pytest.raises(SystemExit, match=another):
        variants.main([*args, "--set", *TINY_RECIPE, "learning_rate=0.01"])


def test_grad_rule_study_runs_each_rule_once(tmp_path):
    nothing = ["--inference", "none"]
    grad_rules.main(
        ["--clip-scales", "1", "4", "--out", str(tmp_path), *nothing, "--set", *TINY_RECIPE]
    )
    record = json.loads((tmp_path / "grad_rules.json").read_text())
    labels = [r["label"] for r in record]
    # clip_scale 1 is the addernet rule, listed once
    assert labels == ["exact", "addernet (= clipped, clip_scale 1)", "clipped, clip_scale 4"]
    configs = [
        json.loads((tmp_path / "runs" / name / "config.json").read_text())
        for name in sorted(p.name for p in (tmp_path / "runs").iterdir())
    ]
    assert sorted((c["model"]["grad"], c["model"]["clip_scale"]) for c in configs) == [
        ("addernet", 1.0),
        ("clipped", 4.0),
        ("exact", 4.0),
    ]
    assert "Backward rules, qkv_2ffn on digits" in (tmp_path / "grad_rules.md").read_text()


def test_grad_rule_study_refuses_a_variant_whose_sites_ignore_the_rule(tmp_path):
    # AdderNet's sites (variant "adder") have their own rule: every label would train one model
    with pytest.raises(SystemExit, match="grad='exact' is honoured by no site"):
        grad_rules.main(["--variant", "adder", "--out", str(tmp_path), "--set", *TINY_RECIPE])
    assert not (tmp_path / "runs").exists()


def test_screen_trains_the_teacher_first_and_distils_from_it(tmp_path):
    args = ["--config", "digits", "--out", str(tmp_path), "--set", *TINY_RECIPE]
    args += ["--inference", "none"]
    screen.main([*args, "--arms", "multi", "multi_ln", "qkv_2ffn + distill"])
    record = {r["label"]: r for r in json.loads((tmp_path / "screen.json").read_text())}
    assert list(record) == ["multi", "multi_ln", "qkv_2ffn + distill"]
    teacher = record["qkv_2ffn + distill"]["teacher"]
    assert teacher["workdir"] == str(tmp_path / "runs" / "multi_seed0")
    assert teacher["params_checksum"] == record["multi"]["params_checksum"]
    # the digits config evaluates on its test split: the table says so and shows no best-over-run
    table = (tmp_path / "screen.md").read_text()
    assert "final test acc (%)" in table and "best" not in table.split("| arm |")[1]
    # each run directory keeps its final parameters in params-only form
    for name in ("multi_seed0", "multi_ln_seed0", "qkv_2ffn_distill_seed0"):
        assert (tmp_path / "runs" / name / "params.msgpack").stat().st_size > 1000
    with pytest.raises(SystemExit):
        screen.main([*args, "--arms", "multi", "qkv_2ffn + distill", "--seeds", "1"])


def test_cifar10_study_goes_seed_by_seed_and_distils_every_seed_from_multi_seed0(tmp_path, capsys):
    args = ["--config", "digits", "--out", str(tmp_path), "--set", *TINY_RECIPE]
    converted = "qkv_2ffn + distill + features, norm=batch, converted from multi"
    nothing = ["--inference", "none"]
    study_cifar10.main([*args, *nothing, "--arms", "multi", converted])
    record = json.loads((tmp_path / "study_cifar10.json").read_text())
    # the teacher first, then seed by seed: each seed's comparison is whole before the next begins
    assert [(r["label"], r["seed"]) for r in record] == [
        ("multi", 0),
        (converted, 0),
        ("multi", 1),
        (converted, 1),
    ]
    teacher = str(tmp_path / "runs" / "multi_seed0")
    assert all(r["teacher"]["workdir"] == teacher for r in record if "distill" in r["label"])
    # --set adds to the study's own recipe (30 epochs, 3 warm-up), it does not replace it
    saved = json.loads((tmp_path / "runs" / "multi_seed0" / "config.json").read_text())
    assert (saved["num_epochs"], saved["warmup_epochs"], saved["total_steps"]) == (30, 3, 4)
    table = (tmp_path / "study_cifar10.md").read_text()
    assert "| multi | 2 |" in table and "±" in table  # mean ± spread over the two seeds
    # the gap to multi, paired by seed, with the standard error of the evaluation set alone
    acc = {(r["label"], r["seed"]): r["eval_accuracy"] for r in record}
    n = record[0]["eval_examples"]
    diffs = [acc[converted, s] - acc["multi", s] for s in (0, 1)]
    var = sum(acc[k] * (1 - acc[k]) / n for k in acc)
    gap = (
        f"| {converted} | {50 * sum(diffs):+.1f} | {100 * diffs[0]:+.1f} (seed 0), "
        f"{100 * diffs[1]:+.1f} (seed 1) | {100 * var**0.5 / 2:.1f} |"
    )
    assert gap in table, table
    # the converted arm started from multi seed 0: its budget counts that run's epochs too
    assert all(r["conversion"]["init_from"] == teacher for r in record if r["label"] == converted)
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if "budget (epochs)" in line)
    column = lines[start].split(" | ").index("budget (epochs)")
    main_table = lines[start + 2 : lines.index("", start)]
    cells = {row.split(" | ")[0].strip("| "): row.split(" | ") for row in main_table}
    assert float(cells[converted][column]) == 2 * float(cells["multi"][column])
    # no bench_int8 results there: the inference column says "not timed"
    assert "- inference: not timed" in table and cells["multi"][-1] == "- / - |"
    # --arms trains only its arms, and the report keeps the other arms' finished runs; with
    # --report-only nothing trains: an unfinished run is left out, not resumed
    shutil.rmtree(tmp_path / "runs" / "multi_seed1" / "checkpoints", ignore_errors=True)
    (tmp_path / "runs" / "multi_seed1" / "summary.json").unlink()
    before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    study_cifar10.main([*args, *nothing, "--report-only"])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == before
    assert not (tmp_path / "runs" / "multi_seed1" / "summary.json").exists()
    kept = json.loads((tmp_path / "study_cifar10.json").read_text())
    assert [(r["label"], r["seed"]) for r in kept] == [("multi", 0), (converted, 0), (converted, 1)]
    study_cifar10.main([*args, *nothing, "--arms", "multi"])
    again = json.loads((tmp_path / "study_cifar10.json").read_text())
    assert [(r["label"], r["seed"]) for r in again] == [(r["label"], r["seed"]) for r in record]
    # a finished run of an arm not trained here but made with another config is left out, named
    saved = tmp_path / "runs" / "qkv_2ffn_distill_features_norm_batch_converted_from_multi_seed1"
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "learning_rate": 0.5}))
    capsys.readouterr()
    study_cifar10.main([*args, *nothing, "--arms", "multi"])
    assert f"{saved}: another config (learning_rate: " in capsys.readouterr().out
    last = json.loads((tmp_path / "study_cifar10.json").read_text())
    assert [(r["label"], r["seed"]) for r in last] == [("multi", 0), (converted, 0), ("multi", 1)]
    # a distilled arm without its teacher, neither trained nor among the runs, is refused
    with pytest.raises(SystemExit):
        study_cifar10.main(
            ["--out", str(tmp_path / "other"), "--arms", "qkv_2ffn + distill", "--seeds", "1"]
        )


def _synthetic(label, seed, accuracies, *, per_epoch=10, n=5000):
    """A finished run's result as study.run_all returns it: one evaluation per epoch."""
    records = [
        {"step": per_epoch * (e + 1), "split": "eval", "accuracy": a}
        for e, a in enumerate(accuracies)
    ]
    summary = {
        "eval_accuracy": accuracies[-1],
        "eval_examples": n,
        "steps_per_epoch": per_epoch,
    }
    return {"run": study.Run(label, seed, None), "summary": summary, "records": records}


def test_control_and_epoch_gap_tables_pair_by_seed():
    rng = np.random.default_rng(46)
    curves = {(lb, s): rng.uniform(0.5, 0.9, size=4) for lb in ("a", "c") for s in (0, 1)}
    curves["b", 1] = rng.uniform(0.5, 0.9, size=2)  # a shorter run, of one seed only
    results = [_synthetic(lb, s, list(c)) for (lb, s), c in curves.items()]
    table = study.control_table(results, [("a", "c"), ("b", "c"), ("b", "a"), ("a", "d")])
    diffs = [curves["a", s][-1] - curves["c", s][-1] for s in (0, 1)]
    var = sum(p * (1 - p) / 5000 for k in ("a", "c") for p in (curves[k, 0][-1], curves[k, 1][-1]))
    assert (
        f"| a | c | {50 * sum(diffs):+.1f} | {100 * diffs[0]:+.1f} (seed 0), "
        f"{100 * diffs[1]:+.1f} (seed 1) | {100 * var**0.5 / 2:.1f} |"
    ) in table
    # b ran seed 1 only: paired on that seed alone
    b = curves["b", 1][-1] - curves["c", 1][-1]
    assert f"| b | c | {100 * b:+.1f} | {100 * b:+.1f} (seed 1) |" in table
    assert "Not yet comparable (no seed finished by both): a against d." in table
    epochs = study.gap_by_epoch_table(results, reference="c", epochs=(1.0, 2.0, 4.0))
    rows = {line.split(" | ")[0].strip("| "): line for line in epochs.splitlines()[2:]}
    assert set(rows) == {"a", "b"}
    mean = [
        np.mean([curves["a", s][e - 1] - curves["c", s][e - 1] for s in (0, 1)]) for e in (1, 2, 4)
    ]
    assert rows["a"] == "| a | " + " | ".join(f"{100 * m:+.1f}" for m in mean) + " |"
    early = [curves["b", 1][e - 1] - curves["c", 1][e - 1] for e in (1, 2)]
    assert rows["b"] == f"| b | {100 * early[0]:+.1f} | {100 * early[1]:+.1f} | - |"  # not that far
    with pytest.raises(ValueError, match="reference 'd' is not among the labels"):
        study.gap_by_epoch_table(results, reference="d", epochs=(1.0,))


def test_cifar10_study_sets_each_arm_against_the_control_with_the_same_help(tmp_path):
    recipe = study.load_recipe("cifar10", [*study_cifar10.DEFAULT_SET, "num_epochs=4"])
    table = study_cifar10.arms(tmp_path, recipe)
    pairs = study_cifar10.controls(recipe)
    # every pair names two arms of the study; every arm but the plain baselines has a control
    assert all(a in table and c in table for a, c in pairs)
    assert {a for a, _ in pairs} == set(table) - {"multi", "multi_ln"}
    for arm in ("qkv_2ffn + distill", study_cifar10.BEST_ADDER, "qkv_2ffn_ternary + distill"):
        assert (arm, "multi + distill") in pairs and (arm, "multi_ln + distill") in pairs
    for arm in ("qkv_2ffn", "qkv_2ffn_ternary"):
        assert (arm, "multi") in pairs and (arm, "multi_ln") in pairs
    assert (study_cifar10.CONVERTED, "multi, 8 epochs") in pairs
    # the equal-budget control: twice the recipe's epochs and warm-up, undistilled
    assert table["multi, 8 epochs"] == {"variant": "multi", "num_epochs": 8, "warmup_epochs": 6}
    # the distilled controls learn from the same teacher with the same loss as the ternary arm
    same = {k: v for k, v in table["qkv_2ffn_ternary + distill"].items() if k != "variant"}
    for arm in ("multi + distill", "multi_ln + distill"):
        assert {k: v for k, v in table[arm].items() if k != "variant"} == same


def test_100_epoch_study_distils_from_its_own_multi_and_reports_the_gap_along_training(tmp_path):
    args = ["--config", "digits", "--out", str(tmp_path), "--set", *TINY_RECIPE]
    study_cifar10_100ep.main([*args, "--inference", "none", "--arms", "multi", "multi + distill"])
    record = json.loads((tmp_path / "study_cifar10_100ep.json").read_text())
    assert [(r["label"], r["seed"]) for r in record] == [("multi", 0), ("multi + distill", 0)]
    assert record[1]["teacher"]["workdir"] == str(tmp_path / "runs" / "multi_seed0")
    saved = json.loads((tmp_path / "runs" / "multi_seed0" / "config.json").read_text())
    assert (saved["num_epochs"], saved["warmup_epochs"]) == (100, 10)
    report = (tmp_path / "study_cifar10_100ep.md").read_text()
    assert report.startswith("# Adder vs multiplication on digits, 100 epochs")
    assert "| multi + distill | multi |" in report  # what distillation buys multi
    # the arms not run yet are named, not dropped
    assert "qkv_2ffn_ternary + distill against multi + distill" in report
    # digits evaluates on its test split: the columns say so
    assert "| arm | test acc minus multi + distill (points) at epoch 10 | 30 | 60 | 100 |" in report
    assert list(study_cifar10_100ep.LABELS)[:2] == ["multi", "multi + distill"]


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--seeds", "0", "-1"], "argument --seeds: must be an integer >= 0, got -1"),
        (["--seeds", "one"], "argument --seeds: 'one' is not an integer"),
        (["--seeds", "0", "1", "0"], "--seeds 0 1 0 repeats [0]"),
        (["--set", "num_epoch=3"], "--set 'num_epoch=3': the config has no field 'num_epoch'"),
        (["--config", "nosuch"], "--config 'nosuch' is neither a file nor one of"),
        (["--inference", "no/such/results.json"], "--inference no/such/results.json: no such"),
        (["--arms", "qkv_2ffn + distill"], "learn from multi seed 0's run, which is neither in"),
    ],
)
@pytest.mark.parametrize("script", [screen, study_cifar10])
def test_studies_refuse_bad_flags_before_training_anything(
    script, flags, fragment, tmp_path, capsys
):
    with pytest.raises(SystemExit) as info:
        script.main(["--out", str(tmp_path), *flags])
    assert info.value.code == 2 and fragment in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_report_only_on_an_empty_out_says_so_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        study_cifar10.main(["--out", str(tmp_path), "--report-only", "--inference", "none"])
    runs = 2 * len(study_cifar10.arms(tmp_path, study.load_recipe("cifar10", [])))
    assert str(info.value) == (
        f"no finished run in {tmp_path}/runs to report: none of this study's {runs} runs is there"
    )
    assert capsys.readouterr().out == "" and not any(tmp_path.iterdir())


def test_a_set_adds_to_the_study_recipe_and_a_failed_run_is_named(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    study.add_recipe_flags(parser, default_config="digits", default_set=first_run.DEFAULT_SET)
    args = study.parse_recipe_args(parser, ["--out", str(tmp_path), "--set", "num_epochs=1"])
    # first_run's validation slice stays: a --set never sends it back to the test split
    assert (args.recipe.eval_split, args.recipe.num_epochs) == ("train[1150:]", 1)

    def diverges(*args, **kwargs):
        raise train.TrainingDiverged("the loss became nan by step 3")

    monkeypatch.setattr(train, "train", diverges)
    (run,) = study.make_runs(args.recipe, [("multi", {"variant": "multi"})], [0])
    with pytest.raises(SystemExit, match="^multi_seed0: the loss became nan by step 3$"):
        study.run_all([run], tmp_path)


def test_shape_strings_parse_to_three_positive_integers():
    assert parse_shape("4096x384x1536") == (4096, 384, 1536)
    assert parse_shape("37X19x23") == (37, 19, 23)
    for bad in ("10x10", "axbxc", "0x1x2", "4x-3x2", "1x2x3x4", "", "4.0x3x2"):
        with pytest.raises(ValueError, match=r"expected LxD_INxD_OUT, three positive integers"):
            parse_shape(bad)
    with pytest.raises(ValueError, match=r"^shape '10x10': "):
        parse_shape("10x10")


def test_bench_scripts_refuse_a_malformed_shape_with_a_usage_error(capsys):
    for script in (bench_ops, bench_int8):
        with pytest.raises(SystemExit) as exit_info:
            script.main(["--shapes", "10x10"])
        assert exit_info.value.code == 2
        assert "--shapes: shape '10x10': expected LxD_INxD_OUT" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("script", "flags", "fragment"),
    [
        (bench_ops, ["--repeats", "0"], "argument --repeats: must be a positive integer, got 0"),
        (speed_table, ["--steps", "two"], "argument --steps: 'two' is not an integer"),
        (speed_table, ["--warmup", "-1"], "argument --warmup: must be an integer >= 0, got -1"),
        (
            int8_accuracy,
            ["RUN", "--calibration-batches", "0"],
            "argument --calibration-batches: must be a positive integer, got 0",
        ),
    ],
)
def test_experiment_counts_are_usage_errors_before_any_work(script, flags, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(flags)
    assert exit_info.value.code == 2 and fragment in capsys.readouterr().err


def test_report_header_names_the_command_hardware_and_date():
    command = reports.command_line("op_counts.py", ["--set", "patch_size=16", "a b"])
    assert command == "python experiments/op_counts.py --set patch_size=16 'a b'"
    today = datetime.date.today().isoformat()
    assert reports.header_lines(
        command, "cpu (x), jax 0", hardware_label="hardware of the runs"
    ) == [
        f"- command: `{command}`",
        "- hardware of the runs: cpu (x), jax 0",
        f"- date: {today}",
    ]
    assert reports.header_lines("c", date="2000-01-02")[1:] == [
        f"- hardware: {timing.describe_device()}",
        "- date: 2000-01-02",
    ]


# two processors of a VM that names a Zen 3 EPYC like a Zen 5 one; only the first block is read
ZEN3_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma bmi2

processor\t: 1
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC 9999
flags\t\t: avx2 avx512f avx512bw avx512_vnni
"""


@pytest.mark.parametrize(
    "cpuinfo, expected",
    [
        (ZEN3_CPUINFO, "AMD EPYC, family 25 model 1, AVX2"),
        (
            "model name\t: Intel(R) Xeon(R) Processor\ncpu family\t: 6\nmodel\t\t: 143\n"
            "flags\t\t: avx2 avx512f avx512bw amx_tile\n",
            "Intel(R) Xeon(R) Processor, family 6 model 143, AVX-512",
        ),
        ("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: sse2\n", "Some CPU"),
    ],
)
def test_describe_cpu_tells_apart_cpus_that_share_a_name(cpuinfo, expected):
    assert timing.describe_cpu(cpuinfo) == expected
    device = timing.describe_device()
    assert device.startswith(f"cpu ({timing.describe_cpu()}, ") and "cores), jax " in device


def test_describe_cpu_without_cpuinfo_falls_back_to_the_platform(monkeypatch):
    monkeypatch.setattr(timing.platform, "processor", lambda: "")
    assert timing.describe_cpu("") == "cpu"
    monkeypatch.setattr(timing.platform, "processor", lambda: "arm")
    assert timing.describe_cpu("") == "arm"


def test_cpuinfo_fields_reads_the_first_processor_block_only():
    fields = timing.cpuinfo_fields(ZEN3_CPUINFO)
    assert fields["model name"] == "AMD EPYC" and fields["cpu family"] == "25"
    assert fields["flags"] == "fpu sse2 avx avx2 fma bmi2"
    assert timing.cpuinfo_fields("") == {}


@pytest.mark.parametrize(
    "cpuinfo, expected",
    [
        (
            ZEN3_CPUINFO,  # the second processor's avx512 flags must not count
            {
                "avx2": True,
                "avx512bw": False,
                "avx512_vnni": False,
                "avx_vnni": False,
                "amx_int8": False,
            },
        ),
        (
            "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd asimddp i8mm\n",
            {"asimddp": True, "i8mm": True, "sve": False},
        ),
        ("processor\t: 0\nmodel name\t: Some CPU\n", {}),
        ("", {}),
    ],
)
def test_bench_int8_reads_instruction_sets_through_the_library(cpuinfo, expected):
    assert bench_int8.cpu_instruction_sets(cpuinfo) == expected


def test_bench_int8_heads_its_table_with_the_command_and_date(tmp_path):
    argv = ["--shapes", "9x5x7", "--skip-models", "--repeats", "1", "--out", str(tmp_path)]
    bench_int8.main(argv)
    table = (tmp_path / "table.md").read_text()
    assert f"- command: `python experiments/bench_int8.py {' '.join(argv)}`" in table
    assert f"- date: {datetime.date.today().isoformat()}" in table
    assert "| 9x5x7 |" in table
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["command"].startswith("python experiments/bench_int8.py --shapes 9x5x7")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--repeats", "0"], "argument --repeats: must be a positive integer, got 0"),
        (["--batch", "-1"], "argument --batch: must be a positive integer, got -1"),
        (["--set", "dimm=16"], "--set dimm=16: "),
        (["--out", "A_FILE"], "is a file, not a directory"),
        (["--skip-models", "--out", "RESULTS"], "--skip-models would replace the model timings"),
    ],
)
def test_bench_int8_refuses_bad_flags_before_timing_anything(flags, fragment, tmp_path, capsys):
    (tmp_path / "A_FILE").write_text("")
    (tmp_path / "RESULTS").mkdir()
    (tmp_path / "RESULTS" / "results.json").write_text('{"models": [{"model": "multi"}]}')
    flags = [str(tmp_path / f) if f in ("A_FILE", "RESULTS") else f for f in flags]
    with pytest.raises(SystemExit) as info:
        bench_int8.main(["--shapes", "9x5x7", *flags])
    captured = capsys.readouterr()
    assert info.value.code == 2 and fragment in captured.err and not captured.out


def test_bench_int8_times_each_int8_op_and_model_against_float(tmp_path):
    tiny = ["dim=16", "depth=1", "heads=2", "dim_head=8", "mlp_dim=32", "patch_size=8"]
    argv = ["--shapes", "9x5x7", "--batch", "2", "--repeats", "2", "--set", *tiny]
    bench_int8.main([*argv, "--out", str(tmp_path)])
    table = (tmp_path / "table.md").read_text()
    record = json.loads((tmp_path / "results.json").read_text())
    (row,) = record["ops"]
    native = record["int8_matmul_path"] == "onednn"
    assert list(row["against_f32"]) == [
        "int8 product (XLA)",
        *(["int8 product (oneDNN)"] if native else []),
        "int8 SAD",
    ]
    for name, pair in row["against_f32"].items():
        assert pair["over_f32"] > 0 and pair["ms"] > 0 and pair["f32_matmul_ms"] > 0
        assert f"| 9x5x7 | {name} | {pair['ms']:.2f} | " in table
    assert set(row["xla_kernels"]) == {"f32 matmul", "int8 product (XLA)"}
    # the timed products are the int8 sites' own: a ternary site's sums on either backend
    ternary = models.Int8Ternary(layers.TernaryDense(5, 7, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (9, 5))
    codes, w = ternary.activation_codes(x)[0], ternary.integer_weights()
    assert w.dtype == codes.dtype == jnp.int8 and set(map(int, jnp.unique(w))) <= {-1, 0, 1}
    h = quantizers.rms_norm(x)
    for backend in ("xla", "cpu_native"):
        sums = bench_int8.int8_product(backend)(h, w)[0]
        assert jnp.array_equal(sums, ternary.integer_similarity(x))
        assert jnp.array_equal(sums, codes.astype(jnp.int32) @ w.astype(jnp.int32))
    # the peer ran in its own process where PyTorch is installed, at the same shapes
    if record["peer"] is not None:
        assert [r["shape"] for r in record["peer"]["ops"]] == ["9x5x7"]
        assert "| 9x5x7 |" in table and "torch._int_mm" in table
    forms = [(r["model"], r["form"]) for r in record["models"]]
    assert forms == [
        (model, form)
        for model in (
            "multi",
            "multi_ln",
            "qkv_2ffn",
            "qkv_2ffn, norm=batch",
            "qkv_2ffn_ternary",
            "qkv_2ffn_shift",
            "all_adder, attn=l1_identity",
        )
        for form in ("float", "int8")
        if (model, form) != ("qkv_2ffn_shift", "int8")  # shift sites have no int8 form
    ]
    for r in record["models"]:
        assert r["over_multi"] > 0 and r["ms"] > 0
        assert f"| {r['model']} | {r['form']} | {r['ms']:.1f} |" in table
        assert 0 < r["memory_bytes"] <= r["saved_bytes"]  # msgpack adds names and headers
        if r["form"] == "int8":  # every linear site on integers, the attention products float
            assert set(r["float_sites"]) <= {"scores_dot", "scores_l1", "attention_values"}
    # batch-1 latency of the same models and forms
    assert record["latency_batch"] == 1
    assert [(r["model"], r["form"]) for r in record["latency"]] == forms
    assert "Latency, batch 1" in table
    # the profile: each part of the profiled models timed, float and int8
    profiled = [(r["model"], r["form"]) for r in record["profile"]]
    assert profiled == [(m, f) for m in bench_int8.PROFILED for f in ("float", "int8")]
    for r in record["profile"]:
        assert r["whole_ms"] > 0 and r["linear_sites_share"] > 0 and r["attention_share"] > 0
        assert (r["int8_products_share"] > 0) == (r["form"] == "int8")
        assert r["rest_share"] == pytest.approx(1 - r["linear_sites_share"] - r["attention_share"])
    assert "Where the time goes" in table
    size = {(r["model"], r["form"]): r["memory_bytes"] for r in record["models"]}
    assert all(size[m, "int8"] < size[m, "float"] for m, form in size if form == "int8")
    # ternary codes in 2 bits: the ternary model is the smallest int8 form
    assert size["qkv_2ffn_ternary", "int8"] < min(size["multi", "int8"], size["qkv_2ffn", "int8"])
    assert record["model_size"]["dim"] == 16 and record["model_size"]["patch_size"] == 8
    # the studies' reports find these rows by model graph: a cifar10 recipe of the same size
    recipe = study.load_recipe("cifar10", [f"model.{item}" for item in tiny])
    rows = {(r["model"], r["form"]): r["over_multi"] for r in record["models"]}
    for label, fields in [("qkv_2ffn", {}), ("qkv_2ffn, norm=batch", {"model.norm": "batch"})]:
        (run,) = study.make_runs(recipe, [(label, {"variant": "qkv_2ffn", **fields})], [0])
        assert study.inference_ratios(run.config, record) == {
            form: rows[label, form] for form in ("float", "int8")
        }
    cpu = record["cpu_instruction_sets"]
    assert cpu == bench_int8.cpu_instruction_sets()
    sets = ", ".join(f"{name} {'yes' if have else 'no'}" for name, have in cpu.items())
    assert f"- CPU instruction sets for int8 sums (/proc/cpuinfo): {sets or 'unknown'}" in table


def test_study_reports_read_inference_times_of_the_same_model_from_bench_int8():
    size = dict(bench_int8.CIFAR)
    inference = {
        "models": [
            {"variant": "qkv_2ffn", "build": size, "form": "float", "over_multi": 1.5},
            {
                "variant": "qkv_2ffn",
                "build": {**size, "norm": "batch"},
                "form": "int8",
                "over_multi": 0.7,
            },
            {"variant": "qkv_2ffn", "build": size, "form": "int8", "over_multi": 0.8},
            {"variant": "multi", "build": size, "form": "int8", "over_multi": 0.4},
        ]
    }
    recipe = study.load_recipe("cifar10", [])
    arms = [
        ("plain", {"variant": "qkv_2ffn"}),
        ("per-unit", {"variant": "qkv_2ffn", "model.norm": "batch"}),
        ("wider", {"variant": "qkv_2ffn", "model.mlp_dim": 512}),
    ]
    found = {
        run.label: study.inference_ratios(run.config, inference)
        for run in study.make_runs(recipe, arms, [0])
    }
    # matched by model graph: variant, shapes and norms, not by name
    assert found == {"plain": {"float": 1.5, "int8": 0.8}, "per-unit": {"int8": 0.7}, "wider": {}}
    assert study.inference_ratios(recipe, None) == {}


def test_int8_accuracy_tables_float_and_int8_of_finished_runs(tmp_path, capsys):
    config = study.load_recipe("digits", [*TINY_RECIPE, "variant=qkv_2ffn_ternary"])
    train.train(config, tmp_path / "ternary")
    int8_accuracy.main([str(tmp_path / "ternary"), "--out", str(tmp_path / "out")])
    (record,) = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    direct = train.evaluate_workdir(tmp_path / "ternary", int8=True)
    assert record["float"] == direct["float"] and record["int8"] == direct["int8"]
    f, q = record["float"]["accuracy"], record["int8"]["accuracy"]
    table = (tmp_path / "out" / "accuracy.md").read_text()
    sites = ", ".join(f"{n} {kind}" for kind, n in direct["int8_sites"].items())
    assert f"| ternary | qkv_2ffn_ternary | test | {100 * f:.2f} | {100 * q:.2f} | " in table
    assert f"| {sites} | attention_values, scores_dot |" in table
    # an unfinished run is refused before anything is evaluated
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        int8_accuracy.main([str(tmp_path / "ternary"), str(tmp_path / "empty")])
    # a run that cannot be evaluated does not cost the others their results
    train.train(configs.override(config, {"batch_size": 128}), tmp_path / "wide")
    before = (tmp_path / "out" / "accuracy.json").read_text()
    with pytest.raises(SystemExit, match="1 of 2 runs not evaluated; nothing written to --out"):
        # one epoch of digits: 44 batches of 32, 11 of 128
        int8_accuracy.main(
            [str(tmp_path / "wide"), str(tmp_path / "ternary"), "--out", str(tmp_path / "out")]
            + ["--calibration-batches", "20"]
        )
    table = capsys.readouterr().out  # what was measured is printed, --out's files are kept whole
    assert f"| ternary | qkv_2ffn_ternary | test | {100 * f:.2f} |" in table
    assert "Not evaluated: wide: calibration_batches=20 of 128 images" in table
    assert (tmp_path / "out" / "accuracy.json").read_text() == before


def test_bench_ops_times_the_naive_backend(capsys):
    bench_ops.main(["--shapes", "9x5x7", "--repeats", "1", "--naive", "--backend", "xla"])
    out = capsys.readouterr().out
    assert "| 9x5x7 | naive adder | forward |" in out
    assert "| 9x5x7 | adder xla grad=clipped | fwd+bwd |" in out
