"""A fingerprint of what the code computes, to show that a restructuring changed nothing.

    python experiments/fingerprint.py --out A.json          # on the code before
    python experiments/fingerprint.py --out B.json          # on the code after (same machine)
    python experiments/fingerprint.py --compare A.json B.json

Records, for short fixed-seed digits runs of ``qkv_2ffn``, ``multi`` and ``all_adder`` (one
device; ``all_adder`` also with ``backend="xla"``) and of ``qkv_2ffn`` on 8 simulated devices
(data-parallel, in a subprocess with ``--xla_force_host_platform_device_count=8``): every step's
training loss (``log_every_steps=1``), the final evaluation and the SHA-256 of the final
parameters (``params.msgpack``), and the output of ``addervit check-kernels`` (interpret mode on a
CPU). ``--compare`` says, field by field, whether two fingerprints are identical: bit for bit, as
they must be on the same machine and JAX release.

Uses only the public entry points (``train.train``, the digits config, the CLI), so it runs
unchanged on the code before and after a restructuring (e.g. from a ``git worktree`` of the old
commit).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile

VARIANTS = ("qkv_2ffn", "multi", "all_adder")
STEPS = 30


def run(variant: str, steps: int, **model) -> dict:
    """One digits run of ``steps`` steps, seed 0: its per-step losses and parameter digest.
    ``model``: overrides of the variant's model config (e.g. ``backend="xla"``)."""
    from flax import serialization

    from addervit_jax import train
    from addervit_jax.configs import digits

    config = digits.get_config()
    config.variant = variant
    config.total_steps = steps
    config.log_every_steps = 1
    for key, value in model.items():
        config.model[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        summary = train.train(config, tmp)
        records = [json.loads(line) for line in open(pathlib.Path(tmp) / "metrics.jsonl")]
        params = (pathlib.Path(tmp) / "params.msgpack").read_bytes()
        digest = serialization.msgpack_restore(params)["sha256"]
    return {
        "train_loss": [r["loss"] for r in records if r["split"] == "train"],
        "eval": [[r["loss"], r["accuracy"]] for r in records if r["split"] == "eval"],
        "eval_accuracy": summary["eval_accuracy"],
        "params_sha256": digest,
    }


def check_kernels() -> str:
    from addervit_jax import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(["check-kernels"])
    return "\n".join(out.getvalue().splitlines()[1:])  # the first line names the machine


def fingerprint(steps: int) -> dict:
    import jax

    result = {"jax": jax.__version__, "steps": steps}
    for variant in VARIANTS:
        result[f"digits/{variant}"] = run(variant, steps)
    # "auto" is the native kernels on a CPU; the pure-JAX backend too
    result["digits/all_adder, backend=xla"] = run("all_adder", steps, backend="xla")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import fingerprint, jax; "
        "assert jax.device_count() == 8; "
        "print(json.dumps(fingerprint.run('qkv_2ffn', int(sys.argv[2]))))"
    )
    here = str(pathlib.Path(__file__).resolve().parent)
    out = subprocess.run(
        [sys.executable, "-c", code, here, str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result["digits/qkv_2ffn, 8 devices"] = json.loads(out.stdout.strip().splitlines()[-1])
    result["check-kernels"] = check_kernels()
    return result


def compare(a: dict, b: dict) -> bool:
    same = True
    for key in sorted(set(a) | set(b)):
        equal = a.get(key) == b.get(key)
        same &= equal
        print(f"{'identical' if equal else 'DIFFERENT'}: {key}")
    print("all identical" if same else "the fingerprints differ")
    return same


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, help="write the fingerprint here (JSON)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--compare", nargs=2, type=pathlib.Path, metavar=("A", "B"))
    args = parser.parse_args(argv)
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        return 0 if compare(a, b) else 1
    if not args.out:
        parser.error("give --out FILE or --compare A B")
    args.out.write_text(json.dumps(fingerprint(args.steps), indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
