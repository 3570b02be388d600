"""int8 inference against float: the SAD op and the int8 products against matmuls, and models.

    python experiments/bench_int8.py                     # op shapes and CIFAR SimpleViT, batch 256
    python experiments/bench_int8.py --out experiments/results/int8

Ops, each against a float32 matmul (``ops.dense``, what a float ``multi`` site runs) of the same
``L x D_in x D_out``: ``int8 product (XLA)`` and ``int8 product (oneDNN)``, the int8 multi and
ternary sites' product ``ops.int8_matmul`` from float activations (their per-token coding
included) on the XLA and the native backend (the latter where this build has oneDNN); ``int8
SAD``, ``ops.adder_int8`` on uint8 codes made beforehand (the native PSADBW kernel on a CPU).
The peer, PyTorch's ``torch._int_mm`` on codes made beforehand, runs in its own process where
torch is installed (the ``bench`` extra; ``--no-peer`` skips it).

Models: inference (jitted forward, batch 256, and batch 1: ``--latency-batch``) of the float
and int8 forms (``models.quantize``, every kind: adder sites on SAD, multi sites as int8 matmuls,
ternary sites on int8 codes; a model with sites that have no int8 form, such as shift sites, is
timed in float only) of every model of the CIFAR-10 studies (``MODELS``), each against float
``multi`` of the same size (float ``multi`` against itself: the noise of the pairs); the studies'
reports read these rows (``study.inference_ratios``). Where the time of ``PROFILED`` goes, float
and int8: ``profile_model``. Every timing is the median of alternating
pairs after warm-up (``timing.paired_ratio``), in one process. Weights and calibration images are
random (speed does not depend on them). The header names the CPU's instruction sets for int8 sums
(``/proc/cpuinfo``) and the kernels XLA compiled the matmuls to.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import pathlib
import platform
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from addervit_jax import cli, configs, layers, models, ops, reports, timing
from addervit_jax.models import sites as sites_of
from addervit_jax.models.blocks import Attention
from addervit_jax.shapes import parse_shape

# (L, D_in, D_out): a ViT-S MLP on 4,096 tokens (the shape) and the sites of the CIFAR
# SimpleViT (dim 128, MLP 256) on a batch of 256 images of 64 patches.
OP_SHAPES = ["4096x384x1536", "4096x1536x384", "16384x128x128", "16384x128x256", "16384x256x128"]
CIFAR = {"patch_size": 4, "dim": 128, "depth": 4, "heads": 4, "dim_head": 32, "mlp_dim": 256}
# every model of the CIFAR-10 studies' tables (their reports read these rows by model graph)
MODELS = [
    ("multi", {}),
    ("multi_ln", {}),
    ("qkv_2ffn", {}),
    ("qkv_2ffn", {"norm": "batch"}),
    ("qkv_2ffn_ternary", {}),
    ("qkv_2ffn_shift", {}),
    ("all_adder", {"attn": "l1_identity"}),
]
# each timed against the float32 matmul; the oneDNN product only where this build has it
OPS = ("int8 product (XLA)", "int8 product (oneDNN)", "int8 SAD")

# The /proc/cpuinfo flags that decide which int8 sums have hardware: x86 PSADBW (SSE2, AVX2,
# AVX-512BW) for the absolute differences; VNNI's VPDPBUSD (AVX-512 or AVX) and AMX's tile
# products for the int8 products summed in int32; on Arm, SDOT (asimddp), SMMLA (i8mm), SVE.
INSTRUCTION_SETS = {
    "flags": ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"),
    "Features": ("asimddp", "i8mm", "sve"),
}


def int8_product(backend: str):
    """The int8 multi and ternary sites' product with its activation coding, as they call it:
    ``ops.int8_matmul`` on float activations and int8 weights, on ``backend``."""
    return jax.jit(functools.partial(ops.int8_matmul, backend=backend))


def bench_ops(shapes, repeats) -> list[dict]:
    rows = []
    sad, f32 = jax.jit(ops.adder_int8), jax.jit(ops.dense)
    names = [n for n in OPS if n != "int8 product (oneDNN)" or _int8_matmul_path() == "onednn"]
    for spec in shapes:
        length, d_in, d_out = parse_shape(spec)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(length, d_in)).astype(np.float32))
        w = jnp.asarray(rng.normal(size=(d_in, d_out)).astype(np.float32))
        qx = jnp.asarray(rng.integers(0, 256, (length, d_in), np.uint8))
        qw = jnp.asarray(rng.integers(0, 256, (d_in, d_out), np.uint8))
        # the weights as Int8DenseMulti makes them (a ternary site's are int8 too, in {-1, 0, 1})
        w8 = models.Int8DenseMulti(layers.Dense(d_in, d_out, rngs=nnx.Rngs(0))).integer_weights()
        calls = {
            "f32 matmul": functools.partial(f32, x, w),
            "int8 SAD": functools.partial(sad, qx, qw),
            "int8 product (XLA)": functools.partial(int8_product("xla"), x, w8),
            "int8 product (oneDNN)": functools.partial(int8_product("cpu_native"), x, w8),
        }
        against_f32 = {}
        for name in names:
            ratio, t, t_f32 = timing.paired_ratio(calls[name], calls["f32 matmul"], (), repeats)
            against_f32[name] = {
                "ms": 1e3 * t,
                "f32_matmul_ms": 1e3 * t_f32,
                "over_f32": ratio,
                "terms_per_ns": length * d_in * d_out / t * 1e-9,
            }
        rows.append(
            {
                "shape": spec,
                "against_f32": against_f32,
                "xla_kernels": {
                    "f32 matmul": _xla_kernel(f32, x, w),
                    "int8 product (XLA)": _xla_kernel(int8_product("xla"), x, w8),
                },
            }
        )
        print(rows[-1], flush=True)
    return rows


def torch_int_mm(shapes, repeats) -> list[dict]:
    """The peer: PyTorch's int8 GEMM (``torch._int_mm``, int8 x int8 -> int32; oneDNN on x86)
    at ``shapes``, median of ``repeats`` after warm-up, on codes made beforehand (no coding).
    Run in its own process (``--peer``), so that its threads never share this one's."""
    import time

    import torch

    rows = []
    for spec in shapes:
        length, d_in, d_out = parse_shape(spec)
        a = torch.randint(-127, 128, (length, d_in), dtype=torch.int8)
        b = torch.randint(-128, 128, (d_in, d_out), dtype=torch.int8)
        torch._int_mm(a, b)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch._int_mm(a, b)
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        rate = length * d_in * d_out / t * 1e-9
        rows.append({"shape": spec, "ms": 1e3 * t, "terms_per_ns": rate})
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "ops": rows}


