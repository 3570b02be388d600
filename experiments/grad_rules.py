"""The gradient-rule study (the *Exploration of AdderViT* write-up's Problem 1): training curves of
one adder model under each backward rule of ``ops.adder``.

    python experiments/grad_rules.py --out experiments/results/grad_rules_digits --seeds 0 1 2
    python experiments/grad_rules.py --variant all_adder --clip-scales 1 2 4 8 --out OUT

Rules: ``exact`` (the true gradient, sign), ``addernet`` (AdderNet's full-precision dL/dw and
``hardtanh(w - x)`` for dL/dx), and ``clipped`` at each ``--clip-scales`` value (the study's fix,
``hardtanh(clip_scale * (w - x))``, 4 in the study). ``clipped`` at clip_scale 1 is the
``addernet`` rule exactly, so it is not run twice. Every adder site of ``--variant`` uses the rule;
everything else is the shared recipe (``--config``, ``--set``). Writes ``grad_rules.md`` /
``.png`` / ``.json`` under ``--out``; rerunning resumes unfinished runs.
"""

from __future__ import annotations

import argparse
import pathlib

import study

from addervit_jax import models


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="qkv_2ffn", choices=sorted(models.VARIANTS))
    parser.add_argument("--clip-scales", nargs="+", type=float, default=[2.0, 4.0, 16.0])
    study.add_recipe_flags(parser, default_config="digits")
    args = study.parse_recipe_args(parser, argv)
    recipe = args.recipe
    recipe.variant = args.variant
    rules = [("exact", "exact", 4.0), ("addernet (= clipped, clip_scale 1)", "addernet", 1.0)]
    rules += [(f"clipped, clip_scale {c:g}", "clipped", c) for c in args.clip_scales if c != 1.0]
    settings = [
        (label, {"model.grad": grad, "model.clip_scale": clip_scale})
        for label, grad, clip_scale in rules
    ]
    study.run_and_report(
        study.make_runs(recipe, settings, args.seeds, study.trainable(args)),
        pathlib.Path(args.out),
        name="grad_rules",
        title=f"Backward rules, {args.variant} on {recipe.dataset}",
        label_header="rule",
        recipe=recipe,
        argv=argv,
        inference=study.load_inference(args.inference),
    )


if __name__ == "__main__":
    main()
