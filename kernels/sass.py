"""A static check of the Pallas kernels in Hopper machine code, on a machine without a GPU.

For a kernel, a rule, a dtype and a tile (:class:`kernels.adder_pallas.Blocks`) at a problem
shape: lower the kernel through Pallas for CUDA (the Triton IR Pallas emits is captured), compile
it with Triton's ahead-of-time compiler for ``sm_90a`` (H100/H200) to PTX, assemble it with the
``ptxas`` Triton ships for recent PTX, and disassemble the cubin. Reported: registers, spill
stores and loads, shared memory, the hot loop's instructions by opcode, and its static roofline
fraction

    useful FP32 instructions per loop iteration / all instructions issued in it,

where one loop iteration is one step of the kernel's reduction loop, covering
``rows * cols * reduce / threads`` terms per thread, and a term needs, at least:

============================ ===== =========================================================
term                          FP32  instructions
============================ ===== =========================================================
forward ``-|u - w|``           2     FADD (the difference), FADD with the |.| operand modifier
x_grad / w_grad, ``"exact"``   4     FSET, FSET, FFMA, FFMA: ``g [a > b] + g [a >= b]``
x_grad ``"addernet"``          4     FADD, FMNMX, FMNMX (the clip), FFMA
x_grad ``"clipped"``           4     as addernet, with ``c`` folded into the operands once
============================ ===== =========================================================

The exact rule's ``g * sign(a - b)`` needs two comparisons: sm_90 has no one-instruction sign
with ``sign(0) = 0`` (``copysign`` is a LOP3 that makes it +-1, which would be three instructions
a term, FADD, LOP3, FADD, with ties counted as +-g instead of 0). The kernels sum
``g * (sign + 1) = g [a > b] + g [a >= b]`` and subtract ``g``'s sum once per output.

The hot loop is the longest backward branch of the SASS (``BRA`` to a lower address). The
fraction is an upper bound on the share of the FP32 SIMT peak the loop can reach: it ignores
memory stalls and dual issue, and counts nothing but the loop.

Needs Triton (``pip install 'addervit-jax[sass]'``); the compile runs in a subprocess of the same
interpreter, so Triton's LLVM never loads beside jaxlib's. Without Triton, :func:`missing` says
what is missing and :func:`check` raises ``RuntimeError`` with it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from addervit_jax.kernels import adder_pallas, compat

__all__ = [
    "KERNELS",
    "SHAPES",
    "TARGETS",
    "TERM_FP32",
    "Report",
    "check",
    "hot_loop",
    "markdown",
    "missing",
    "passes",
    "sweep",
    "write",
]

#: (L, D_in, D_out) of a ViT-S block on 4,096 tokens: MLP up, MLP down, qkv
SHAPES = ((4096, 384, 1536), (4096, 1536, 384), (4096, 384, 1152))

#: minimal FP32 instructions per term, by (kernel, rule); see the module docstring
TERM_FP32 = {
    ("forward", None): 2,
    ("x_grad", "exact"): 4,
    ("x_grad", "addernet"): 4,
    ("x_grad", "clipped"): 4,
    ("w_grad_exact", None): 4,
}

FP32_OPCODES = ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSET", "FSETP", "FCHK", "FSWZADD")


def missing() -> str | None:
    """What the check needs and is not installed, or None."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed: pip install 'addervit-jax[sass]' (triton==3.9.0)"
    return None


@dataclasses.dataclass
class Report:
    kernel: str
    rule: str | None
    dtype: str
    shape: tuple[int, int, int]
    blocks: dict
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    loop_instructions: int
    loop_mix: dict
    terms_per_thread: float
    useful: float
    roofline_fraction: float


# ---------------------------------------------------------------------------------------------
# Triton IR out of Pallas
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _capture_ttir(sink: list):
    from jax._src.pallas.triton import lowering

    original = lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        sink.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield
    finally:
        lowering.lower_jaxpr_to_triton_module = original


@contextlib.contextmanager
def _blocks(kernel: str, blocks: adder_pallas.Blocks):
    """Every output size of ``kernel`` tiled with ``blocks`` (both table entries replaced)."""
    saved = dict(adder_pallas.BLOCKS[kernel])
    adder_pallas.BLOCKS[kernel].update(small=blocks, large=blocks)
    try:
        yield
    finally:
        adder_pallas.BLOCKS[kernel].update(saved)


