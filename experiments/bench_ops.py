"""Time ops.adder against ops.dense of the same shape: forward, and forward + backward.

    python experiments/bench_ops.py                       # ViT-like shapes, grad="clipped"
    python experiments/bench_ops.py --grad exact addernet clipped --naive
    python experiments/bench_ops.py --backend cpu_native xla --grad clipped addernet exact

Single timings on shared machines swing by 2x, so each adder run is paired with a dense run of
the same shape right after it, in one process and after warm-up, and the table reports the median
of the per-pair ratios (plus the median absolute times). ``--naive`` adds the obvious broadcast
formula, ``ops.adder``'s ``"naive"`` backend (forward only: its backward needs the whole
(L, D_in, D_out) tensor).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from addervit_jax import cli, ops, timing
from addervit_jax.shapes import parse_shape

# (L, D_in, D_out): a ViT-S block on 4,096 tokens (qkv, MLP up, MLP down) and the CIFAR-sized
# SimpleViT MLP on a batch of 64 images of 64 patches.
DEFAULT_SHAPES = ["4096x384x1536", "4096x1536x384", "4096x384x1152", "4096x128x256"]


def forward_and_backward(op):
    def loss(x, w, r):
        return jnp.sum(op(x, w) * r)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="LxD_INxD_OUT")
    parser.add_argument("--grad", nargs="+", default=["clipped"], choices=ops.GRAD_RULES)
    parser.add_argument(
        "--backend", nargs="+", default=["auto"], choices=ops.BACKENDS, help="one row set each"
    )
    parser.add_argument("--repeats", type=cli.int_at_least(1), default=7)
    parser.add_argument("--naive", action="store_true", help="also time the broadcast formula")
    args = parser.parse_args(argv)
    try:
        shapes = [(spec, parse_shape(spec)) for spec in args.shapes]
    except ValueError as err:
        parser.error(f"--shapes: {err}")

    backends = [ops.resolve_backend(b) for b in args.backend]
    print(f"device: {timing.describe_device()}; adder backends: {', '.join(backends)}")
    print(f"median of {args.repeats} alternating runs after warm-up\n")
    print("| shape (L x D_in x D_out) | op | pass | ratio to dense | op time (ms) | dense (ms) |")
    print("|---|---|---|---:|---:|---:|")
    dense_fwd = jax.jit(lambda x, w, r: ops.dense(x, w))
    dense_fb = forward_and_backward(ops.dense)
    for spec, (length, d_in, d_out) in shapes:
        kx, kw, kr = jax.random.split(jax.random.key(0), 3)
        inputs = (
            jax.random.normal(kx, (length, d_in)),
            jax.random.normal(kw, (d_in, d_out)),
            jax.random.normal(kr, (length, d_out)),
        )
        rows = []
        if args.naive:
            naive = jax.jit(lambda x, w, r: ops.adder(x, w, backend="naive"))
            rows.append(("naive adder", "forward", naive))
        for backend in backends:
            forward = jax.jit(lambda x, w, r, b=backend: ops.adder(x, w, backend=b))
            rows.append((f"adder {backend}", "forward", forward))
            for grad in args.grad:

                def adder(x, w, grad=grad, backend=backend):
                    return ops.adder(x, w, grad=grad, backend=backend)

                name = f"adder {backend} grad={grad}"
                rows.append((name, "fwd+bwd", forward_and_backward(adder)))
        for name, kind, fn in rows:
            baseline = dense_fwd if kind == "forward" else dense_fb
            ratio, t_op, t_dense = timing.paired_ratio(fn, baseline, inputs, args.repeats)
            print(
                f"| {spec} | {name} | {kind} | {ratio:.2f}x | {1e3 * t_op:.1f} | "
                f"{1e3 * t_dense:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
