"""The static check of the Pallas kernels in Hopper machine code (kernels/sass.py).

The SASS parsing and the capture of Pallas' Triton IR need no Triton; compiling to SASS does
(the ``sass`` extra), and those tests run where it is installed.
"""

import dataclasses
import importlib.util
import json

import jax.numpy as jnp
import pytest

from addervit_jax.kernels import adder_pallas, sass

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.GE.AND P0, PT, R0, 0x4, PT ;
        /*0020*/                   FADD R4, R5, -R6 ;
        /*0030*/                   FADD R8, R8, |R4| ;
        /*0040*/              @!P0 BRA 0x20 ;
        /*0050*/                   SHFL.BFLY PT, R9, R8, 0x1, 0x1f ;
        /*0060*/                   FADD R4, R5, -R6 ;
        /*0070*/                   FFMA R8, R4, R5, R8 ;
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0090*/               @P0 BRA 0x50 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
"""


def test_hot_loop_is_the_longest_backward_branch():
    # two loops: 0x20-0x40 (3 instructions) and 0x50-0x90 (5); the self-branch at 0xb0 is none
    assert sass.hot_loop(SASS) == ["SHFL", "FADD", "FFMA", "BAR", "BRA"]
    assert sass.hot_loop("EXIT ;") == []


@pytest.mark.parametrize(("kernel", "rule"), sass.KERNELS)
def test_triton_ir_of_every_kernel_is_captured_without_triton(kernel, rule):
    shipped = dict(adder_pallas.BLOCKS[kernel])
    blocks = adder_pallas.Blocks(rows=32, cols=16, reduce=4, num_warps=4, num_stages=2)
    ir = sass.triton_ir(kernel, rule, (64, 48, 32), jnp.float32, blocks)
    assert "tt.func public @adder_" in ir and "scf.for" in ir
    # the table entry was restored; another tile at the same shape is a new trace, not a cached one
    assert adder_pallas.BLOCKS[kernel] == shipped
    other = sass.triton_ir(kernel, rule, (64, 48, 32), jnp.float32, adder_pallas.Blocks(16, 16, 2))
    assert other != ir


def test_without_triton_the_check_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "pip install 'addervit-jax[sass]'" in sass.missing()
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        sass.compile_to_sass("module {}", 4, 2)


@pytest.mark.skipif(sass.missing() is not None, reason="the sass extra (Triton) is not installed")
def test_forward_hot_loop_counts_its_terms():
    blocks = adder_pallas.Blocks(rows=32, cols=32, reduce=8, num_warps=4, num_stages=2)
    report = sass.check("forward", None, (4096, 384, 1536), jnp.float32, blocks)
    assert report.registers > 0 and report.spill_stores == 0
    assert report.terms_per_thread == 32 * 32 * 8 / 128
    # every term is at least a difference and an accumulation, both FADD
    assert report.loop_mix["FADD"] >= report.useful == 2 * report.terms_per_thread
    assert report.roofline_fraction == report.useful / report.loop_instructions
    assert "| forward | - | float32 | 4096x384x1536 |" in sass.markdown([("small", report)])


# Every kernel, rule and table entry; bfloat16 only for the forward, the one kernel whose output
# (and so whose compiled code) depends on the input dtype: the others take float32 operands and
# return float32 whatever the inputs.
SHIPPED = [
    (kernel, rule, entry, dtype)
    for kernel, rule in sass.KERNELS
    for entry in ("small", "large")
    for dtype in ((jnp.float32, jnp.bfloat16) if kernel == "forward" else (jnp.float32,))
]


@pytest.mark.skipif(sass.missing() is not None, reason="the sass extra (Triton) is not installed")
@pytest.mark.parametrize(("kernel", "rule", "entry", "dtype"), SHIPPED)
def test_every_shipped_tile_compiles_without_spills_and_reaches_its_target(
    kernel, rule, entry, dtype
):
    # The guard of BLOCKS (CI installs the sass extra). One ViT shape: the hot loop does not
    # depend on the shape, only its trip count (the sweep over all three, in
    # experiments/results/sass/sass.md, has the same loop at each).
    report = sass.check(kernel, rule, sass.SHAPES[0], dtype, adder_pallas.BLOCKS[kernel][entry])
    assert sass.passes(report), (
        f"{kernel} {rule} {entry} {report.dtype}: {report.spill_stores} B of spill stores, "
        f"static roofline fraction {report.roofline_fraction:.3f} (target {sass.TARGETS[kernel]}); "
        f"loop {report.loop_mix}"
    )


def test_write_puts_the_table_and_the_records_side_by_side(tmp_path):
    report = sass.Report(
        kernel="forward",
        rule=None,
        dtype="float32",
        shape=(8, 4, 4),
        blocks={"rows": 8, "cols": 4, "reduce": 4, "num_warps": 4, "num_stages": 2},
        registers=32,
        spill_stores=0,
        spill_loads=0,
        shared_bytes=0,
        loop_instructions=10,
        loop_mix={"FADD": 8, "BRA": 1, "BAR": 1},
        terms_per_thread=4.0,
        useful=8.0,
        roofline_fraction=0.8,
    )
    sass.write([("small", report)], tmp_path / "out", "sass")
    assert (tmp_path / "out" / "sass.md").read_text() == sass.markdown([("small", report)]) + "\n"
    record = json.loads((tmp_path / "out" / "sass.json").read_text())
    assert record == [{"entry": "small", **dataclasses.asdict(report), "shape": [8, 4, 4]}]
