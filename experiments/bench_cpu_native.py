"""Time the native CPU kernels (kernels/cpu_native.cc) against ops.dense of the same shape.

    python experiments/bench_cpu_native.py                        # ViT-like shapes, every rule
    python experiments/bench_cpu_native.py --shapes 4096x384x1536 --repeats 11 --xla

Rows: the forward kernel against a dense forward, and for each backward rule a forward + backward
(``jax.value_and_grad`` of ``sum(adder(x, w) * r)``) against the same for ``ops.dense``. The
native backward is wired as ``ops.adder``'s custom_vjp wires the Pallas kernels: the dL/dx
kernel, then dL/dw from the dL/dw kernel (``"exact"``) or as ``x^T g - w * sum_l g`` in XLA
(``"addernet"``, ``"clipped"``). ``--xla`` adds the XLA backend of ``ops.adder`` for comparison.

Targets (the issue): forward <= 3x and forward + backward <= 3.5x a dense matmul at L=4096,
384->1536. Single timings on a shared machine swing by 2x, so each run is paired with a dense run
right after it and the table reports the median of the per-pair ratios
(``profile.paired_ratio``) and the median times.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
from jax import lax

from addervit_jax import ops, profile
from addervit_jax.kernels import cpu_native

DEFAULT_SHAPES = ["4096x384x1536", "4096x1536x384", "4096x384x1152", "4096x128x256"]
TARGETS = {"forward": 3.0, "fwd+bwd": 3.5}


def native_adder(grad: str, clip_scale: float = 4.0):
    """``-sum_i |x_i - w_id|`` with the rule ``grad``, from the native kernels (2-D ``x``)."""

    @jax.custom_vjp
    def adder(x, w):
        return cpu_native.forward(x, w)

    def fwd(x, w):
        return adder(x, w), (x, w)

    def bwd(residuals, g):
        x, w = residuals
        dx = cpu_native.x_grad(x, w, g, grad=grad, clip_scale=clip_scale)
        if grad == "exact":
            dw = cpu_native.w_grad_exact(x, w, g)
        else:
            dw = jnp.matmul(x.T, g, precision=lax.Precision.HIGHEST) - w * jnp.sum(g, axis=0)
        return dx.astype(x.dtype), dw.astype(w.dtype)

    adder.defvjp(fwd, bwd)
    return adder


def forward_and_backward(op):
    def loss(x, w, r):
        return jnp.sum(op(x, w) * r)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="LxD_INxD_OUT")
    parser.add_argument("--grad", nargs="+", default=list(ops.GRAD_RULES), choices=ops.GRAD_RULES)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--xla", action="store_true", help="also time ops.adder(backend='xla')")
    args = parser.parse_args(argv)

    if not cpu_native.available():
        raise SystemExit(f"native CPU kernels unavailable: {cpu_native.unavailable_reason}")
    threads = os.environ.get("ADDERVIT_CPU_THREADS", "XLA's pool")
    print(f"device: {profile.describe_device()}; kernel threads: {threads}")
    print(f"median of {args.repeats} alternating runs after warm-up; targets {TARGETS}\n")
    print("| shape (L x D_in x D_out) | op | pass | ratio to dense | op time (ms) | dense (ms) |")
    print("|---|---|---|---:|---:|---:|")
    dense_fwd = jax.jit(lambda x, w, r: ops.dense(x, w))
    dense_fb = forward_and_backward(ops.dense)
    for spec in args.shapes:
        length, d_in, d_out = (int(v) for v in spec.lower().split("x"))
        kx, kw, kr = jax.random.split(jax.random.key(0), 3)
        inputs = (
            jax.random.normal(kx, (length, d_in)),
            jax.random.normal(kw, (d_in, d_out)),
            jax.random.normal(kr, (length, d_out)),
        )
        rows = [("native", "forward", jax.jit(lambda x, w, r: cpu_native.forward(x, w)))]
        if args.xla:
            xla_fwd = jax.jit(lambda x, w, r: ops.adder(x, w, backend="xla"))
            rows.append(("xla", "forward", xla_fwd))
        for grad in args.grad:
            rows.append(
                (f"native grad={grad}", "fwd+bwd", forward_and_backward(native_adder(grad)))
            )
            if args.xla:

                def xla_adder(x, w, grad=grad):
                    return ops.adder(x, w, grad=grad, backend="xla")

                rows.append((f"xla grad={grad}", "fwd+bwd", forward_and_backward(xla_adder)))
        for name, kind, fn in rows:
            baseline = dense_fwd if kind == "forward" else dense_fb
            ratio, t_op, t_dense = profile.paired_ratio(fn, baseline, inputs, args.repeats)
            print(
                f"| {spec} | {name} | {kind} | {ratio:.2f}x | {1e3 * t_op:.1f} | "
                f"{1e3 * t_dense:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
