"""The speed table: train step, inference and training memory of Multi, naive Adder and this
project's Adder, relative to Multi, for the SimpleViT.

    python experiments/speed_table.py                        # batch 64 of 32x32x3, study's model
    python experiments/speed_table.py --memory-limit-gib 16  # the original's 16 GiB GPU, on any
                                                             # machine: rows needing more are OOM
    python experiments/speed_table.py --batch 4 --steps 2 --dim 32 --depth 1   # smoke test

Rows: ``multi``; "naive adder", the ``--variant`` model (``qkv_2ffn``: adder q/k/v and both FFN
layers) with ``ops.adder(..., backend="naive")``, the broadcast formula
``-sum(|x[..., :, None] - w|, axis=-2)`` differentiated by plain autodiff, which is what the
original code called "Adder" (it materialises the ``(L, D_in, D_out)`` difference tensor); and
"adder <backend>", the same model with this project's op, for every backend that runs on the
device (``xla`` everywhere, ``pallas`` on a GPU, the others when they are available); a
``--variant`` without adder sites (``qkv_2ffn_ternary``, ...) is one row instead. Beside them, a
row for each other arm of the CIFAR-10 studies (``ARMS``: ``multi_ln``, ``qkv_2ffn`` with
``norm=batch``, the ternary and the power-of-two sites; ``--arms`` chooses).

A train step is the trainer's own jitted step (``train.jit_train_step``, what ``addervit train``
runs): the recipe's augmentation (``--config``, default ``cifar10``: random crop and flip), the
cross-entropy, and its whole optimiser chain (gradient clipping, AdderNet's adaptive learning rate
on adder weights, AdamW), on a batch of ``--batch`` random uint8 images, the state donated and fed
back as in training; inference is the trainer's jitted eval step (normalisation and the forward
pass; the models have no dropout or batch statistics). One process; each step is compiled once,
then ``--warmup`` calls of it and of Multi's step, then ``--steps`` alternating timed calls of the
row's step and Multi's step: "vs multi" is the median of the per-pair ratios (robust on a shared
machine, as in ``timing.paired_ratio``), the times are medians (Multi's over all its pairs).

Memory: "compiled" is the train step's ``memory_analysis()`` after compilation, arguments
(params, optimiser state, batch) + outputs + temporaries - aliased bytes: what the step needs on
the device. "device peak" is ``peak_bytes_in_use`` of the device's ``memory_stats()`` after the
row ran, where the runtime reports it (GPUs; "n/a" on CPU); it is the process's running maximum,
so rows run in the order multi, adder backends, naive adder, and each peak is an upper bound
that includes the rows run before it.

OOM: a row whose compiled train (or inference) step needs more than ``--memory-limit-gib`` is
not run and reads "OOM", and so does one that fails with ``RESOURCE_EXHAUSTED`` while compiling
or running. ``--memory-limit-gib 16`` reproduces the original's OOM on a 16 GiB GPU on any
machine. On a CPU the limit defaults to half the physical memory, because running out of host
memory kills the process instead of raising an error.

Writes ``speed_table.md`` and ``speed_table.json`` under ``--out``, headed with the command and
the hardware.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import statistics

import jax
import jax.numpy as jnp
import ml_collections

from addervit_jax import cli, configs, data, models, ops, reports, timing, train

MIB = 2**20
MODEL_FLAGS = (
    "image_size",
    "num_classes",
    "patch_size",
    "dim",
    "depth",
    "heads",
    "dim_head",
    "mlp_dim",
)


class OutOfMemory(Exception):
    """A step needs more memory than the device (or ``--memory-limit-gib``) has."""


def _is_oom(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


# The other arms of the CIFAR-10 studies, each a row beside the adder backends: (name, variant,
# config overrides)
ARMS = {
    "multi_ln": ("multi_ln", {}),
    "qkv_2ffn, norm=batch": ("qkv_2ffn", {"model.norm": "batch"}),
    "qkv_2ffn_ternary": ("qkv_2ffn_ternary", {}),
    "qkv_2ffn_shift": ("qkv_2ffn_shift", {}),
}


@dataclasses.dataclass
class Row:
    name: str
    variant: str
    backend: str | None
    overrides: dict = dataclasses.field(default_factory=dict)
    train: dict = dataclasses.field(default_factory=dict)
    infer: dict = dataclasses.field(default_factory=dict)
    memory: dict | None = None
    device_peak_mib: float | None = None


def build_steps(config: ml_collections.ConfigDict, images, labels) -> tuple:
    """``(train_step, train_args, infer, infer_args)``: the trainer's jitted train and eval steps
    for ``config`` and their arguments (the state and the batch on the device mesh)."""
    mesh = train.make_mesh()
    state = train.create_train_state(config, total_steps=1000, steps_per_epoch=100)
    state = train.shard_state(state, mesh, config.fsdp)
    info = data.DATASETS[config.dataset]
    batch = train.global_batch({"image": images, "label": labels}, mesh)
    step = train.jit_train_step(config, state, mesh, info)
    infer = jax.jit(functools.partial(train.eval_step, info=info))
    eval_batch = {**batch, "mask": jnp.ones(labels.shape, bool)}
    # the train step donates its state: inference gets its own copy
    return step, (state, batch, None), infer, (jax.tree.map(jnp.copy, state), eval_batch)


def compile_step(fn, args):
    """The compiled step and its memory analysis in bytes (OutOfMemory if compiling fails so);
    ``fn`` is jitted."""
    try:
        compiled = fn.lower(*args).compile()
    except jax.errors.JaxRuntimeError as err:
        if _is_oom(err):
            raise OutOfMemory(f"compile: {str(err).splitlines()[0][:200]}") from err
        raise
    analysis = compiled.memory_analysis()
    memory = {
        "argument": analysis.argument_size_in_bytes,
        "output": analysis.output_size_in_bytes,
        "temp": analysis.temp_size_in_bytes,
        "alias": analysis.alias_size_in_bytes,
    }
    memory["total"] = memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]
    return compiled, memory


def _train_call(compiled, state, batch, teacher):
    """A no-argument call of the compiled train step that feeds its (donated) state back."""
    held = [state]

    def call():
        held[0], metrics = compiled(held[0], batch, teacher)
        return metrics

    return call


def prepare(fn, args, limit_bytes: float | None, *, donates: bool = False):
    """``(call, memory, status)``: a no-argument call of the compiled step, or None if OOM;
    ``donates``: ``fn`` is the train step, whose state argument is donated."""
    try:
        compiled, memory = compile_step(fn, args)
    except OutOfMemory as err:
        return None, None, {"status": "OOM", "reason": str(err)}
    if limit_bytes is not None and memory["total"] > limit_bytes:
        reason = f"needs {memory['total'] / 2**30:.2f} GiB > limit {limit_bytes / 2**30:.2f} GiB"
        return None, memory, {"status": "OOM", "reason": reason}
    call = _train_call(compiled, *args) if donates else functools.partial(compiled, *args)
    return call, memory, {"status": "ok"}


def time_against(f, baseline, *, warmup: int, steps: int) -> dict:
    """Warm up, then ``timing.paired_ratio`` (its first call of each is the last warm-up)."""
    try:
        for _ in range(max(warmup - 1, 0)):
            jax.block_until_ready(f())
            jax.block_until_ready(baseline())
        ratio, t_f, t_b = timing.paired_ratio(f, baseline, (), steps)
    except jax.errors.JaxRuntimeError as err:
        if _is_oom(err):
            raise OutOfMemory(f"run: {str(err).splitlines()[0][:200]}") from err
        raise
    return {"ms": 1e3 * t_f, "ratio": ratio, "baseline_ms": 1e3 * t_b}


def device_peak_mib() -> float | None:
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / MIB


def available_backends() -> list[str]:
    """This project's adder backends that run on the default device (``auto`` is one of them,
    ``naive`` is the baseline row): each is tried on a tiny input, forward and backward."""
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    names = []
    for backend in ops.BACKENDS:
        if backend in ("auto", "naive"):
            continue
        try:
            jax.block_until_ready(
                jax.grad(lambda x, b=backend: ops.adder(x, w, backend=b).sum())(x)
            )
        except (NotImplementedError, ValueError) as err:  # unavailable, or not on this device
            print(f"adder backend {backend!r} skipped: {err}")
            continue
        if ops.resolve_backend(backend) != backend:  # e.g. cpu_native without a compiler
            print(f"adder backend {backend!r} skipped: it falls back to another backend here")
            continue
        names.append(backend)
    return names


def default_memory_limit() -> float | None:
    if jax.devices()[0].platform != "cpu":
        return None  # accelerators raise RESOURCE_EXHAUSTED, which is caught
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    except (ValueError, OSError, AttributeError):
        return None


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| model | train step (ms) | train vs multi | inference (ms) | inference vs multi | "
        "train memory, compiled (MiB) | memory vs multi | device peak (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_memory = rows[0].memory["total"]
    for r in rows:
        cells = [r.name]
        for part in (r.train, r.infer):
            if part.get("status") == "OOM":
                cells += ["OOM", "OOM"]
            else:
                cells += [f"{part['ms']:.1f}", f"{part['ratio']:.2f}x"]
        if r.memory is None:
            cells += ["OOM", "n/a"]
        else:
            total = r.memory["total"]
            cells += [f"{total / MIB:.1f}", f"{total / base_memory:.2f}x"]
        cells.append(_fmt(r.device_peak_mib, ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        f"- {r.name}, {label}: OOM, {part['reason']}"
        for r in rows
        for label, part in (("train", r.train), ("inference", r.infer))
        if part.get("status") == "OOM"
    ]
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variant",
        default="qkv_2ffn",
        choices=[n for n, v in models.VARIANTS.items() if v.family == "simple_vit"],
        help="the model of the naive and project adder rows (default %(default)s); a variant "
        "without adder sites is one row of its own",
    )
    parser.add_argument(
        "--arms",
        nargs="*",
        default=list(ARMS),
        choices=list(ARMS),
        metavar="ARM",
        help=f"the studies' other arms, a row each (default all: {', '.join(ARMS)}; none: "
        "--arms with no name)",
    )
    parser.add_argument("--batch", type=cli.int_at_least(1), default=64)
    parser.add_argument(
        "--steps", type=cli.int_at_least(1), default=10, help="timed steps (median)"
    )
    parser.add_argument("--warmup", type=cli.int_at_least(0), default=2, help="untimed steps first")
    parser.add_argument(
        "--config",
        default="cifar10",
        help="the training recipe whose step is timed: a config name or file (default %(default)s)",
    )
    for flag in MODEL_FLAGS:
        parser.add_argument(
            "--" + flag.replace("_", "-"),
            type=int,
            default=None,
            help="model override (default: the recipe's, the image size and classes its dataset's)",
        )
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        default=None,
        help="rows whose compiled step needs more are OOM (default: none on an accelerator, "
        "half the physical memory on a CPU)",
    )
    parser.add_argument(
        "--out", default="experiments/results/speed_table", help="results directory"
    )
    args = parser.parse_args(argv)

    limit = args.memory_limit_gib * 2**30 if args.memory_limit_gib else default_memory_limit()
    recipe = configs.load(args.config)
    model = {f"model.{f}": getattr(args, f) for f in MODEL_FLAGS if getattr(args, f) is not None}
    configs.override(recipe, {**model, "batch_size": args.batch})

    def row_config(
        variant: str, backend: str | None, overrides: dict | None = None
    ) -> ml_collections.ConfigDict:
        config = recipe.copy_and_resolve_references()
        backend_field = {"model.backend": backend} if backend else {}
        configs.override(config, {"variant": variant, **backend_field, **(overrides or {})})
        train.validate_config(config)
        return config

    row_config(args.variant, None)  # a bad recipe or override fails here, named
    try:  # the adder backend rows need adder sites (a backend no site honours is refused)
        row_config(args.variant, "xla")
        has_adder = True
    except ValueError as err:
        if "backend" not in str(err):
            raise
        has_adder = False

    model_kwargs = train.model_overrides(recipe)
    kx, ky = jax.random.split(jax.random.key(0))
    size, channels = model_kwargs["image_size"], model_kwargs["channels"]
    shape = (args.batch, size, size, channels)
    images = jax.random.randint(kx, shape, 0, 256).astype(jnp.uint8)
    labels = jax.random.randint(ky, (args.batch,), 0, model_kwargs["num_classes"])

    hardware = timing.describe_device()
    print(f"device: {hardware}; batch {args.batch} of {shape[1:]}; {args.steps} timed steps")
    # run order: multi, this project's backends, naive last (the device peak is cumulative)
    runs = [Row("multi", "multi", None)]
    runs += [Row(name, ARMS[name][0], None, ARMS[name][1]) for name in args.arms]
    if has_adder:
        runs += [Row(f"adder {b}", args.variant, b) for b in available_backends()]
        runs.append(Row("naive adder", args.variant, "naive"))
    elif args.variant not in ARMS or args.variant not in args.arms:
        runs.append(Row(args.variant, args.variant, None))

    base = None
    # the mesh in context, as in training: the Pallas kernels run per device under it
    with jax.set_mesh(train.make_mesh()):
        for row in runs:
            print(f"{row.name}: compiling", flush=True)
            train_step, train_args, infer, infer_args = build_steps(
                row_config(row.variant, row.backend, row.overrides), images, labels
            )
            train_call, row.memory, row.train = prepare(train_step, train_args, limit, donates=True)
            infer_call, _, row.infer = prepare(infer, infer_args, limit)
            if base is None:
                if train_call is None or infer_call is None:
                    raise SystemExit(
                        f"multi does not fit ({row.train}, {row.infer}); nothing to compare"
                    )
                base = {"train": train_call, "infer": infer_call, "train_ms": [], "infer_ms": []}
                row.train["ratio"] = row.infer["ratio"] = 1.0
            else:
                for part, call in (("train", train_call), ("infer", infer_call)):
                    if call is None:
                        continue
                    try:
                        result = time_against(
                            call, base[part], warmup=args.warmup, steps=args.steps
                        )
                    except OutOfMemory as err:
                        setattr(row, part, {"status": "OOM", "reason": str(err)})
                        continue
                    getattr(row, part).update(ms=result["ms"], ratio=result["ratio"])
                    base[f"{part}_ms"].append(result["baseline_ms"])
            row.device_peak_mib = device_peak_mib()
            print(f"{row.name}: train {row.train}, inference {row.infer}", flush=True)
            del train_step, train_args, infer, infer_args, train_call, infer_call

    multi = runs[0]
    for part in ("train", "infer"):
        if not base[f"{part}_ms"]:  # no other row ran: time multi on its own
            result = time_against(base[part], base[part], warmup=args.warmup, steps=args.steps)
            base[f"{part}_ms"].append(result["ms"])
    multi.train["ms"] = statistics.median(base["train_ms"])
    multi.infer["ms"] = statistics.median(base["infer_ms"])

    # table order: multi, naive adder, this project's adder, the other arms
    naive = [r for r in runs if r.name == "naive adder"]
    adders = [r for r in runs if r.name.startswith("adder ")]
    rows = [multi, *naive, *adders, *(r for r in runs[1:] if r not in naive + adders)]
    table = markdown_table(rows)
    command, date = reports.command_line("speed_table.py", argv), reports.today()
    m = models.config("multi", **model_kwargs)
    config = dataclasses.asdict(m)
    adder_config = {
        k: v
        for k, v in dataclasses.asdict(models.config(args.variant, **model_kwargs)).items()
        if config.get(k) != v and k != "backend"
    }
    adaptive = train.uses_adaptive_lr(row_config(args.variant, None))
    limit_text = "none" if limit is None else f"{limit / 2**30:.2f} GiB"
    header = [
        "# Speed and memory: Multi, naive Adder and this project's Adder (SimpleViT)",
        "",
        *reports.header_lines(command, hardware, date=date),
        f"- model: SimpleViT {m.image_size}x{m.image_size}x{m.channels}, patch {m.patch_size}, "
        f"dim {m.dim}, depth {m.depth}, {m.heads} heads of {m.dim_head}, MLP {m.mlp_dim}, "
        f"{m.num_classes} classes; adder rows: `{args.variant}` ({adder_config})",
        f"- batch {args.batch} of random uint8 images; train step = the trainer's jitted step "
        f"(`train.jit_train_step`) of the `{args.config}` recipe: its augmentation, "
        f"cross-entropy and whole optimiser chain ({recipe.optimizer}, grad clip "
        f"{recipe.grad_clip:g}, adaptive LR on adder weights "
        f"{'on' if adaptive else 'off'}); inference = the trainer's eval "
        f"step; {args.warmup} warm-up calls, then the median of {args.steps} calls alternating "
        'with Multi\'s ("vs multi" is the median per-pair ratio)',
        "- train memory, compiled: arguments + outputs + temporaries - aliased bytes of the "
        "compiled train step (`memory_analysis()`); device peak: `peak_bytes_in_use` after the "
        "row, cumulative over rows run multi, the other arms, adder backends, naive adder (n/a: "
        "not reported)",
        f"- OOM: the step needs more than the memory limit ({limit_text}) or the device "
        "raised RESOURCE_EXHAUSTED",
        "",
        table,
        "",
    ]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed_table.md").write_text("\n".join(header))
    record = {
        "command": command,
        "hardware": hardware,
        "date": date,
        "recipe": args.config,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "memory_limit_bytes": limit,
        "model": config,
        "adder_variant": args.variant,
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    (out / "speed_table.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
