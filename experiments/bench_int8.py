"""int8 adder inference against float: the SAD op against matmuls, and whole models.

    python experiments/bench_int8.py                     # op shapes and CIFAR SimpleViT, batch 256
    python experiments/bench_int8.py --out experiments/results/int8

Op: ``ops.adder_int8`` on uint8 codes (the native PSADBW kernel on a CPU) against a float32
matmul (``ops.dense``, what a ``multi`` site runs) and an int8 matmul with int32 accumulation
(``jnp.matmul`` of int8 operands, ``preferred_element_type=int32``: what XLA does with integer
products) of the same shape. Models: inference (jitted forward, batch 256) of the int8 forms
(``models.quantize``) of ``qkv_2ffn`` and ``all_adder`` (L1 scores with the identity mapping),
and of their float forms, each against float ``multi`` of the same size. Every timing is the
median of alternating pairs after warm-up (``timing.paired_ratio``), in one process.
Weights are random (speed does not depend on them); the codes of the op are uniform.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from addervit_jax import models, ops, reports, timing
from addervit_jax.shapes import parse_shape

# (L, D_in, D_out): a ViT-S MLP on 4,096 tokens (the shape) and the sites of the CIFAR
# SimpleViT (dim 128, MLP 256) on a batch of 256 images of 64 patches.
OP_SHAPES = ["4096x384x1536", "4096x1536x384", "16384x128x128", "16384x128x256", "16384x256x128"]
CIFAR = {"patch_size": 4, "dim": 128, "depth": 4, "heads": 4, "dim_head": 32, "mlp_dim": 256}
MODELS = [("qkv_2ffn", {}), ("all_adder", {"attn": "l1_identity"})]


def bench_ops(shapes, repeats) -> list[dict]:
    rows = []
    sad = jax.jit(lambda qx, qw, x, w, xi, wi: ops.adder_int8(qx, qw))
    f32 = jax.jit(lambda qx, qw, x, w, xi, wi: ops.dense(x, w))
    i8 = jax.jit(lambda qx, qw, x, w, xi, wi: jnp.matmul(xi, wi, preferred_element_type=jnp.int32))
    for spec in shapes:
        length, d_in, d_out = parse_shape(spec)
        rng = np.random.default_rng(0)
        args = (
            rng.integers(0, 256, (length, d_in), np.uint8),
            rng.integers(0, 256, (d_in, d_out), np.uint8),
            rng.normal(size=(length, d_in)).astype(np.float32),
            rng.normal(size=(d_in, d_out)).astype(np.float32),
            rng.integers(-128, 128, (length, d_in), np.int8),
            rng.integers(-128, 128, (d_in, d_out), np.int8),
        )
        args = tuple(jnp.asarray(a) for a in args)
        to_f32, t_sad, t_f32 = timing.paired_ratio(sad, f32, args, repeats)
        to_i8, _, t_i8 = timing.paired_ratio(sad, i8, args, repeats)
        rows.append(
            {
                "shape": spec,
                "sad_ms": 1e3 * t_sad,
                "f32_matmul_ms": 1e3 * t_f32,
                "int8_matmul_ms": 1e3 * t_i8,
                "sad_over_f32": to_f32,
                "sad_over_int8": to_i8,
                "sad_terms_per_ns": length * d_in * d_out / t_sad * 1e-9,
            }
        )
        print(rows[-1], flush=True)
    return rows


def _forward(model):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))
    return lambda images: fn(state, images)


def bench_models(batch, repeats) -> list[dict]:
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)).astype(np.float32))
    calibration = [rng.normal(size=(64, 32, 32, 3)).astype(np.float32)]
    multi = _forward(models.build("multi", rngs=nnx.Rngs(0), **CIFAR))
    rows = []
    for variant, overrides in MODELS:
        model = models.build(variant, rngs=nnx.Rngs(0), **CIFAR, **overrides)
        for form, fn in (
            ("float", _forward(model)),
            ("int8", _forward(models.quantize(model, calibration))),
        ):
            ratio, t, t_multi = timing.paired_ratio(fn, multi, (images,), repeats)
            rows.append(
                {
                    "model": variant + ("" if not overrides else f" ({overrides['attn']})"),
                    "form": form,
                    "ms": 1e3 * t,
                    "multi_float_ms": 1e3 * t_multi,
                    "over_multi": ratio,
                }
            )
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=OP_SHAPES, help="LxD_INxD_OUT")
    parser.add_argument("--batch", type=int, default=256, help="images per model forward")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--out", default=None, help="directory for results.json and table.md")
    args = parser.parse_args(argv)
    for spec in args.shapes:
        try:
            parse_shape(spec)
        except ValueError as err:
            parser.error(f"--shapes: {err}")

    command = reports.command_line("bench_int8.py", argv)
    device, date = timing.describe_device(), reports.today()
    print(f"device: {device}; SAD path: {_sad_path()}")
    op_rows = bench_ops(args.shapes, args.repeats)
    model_rows = [] if args.skip_models else bench_models(args.batch, args.repeats)
    lines = [
        "# int8 adder inference against float",
        "",
        *reports.header_lines(command, f"{device}; SAD kernel path: {_sad_path()}", date=date),
        f"- timing: medians of {args.repeats} alternating pairs after warm-up, one process",
        "",
        "| shape (L x D_in x D_out) | int8 SAD (ms) | f32 matmul (ms) | int8 matmul (ms) "
        "| SAD / f32 | SAD / int8 | SAD terms per ns |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in op_rows:
        lines.append(
            f"| {r['shape']} | {r['sad_ms']:.2f} | {r['f32_matmul_ms']:.2f} | "
            f"{r['int8_matmul_ms']:.2f} | {r['sad_over_f32']:.2f} | {r['sad_over_int8']:.2f} | "
            f"{r['sad_terms_per_ns']:.0f} |"
        )
    if model_rows:
        lines += [
            "",
            f"SimpleViT (CIFAR size, {CIFAR}) inference, batch {args.batch}:",
            "",
            "| model | form | time (ms) | float multi (ms) | time / float multi |",
            "|---|---|---:|---:|---:|",
        ]
        for r in model_rows:
            lines.append(
                f"| {r['model']} | {r['form']} | {r['ms']:.1f} | {r['multi_float_ms']:.1f} | "
                f"{r['over_multi']:.2f} |"
            )
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": command,
            "device": device,
            "date": date,
            "sad_path": _sad_path(),
            "ops": op_rows,
            "models": model_rows,
        }
        (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
        (out / "table.md").write_text(table + "\n")


def _sad_path() -> str:
    if ops.resolve_backend("auto") != "cpu_native":
        return "xla (no native kernel here)"
    from addervit_jax.kernels import cpu_native

    return cpu_native.sad_path()


if __name__ == "__main__":
    main()
