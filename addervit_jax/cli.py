"""The ``addervit`` command.

addervit train [--config NAME_OR_PATH] [--config.key=value ...] [--workdir DIR]
               [--resume | --overwrite]
addervit eval --checkpoint WORKDIR [--split SPLIT] [--batch-size N] [--int8]
              [--calibration-batches N] [--kinds KIND ...]
addervit demo [--tokens L] [--features D_IN] [--seed S]
              # the similarity operations and the adder backward rules on toy tensors
addervit check-kernels [--shapes LxD_INxD_OUT ...] [--dtype float32|bfloat16] [--tol TOL]
                       [--seed S]
addervit check-kernels --sass [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import signal
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from addervit_jax import configs, ops, reports, timing
from addervit_jax.shapes import parse_shape

DEFAULT_CONFIG = "digits"


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (argparse names the flag and exits with 2);
    the one such check of ``addervit`` and of the experiment scripts."""
    wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value

    return parse


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

    # Check the bounded-memory implementation against the broadcast formula (the "naive" backend)
    # on random data.
    kx, kw = jax.random.split(jax.random.key(args.seed))
    length, d_in, d_out = args.tokens, args.features, 2 * args.features
    xr = jax.random.normal(kx, (length, d_in))
    wr = jax.random.normal(kw, (d_in, d_out))
    broadcast = ops.adder(xr, wr, backend="naive")
    err = float(jnp.linalg.norm(ops.adder(xr, wr) - broadcast) / jnp.linalg.norm(broadcast))
    print(f"\nadder vs broadcast formula at L={length}, {d_in}->{d_out}: relative error {err:.1e}")

    def train_like(op):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(op(x, w) ** 2), argnums=(0, 1)))

    ratio, _, _ = timing.paired_ratio(
        train_like(ops.adder), train_like(ops.dense), (xr, wr), repeats=5
    )
    print(f"forward+backward time, adder / dense at that shape: {ratio:.1f}x")
    return 0


# (L, D_in, D_out): a ViT-S block on 4,096 tokens (qkv, MLP up, MLP down), the CIFAR SimpleViT MLP
# on a batch of 64 images of 65 tokens, and a classifier head with odd sizes.
CHECK_SHAPES_GPU = [
    "4096x384x1152",
    "4096x384x1536",
    "4096x1536x384",
    "4160x128x256",
    "1000x191x10",
]
# Interpret mode runs the grid as a Python-level loop: small shapes only.
CHECK_SHAPES_INTERPRET = ["130x32x48", "37x19x23"]


def check_kernels_sass(args: argparse.Namespace) -> int:
    """The static check of the Pallas kernels in Hopper machine code (``kernels/sass.py``): every
    kernel, rule, dtype and shipped tile at the ViT shapes; exit 1 when one spills or misses its
    roofline target, 2 when Triton is missing."""
    from addervit_jax.kernels import sass

    reason = sass.missing()
    if reason:
        print(f"addervit check-kernels --sass: {reason}", file=sys.stderr)
        return 2
    print("addervit check-kernels --sass: Pallas -> Triton -> sm_90a SASS, no GPU needed")
    print("fraction: useful FP32 instructions / all instructions of the hot loop\n")
    rows = []
    for row in sass.sweep():
        rows.append(row)
        print(sass.markdown([row]).splitlines()[-1], flush=True)
    failures = sum(not sass.passes(r) for _, r in rows)
    if args.out:
        sass.write(rows, args.out, "sass")
    print(f"\n{'all passed' if not failures else f'{failures} of {len(rows)} FAILED'}")
    return 1 if failures else 0