def peer_rows(shapes, repeats) -> dict | None:
    """:func:`torch_int_mm` in a subprocess of this script; None where PyTorch is not installed
    (it is an optional peer, never a dependency: ``pip install torch``)."""
    if importlib.util.find_spec("torch") is None:
        return None
    command = [sys.executable, __file__, "--peer-only", "--repeats", str(repeats), "--shapes"]
    out = subprocess.run(command + list(shapes), capture_output=True, text=True)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):  # a broken torch must not cost the timings already made
        warnings.warn(f"the torch._int_mm peer failed: {out.stderr[-500:]}", stacklevel=2)
        return None


def _forward(model):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))
    return lambda images: fn(state, images)


def model_bytes(model) -> dict:
    """The bytes of ``model``'s variables in memory (every array of its ``nnx.state``: weights or
    their codes, scales, norms) and saved (``flax.serialization.msgpack_serialize`` of that state,
    as ``params.msgpack`` is written)."""
    from flax import serialization

    state = nnx.state(model).to_pure_dict()
    memory = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))
    return {"memory_bytes": int(memory), "saved_bytes": len(serialization.msgpack_serialize(state))}


def bench_models(batch, repeats, size) -> list[dict]:
    rng = np.random.default_rng(0)
    side = size.get("image_size", 32)
    images = jnp.asarray(rng.normal(size=(batch, side, side, 3)).astype(np.float32))
    calibration = [rng.normal(size=(64, side, side, 3)).astype(np.float32)]
    multi = _forward(models.build("multi", rngs=nnx.Rngs(0), **size))
    rows = []
    for variant, overrides in MODELS:
        model = models.build(variant, rngs=nnx.Rngs(0), **size, **overrides)
        forms = [("float", model)]
        if not any(kind in models.NO_INT8_FORM for _, kind in models.float_sites(model)):
            with warnings.catch_warnings():  # quantize names the sites that stay float: recorded
                warnings.simplefilter("ignore", UserWarning)
                forms.append(("int8", models.quantize(model, calibration)))
        for form, m in forms:
            fn = multi if (variant, form) == ("multi", "float") else _forward(m)
            ratio, t, t_multi = timing.paired_ratio(fn, multi, (images,), repeats)
            rows.append(
                {
                    "model": variant + "".join(f", {k}={v}" for k, v in overrides.items()),
                    "variant": variant,
                    "build": {**size, **overrides},
                    "form": form,
                    "ms": 1e3 * t,
                    "multi_float_ms": 1e3 * t_multi,
                    "over_multi": ratio,
                    "float_sites": sorted({kind for _, kind in models.float_sites(m)}),
                    **model_bytes(m),
                }
            )
            print(rows[-1], flush=True)
    return rows


