"""The variant study: named variants trained with one shared recipe and seed, compared.

    python experiments/variants.py --out experiments/results/variants_digits --seeds 0 1 2
    TFDS_DATA_DIR=../shared/datasets/tfds python experiments/variants.py --config cifar10 \\
        --variants multi qkv_2ffn adder euclider --set num_epochs=2 \\
        --out experiments/results/variants_cifar10

The original study compared its variants with different learning rates and normalisation for
Multi and Adder; here every variant gets the same recipe (``--config`` plus ``--set``
overrides), the same seeds and the same data order. Writes ``variants.md`` (final and best
validation accuracy, last-epoch train accuracy, wall time and images/s, mean ± sd over seeds),
``variants.png`` (validation curves) and ``variants.json`` under ``--out``; each run's own
workdir (checkpoints, metrics.jsonl, curves) is under ``--out/runs``, and rerunning the command
resumes unfinished runs and reads back finished ones.
"""

from __future__ import annotations

import argparse
import pathlib

import study

from addervit_jax import models

SIMPLE_VIT_VARIANTS = [n for n, v in models.VARIANTS.items() if v.family == "simple_vit"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=SIMPLE_VIT_VARIANTS,
        choices=sorted(models.VARIANTS),
        help="default: every SimpleViT variant",
    )
    study.add_recipe_flags(parser, default_config="digits")
    args = study.parse_recipe_args(parser, argv)
    recipe = args.recipe
    settings = [(v, {"variant": v}) for v in args.variants]
    runs = study.make_runs(recipe, settings, args.seeds, study.trainable(args))
    study.run_and_report(
        runs,
        pathlib.Path(args.out),
        name="variants",
        title=f"Variants on {recipe.dataset}",
        label_header="variant",
        recipe=recipe,
        argv=argv,
        inference=study.load_inference(args.inference),
    )


if __name__ == "__main__":
    main()
