"""Run ``train.train`` in a fresh process (so XLA flags and jax.distributed apply) and print a
JSON line with its summary: ``python tests/train_worker.py WORKDIR '{"config.field": value}'``."""

import json
import sys

from addervit_jax import train
from addervit_jax.configs import digits


def main():
    workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
    resume = bool(overrides.pop("resume", False))
    config = digits.get_config()
    config.update_from_flattened_dict(overrides, strip_prefix="config.")
    summary = train.train(config, workdir, resume=resume)
    print("SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