# the models whose int8 form has the 0.5x target: where their time goes
PROFILED = ("multi", "qkv_2ffn", "qkv_2ffn_ternary")


def _jitted_calls(calls):
    """One jitted function of no arguments that runs every ``(fn, args)`` of ``calls``."""
    fns, args = zip(*calls, strict=True)
    jitted = jax.jit(lambda args: [fn(*a) for fn, a in zip(fns, args, strict=True)])
    return lambda: jitted(args)


def _module_call(module, method: str = "__call__"):
    """``(fn, state)``: a pure function ``fn(state, *args)`` of ``module``'s ``method``."""
    graphdef, state = nnx.split(module)
    return lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args), state


def profile_model(model, images, repeats: int) -> dict:
    """Where ``model``'s forward on ``images`` spends its time: the share of the whole jitted
    forward taken by each part, every part one jitted call timed in alternating pairs with the
    whole forward (``timing.paired_ratio``: the median ratio), so that the machine's drift
    cancels. Parts: every linear site on the inputs it receives in that forward (int8 sites:
    also ``ops.int8_matmul`` alone, the activations' coding and the int8 product, which the
    sites' time includes); every attention block's scores, softmax and weighted values
    (``Attention.attend``) on the q, k, v of that forward; the rest is the whole less the sites
    and the attention (norms, GELU, residuals, head reshapes, patch extraction, pooling), so it
    also absorbs what the parts lose or gain by running apart."""
    types = sites_of.LINEAR_SITES + models.INT8_SITES
    site_paths = [path for path, _ in sites_of.linear_sites(model, types)]
    attention_paths = [path for path, m in nnx.iter_modules(model) if isinstance(m, Attention)]
    inputs, _ = sites_of.record_inputs(model, site_paths, [images])  # nested: two passes
    inputs.update(sites_of.record_inputs(model, attention_paths, [images])[0])
    sites, products, attention = [], [], []
    for path in site_paths:
        module, x = sites_of.module_at(model, path), jnp.asarray(inputs[path])
        fn, state = _module_call(module)
        sites.append((fn, (state, x)))
        if isinstance(module, models.Int8DenseMulti | models.Int8Ternary):
            product = functools.partial(ops.int8_matmul, backend=module.backend)
            products.append((product, (x, module.integer_weights())))
    for path in attention_paths:
        module = sites_of.module_at(model, path)
        x = jnp.asarray(inputs[path]).reshape(images.shape[0], -1, inputs[path].shape[-1])
        q, k, v = (
            f(x).reshape(*x.shape[:2], module.heads, -1).transpose(0, 2, 1, 3)
            for f in (module.to_q, module.to_k, module.to_v)
        )
        fn, state = _module_call(module, "attend")
        attention.append((fn, (state, q, k, v)))
    whole = _forward(model)
    row = {}
    for name, calls in (
        ("linear_sites", sites),
        ("attention", attention),
        ("int8_products", products),
    ):
        if not calls:
            row[f"{name}_share"] = row[f"{name}_ms"] = 0.0
            continue
        share, t, t_whole = timing.paired_ratio(
            _jitted_calls(calls), lambda: whole(images), (), repeats
        )
        row[f"{name}_share"], row[f"{name}_ms"] = share, 1e3 * t
        row.setdefault("whole_ms", 1e3 * t_whole)
    row["rest_share"] = 1.0 - row["linear_sites_share"] - row["attention_share"]
    row["rest_ms"] = row["rest_share"] * row["whole_ms"]
    return row


