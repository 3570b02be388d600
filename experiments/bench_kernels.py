"""Time the Pallas adder kernels on a GPU against the FP32 peak and a dense matmul.

    python experiments/bench_kernels.py                  # on a GPU: ViT-like shapes
    python experiments/bench_kernels.py --shapes 4096x384x1536 --repeats 20
    python experiments/bench_kernels.py --interpret --shapes 64x32x32 --repeats 1   # smoke, CPU

Each kernel is timed directly (not through ``ops``, whose custom_vjp would add other work):
after warm-up, the median of ``--repeats`` runs, cycling through ``--rotate`` input sets so no
run finds its operands in the L2 cache of the previous one. A dense matmul with the same number
of terms (``ops.dense`` at the backend's default precision) is timed the same way right after:
the ratio of the medians is the kernel's cost in matmuls.

Achieved throughput is in L1 terms per second: a term ``|u - w|`` accumulated costs two FP32
CUDA-core instructions (a subtract, then an add with the absolute-value modifier), against one
fused multiply-add for a matmul term, so the FP32 CUDA-core peak for these kernels is
``cores x clock / 2`` terms/s (a matmul runs on tensor cores, which these kernels cannot use).
The peak comes from :data:`FP32_CORES` (or ``--cores`` and ``--clock-ghz`` for a GPU not
listed).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from addervit_jax import cli, ops, timing
from addervit_jax.kernels import adder_pallas
from addervit_jax.shapes import parse_shape

DEFAULT_SHAPES = ["4096x384x1536", "4096x1536x384", "4096x384x1152", "4160x128x256"]

# FP32 CUDA cores and boost clock (GHz) from NVIDIA's product specifications, matched against
# jax's device_kind. Instructions per second = cores x clock.
FP32_CORES = {
    "H200": (16896, 1.98),
    "H100 80GB HBM3": (16896, 1.98),  # SXM5
    "H100 PCIe": (14592, 1.755),
    "H100": (16896, 1.98),
    "A100": (6912, 1.41),
    "L40S": (18176, 2.52),
    "L4": (7424, 2.04),
    "RTX 4090": (16384, 2.52),
    "A10": (9216, 1.695),
    "V100": (5120, 1.53),
    "T4": (2560, 1.59),
}


def fp32_peak(device, cores: int | None, clock_ghz: float | None) -> tuple[float, str] | None:
    """FP32 CUDA-core instructions per second of ``device`` and where the figure comes from."""
    if cores and clock_ghz:
        return cores * clock_ghz * 1e9, f"{cores} cores x {clock_ghz} GHz (given)"
    for name, (n, ghz) in FP32_CORES.items():
        if name.lower() in device.device_kind.lower():
            return n * ghz * 1e9, f"{n} FP32 cores x {ghz} GHz ({name} specification)"
    return None


def median_time(fn, inputs: list[tuple], repeats: int) -> float:
    for args in inputs:  # compile and warm up on every input set
        jax.block_until_ready(fn(*args))
    times = []
    for r in range(repeats):
        args = inputs[r % len(inputs)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="LxD_INxD_OUT")
    parser.add_argument("--repeats", type=cli.int_at_least(1), default=20)
    parser.add_argument(
        "--rotate", type=cli.int_at_least(1), default=3, help="input sets cycled through"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--interpret", action="store_true", help="CPU smoke run (no timing value)")
    parser.add_argument(
        "--cores", type=cli.int_at_least(1), default=None, help="FP32 cores, if not listed"
    )
    parser.add_argument("--clock-ghz", type=float, default=None)
    args = parser.parse_args(argv)
    try:
        shapes = [(spec, parse_shape(spec)) for spec in args.shapes]
    except ValueError as err:
        parser.error(f"--shapes: {err}")

    device = jax.devices()[0]
    if device.platform != "gpu" and not args.interpret:
        raise SystemExit(
            f"bench_kernels: no GPU here ({timing.describe_device()}); the Pallas kernels "
            "are GPU kernels. Pass --interpret for a smoke run of the script on CPU."
        )
    peak = fp32_peak(device, args.cores, args.clock_ghz)
    dtype = jnp.dtype(args.dtype)
    print(f"device: {timing.describe_device()}, {dtype.name} inputs")
    if peak:
        print(f"FP32 CUDA-core peak: {peak[0] / 1e12:.1f} T instr/s, {peak[1]}; an L1 term is 2")
    print(f"median of {args.repeats} runs over {args.rotate} rotating input sets, after warm-up\n")
    print(
        "| shape (L x D_in x D_out) | kernel | time (ms) | G terms/s | % of FP32 peak | "
        "dense matmul (ms) | ratio to dense |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    kernel_args = {"interpret": args.interpret}
    for spec, (length, d_in, d_out) in shapes:
        inputs = []
        for r in range(args.rotate):
            kx, kw, ke, kg = jax.random.split(jax.random.key(r), 4)
            inputs.append(
                (
                    jax.random.normal(kx, (length, d_in), dtype),
                    jax.random.normal(kw, (d_in, d_out), dtype),
                    jax.random.uniform(ke, (d_in,), dtype, 0.5, 1.5),
                    jax.random.normal(kg, (length, d_out), dtype),
                )
            )
        # each kernel, and the matmul that has the same terms (output x reduction)
        rows = [
            (
                "forward",
                lambda x, w, e, g: adder_pallas.forward(x, w, e, **kernel_args),
                lambda x, w, e, g: ops.dense(x, w),
            )
        ]
        for grad in ops.GRAD_RULES:
            fn = functools.partial(adder_pallas.x_grad, grad=grad, **kernel_args)
            rows.append(
                (
                    f"dL/dx {grad}",
                    lambda x, w, e, g, fn=fn: fn(x, w, g, e),
                    lambda x, w, e, g: ops.dense(g, w.T),
                )
            )
        rows.append(
            (
                "dL/dw exact",
                lambda x, w, e, g: adder_pallas.w_grad_exact(x, w, g, e, **kernel_args),
                lambda x, w, e, g: ops.dense(x.T, g),
            )
        )
        terms = length * d_in * d_out
        for name, kernel, dense in rows:
            t_kernel = median_time(jax.jit(kernel), inputs, args.repeats)
            t_dense = median_time(jax.jit(dense), inputs, args.repeats)
            rate = terms / t_kernel
            share = f"{100 * rate * 2 / peak[0]:.0f}" if peak else "n/a"
            print(
                f"| {spec} | {name} | {1e3 * t_kernel:.3f} | {rate / 1e9:.0f} | {share} | "
                f"{1e3 * t_dense:.3f} | {t_kernel / t_dense:.1f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
