"""Candidate tiles for the Pallas kernels, judged by the static check of their Hopper machine code.

    python experiments/sass_blocks.py --out experiments/results/sass     # needs the sass extra

For each kernel and rule, every candidate tile of :data:`CANDIDATES` at L=4096, 384 -> 1536 in
float32 (the hot loop does not depend on the shape, only its trip count; ``addervit check-kernels
--sass`` checks the chosen table at every ViT shape and dtype): registers, spills and the static
roofline fraction (``kernels/sass.py``). Writes ``candidates.md`` and ``candidates.json``.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from addervit_jax.kernels import sass
from addervit_jax.kernels.adder_pallas import Blocks

CANDIDATES = [
    Blocks(rows=32, cols=32, reduce=8, num_warps=4, num_stages=2),
    Blocks(rows=32, cols=64, reduce=8, num_warps=4, num_stages=2),
    Blocks(rows=32, cols=32, reduce=16, num_warps=4, num_stages=2),
    Blocks(rows=128, cols=64, reduce=4, num_warps=8, num_stages=3),
    Blocks(rows=64, cols=64, reduce=4, num_warps=4, num_stages=2),
    Blocks(rows=64, cols=64, reduce=4, num_warps=8, num_stages=3),
    Blocks(rows=64, cols=64, reduce=8, num_warps=8, num_stages=2),
    Blocks(rows=128, cols=64, reduce=4, num_warps=8, num_stages=2),
    Blocks(rows=64, cols=128, reduce=4, num_warps=8, num_stages=2),
    Blocks(rows=128, cols=128, reduce=2, num_warps=8, num_stages=2),
]
SHAPE = (4096, 384, 1536)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="directory for candidates.md/.json")
    args = parser.parse_args(argv)
    if sass.missing():
        raise SystemExit(sass.missing())
    rows = []
    for kernel, rule in sass.KERNELS:
        for blocks in CANDIDATES:
            report = sass.check(kernel, rule, SHAPE, jnp.float32, blocks)
            name = f"{blocks.rows}x{blocks.cols}x{blocks.reduce}"
            rows.append((name, report))
            print(sass.markdown([(name, report)]).splitlines()[-1], flush=True)
    if args.out:
        sass.write(rows, args.out, "candidates")


if __name__ == "__main__":
    main()