def check_kernels(args: argparse.Namespace) -> int:
    """Compare ``ops.adder(backend="pallas")`` with the XLA backend, forward and every gradient.

    The reference-vs-kernel check to run on one's own GPU: for each shape and rule, the relative
    Frobenius error of y, dL/dx, dL/dw and dL/dE (with a random stretch E and cotangent) between
    the two backends. On a machine without a GPU the kernels run in interpret mode. With
    ``--sass``, the static check of their machine code instead (:func:`check_kernels_sass`).
    """
    if args.sass:
        return check_kernels_sass(args)
    device = jax.devices()[0]
    interpret = device.platform != "gpu"
    specs = args.shapes or (CHECK_SHAPES_INTERPRET if interpret else CHECK_SHAPES_GPU)
    dtype = jnp.dtype(args.dtype or "float32")
    tol = args.tol if args.tol is not None else (1e-5 if dtype == jnp.float32 else 1e-2)
    mode = " (interpret mode: no GPU)" if interpret else ""
    print(f"addervit check-kernels on {timing.describe_device()}{mode}, {dtype.name} inputs")
    print(f"relative Frobenius error, Pallas kernels vs the XLA backend; pass: all < {tol:g}\n")
    print("| shape (L x D_in x D_out) | rule | y | dL/dx | dL/dw | dL/dE | result |")
    print("|---|---|---:|---:|---:|---:|---|")
    failures = 0
    for spec in specs:
        length, d_in, d_out = parse_shape(spec)
        kx, kw, ke, kg = jax.random.split(jax.random.key(args.seed or 0), 4)
        x = jax.random.normal(kx, (length, d_in), dtype)
        w = jax.random.normal(kw, (d_in, d_out), dtype)
        e = jax.random.uniform(ke, (d_in,), dtype, 0.5, 1.5)
        g = jax.random.normal(kg, (length, d_out), dtype)
        for grad in ops.GRAD_RULES:

            def vjp(x, w, e, g, backend, grad=grad):
                def fn(x, w, e):
                    return ops.adder(
                        x, w, stretch=e, grad=grad, backend=backend, interpret=interpret
                    )

                y, pullback = jax.vjp(fn, x, w, e)
                return (y, *pullback(g))

            run = jax.jit(vjp, static_argnums=4)
            kernel, reference = run(x, w, e, g, "pallas"), run(x, w, e, g, "xla")
            errors = [
                float(
                    jnp.linalg.norm((a - b).astype(jnp.float32))
                    / jnp.maximum(jnp.linalg.norm(b.astype(jnp.float32)), 1e-30)
                )
                for a, b in zip(kernel, reference, strict=True)
            ]
            ok = all(err < tol for err in errors)
            failures += not ok
            cells = " | ".join(f"{err:.1e}" for err in errors)
            print(f"| {spec} | {grad} | {cells} | {'pass' if ok else 'FAIL'} |", flush=True)
    print(f"\n{'all passed' if not failures else f'{failures} FAILED'}")
    return 1 if failures else 0


