"""Multiplications, additions and estimated energy per image of every named variant.

    python experiments/op_counts.py                          # every variant, 32x32x3 images
    python experiments/op_counts.py --variants multi qkv_2ffn all_adder --image-size 128 \\
        --set patch_size=16                                  # the study's 128px SimpleViT
    python experiments/op_counts.py --variants swin_multi swin_adder swin_euclider \\
        --set image_size=224 patch_size=4 window_size=7      # Swin at 224px

Counts come from ``counts.count_ops``, which traces the model on one image: similarity sites
(linear layers, attention scores and values) by their formula, with an adder site costing two
additions and no multiplication per term, as the AdderNet papers count; everything else
(normalisation, softmax, GELU, the stretch E and mask F, residuals) from its primitives. Energies
use Horowitz's 45 nm per-operation costs (ISSCC 2014: fp32 multiply 3.7 pJ, add 0.9 pJ), and each
variant's energy is also given relative to the multiplication baseline of its family (``multi``
for SimpleViT, ``swin_multi`` for Swin), counted with the same image size and overrides. Writes
``op_counts.md`` and ``op_counts.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
from flax import nnx

from addervit_jax import configs, counts, models, reports, timing

BASELINES = {"simple_vit": "multi", "swin": "swin_multi"}


def count_variant(variant: str, overrides: dict) -> dict:
    """Parameters and ``counts.count_ops`` of one variant, as a JSON-ready record."""
    model = models.build(variant, rngs=nnx.Rngs(0), **overrides)
    cfg = model.cfg
    image_shape = (cfg.image_size, cfg.image_size, cfg.channels)
    c = counts.count_ops(model, image_shape)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {
        "variant": variant,
        "family": models.VARIANTS[variant].family,
        "image_shape": list(image_shape),
        "params": int(params),
        "similarity": {site: list(v) for site, v in sorted(c.similarity.items())},
        "similarity_mults": c.similarity_mults,
        "similarity_adds": c.similarity_adds,
        "other_mults": c.other_mults,
        "other_adds": c.other_adds,
        "total_mults": c.total_mults,
        "total_adds": c.total_adds,
        **({"shifts": c.shifts} if c.shifts else {}),  # (shift sites: one shift per term)
        "counts": c,  # dropped before writing JSON
    }


def markdown_table(rows: list[dict], precision: str) -> str:
    lines = [
        "| variant | image | params | similarity mults (M) | similarity adds (M) | total mults (M)"
        f" | total adds (M) | energy {precision} (µJ) | energy vs multi |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        h, w, c = r["image_shape"]
        millions = (
            f"{r[k] / 1e6:.2f}"
            for k in ("similarity_mults", "similarity_adds", "total_mults", "total_adds")
        )
        lines.append(
            f"| {r['variant']} | {h}x{w}x{c} | {r['params']:,} | {' | '.join(millions)} | "
            f"{r['energy_uj']:.2f} | {r['energy_relative']:.3f} ({r['baseline']}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(models.VARIANTS),
        choices=list(models.VARIANTS),
        help="default: every named variant",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="square image side for every variant (default: each family's config, 32)",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="model-config overrides for every variant, e.g. patch_size=16",
    )
    parser.add_argument("--precision", default="fp32", choices=sorted(counts.ENERGY_PJ))
    parser.add_argument("--out", default="experiments/results/op_counts", help="results directory")
    args = parser.parse_args(argv)

    overrides = configs.parse_overrides(args.set)
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    cache: dict[str, dict] = {}

    def counted(variant):
        if variant not in cache:
            cache[variant] = count_variant(variant, overrides)
        return cache[variant]

    rows = []
    for variant in args.variants:
        row = dict(counted(variant))
        baseline = BASELINES[row["family"]]
        energy = row["counts"].energy_pj(args.precision)
        row["energy_pj"] = energy
        row["energy_uj"] = energy / 1e6
        row["baseline"] = baseline
        row["energy_relative"] = energy / counted(baseline)["counts"].energy_pj(args.precision)
        rows.append(row)

    table = markdown_table(rows, args.precision)
    e_mul, e_add = counts.ENERGY_PJ[args.precision]
    command, hardware = reports.command_line("op_counts.py", argv), timing.describe_device()
    date = reports.today()
    header = [
        "# Operations and energy per image",
        "",
        *reports.header_lines(command, f"{hardware} (the counts do not depend on it)", date=date),
        f"- model overrides: {overrides or 'none'}",
        "- energy: arithmetic energy only, memory traffic excluded: "
        f"{args.precision} multiply {e_mul} pJ, add {e_add} pJ (45 nm, M. Horowitz, "
        '"Computing\'s energy problem", ISSCC 2014); an adder term is 2 additions, a '
        "multiply-accumulate 1 + 1",
        *(
            [
                "- a ternary term is one int8 addition, priced at int8 (0.03 pJ) at every "
                "precision as BitNet b1.58 prices it; a shift term is a shift (ShiftAddNet, 45 nm: "
                f"{counts.SHIFT_PJ[args.precision]} pJ) and an addition; weights quantised "
                "offline are not counted (counts.py)"
            ]
            if any(site in r["similarity"] for r in rows for site in ("ternary", "shift"))
            else []
        ),
        "- similarity: linear layers, attention scores and attention values; total adds "
        "normalisation, softmax, GELU, the stretch E and mask F, residuals (counts.count_ops)",
        "- energy vs multi: total energy over that of the family's multiplication baseline",
        "",
        table,
        "",
    ]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "op_counts.md").write_text("\n".join(header))
    record = {
        "command": command,
        "hardware": hardware,
        "date": date,
        "overrides": overrides,
        "precision": args.precision,
        "energy_pj_per_op": {"mult": e_mul, "add": e_add},
        "rows": [{k: v for k, v in r.items() if k != "counts"} for r in rows],
    }
    (out / "op_counts.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
