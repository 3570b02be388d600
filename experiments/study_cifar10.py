"""Adder vs multiplication on CIFAR-10 at a real budget: 30 epochs, seeds 0 and 1.

    TFDS_DATA_DIR=../shared/datasets/tfds python experiments/study_cifar10.py \\
        --out experiments/results/study_cifar10

Arms (labels of the table), every one the ``cifar10`` config at 30 epochs with 3 warm-up epochs
(the screen's 10% warm-up; ``--set`` items apply after these), ``train[:45000]`` to fit and
``train[45000:]`` (5,000 images) to validate:

* ``multi``: the multiplication baseline; its seed-0 run is the teacher of the distilled arm;
* ``multi_ln``: multiplication sites with the distance sites' normalisation, gain and bias (the
  control that separates "L1 vs dot product" from "normalised site vs plain Dense"; it led
  ``multi`` by 2.6 points in the 10-epoch screen);
* ``multi + distill`` and ``multi_ln + distill``: the controls of the distilled arms, with their
  teacher (``multi`` seed 0) and loss (``config.distill``'s defaults, as for
  ``qkv_2ffn_ternary + distill``). ``multi + distill`` seed 0 has its teacher's seed, so it
  starts from the teacher's initial weights and sees its data order: it is still a student
  trained from scratch, but the closest a student can be to its teacher;
* ``multi, 60 epochs`` (twice the recipe's epochs and warm-up): the equal-budget control of the
  converted arm, which trains 30 epochs of ``multi`` and 30 after its conversion;
* ``qkv_2ffn``: the original study's method (adder q/k/v and FFN, no distillation);
* ``qkv_2ffn + distill``: the same, distilled from ``multi`` seed 0 (``config.distill``): the
  best adder arm of the screen (``experiments/results/screen_cifar10``, 62.7% against 61.2% for
  ``qkv_2ffn`` and 56.2% for the best all-adder arm at 10 epochs);
* ``qkv_2ffn + distill + features, norm=batch``: the best adder recipe of the screen's second part
  (issue 33): feature distillation of every block's output and AdderNet's per-unit batch norm
  added to ``qkv_2ffn + distill``, 66.8% at 10 epochs (seed 0) against 64.7% for each of the two
  alone, 62.7% without either and 66.9% for ``multi``. The same pair with the FFN widened to
  ``multi``'s energy reached 67.1%, a tie within noise at 2.2x the parameters and about 1.6x the
  training time, and a wider site cannot be converted from ``multi``; PKKD's kernel form of the
  feature term reached 63.6%;
* ``..., converted from multi``: the same recipe started from ``multi`` seed 0's finished run
  (``init_from``, ``train.convert``) and fine-tuned for the same 30 epochs, both seeds; its budget
  column counts the teacher's 30 epochs too (69.3% in the screen, with 10 + 10 epochs);
* ``qkv_2ffn_ternary``: BitNet b1.58's ternary sites at ``qkv_2ffn``'s places, without
  distillation (68.5% in the 10-epoch screen): what distillation buys the ternary sites;
* ``qkv_2ffn_ternary + distill``: the other families' recipe, BitNet b1.58's ternary sites at
  ``qkv_2ffn``'s places distilled from ``multi``: 70.8% at 10 epochs (seed 0) against 68.5%
  without distillation and 66.9% / 69.5% for ``multi`` / ``multi_ln``. DeepShift's power-of-two
  sites with distillation reached 71.1%, a tie within noise (one standard error of a difference
  is about 0.9 points); the ternary arm goes on because at that tie it costs less (0.27x
  ``multi``'s fp32 arithmetic energy per image against 0.42x) and every one of its sites has an
  exact int8 form.

Runs go seed by seed (``multi`` seed 0 first: the teacher), each in ``OUT/runs/<arm>_seed<s>``;
rerunning the command reads back finished runs and resumes an unfinished one from its
checkpoints. ``--arms`` trains only a subset (the report keeps the other arms' finished runs);
``--report-only`` trains nothing. A 3-epoch smoke run of the same arms:
``--set num_epochs=3 warmup_epochs=0.3 --out experiments/results/study_cifar10/smoke``.
Writes ``study_cifar10.md`` / ``.png`` / ``.json`` under ``--out``. The report's first paired
table sets each multiplication-free arm against the multiplication arms given the same help
(:func:`controls`: undistilled against ``multi`` and ``multi_ln``, distilled against their
distilled forms, converted against ``multi`` at the same budget), then what each help buys;
then each arm's difference to ``multi`` and to ``multi_ln`` (``study.gap_table``), all paired by
seed; and float and int8 inference speeds from ``bench_int8.py``'s results (``--inference``).
"""

from __future__ import annotations

import argparse
import pathlib

import study