def _call(kernel: str, rule: str | None, shape, dtype):
    length, d_in, d_out = shape
    x = jax.ShapeDtypeStruct((length, d_in), dtype)
    w = jax.ShapeDtypeStruct((d_in, d_out), dtype)
    g = jax.ShapeDtypeStruct((length, d_out), dtype)
    e = jax.ShapeDtypeStruct((d_in,), dtype)
    if kernel == "forward":
        return adder_pallas.forward, (x, w, e)
    if kernel == "x_grad":
        return functools.partial(adder_pallas.x_grad, grad=rule), (x, w, g, e)
    return adder_pallas.w_grad_exact, (x, w, g, e)


def triton_ir(kernel: str, rule: str | None, shape, dtype, blocks: adder_pallas.Blocks) -> str:
    """The Triton IR of ``kernel`` (``rule`` for x_grad) at ``shape`` with tile ``blocks``."""
    sink: list[str] = []
    fn, args = _call(kernel, rule, shape, dtype)
    # the kernels are jitted and read the table while tracing: a cached trace has the old tile
    jax.clear_caches()
    with _capture_ttir(sink), _blocks(kernel, blocks):
        compat.lower_for_cuda(fn, *args)
    if len(sink) != 1:
        raise RuntimeError(f"expected one Triton module for {kernel}, captured {len(sink)}")
    return sink[0]


# ---------------------------------------------------------------------------------------------
# Triton IR -> PTX -> cubin -> SASS, in a subprocess
# ---------------------------------------------------------------------------------------------

_COMPILE = r"""
import json, pathlib, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget

src, num_warps, num_stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = pathlib.Path(src).with_suffix("")
options = {"num_warps": num_warps, "num_stages": num_stages}
compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
ptx = out.with_suffix(".ptx")
ptx.write_text(compiled.asm["ptx"])
bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
cubin = out.with_suffix(".cubin")
ptxas = subprocess.run(
    [str(bin_dir / "ptxas-blackwell"), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(cubin)],
    capture_output=True, text=True,
)
if ptxas.returncode:
    raise SystemExit("ptxas failed: " + ptxas.stderr[-2000:])
sass = subprocess.run(
    [str(bin_dir / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True
).stdout
shared = int(getattr(compiled.metadata, "shared", 0))
print(json.dumps({"ptxas": ptxas.stderr + ptxas.stdout, "sass": sass, "shared": shared}))
"""


