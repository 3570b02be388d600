"""The Pallas kernels (kernels/adder_pallas.py) on a CPU machine.

Interpret mode runs each kernel's grid as a loop, so these shapes are small but never multiples
of the blocks. Lowering for CUDA runs the Pallas-to-Triton lowering, which rejects what a GPU
could not compile (block shapes that are not powers of two, unsupported primitives), on any
machine.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys
import warnings
import zlib

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from train_worker import run_worker, train_losses

from addervit_jax import ops
from addervit_jax.adder import backends, selfcheck
from addervit_jax.kernels import adder_pallas as K
from addervit_jax.kernels import compat

TOL = 1e-5  # float32 against float64: relative Frobenius error
BF16_TOL = 1e-2  # bfloat16 inputs: 8 bits of mantissa, accumulated in float32
# (L, D_in, D_out): none a multiple of the 8/32-wide blocks; one output wider than two tiles,
# one reduction longer than several loop steps, and a single row.
SHAPES = [(37, 19, 23), (5, 70, 3), (66, 9, 41), (1, 3, 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_match_their_references_and_float64(shape, dtype):
    seed = zlib.crc32(repr((shape, jnp.dtype(dtype).name)).encode())  # the same in every run
    x, w, g, e = (jnp.asarray(a, dtype) for a in ref.operands(seed, *shape))
    # The kernels stretch in float32 (u = x * e, rounded once); the float64 formulas start from
    # that u, so an "exact" term with u within rounding of w has the same sign in both.
    (uf,) = ref.float64(x.astype(jnp.float32) * e.astype(jnp.float32))
    wf, gf = ref.float64(w, g)
    tol = TOL if dtype == jnp.float32 else BF16_TOL

    y = K.forward(x, w, e, interpret=True)
    assert y.dtype == dtype and y.shape == (shape[0], shape[2])
    assert ref.rel_err(y, K.forward_reference(x, w, e)) < tol
    assert ref.rel_err(y, ref.adder(uf, wf)) < tol

    for grad in ops.GRAD_RULES:
        du = K.x_grad(x, w, g, e, grad=grad, interpret=True)
        want_du, want_dw = ref.adder_grads(uf, wf, gf, grad)
        # the kernel and its reference see the same (rounded) inputs: float32 agreement
        assert ref.rel_err(du, K.x_grad_reference(x, w, g, e, grad=grad)) < TOL
        assert ref.rel_err(du, want_du) < TOL
    dw = K.w_grad_exact(x, w, g, e, interpret=True)
    assert ref.rel_err(dw, K.w_grad_exact_reference(x, w, g, e)) < TOL
    assert ref.rel_err(dw, ref.adder_grads(uf, wf, gf, "exact")[1]) < TOL


def test_exact_rule_gives_sign_zero_at_ties_and_propagates_nan():
    # The kernels sum g [a > b] + g [a >= b] and subtract g's sum after the loop (two
    # comparisons, no sign instruction); ties must still count 0 and a NaN operand NaN, as sign.
    x, w, g, e = (np.asarray(a, np.float32) for a in ref.operands(11, 9, 7, 6))
    e = np.ones_like(e)
    w[2, :] = x[4, 2]  # ties: u[4, 2] == w[2, d] for every d
    w[5, 3] = x[1, 5]
    x_nan, w_nan, g_nan, x_inf, w_inf = x.copy(), w.copy(), g.copy(), x.copy(), w.copy()
    x_nan[3, 1] = np.nan  # dL/du: row 3, column 1; dL/dw: row 1
    w_nan[6, 4] = np.nan  # dL/du: column 6; dL/dw: entry (6, 4)
    g_nan[5, 2] = np.nan  # dL/du: row 5; dL/dw: column 2
    x_inf[0, 3], w_inf[3, 1], w_inf[4, 2] = np.inf, np.inf, -np.inf  # inf - inf: one NaN term
    cases = [(x, w, g), (x_nan, w, g), (x, w_nan, g), (x, w, g_nan), (x_inf, w_inf, g)]
    for xs, ws, gs in cases:
        du = np.asarray(K.x_grad(xs, ws, gs, e, grad="exact", interpret=True))
        dw = np.asarray(K.w_grad_exact(xs, ws, gs, e, interpret=True))
        with np.errstate(invalid="ignore"):
            want_du, want_dw = ref.adder_grads(*ref.float64(xs, ws, gs), "exact")
        np.testing.assert_array_equal(np.isnan(du), np.isnan(want_du))
        np.testing.assert_array_equal(np.isnan(dw), np.isnan(want_dw))
        finite_du, finite_dw = ~np.isnan(want_du), ~np.isnan(want_dw)
        assert ref.rel_err(du[finite_du], want_du[finite_du]) < TOL
        assert ref.rel_err(dw[finite_dw], want_dw[finite_dw]) < TOL
    assert np.isnan(want_dw[3, 1]) and np.isnan(want_du[0, 3])  # the infinities made NaNs
    with pytest.raises(ValueError, match="unknown grad='sign'"):
        K.x_grad(x, w, g, e, grad="sign", interpret=True)


def test_kernels_without_stretch_and_clip_scale_reach_the_kernel():
    x, w, g, _ = (jnp.asarray(a) for a in ref.operands(3, 13, 6, 9))
    assert ref.rel_err(K.forward(x, w, interpret=True), ref.adder(x, w)) < TOL
    for clip_scale in (1.0, 2.5):
        du = K.x_grad(x, w, g, grad="clipped", clip_scale=clip_scale, interpret=True)
        assert ref.rel_err(du, ref.adder_grads(x, w, g, "clipped", clip_scale)[0]) < TOL


@pytest.mark.parametrize("grad", ops.GRAD_RULES)
def test_pallas_backend_matches_xla_and_float64_forward_and_every_gradient(grad):
    x, w, g, e = ref.operands(11, 2 * 3 * 7, 13, 10)
    x, g = x.reshape(2, 3, 7, 13), g.reshape(2, 3, 7, 10)

    def vjp(backend):
        fn = functools.partial(ops.adder, grad=grad, backend=backend, interpret=True)
        y, pullback = jax.vjp(lambda x, w, e: fn(x, w, stretch=e), *map(jnp.asarray, (x, w, e)))
        return y, *pullback(jnp.asarray(g))

    pallas, xla = vjp("pallas"), vjp("xla")
    want = (ref.adder(x.astype(np.float64) * e, w), *ref.adder_stretch_grads(x, w, e, g, grad))
    for got, same, expected in zip(pallas, xla, want, strict=True):
        assert got.shape == same.shape
        assert ref.rel_err(got, expected) < TOL
        assert ref.rel_err(got, same) < TOL


def test_pallas_backend_under_jit_vmap_and_bfloat16():
    x, w, _, _ = ref.operands(5, 4 * 6, 8, 5)
    x = x.reshape(4, 6, 8)
    fn = jax.jit(
        jax.vmap(functools.partial(ops.adder, backend="pallas", interpret=True), (0, None))
    )
    assert ref.rel_err(fn(x, w), ref.adder(x, w)) < TOL
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    yb = fn(xb, wb)
    assert yb.dtype == jnp.bfloat16
    assert ref.rel_err(yb, ref.adder(*ref.float64(xb, wb))) < BF16_TOL
    dx = jax.grad(lambda x: ops.adder(x, wb, backend="pallas", interpret=True).sum())(xb)
    assert dx.dtype == jnp.bfloat16 and dx.shape == xb.shape


def test_empty_operands_give_empty_or_zero_results():
    x, w = jnp.zeros((0, 4)), jnp.ones((4, 3))
    assert K.forward(x, w, interpret=True).shape == (0, 3)
    assert K.w_grad_exact(x, w, jnp.zeros((0, 3)), interpret=True).shape == (4, 3)
    assert not np.any(K.w_grad_exact(x, w, jnp.zeros((0, 3)), interpret=True))


def test_block_table_gives_powers_of_two_that_fit_the_shape():
    for kernel in K.BLOCKS:
        for dims in [(1, 1, 1), (10, 384, 7), (4096, 1536, 384), (65, 3, 10_000)]:
            b = K.blocks_for(kernel, *dims)
            for size, block in zip(dims, (b.rows, b.cols, b.reduce), strict=True):
                assert block & (block - 1) == 0  # a power of two, as Triton requires
                assert block < 2 * max(size, 1)  # never more than one block of padding
    assert K.blocks_for("forward", 4096, 1536, 384).num_warps == 8  # large outputs


# ---------------------------------------------------------------------------------------------
# Lowering for CUDA on a CPU machine
# ---------------------------------------------------------------------------------------------

LOWERING_SHAPES = [(4096, 384, 1536), (4096, 1536, 384), (37, 19, 23), (65, 64, 10), (1, 1, 1)]


def _lower_for_cuda(fn, *specs):
    return compat.lower_for_cuda(fn, *specs).as_text()


@pytest.mark.parametrize("shape", LOWERING_SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_kernel_lowers_for_cuda(shape, dtype):
    length, d_in, d_out = shape
    spec = jax.ShapeDtypeStruct
    x, w, g, e = spec((length, d_in), dtype), spec((d_in, d_out), dtype), None, None
    g, e = spec((length, d_out), dtype), spec((d_in,), dtype)
    kernels = {
        "adder_forward": lambda x, w, g, e: K.forward(x, w, e),
        "adder_w_grad_exact": lambda x, w, g, e: K.w_grad_exact(x, w, g, e),
    }
    for grad in ops.GRAD_RULES:
        kernels[f"adder_x_grad_{grad}"] = functools.partial(
            lambda x, w, g, e, grad: K.x_grad(x, w, g, e, grad=grad), grad=grad
        )
    for name, fn in kernels.items():
        text = _lower_for_cuda(fn, x, w, g, e)
        assert "__gpu$xla.gpu.triton" in text and name in text, name


@pytest.mark.parametrize("grad", ops.GRAD_RULES)
def test_pallas_backend_train_step_lowers_for_cuda(grad):
    spec = jax.ShapeDtypeStruct

    def loss(x, w, e):
        return jnp.sum(ops.adder(x, w, stretch=e, grad=grad, backend="pallas") ** 2)

    f32 = jnp.float32
    text = _lower_for_cuda(
        jax.value_and_grad(loss, argnums=(0, 1, 2)),
        spec((64, 65, 128), f32),
        spec((128, 512), f32),
        spec((128,), f32),
    )
    assert text.count("__gpu$xla.gpu.triton") == (3 if grad == "exact" else 2)


# ---------------------------------------------------------------------------------------------
# Sharded: 8 simulated CPU devices (a fresh process, so the XLA flag applies)
# ---------------------------------------------------------------------------------------------

SHARDED_SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from addervit_jax import ops

mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
rng = np.random.default_rng(0)
x = rng.normal(size=(16, 5, 13)).astype(np.float32)
w = rng.normal(size=(13, 11)).astype(np.float32)
e = rng.uniform(0.5, 1.5, size=13).astype(np.float32)
xs = jax.device_put(x, NamedSharding(mesh, P("data")))
result = {}
for grad in ops.GRAD_RULES:
    def loss(x, w, e, backend):
        y = ops.adder(x, w, stretch=e, grad=grad, backend=backend, interpret=True)
        return jnp.sum(jnp.sin(y))
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    with jax.set_mesh(mesh):
        pallas = f(xs, w, e, "pallas")
        text = f.lower(xs, w, e, "pallas").as_text()
    xla = f(x, w, e, "xla")
    result[grad] = {
        "err": [float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))
                for a, b in zip(jax.tree.leaves(pallas), jax.tree.leaves(xla))],
        "manual": "sdy.manual_computation" in text or "shard_map" in text,
        "dx_sharding": str(pallas[1][0].sharding.spec),
    }
# inside a caller's own shard_map the kernels see that shard (no second, nested shard_map)
inner = {}
for backend in ("pallas", "cpu_native", "xla"):
    f = jax.jit(jax.shard_map(
        lambda x, w, b=backend: ops.adder(x, w, stretch=e, backend=b, interpret=b == "pallas"),
        mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"), check_vma=False))
    inner[backend] = np.asarray(f(x.reshape(-1, 13), w))
result["inside_shard_map"] = [
    float(np.abs(inner[b] - inner["xla"]).max() / np.abs(inner["xla"]).max())
    for b in ("pallas", "cpu_native")
]
# L1 attention scores: one adder per example and head under vmap, split by the batch
q = jax.device_put(rng.normal(size=(8, 2, 6, 4)).astype(np.float32), NamedSharding(mesh, P("data")))
def scores(q, k, backend):
    per_example = lambda q, k: ops.adder(q, k.T, backend=backend, interpret=backend == "pallas")
    return ops.shard_rows(jax.vmap(jax.vmap(per_example)), (q, k))
with jax.set_mesh(mesh):
    f = jax.jit(scores, static_argnums=2)
    hlo = f.lower(q, q, "cpu_native").compile().as_text()
    s = f(q, q, "cpu_native")
result["scores"] = {
    "collectives": "all-gather" in hlo or "all-to-all" in hlo,
    "spec": str(s.sharding.spec),
    "err": float(np.abs(np.asarray(s) - np.asarray(scores(q, q, "xla"))).max()),
}
print("RESULT " + json.dumps(result))
"""


