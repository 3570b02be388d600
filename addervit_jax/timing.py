"""Timing for the benchmarks of ``experiments/``: paired ratios on a shared machine, and the
device description every result table is headed with. (Operation counts: :mod:`.counts`.)"""

from __future__ import annotations

import os
import platform
import statistics
import time

import jax

__all__ = ["cpuinfo_fields", "describe_cpu", "describe_device", "paired_ratio"]


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


def cpuinfo_fields(cpuinfo: str | None = None) -> dict[str, str]:
    """The first processor's block of ``/proc/cpuinfo`` as ``{key: value}`` (``cpuinfo``: that
    file's text; read when None). Empty without the file (not Linux). Later blocks are ignored:
    every core of the machines here reports the same."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, colon, value = line.partition(":")
        if not colon and fields:
            break  # the first processor's block ends at an empty line
        if colon:
            fields.setdefault(key.strip(), value.strip())
    return fields


def describe_cpu(cpuinfo: str | None = None) -> str:
    """The CPU as ``/proc/cpuinfo`` names it (``cpuinfo``: that file's text; read when None),
    with what tells apart machines that share a generic name: the x86 family and model and the
    widest vector instructions, ``AVX-512`` or ``AVX2``. Virtual machines name a Zen 3 and a Zen 5
    EPYC alike ("AMD EPYC"), and they train at about half and full speed here. Without the file
    (not Linux): :func:`platform.processor`, else ``"cpu"``."""
    fields = cpuinfo_fields(cpuinfo)
    parts = [fields.get("model name") or platform.processor() or "cpu"]
    if "cpu family" in fields and "model" in fields:
        parts.append(f"family {fields['cpu family']} model {fields['model']}")
    flags = set(fields.get("flags", "").split())
    if "avx512f" in flags:
        parts.append("AVX-512")
    elif "avx2" in flags:
        parts.append("AVX2")
    return ", ".join(parts)


def describe_device() -> str:
    """The accelerator (or :func:`describe_cpu` and the core count) and the JAX version, for
    result tables."""
    device = jax.devices()[0]
    kind = device.device_kind
    if device.platform == "cpu":
        kind = f"{describe_cpu()}, {os.cpu_count()} cores"
    count = f"{jax.device_count()} x " if jax.device_count() > 1 else ""
    return f"{count}{device.platform} ({kind}), jax {jax.__version__}"
