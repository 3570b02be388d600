"""The ``addervit`` command.

addervit demo     # the three similarity operations and the adder backward rules on toy tensors
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from addervit_jax import ops


def _timed_ratio(f, baseline, args, repeats=5) -> float:
    """Median of alternating time(f) / time(baseline) after one warm-up call each."""
    jax.block_until_ready(f(*args))
    jax.block_until_ready(baseline(*args))
    ratios = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        t1 = time.perf_counter()
        jax.block_until_ready(baseline(*args))
        ratios.append((t1 - t0) / (time.perf_counter() - t1))
    return statistics.median(ratios)


def demo(args: argparse.Namespace) -> int:
    np.set_printoptions(precision=3, suppress=True)
    device = jax.devices()[0]
    print(f"addervit-jax demo on {device.platform} ({device.device_kind}), jax {jax.__version__}\n")

    x = jnp.array([[0.5, -1.0, 2.0], [0.0, 0.25, -0.5]])
    w = jnp.array([[1.0, 0.0], [0.0, -1.0], [2.0, 0.5]])
    print(f"x (L=2, D_in=3):\n{np.asarray(x)}\nw (D_in=3, D_out=2):\n{np.asarray(w)}\n")
    for name, formula in (
        ("dense", " sum_i x_i * w_id"),
        ("adder", "-sum_i |x_i - w_id|"),
        ("euclid", "-sum_i (x_i - w_id)^2"),
    ):
        print(f"{name:6s} y = {formula:22s} ->\n{np.asarray(getattr(ops, name)(x, w))}")

    print("\ndL/dx of L = sum(adder(x, w)) under each backward rule:")
    for grad in ops.GRAD_RULES:
        dx = jax.grad(lambda x, grad=grad: ops.adder(x, w, grad=grad).sum())(x)
        print(f"  grad={grad!r:11s}\n{np.asarray(dx)}")

    # Check the bounded-memory implementation against the broadcast formula on random data.
    kx, kw = jax.random.split(jax.random.key(args.seed))
    length, d_in, d_out = args.tokens, args.features, 2 * args.features
    xr = jax.random.normal(kx, (length, d_in))
    wr = jax.random.normal(kw, (d_in, d_out))
    broadcast = -jnp.sum(jnp.abs(xr[:, :, None] - wr[None]), axis=1)
    err = float(jnp.linalg.norm(ops.adder(xr, wr) - broadcast) / jnp.linalg.norm(broadcast))
    print(f"\nadder vs broadcast formula at L={length}, {d_in}->{d_out}: relative error {err:.1e}")

    def train_like(op):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(op(x, w) ** 2), argnums=(0, 1)))

    ratio = _timed_ratio(train_like(ops.adder), train_like(ops.dense), (xr, wr))
    print(f"forward+backward time, adder / dense at that shape: {ratio:.1f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="addervit", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p_demo = commands.add_parser("demo", help="the ops and their gradients on toy tensors")
    p_demo.add_argument("--tokens", type=int, default=1024, help="L of the timed example")
    p_demo.add_argument("--features", type=int, default=128, help="D_in of the timed example")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(run=demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