def _run_on_8_devices(script_or_args):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run(
        [sys.executable, *script_or_args], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_kernels_run_per_device_under_shard_map_on_8_devices():
    stdout = _run_on_8_devices(["-c", SHARDED_SCRIPT])
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert max(result.pop("inside_shard_map")) < TOL
    scores = result.pop("scores")
    assert not scores["collectives"] and scores["spec"] == "P('data',)" and scores["err"] < 1e-4
    for grad, r in result.items():
        assert r["manual"], grad  # the kernels sit inside a shard_map, one call per device
        assert r["dx_sharding"] == "P('data',)", grad  # dL/dx stays split by rows
        assert max(r["err"]) < TOL, (grad, r["err"])


def test_sharded_train_step_with_pallas_kernels_equals_xla(tmp_path):
    summaries, losses = {}, {}
    for backend in ("pallas", "xla"):
        overrides = {
            "config.variant": "qkv_2ffn",
            "config.batch_size": 16,
            "config.total_steps": 3,
            "config.model.backend": backend,
            "config.model.interpret": True,
        }
        summaries[backend] = run_worker(tmp_path / backend, overrides, devices=8)
        losses[backend] = train_losses(tmp_path / backend)
    assert "8 x cpu" in summaries["pallas"]["device"]
    np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-5)
    assert summaries["pallas"]["params_checksum"] == pytest.approx(
        summaries["xla"]["params_checksum"], rel=1e-5
    )


