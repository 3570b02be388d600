"""Run ``train.train`` in a fresh process (so XLA flags and jax.distributed apply) and print a
JSON line with its summary: ``python tests/train_worker.py WORKDIR '{"config.field": value}'``.

The tests start it with :func:`run_worker` and read its results with :func:`summary_of` and
:func:`train_losses`.
"""

import json
import os
import pathlib
import subprocess
import sys

from addervit_jax import train
from addervit_jax.configs import digits

# A model small enough that a few steps cost milliseconds, so the tests time the machinery.
TINY = {
    "config.model.dim": 16,
    "config.model.depth": 1,
    "config.model.heads": 2,
    "config.model.dim_head": 8,
    "config.model.mlp_dim": 32,
    "config.batch_size": 32,
    "config.log_every_steps": 1,
    "config.eval_every_steps": 1000,
    "config.randaugment": None,  # the digits recipe's RandAugment costs seconds of compilation
}


def run_worker(workdir, overrides, *, devices=1, extra_env=None, background=False):
    """Train ``TINY`` plus ``overrides`` on ``devices`` simulated CPU devices in a subprocess;
    its summary, or the running process with ``background``."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    env.update(extra_env or {})
    cmd = [sys.executable, __file__, str(workdir), json.dumps({**TINY, **overrides})]
    if background:
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return summary_of(out.stdout)


def summary_of(stdout):
    line = next(line for line in stdout.splitlines() if line.startswith("SUMMARY "))
    return json.loads(line.removeprefix("SUMMARY "))


def train_losses(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]


def main():
    workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
    resume = overrides.pop("resume", False)
    resume = resume if resume == "auto" else bool(resume)
    config = digits.get_config()
    config.update_from_flattened_dict(overrides, strip_prefix="config.")
    summary = train.train(config, workdir, resume=resume)
    print("SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
