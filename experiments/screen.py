"""The screening study: the methods that could close the adder gap, one recipe, on CIFAR-10.

    TFDS_DATA_DIR=../shared/datasets/tfds python experiments/screen.py \\
        --out experiments/results/screen_cifar10

Arms (labels of the table), every one the ``cifar10`` config at 10 epochs with 1 warm-up epoch
(``--set`` items apply after these), seed 0, ``train[:45000]`` to fit and ``train[45000:]`` to
validate:

* ``multi``: the multiplication baseline, and the distillation teacher of the ``+ distill`` arms;
* ``multi_ln``: multi sites with the distance sites' normalisation, gain F and bias b (the
  control that separates "L1 vs dot product" from "norm vs no norm");
* ``qkv_2ffn``: the original study's method;
* ``qkv_2ffn + distill``: logit distillation from the ``multi`` arm (``config.distill``);
* ``qkv_2ffn + adder lr x10``: the adder weights at 10x the learning rate (``adder_lr_scale``;
  the reason is in ``optim.make_optimizer``);
* ``all_adder, l1_identity``: every linear site adder, L1 attention with the identity mapping of
  Shu et al. (``models.Attention``);
* ``all_adder, l1_identity + distill``: the same, distilled from ``multi``;
* ``euclider``: EuclidNet's squared L2 distance in q/k/v and the FFN.

The methods that closed the gap elsewhere, each added alone to ``qkv_2ffn + distill`` (the best
adder arm of the first eight), whose differences the report gives:

* ``+ features``: feature distillation, every block's output matched to the teacher's
  (``distill.feature_weight=1``, ``train.feature_loss``, standardised tokens);
* ``, norm=batch``: AdderNet's per-unit batch norm at every adder site instead of the per-token
  one (``layers``);
* ``, equal-energy width``: the adder FFN as wide as the fp32 arithmetic energy per image of
  ``multi`` allows (``study.equal_energy_mlp_dim``: 864 instead of 256 at this model);
* ``, converted from multi``: started from the ``multi`` arm's finished run (``init_from``,
  ``train.convert``: shared parameters copied, each adder site fitted to its multiplication site)
  and fine-tuned for the same 10 epochs; its budget is the teacher's 10 epochs plus these;
* ``+ features (pkkd)``: feature distillation through token kernel matrices, our reading of PKKD
  (``distill.feature_kernel="pkkd"``);
* ``+ features, norm=batch``: the two that helped first (+2.0 points each over ``qkv_2ffn +
  distill``, one seed), together;
* ``+ features, norm=batch, equal-energy width`` and ``..., converted from multi``: that pair with
  each of the two later methods that helped (equal-energy width +1.7, conversion +6.3); not all four
  at once, since a converted site keeps the teacher's shape and the wider FFN has no such teacher.

The other multiplication-free families at ``qkv_2ffn``'s sites, the same recipe:

* ``qkv_2ffn_ternary``, with and without distillation from ``multi``: BitNet b1.58's ternary
  weights and 8-bit activations (``layers.TernaryDense``);
* ``qkv_2ffn_shift + distill``: DeepShift's power-of-two weights (``layers.ShiftDense``).

Runs train one after the other in ``OUT/runs/<arm>_seed<s>`` (the teacher first); rerunning the
command reads back finished runs and resumes an unfinished one from its checkpoints. ``--arms``
trains only a subset (the report keeps the other arms' finished runs); ``--report-only`` trains
nothing. Writes ``screen.md`` / ``.png`` / ``.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import pathlib

import study

DEFAULT_SET = ["num_epochs=10", "warmup_epochs=1"]


def arms(out: pathlib.Path, recipe) -> dict[str, dict]:
    teacher = str(out / "runs" / "multi_seed0")
    identity = {"variant": "all_adder", "model.attn": "l1_identity"}
    distilled = {"variant": "qkv_2ffn", "distill.teacher": teacher}
    both = {**distilled, "distill.feature_weight": 1.0, "model.norm": "batch"}
    return {
        "multi": {"variant": "multi"},
        "multi_ln": {"variant": "multi_ln"},
        "qkv_2ffn": {"variant": "qkv_2ffn"},
        "qkv_2ffn + distill": {"variant": "qkv_2ffn", "distill.teacher": teacher},
        "qkv_2ffn + adder lr x10": {"variant": "qkv_2ffn", "adder_lr_scale": 10.0},
        "all_adder, l1_identity": identity,
        "all_adder, l1_identity + distill": {**identity, "distill.teacher": teacher},
        "euclider": {"variant": "euclider"},
        "qkv_2ffn + distill + features": {**distilled, "distill.feature_weight": 1.0},
        "qkv_2ffn + distill, norm=batch": {**distilled, "model.norm": "batch"},
        "qkv_2ffn + distill, equal-energy width": {
            **distilled,
            "model.mlp_dim": study.equal_energy_mlp_dim(recipe, "qkv_2ffn"),
        },
        "qkv_2ffn + distill, converted from multi": {**distilled, "init_from": teacher},
        "qkv_2ffn + distill + features (pkkd)": {
            **distilled,
            "distill.feature_weight": 1.0,
            "distill.feature_kernel": "pkkd",
        },
        "qkv_2ffn + distill + features, norm=batch": both,
        "qkv_2ffn + distill + features, norm=batch, equal-energy width": {
            **both,
            "model.mlp_dim": study.equal_energy_mlp_dim(recipe, "qkv_2ffn"),
        },
        "qkv_2ffn + distill + features, norm=batch, converted from multi": {
            **both,
            "init_from": teacher,
        },
        "qkv_2ffn_ternary": {"variant": "qkv_2ffn_ternary"},
        "qkv_2ffn_ternary + distill": {"variant": "qkv_2ffn_ternary", "distill.teacher": teacher},
        "qkv_2ffn_shift + distill": {"variant": "qkv_2ffn_shift", "distill.teacher": teacher},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    study.add_recipe_flags(parser, default_config="cifar10", default_set=DEFAULT_SET)
    study.add_arms_flag(parser)
    args = study.parse_recipe_args(parser, argv)
    out, recipe = pathlib.Path(args.out), args.recipe
    table = arms(out, recipe)
    chosen = study.choose_arms(parser, table, args.arms)
    if not args.report_only:
        if any("distill.teacher" in fields for _, fields in chosen) and args.seeds != [0]:
            parser.error("the distillation arms learn from multi's seed-0 run: use --seeds 0")
        study.check_teacher(parser, chosen, args.seeds, out, ("multi", 0))
    study.run_and_report(
        study.make_runs(recipe, list(table.items()), args.seeds, study.trainable(args, chosen)),
        out,
        name="screen",
        title=f"Screening on {recipe.dataset}",
        label_header="arm",
        recipe=recipe,
        argv=argv,
        references=("qkv_2ffn + distill",),
        inference=study.load_inference(args.inference),
    )


if __name__ == "__main__":
    main()