def _take_model_overrides(argv: list[str]) -> tuple[list[str], dict]:
    """``--config.model.FIELD=VALUE`` (or ``--config.model.FIELD VALUE``) taken out of ``argv``:
    absl's config flags accept only the fields a recipe lists, but every field of the variant's
    model config may be set (``configs.override``'s free-form ``model.*``; the model refuses an
    unknown one, listing the valid ones)."""
    rest, overrides, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config.model."):
            key, sep, text = arg[len("--config.") :].partition("=")
            if not sep:
                if i + 1 >= len(argv):
                    raise SystemExit(f"addervit train: {arg} needs a value")
                text, i = argv[i + 1], i + 1
            overrides.update(configs.parse_overrides([f"{key}={text}"]))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _parse_train_flags(argv: list[str]):
    from absl import flags
    from ml_collections import config_flags

    argv, model_overrides = _take_model_overrides(list(argv))
    help_requested = "-h" in argv or "--help" in argv
    names = [i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
    if not names:
        argv = ["--config", DEFAULT_CONFIG, *argv]
        names = [0]
    i = names[-1]
    if argv[i] == "--config" and i + 1 >= len(argv):
        raise SystemExit("addervit train: --config needs a name or a path")
    given = argv[i + 1] if argv[i] == "--config" else argv[i].partition("=")[2]
    try:
        configs.load(given)  # one-line errors for a bad name or file, before absl parses it
        resolved = configs.path(given)
    except ValueError as err:
        raise SystemExit(f"addervit train: --config {given}: {err}") from None
    if argv[i] == "--config":
        argv[i + 1] = resolved
    else:
        argv[i] = "--config=" + resolved
    argv = ["addervit train", *argv]

    flag_values = flags.FlagValues()
    # config_flags reads the --config.<field> overrides from sys_argv, not from the parsed list
    config_flags.DEFINE_config_file(
        "config",
        None,
        "config name or file",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=argv,
    )
    flags.DEFINE_string(
        "workdir", None, "run directory (default: a new one under ./runs)", flag_values=flag_values
    )
    flags.DEFINE_bool(
        "resume", False, "continue from the latest checkpoint in --workdir", flag_values=flag_values
    )
    flags.DEFINE_bool(
        "overwrite",
        False,
        "start a new run in a --workdir that holds one: the old run is moved aside to "
        "<workdir>.replaced-<date>-<time> (nothing is deleted)",
        flag_values=flag_values,
    )
    if help_requested:
        print("usage: " + __doc__.split("\n\n")[1].splitlines()[0].strip())
        print(flag_values.get_help())
        raise SystemExit(0)
    try:
        rest = flag_values(argv)
    except flags.Error as err:
        raise SystemExit(f"addervit train: {err}") from err
    except (AttributeError, KeyError) as err:  # config_flags on an override of a missing field
        detail = str(err).strip("'\"").replace("\\'", "'").replace("\\n", "; ")
        raise SystemExit(f"addervit train: the config has no field {detail}") from err
    if len(rest) > 1:
        raise SystemExit(f"addervit train: unexpected arguments {rest[1:]}")
    try:
        with flag_values.config.unlocked():
            configs.override(flag_values.config, model_overrides)
    except ValueError as err:
        raise SystemExit(f"addervit train: --config.model: {err}") from err
    _none_for_optional_tuples(flag_values.config)
    return flag_values


def _none_for_optional_tuples(config) -> None:
    """``--config.randaugment=None`` means None: config_flags parses a tuple field's ``None`` as
    ``(None,)``, which no tuple field means (and validate_config would refuse)."""
    for key, value in config.items():
        if hasattr(value, "items"):
            _none_for_optional_tuples(value)
        elif isinstance(value, tuple) and value == (None,):
            config[key] = None


def train_command(argv: list[str]) -> int:
    from addervit_jax import train

    flag_values = _parse_train_flags(argv)
    config = flag_values.config
    workdir = flag_values.workdir
    if workdir is None:
        if flag_values.resume:
            raise SystemExit("addervit train: --resume needs the --workdir of the run")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        workdir = pathlib.Path("runs") / f"{config.variant}-{config.dataset}-{stamp}"
    try:
        summary = train.train(
            config, workdir, resume=flag_values.resume, overwrite=flag_values.overwrite
        )
    except (
        ValueError,
        FileExistsError,
        FileNotFoundError,
        train.RunDirectoryBusy,
        train.TrainingDiverged,
    ) as err:
        print(f"addervit train: {err}", file=sys.stderr)
        return 1
    except train.ConversionInterrupted as err:
        print(f"addervit train: {err}", file=sys.stderr)
        return 128 + err.signal
    if summary["status"] != "finished":  # a signal, or a preemption of a multi-process run
        print(f"resume with: addervit train --workdir {workdir} --resume [same --config flags]")
        return 128 + summary.get("signal", signal.SIGTERM)
    return 0


def eval_command(argv: list[str]) -> int:
    from addervit_jax import models, train

    parser = argparse.ArgumentParser(prog="addervit eval")
    parser.add_argument("--checkpoint", required=True, help="work directory of a training run")
    parser.add_argument("--split", default=None, help="dataset split (default: the run's)")
    parser.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=None,
        help="default: the run's; at most the number of examples of the split",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also evaluate the int8 form of the model (adder, multi, multi_ln and ternary "
        "sites on integers, shift and euclid sites float; adder sites calibrated on training "
        "batches), and report float and int8 side by side with the sites left float",
    )
    parser.add_argument(
        "--calibration-batches",
        type=int_at_least(1),
        default=None,
        help="with --int8: the training batches (of --batch-size) that calibrate it (default 4; "
        "at most one epoch of the training split: no image is drawn twice)",
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=models.INT8_KINDS,
        default=None,
        metavar="KIND",
        help="with --int8: only the sites of these kinds (%(choices)s; default all) on integers, "
        "the others left float, to see which sites an int8 loss comes from",
    )
    args = parser.parse_args(argv)
    if args.split is not None and not args.split.strip():
        parser.error("--split is empty; name a split (e.g. test, train[:100]) or leave it out")
    if args.calibration_batches is not None and not args.int8:
        parser.error("--calibration-batches calibrates the int8 form: add --int8")
    if args.kinds is not None and not args.int8:
        parser.error("--kinds chooses the sites of the int8 form: add --int8")

    options = {"split": args.split, "batch_size": args.batch_size, "int8": args.int8}
    if args.calibration_batches is not None:  # else evaluate_workdir's default
        options["calibration_batches"] = args.calibration_batches
    if args.kinds is not None:
        options["kinds"] = args.kinds
    try:
        result = train.evaluate_workdir(args.checkpoint, **options)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"addervit eval: {str(err).strip(chr(34) + chr(39))}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    if args.int8:  # the same, for a reader, on stderr (stdout stays one JSON document)
        f, q = result["float"]["accuracy"], result["int8"]["accuracy"]
        converted = ", ".join(f"{n} {kind}" for kind, n in result["int8_sites"].items())
        print(
            f"accuracy: float {f:.2%}, int8 {q:.2%} ({100 * (q - f):+.2f} points); int8 sites: "
            f"{converted}; left float: {', '.join(result['float_sites'])}",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":
        return train_command(argv[1:])
    if argv and argv[0] == "eval":
        return eval_command(argv[1:])
    parser = argparse.ArgumentParser(prog="addervit", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="train a model (see addervit train --help)")
    commands.add_parser("eval", help="evaluate a run's latest checkpoint")
    p_demo = commands.add_parser("demo", help="the ops and their gradients on toy tensors")
    p_demo.add_argument(
        "--tokens", type=int_at_least(1), default=1024, help="L of the timed example"
    )
    p_demo.add_argument(
        "--features", type=int_at_least(1), default=128, help="D_in of the timed example"
    )
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(run=demo)
    p_check = commands.add_parser(
        "check-kernels", help="the Pallas kernels against the XLA backend on this device"
    )
    p_check.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        metavar="LxD_INxD_OUT",
        help="LxD_INxD_OUT (default: realistic shapes on a GPU, small ones in interpret mode)",
    )
    p_check.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"], help="default float32"
    )
    p_check.add_argument("--tol", type=float, default=None, help="default 1e-5 (bf16: 1e-2)")
    p_check.add_argument("--seed", type=int, default=None, help="default 0")
    p_check.add_argument(
        "--sass",
        action="store_true",
        help="instead: compile every kernel to H100/H200 machine code (needs the sass extra) and "
        "report registers, spills and the hot loop's static roofline fraction",
    )
    p_check.add_argument("--out", default=None, help="with --sass: write sass.md/.json here")
    p_check.set_defaults(run=check_kernels)
    args = parser.parse_args(argv)
    if args.command == "check-kernels":
        for spec in args.shapes or ():
            try:
                parse_shape(spec)
            except ValueError as err:
                p_check.error(f"--shapes: {err}")
        if args.out is not None and not args.sass:
            p_check.error("--out is for --sass (the table of the machine-code check)")
        given = [
            f"--{n}" for n in ("shapes", "dtype", "tol", "seed") if getattr(args, n) is not None
        ]
        if args.sass and given:
            p_check.error(
                f"--sass compiles every kernel at its own shapes and dtypes; {', '.join(given)} "
                "are for the comparison against XLA (without --sass)"
            )
        problem = reports.unwritable(args.out) if args.out is not None else None
        if problem:  # before the sweep, not after it
            p_check.error(f"--out {args.out}: {problem}")
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