def bench_profiles(batch, repeats, size) -> list[dict]:
    """:func:`profile_model` of the float and int8 forms of each of ``PROFILED``."""
    rng = np.random.default_rng(0)
    side = size.get("image_size", 32)
    images = jnp.asarray(rng.normal(size=(batch, side, side, 3)).astype(np.float32))
    calibration = [rng.normal(size=(64, side, side, 3)).astype(np.float32)]
    rows = []
    for variant in PROFILED:
        model = models.build(variant, rngs=nnx.Rngs(0), **size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            quantized = models.quantize(model, calibration)
        for form, m in (("float", model), ("int8", quantized)):
            rows.append({"model": variant, "form": form, **profile_model(m, images, repeats)})
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=OP_SHAPES, help="LxD_INxD_OUT")
    parser.add_argument(
        "--batch", type=cli.int_at_least(1), default=256, help="images per model forward"
    )
    parser.add_argument(
        "--latency-batch",
        type=cli.int_at_least(0),
        default=1,
        help="images per forward of the latency rows (0: none)",
    )
    parser.add_argument("--repeats", type=cli.int_at_least(1), default=9)
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument(
        "--no-peer",
        action="store_true",
        help="skip PyTorch's torch._int_mm (timed in a subprocess where torch is installed)",
    )
    parser.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="SimpleViT config overrides of the CIFAR size, e.g. dim=16 depth=1 image_size=8",
    )
    parser.add_argument("--out", default=None, help="directory for results.json and table.md")
    args = parser.parse_args(argv)
    for spec in args.shapes:
        try:
            parse_shape(spec)
        except ValueError as err:
            parser.error(f"--shapes: {err}")
    if args.peer_only:  # the subprocess of peer_rows: its JSON on the last line
        print(json.dumps(torch_int_mm(args.shapes, args.repeats)))
        return
    try:
        size = {**CIFAR, **configs.parse_overrides(args.set)}
        models.config("multi", **size)
    except (ValueError, TypeError) as err:
        parser.error(f"--set {' '.join(args.set)}: {err}")
    if args.out is not None:
        problem = reports.unwritable(args.out)
        if problem:  # before the timings, not after them
            parser.error(f"--out {args.out}: {problem}")
        if args.skip_models and _model_rows(pathlib.Path(args.out) / "results.json"):
            parser.error(
                f"--skip-models would replace the model timings in {args.out}/results.json, which "
                "the studies' reports read, with none; write to another --out"
            )

    command = reports.command_line("bench_int8.py", argv)
    device, date, cpu = timing.describe_device(), reports.today(), cpu_instruction_sets()
    print(f"device: {device}; SAD path: {_sad_path()}; {_describe_sets(cpu)}")
    op_rows = bench_ops(args.shapes, args.repeats)
    peer = None if args.no_peer else peer_rows(args.shapes, args.repeats)
    model_rows = [] if args.skip_models else bench_models(args.batch, args.repeats, size)
    profile_rows = [] if args.skip_models else bench_profiles(args.batch, args.repeats, size)
    latency_rows = (
        []
        if args.skip_models or not args.latency_batch
        else bench_models(args.latency_batch, args.repeats, size)
    )
    kernels = {
        name: ", ".join(sorted({r["xla_kernels"][name] for r in op_rows}))
        for name in ("f32 matmul", "int8 product (XLA)")
    }
    names = list(op_rows[0]["against_f32"])
    peer_line = (
        f"PyTorch {peer['torch']}'s `torch._int_mm` ({peer['threads']} threads, its own process, "
        "codes made beforehand)"
        if peer
        else "not timed (PyTorch not installed, or --no-peer)"
    )
    lines = [
        "# int8 inference against float: int8 products, SAD, models",
        "",
        *reports.header_lines(command, f"{device}; SAD kernel path: {_sad_path()}", date=date),
        f"- CPU instruction sets for int8 sums (/proc/cpuinfo): {_describe_sets(cpu)}",
        f"- XLA's kernels: f32 matmul {kernels['f32 matmul']}; int8 product "
        f"{kernels['int8 product (XLA)']}; native int8 product: {_int8_matmul_path() or 'none'}",
        f"- peer: {peer_line}",
        f"- timing: medians of {args.repeats} alternating pairs after warm-up, one process",
        "",
        "Multiply-adds (SAD: terms) per ns, each op with what it needs of its inputs' coding (the "
        "int8 products: `ops.int8_matmul` from float activations, per-token codes included; SAD: "
        "`ops.adder_int8` on codes made beforehand):",
        "",
        "| shape (L x D_in x D_out) | f32 matmul | "
        + " | ".join(names)
        + (" | torch._int_mm |" if peer else " |"),
        "|---|---:|" + "---:|" * (len(names) + bool(peer)),
    ]
    for i, r in enumerate(op_rows):
        length, d_in, d_out = parse_shape(r["shape"])
        f32_rate = length * d_in * d_out / r["against_f32"][names[0]]["f32_matmul_ms"] * 1e-6
        cells = [f"{f32_rate:.0f}"] + [f"{r['against_f32'][n]['terms_per_ns']:.0f}" for n in names]
        if peer:
            cells.append(f"{peer['ops'][i]['terms_per_ns']:.0f}")
        lines.append(f"| {r['shape']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each int8 op against the float32 matmul of its shape, timed in pairs:",
        "",
        "| shape (L x D_in x D_out) | op | time (ms) | f32 matmul (ms) | time / f32 "
        "| terms per ns |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in op_rows:
        for name, p in r["against_f32"].items():
            lines.append(
                f"| {r['shape']} | {name} | {p['ms']:.2f} | {p['f32_matmul_ms']:.2f} | "
                f"{p['over_f32']:.2f} | {p['terms_per_ns']:.0f} |"
            )
    if model_rows:
        lines += [
            "",
            f"SimpleViT ({size}) inference, batch {args.batch}; int8: `models.quantize`, every "
            "kind (adder sites on SAD, multi sites int8 matmuls, ternary sites int8 codes; shift "
            "sites have none: float only); "
            "float multi against itself gives the noise of the pairs:",
            "",
            "| model | form | time (ms) | float multi (ms) | time / float multi | memory (kB) "
            "| saved (kB) |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in model_rows:
            lines.append(
                f"| {r['model']} | {r['form']} | {r['ms']:.1f} | {r['multi_float_ms']:.1f} | "
                f"{r['over_multi']:.2f} | {r['memory_bytes'] / 1e3:.0f} | "
                f"{r['saved_bytes'] / 1e3:.0f} |"
            )
        if latency_rows:
            lines += [
                "",
                f"Latency, batch {args.latency_batch} (the same models and pairs):",
                "",
                "| model | form | time (ms) | float multi (ms) | time / float multi |",
                "|---|---|---:|---:|---:|",
            ]
            for r in latency_rows:
                lines.append(
                    f"| {r['model']} | {r['form']} | {r['ms']:.2f} | {r['multi_float_ms']:.2f} "
                    f"| {r['over_multi']:.2f} |"
                )
        lines += [
            "",
            f"Where the time goes, batch {args.batch} (`profile_model`: each part one jitted call "
            "timed in pairs with the whole forward, its share the median ratio: every linear "
            "site on its inputs in that forward, the int8 product op (coding + product) within "
            "them; the attention scores, softmax and weighted values (`Attention.attend`); the "
            "rest = whole - both: norms, GELU, residuals, patches, pooling):",
            "",
            "| model | form | whole (ms) | linear sites (ms, share) | int8 product op (ms, share) "
            "| attention (ms, share) | rest (ms, share) |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in profile_rows:
            cells = [
                f"{r[f'{k}_ms']:.1f} ({r[f'{k}_share']:.0%})"
                for k in ("linear_sites", "int8_products", "attention", "rest")
            ]
            lines.append(
                f"| {r['model']} | {r['form']} | {r['whole_ms']:.1f} | " + " | ".join(cells) + " |"
            )
        stay = sorted({k for r in model_rows if r["form"] == "int8" for k in r["float_sites"]})
        lines += ["", f"Sites that stay float in the int8 forms: {', '.join(stay) or 'none'}."]
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
            "int8_matmul_path": _int8_matmul_path(),
            "peer": peer,
            "cpu_instruction_sets": cpu,
            "xla_kernels": kernels,
            "model_size": size,
            "batch": args.batch,
            "ops": op_rows,
            "models": model_rows,
            "latency_batch": args.latency_batch,
            "latency": latency_rows,
            "profile": profile_rows,
        }
        (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
        (out / "table.md").write_text(table + "\n")


def _model_rows(path: pathlib.Path) -> list:
    """The model timings of an earlier ``results.json``; none where there is no readable one."""
    try:
        return json.loads(path.read_text()).get("models", [])
    except (OSError, ValueError, AttributeError):
        return []


def cpu_instruction_sets(cpuinfo: str | None = None) -> dict[str, bool]:
    """Which of ``INSTRUCTION_SETS`` this CPU has, from the first of its lines in the first
    processor's block of ``/proc/cpuinfo`` (``cpuinfo``: that file's text; read when None; see
    :func:`timing.cpuinfo_fields`); ``{}`` where it has none of the lines, e.g. not Linux."""
    fields = timing.cpuinfo_fields(cpuinfo)
    for key, names in INSTRUCTION_SETS.items():
        if key in fields:
            have = set(fields[key].split())
            return {name: name in have for name in names}
    return {}


def _describe_sets(cpu: dict[str, bool]) -> str:
    if not cpu:
        return f"unknown ({platform.machine()}, no /proc/cpuinfo flags)"
    return ", ".join(f"{name} {'yes' if have else 'no'}" for name, have in cpu.items())


def _xla_kernel(fn, *args) -> str:
    """What XLA compiled ``fn`` to on this machine: the kind of its custom fusion (e.g.
    ``__ynn_fusion``, the YNNPACK library), or its custom call target, else ``XLA dot``."""
    text = fn.lower(*args).compile().as_text()
    found = re.search(r'"kind":"(__\w+)"', text) or re.search(r'custom_call_target="([^"]+)"', text)
    return found.group(1) if found else "XLA dot"


def _int8_matmul_path() -> str | None:
    if ops.resolve_backend("auto") != "cpu_native":
        return None
    from addervit_jax.kernels import cpu_native

    return cpu_native.int8_matmul_path()


def _sad_path() -> str:
    if ops.resolve_backend("auto") != "cpu_native":
        return "xla (no native kernel here)"
    from addervit_jax.kernels import cpu_native

    return cpu_native.sad_path()


if __name__ == "__main__":
    main()
