"""Timing for the benchmarks of ``experiments/``: paired ratios on a shared machine, and the
device description every result table is headed with. (Operation counts: :mod:`.counts`.)"""

from __future__ import annotations

import os
import platform
import statistics
import time

import jax

__all__ = ["describe_device", "paired_ratio"]


def paired_ratio(f, baseline, args, repeats: int = 7) -> tuple[float, float, float]:
    """Median of ``repeats`` alternating time(f) / time(baseline), and the two median times.

    Single timings on shared machines swing by 2x; a run of ``f`` paired with a run of
    ``baseline`` right after it sees the same machine state, so the ratio of a pair holds. Both
    are called once first (compilation, warm-up).
    """
    jax.block_until_ready(f(*args))
    jax.block_until_ready(baseline(*args))
    ratios, t_f, t_b = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        t1 = time.perf_counter()
        jax.block_until_ready(baseline(*args))
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
        t_f.append(t1 - t0)
        t_b.append(t2 - t1)
    return statistics.median(ratios), statistics.median(t_f), statistics.median(t_b)


def describe_device() -> str:
    """The accelerator (or the CPU model and core count) and the JAX version, for result tables."""
    device = jax.devices()[0]
    kind = device.device_kind
    if device.platform == "cpu":
        model = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
        except (OSError, StopIteration):
            pass
        kind = f"{model}, {os.cpu_count()} cores"
    count = f"{jax.device_count()} x " if jax.device_count() > 1 else ""
    return f"{count}{device.platform} ({kind}), jax {jax.__version__}"