DEFAULT_SET = ["num_epochs=30", "warmup_epochs=3"]
TEACHER = ("multi", 0)
BEST_ADDER = "qkv_2ffn + distill + features, norm=batch"
CONVERTED = f"{BEST_ADDER}, converted from multi"


def long_multi(recipe) -> str:
    """The label of ``multi`` at twice the recipe's epochs: the converted arm's equal budget."""
    return f"multi, {2 * recipe.num_epochs:g} epochs"


def arms(out: pathlib.Path, recipe) -> dict[str, dict]:
    teacher = str(out / "runs" / study.Run(*TEACHER, config=None).name)
    distilled = {"distill.teacher": teacher}
    best_adder = {
        "variant": "qkv_2ffn",
        **distilled,
        "distill.feature_weight": 1.0,
        "model.norm": "batch",
    }
    return {
        "multi": {"variant": "multi"},
        "multi_ln": {"variant": "multi_ln"},
        "multi + distill": {"variant": "multi", **distilled},
        "multi_ln + distill": {"variant": "multi_ln", **distilled},
        long_multi(recipe): {
            "variant": "multi",
            "num_epochs": 2 * recipe.num_epochs,
            "warmup_epochs": 2 * recipe.warmup_epochs,
        },
        "qkv_2ffn": {"variant": "qkv_2ffn"},
        "qkv_2ffn + distill": {"variant": "qkv_2ffn", **distilled},
        BEST_ADDER: best_adder,
        CONVERTED: {**best_adder, "init_from": teacher},
        "qkv_2ffn_ternary": {"variant": "qkv_2ffn_ternary"},
        "qkv_2ffn_ternary + distill": {"variant": "qkv_2ffn_ternary", **distilled},
    }


def controls(recipe) -> tuple[tuple[str, str], ...]:
    """(arm, control) pairs of the report's first paired table: each multiplication-free arm
    against the multiplication arms given the same help (no teacher, the same teacher and loss,
    the same budget), then what each help buys an arm."""
    fair = []
    for arm in ("qkv_2ffn", "qkv_2ffn_ternary"):
        fair += [(arm, "multi"), (arm, "multi_ln")]
    for arm in ("qkv_2ffn + distill", BEST_ADDER, "qkv_2ffn_ternary + distill"):
        fair += [(arm, "multi + distill"), (arm, "multi_ln + distill")]
    fair.append((CONVERTED, long_multi(recipe)))
    helps = [
        ("multi + distill", "multi"),
        ("multi_ln + distill", "multi_ln"),
        ("qkv_2ffn + distill", "qkv_2ffn"),
        ("qkv_2ffn_ternary + distill", "qkv_2ffn_ternary"),
        (long_multi(recipe), "multi"),
    ]
    return tuple(fair + helps)


def order(runs: list[study.Run]) -> list[study.Run]:
    """Seed by seed, the teacher's run first: the first seed's comparison is whole early."""
    first = [r for r in runs if (r.label, r.seed) == TEACHER]
    return first + sorted((r for r in runs if r not in first), key=lambda r: r.seed)


def main(
    argv=None,
    *,
    name: str = "study_cifar10",
    doc: str = __doc__,
    default_set: tuple[str, ...] = DEFAULT_SET,
    default_seeds: tuple[int, ...] = (0, 1),
    labels: tuple[str, ...] | None = None,
    pairs=controls,
    epoch_gaps: tuple[str, tuple[float, ...]] | None = None,
) -> None:
    """This study; another budget of it (``study_cifar10_100ep.py``) passes its own name, docstring,
    recipe overrides, seeds, subset of :func:`arms` (``labels``), pairs (as :func:`controls`) and
    ``epoch_gaps`` (:func:`study.write_report`)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    study.add_recipe_flags(
        parser, default_config="cifar10", default_set=default_set, default_seeds=default_seeds
    )
    study.add_arms_flag(parser)
    args = study.parse_recipe_args(parser, argv)
    out, recipe = pathlib.Path(args.out), args.recipe
    table = arms(out, recipe)
    if labels is not None:
        table = {label: table[label] for label in labels}
    chosen = study.choose_arms(parser, table, args.arms)
    if not args.report_only:
        study.check_teacher(parser, chosen, args.seeds, out, TEACHER)
    study.run_and_report(
        order(
            study.make_runs(recipe, list(table.items()), args.seeds, study.trainable(args, chosen))
        ),
        out,
        name=name,
        title=f"Adder vs multiplication on {recipe.dataset}, {recipe.num_epochs:g} epochs",
        label_header="arm",
        recipe=recipe,
        argv=argv,
        references=("multi", "multi_ln"),
        controls=tuple((a, c) for a, c in pairs(recipe) if a in table and c in table),
        epoch_gaps=epoch_gaps,
        inference=study.load_inference(args.inference),
    )


if __name__ == "__main__":
    main()