def compile_to_sass(ttir: str, num_warps: int, num_stages: int) -> tuple[str, str, int]:
    """(ptxas -v output, SASS text, shared memory bytes) of a Triton IR module for sm_90a."""
    reason = missing()
    if reason:
        raise RuntimeError(reason)
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "kernel.ttir"
        src.write_text(ttir)
        out = subprocess.run(
            [sys.executable, "-c", _COMPILE, str(src), str(num_warps), str(num_stages)],
            capture_output=True,
            text=True,
            timeout=600,
            # Triton 3.9's default (FMA contraction on), said explicitly to silence its warning
            env={**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"},
        )
    if out.returncode:
        raise RuntimeError(f"compiling to SASS failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["ptxas"], result["sass"], result["shared"]


def _ptxas_numbers(text: str) -> dict:
    def number(pattern: str) -> int:
        match = re.search(pattern, text)
        return int(match.group(1)) if match else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
    }


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def hot_loop(sass: str) -> list[str]:
    """The opcodes (without modifiers) of the longest backward branch's body in ``sass``."""
    instructions = [
        (int(m.group(1), 16), m.group(3), m.group(4)) for m in _INSTRUCTION.finditer(sass)
    ]
    best: tuple[int, int] | None = None
    for index, (address, opcode, operands) in enumerate(instructions):
        if opcode.split(".")[0] != "BRA":
            continue
        target = re.search(r"0x([0-9a-f]+)", operands)
        if not target or int(target.group(1), 16) >= address:
            continue
        start = next(i for i, (a, _, _) in enumerate(instructions) if a >= int(target.group(1), 16))
        if best is None or index - start > best[1] - best[0]:
            best = (start, index)
    if best is None:
        return []
    return [op.split(".")[0] for _, op, _ in instructions[best[0] : best[1] + 1]]


def check(
    kernel: str,
    rule: str | None,
    shape: tuple[int, int, int],
    dtype=jnp.float32,
    blocks: adder_pallas.Blocks | None = None,
) -> Report:
    """Compile one kernel to Hopper SASS and measure its hot loop (see the module docstring).

    ``blocks`` defaults to the table entry the kernel picks at ``shape``.
    """
    length, d_in, d_out = shape
    out_rows, out_cols, reduce = {
        "forward": (length, d_out, d_in),
        "x_grad": (length, d_in, d_out),
        "w_grad_exact": (d_in, d_out, length),
    }[kernel]
    if blocks is None:
        blocks = adder_pallas.blocks_for(kernel, out_rows, out_cols, reduce)
    ttir = triton_ir(kernel, rule, shape, dtype, blocks)
    ptxas, sass, shared = compile_to_sass(ttir, blocks.num_warps, blocks.num_stages)
    loop = hot_loop(sass)
    mix = dict(collections.Counter(loop).most_common())
    terms = blocks.rows * blocks.cols * blocks.reduce / (32 * blocks.num_warps)
    useful = terms * TERM_FP32[(kernel, rule if kernel == "x_grad" else None)]
    return Report(
        kernel=kernel,
        rule=rule,
        dtype=jnp.dtype(dtype).name,
        shape=tuple(shape),
        blocks=dataclasses.asdict(blocks),
        **_ptxas_numbers(ptxas),
        shared_bytes=shared,
        loop_instructions=len(loop),
        loop_mix=mix,
        terms_per_thread=terms,
        useful=useful,
        roofline_fraction=useful / len(loop) if loop else 0.0,
    )


# ---------------------------------------------------------------------------------------------
# The sweep: every kernel, rule, dtype and table entry at the ViT shapes
# ---------------------------------------------------------------------------------------------

#: the static roofline fraction each kernel's hot loop should reach (issue targets)
TARGETS = {"forward": 0.80, "w_grad_exact": 0.80, "x_grad": 0.70}

KERNELS = (
    ("forward", None),
    ("x_grad", "exact"),
    ("x_grad", "addernet"),
    ("x_grad", "clipped"),
    ("w_grad_exact", None),
)


def sweep(
    *,
    dtypes=(jnp.float32, jnp.bfloat16),
    shapes=SHAPES,
    entries: dict[str, dict[str, adder_pallas.Blocks]] | None = None,
    kernels=KERNELS,
):
    """Yield ``(entry name, Report)`` for every kernel x dtype x table entry x shape.

    ``entries`` defaults to :data:`adder_pallas.BLOCKS` (the shipped table); pass candidates
    (same layout) to compare tiles.
    """
    entries = entries or adder_pallas.BLOCKS
    for kernel, rule in kernels:
        for name, blocks in entries[kernel].items():
            for dtype in dtypes:
                for shape in shapes:
                    yield name, check(kernel, rule, shape, dtype, blocks)


def passes(report: Report) -> bool:
    """No spills and the hot loop at or above its kernel's :data:`TARGETS` fraction."""
    no_spills = report.spill_stores == 0 and report.spill_loads == 0
    return no_spills and report.roofline_fraction >= TARGETS[report.kernel]


def markdown(rows) -> str:
    """A table of ``(entry name, Report)`` rows."""
    lines = [
        "| kernel | rule | dtype | shape | entry (rows x cols x reduce, warps, stages) | registers "
        "| spills (B st/ld) | shared (B) | loop instr. | FP32 in loop | useful | fraction | "
        "target |",
        "|---|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in rows:
        b = r.blocks
        fp32 = sum(n for op, n in r.loop_mix.items() if op in FP32_OPCODES)
        lines.append(
            f"| {r.kernel} | {r.rule or '-'} | {r.dtype} | {'x'.join(map(str, r.shape))} | "
            f"{name}: {b['rows']}x{b['cols']}x{b['reduce']}, {b['num_warps']}, {b['num_stages']} | "
            f"{r.registers} | {r.spill_stores}/{r.spill_loads} | {r.shared_bytes} | "
            f"{r.loop_instructions} | {fp32} | {r.useful:g} | {r.roofline_fraction:.2f} | "
            f"{'pass' if passes(r) else 'FAIL'} (>= {TARGETS[r.kernel]:.2f}) |"
        )
    return "\n".join(lines)


def write(rows, out: str | os.PathLike, name: str) -> None:
    """``rows`` (``(entry name, Report)``) as ``out/NAME.md`` (:func:`markdown`) and ``.json``."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown(rows) + "\n")
    records = [{"entry": entry, **dataclasses.asdict(r)} for entry, r in rows]
    (out / f"{name}.json").write_text(json.dumps(records, indent=2) + "\n")