# ---------------------------------------------------------------------------------------------
# addervit check-kernels and the GPU benchmark script
# ---------------------------------------------------------------------------------------------


def test_check_kernels_command_passes_and_catches_a_wrong_kernel(capsys, monkeypatch):
    from addervit_jax import cli

    assert cli.main(["check-kernels", "--shapes", "20x7x9", "9x33x4"]) == 0
    out = capsys.readouterr().out
    assert "interpret mode" in out and out.count("| pass |") == 6 and "all passed" in out

    # a kernel that is off by one in a single output element must fail the check
    correct = K.forward
    monkeypatch.setattr(K, "forward", lambda *a, **k: correct(*a, **k).at[0, 0].add(1.0))
    assert cli.main(["check-kernels", "--shapes", "20x7x9"]) == 1
    out = capsys.readouterr().out
    assert out.count("| FAIL |") == 3 and "3 FAILED" in out


def test_check_kernels_refuses_a_malformed_shape_with_a_usage_error(capsys):
    from addervit_jax import cli

    for bad in ("10x10", "axbxc", "0x1x2"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["check-kernels", "--shapes", "20x7x9", bad])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"--shapes: shape '{bad}': expected LxD_INxD_OUT, three positive integers" in err
        assert "Traceback" not in err


def test_bench_kernels_runs_in_interpret_mode():
    script = pathlib.Path(__file__).parents[1] / "experiments" / "bench_kernels.py"
    out = subprocess.run(
        [sys.executable, str(script), "--interpret", "--shapes", "16x8x8", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 16x8x8 |")]
    assert len(rows) == 5  # forward, dL/dx for three rules, exact dL/dw
    no_gpu = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert no_gpu.returncode != 0 and "no GPU" in no_gpu.stderr


def test_auto_picks_pallas_on_a_gpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert ops.resolve_backend("auto") == "pallas"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert ops.resolve_backend("auto") == "cpu_native"  # tests/test_cpu_native.py: or "xla"


# ---------------------------------------------------------------------------------------------
# backend="auto" on a GPU: each kernel checked once per process (addervit_jax/adder/selfcheck.py)
# ---------------------------------------------------------------------------------------------

KERNELS = ("forward", "x_grad", "w_grad_exact")


@pytest.fixture
def auto_on_a_gpu(monkeypatch):
    """``"auto"`` as on a GPU: it chooses the Pallas kernels, which, not interpreted, cannot
    compile on this CPU. Each test starts with no kernel checked and no trace of the op that
    JAX would reuse (the backend is chosen while tracing), and leaves none behind."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    selfcheck.kernel_backend.cache_clear()
    jax.clear_caches()
    yield
    selfcheck.kernel_backend.cache_clear()
    jax.clear_caches()


def _interpreted(kernel, wrong_by=0.0):
    """A Pallas backend function that runs interpreted whatever it is asked (a GPU's kernel that
    compiles, on this CPU), ``wrong_by`` off in its first element."""

    def run(*args, interpret, **options):
        del interpret
        return kernel(*args, interpret=True, **options).at[0, 0].add(wrong_by)

    return run


def _exact_vjp(x, w, e, g, backend="auto"):
    """y, dL/dx, dL/dw, dL/dE of the exact rule, which runs all three kernels."""
    fn = functools.partial(ops.adder, grad="exact", backend=backend)
    y, pullback = jax.vjp(lambda x, w, e: fn(x, w, stretch=e), x, w, e)
    return y, *pullback(g)


def _float64_vjp(x, w, e, g):
    return ref.adder(ref.float64(x)[0] * e, w), *ref.adder_stretch_grads(x, w, e, g, "exact")


def test_auto_on_a_gpu_runs_xla_for_a_kernel_that_does_not_compile(auto_on_a_gpu):
    x, w, g, e = map(jnp.asarray, ref.operands(21, 13, 9, 6))
    with pytest.raises(Exception) as raised:  # what the kernel itself raises on this CPU
        ops.adder(x, w, backend="pallas")
    with pytest.warns(RuntimeWarning) as record:
        got = _exact_vjp(x, w, e, g)
    assert len(record) == 3  # one per kernel
    for kernel, warning in zip(KERNELS, record, strict=True):
        message = str(warning.message)
        assert f"backend='auto' chose the 'pallas' kernel {kernel} (" in message
        assert f"this process runs the 'xla' backend's {kernel} in its place" in message
        assert message.endswith(
            f"The kernel failed to compile or run: {type(raised.value).__name__}: {raised.value}"
        )
    assert "grad='exact', clip_scale=4.0, interpret=False; float32 operands, stretched" in str(
        record[1].message
    )
    for a, b, c in zip(got, _exact_vjp(x, w, e, g, "xla"), _float64_vjp(x, w, e, g), strict=True):
        np.testing.assert_array_equal(a, b)
        assert ref.rel_err(a, c) < TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked once per process: no second warning
        again = _exact_vjp(x, w, e, g)
    for a, b in zip(got, again, strict=True):
        np.testing.assert_array_equal(a, b)
    jaxpr = jax.make_jaxpr(_exact_vjp)(x, w, e, g)
    assert "pallas_call" not in str(jaxpr)


def test_auto_on_a_gpu_replaces_only_the_kernel_with_a_wrong_result(auto_on_a_gpu, monkeypatch):
    pallas = backends.get("pallas")
    for kernel in KERNELS:
        wrong_by = 1.0 if kernel == "forward" else 0.0
        monkeypatch.setattr(pallas, kernel, _interpreted(getattr(pallas, kernel), wrong_by))
    x, w, g, e = map(jnp.asarray, ref.operands(22, 13, 9, 6))
    with pytest.warns(RuntimeWarning) as record:
        got = _exact_vjp(x, w, e, g)
    [warning] = record
    message = str(warning.message)
    assert "the 'pallas' kernel forward (interpret=False; float32 operands, stretched)" in message
    assert "The kernel's result differs from the 'xla' backend's by up to 1 (" in message
    assert "tolerance 0.0001" in message
    for a, b in zip(got, _float64_vjp(x, w, e, g), strict=True):
        assert ref.rel_err(a, b) < TOL
    # the forward of "xla", the backward kernels of "pallas"
    np.testing.assert_array_equal(got[0], ops.adder(x, w, stretch=e, backend="xla"))
    assert str(jax.make_jaxpr(_exact_vjp)(x, w, e, g)).count("pallas_call") == 2
    # a backend asked for by name is not checked: the wrong kernel runs, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        named = ops.adder(x, w, stretch=e, backend="pallas")
    np.testing.assert_allclose(named[0, 0] - got[0][0, 0], 1.0, rtol=1e-5)


def test_auto_on_a_gpu_runs_the_kernels_that_pass(auto_on_a_gpu, monkeypatch):
    pallas = backends.get("pallas")
    for kernel in KERNELS:
        monkeypatch.setattr(pallas, kernel, _interpreted(getattr(pallas, kernel)))
    x, w, g, e = map(jnp.asarray, ref.operands(23, 13, 9, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _exact_vjp(x, w, e, g)
        jaxpr = jax.make_jaxpr(_exact_vjp)(x, w, e, g)
    assert str(jaxpr).count("pallas_call") == 3
    for a, b in zip(got, _float64_vjp(x, w, e, g), strict=True):
        assert ref.rel_err(a, b) < TOL


def test_interpret_mode_selects_the_pallas_kernels_under_auto():
    x, w = jnp.ones((4, 3)), jnp.ones((3, 2))
    assert "pallas_call" in str(jax.make_jaxpr(lambda x: ops.adder(x, w, interpret=True))(x))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x: ops.adder(x, w))(x))


def test_a_cpu_only_import_does_not_load_the_gpu_backend():
    # The Pallas Triton backend (deprecated in JAX 0.12) is GPU-only: kernels/compat.py imports it
    # when a kernel is first built for a GPU, never at import, nor for the interpret mode.
    code = (
        "import sys\n"
        "from addervit_jax import cli, layers, models, ops, train\n"
        "import jax.numpy as jnp\n"
        "ops.adder(jnp.ones((3, 4)), jnp.ones((4, 2)), backend='pallas', interpret=True)\n"
        "gpu = [m for m in sys.modules if m.endswith('pallas.triton') or 'jax_triton' in m]\n"
        "print(sorted(gpu))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
