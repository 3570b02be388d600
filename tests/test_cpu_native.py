"""The native CPU kernels (kernels/cpu_native.cc, loaded by kernels/cpu_native.py).

Against the float64 formulas (tests/np_reference.py), the plain-jnp references
beside the Pallas kernels, and the XLA backend of ops.adder, on fresh random inputs of many
shapes (hypothesis: odd sizes, single rows and features, none a multiple of the register tiles).
The build, cache and no-compiler fallback run in subprocesses or with a stand-in compiler, so
their module state is fresh and no test waits for a real compile twice.
"""

import json
import os
import pathlib
import stat
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addervit_jax import ops
from addervit_jax.kernels import adder_pallas as P
from addervit_jax.kernels import cpu_native as N

TOL = 1e-5  # float32 against float64: relative Frobenius error
BF16_TOL = 1e-2  # bfloat16 inputs: 8 bits of mantissa, accumulated in float32


@pytest.fixture(scope="module", autouse=True)
def native():
    if not N.available():
        pytest.skip(f"native CPU kernels unavailable: {N.unavailable_reason}")


def _check_all_kernels(x, w, g, e, tol, clip_scale=4.0, jnp_references=True):
    """Every kernel against float64, and against the Pallas file's jnp references at float32."""
    xf, wf, gf = ref.float64(x, w, g)
    # the kernels stretch in float32 (u = x * e, rounded once): float64 starts from that u, so an
    # "exact" term with u within rounding of w has the same sign in both
    u = (
        xf
        if e is None
        else ref.float64(jnp.asarray(x, jnp.float32) * jnp.asarray(e, jnp.float32))[0]
    )

    y = N.forward(x, w, e)
    assert y.dtype == jnp.result_type(x, w) and y.shape == (x.shape[0], w.shape[1])
    assert ref.rel_err(y, ref.adder(u, wf)) < tol
    if jnp_references:
        assert ref.rel_err(y, P.forward_reference(x, w, e)) < tol
    for grad in ops.GRAD_RULES:
        du = N.x_grad(x, w, g, e, grad=grad, clip_scale=clip_scale)
        assert du.dtype == jnp.float32 and du.shape == x.shape
        want = ref.adder_grads(u, wf, gf, grad, clip_scale)[0]
        assert ref.rel_err(du, want) < tol, grad
        if jnp_references:  # the same rounded inputs: float32 agreement
            same = P.x_grad_reference(x, w, g, e, grad=grad, clip_scale=clip_scale)
            assert ref.rel_err(du, same) < TOL, grad
    dw = N.w_grad_exact(x, w, g, e)
    assert dw.dtype == jnp.float32 and dw.shape == w.shape
    assert ref.rel_err(dw, ref.adder_grads(u, wf, gf, "exact")[1]) < tol
    if jnp_references:
        assert ref.rel_err(dw, P.w_grad_exact_reference(x, w, g, e)) < TOL


@given(
    st.integers(1, 70),
    st.integers(1, 70),
    st.integers(1, 70),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_kernels_match_float64_on_random_shapes(length, d_in, d_out, stretch, seed):
    x, w, g, e = ref.operands(seed, length, d_in, d_out)
    _check_all_kernels(x, w, g, e if stretch else None, TOL)


@settings(max_examples=10)  # each shape compiles its own XLA programs (the casts)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_bfloat16_inputs_match_float64_of_the_rounded_inputs(length, d_in, d_out, seed):
    x, w, g, e = (jnp.asarray(a, jnp.bfloat16) for a in ref.operands(seed, length, d_in, d_out))
    assert N.forward(x, w, e).dtype == jnp.bfloat16
    _check_all_kernels(x, w, g, e, BF16_TOL, jnp_references=False)


@pytest.mark.parametrize("shape", [(1, 1, 1), (130, 97, 200), (7, 300, 49)])
def test_tile_edges_and_long_reductions(shape):
    # more rows than one job, reductions over several blocks, widths past whole panels
    _check_all_kernels(*ref.operands(sum(shape), *shape), TOL, clip_scale=2.5)


def test_sign_is_zero_at_ties_and_hardtanh_at_its_corners():
    # integers: u == w exactly for many terms, and |c * (w - u)| == 1 for c = 1 and c = 0.5
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=(23, 17)).astype(np.float32)
    w = rng.integers(-3, 4, size=(17, 29)).astype(np.float32)
    g = rng.normal(size=(23, 29)).astype(np.float32)
    assert np.mean(x[:, :, None] == w[None]) > 0.1
    for grad, clip_scale in (("exact", 4.0), ("addernet", 4.0), ("clipped", 0.5)):
        du = N.x_grad(x, w, g, grad=grad, clip_scale=clip_scale)
        assert ref.rel_err(du, ref.adder_grads(x, w, g, grad, clip_scale)[0]) < TOL, grad
    dw = N.w_grad_exact(x, w, g)
    assert ref.rel_err(dw, ref.adder_grads(x, w, g, "exact")[1]) < TOL


def test_nan_and_infinities_propagate_like_the_jnp_formulas():
    x, w, g, e = (jnp.asarray(a) for a in ref.operands(3, 9, 7, 11))
    x = x.at[1, 2].set(jnp.nan).at[3, 4].set(jnp.inf).at[0, 0].set(-jnp.inf)
    w = w.at[5, 6].set(jnp.inf).at[0, 0].set(-jnp.inf)  # inf - inf: NaN in that term

    def same(got, want):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)

    same(N.forward(x, w, e), P.forward_reference(x, w, e))
    for grad in ops.GRAD_RULES:
        same(N.x_grad(x, w, g, e, grad=grad), P.x_grad_reference(x, w, g, e, grad=grad))
    same(N.w_grad_exact(x, w, g, e), P.w_grad_exact_reference(x, w, g, e))


def test_empty_operands_give_empty_or_zero_results():
    x, w, g = jnp.zeros((0, 4)), jnp.ones((4, 3)), jnp.zeros((0, 3))
    assert N.forward(x, w).shape == (0, 3)
    assert N.x_grad(x, w, g, grad="exact").shape == (0, 4)
    dw = N.w_grad_exact(x, w, g)
    assert dw.shape == (4, 3) and not np.any(dw)
    x, w, g = jnp.ones((5, 4)), jnp.ones((4, 0)), jnp.zeros((5, 0))
    assert N.forward(x, w).shape == (5, 0)
    du = N.x_grad(x, w, g, grad="clipped")
    assert du.shape == (5, 4) and not np.any(du)
    y = N.forward(jnp.ones((5, 0)), jnp.ones((0, 3)))
    assert y.shape == (5, 3) and not np.any(y)


def test_unknown_rule_is_rejected():
    x, w, g, _ = ref.operands(0, 2, 3, 4)
    with pytest.raises(ValueError, match="grad='sign'"):
        N.x_grad(x, w, g, grad="sign")


# ---------------------------------------------------------------------------------------------
# Transformations: jit, vmap, and the composition ops will make of them
# ---------------------------------------------------------------------------------------------


def test_under_jit_and_vmap():
    x, w, g, e = ref.operands(5, 4 * 6, 8, 5)
    x, g = x.reshape(4, 6, 8), g.reshape(4, 6, 5)
    u = x.astype(np.float64) * e

    # batched rows fold into one call of the kernel
    fwd = jax.jit(jax.vmap(N.forward, (0, None, None)))
    assert ref.rel_err(fwd(x, w, e), ref.adder(u, w)) < TOL
    assert "f32[24,5]" in str(jax.make_jaxpr(fwd)(x, w, e))
    nested = jax.vmap(jax.vmap(N.forward, (0, None, None)), (0, None, None))
    assert (
        ref.rel_err(nested(x.reshape(2, 2, 6, 8), w, e), ref.adder(u, w).reshape(2, 2, 6, 5)) < TOL
    )

    du = jax.jit(jax.vmap(lambda x, g: N.x_grad(x, w, g, e, grad="clipped")))(x, g)
    want = ref.adder_grads(u, w, g, "clipped")[0]
    assert ref.rel_err(du, want) < TOL
    du = jax.vmap(lambda g: N.x_grad(x[0], w, g, e, grad="exact"))(g)  # rows shared
    for b in range(4):
        assert ref.rel_err(du[b], ref.adder_grads(u[0], w, g[b], "exact")[0]) < TOL

    # a batch of weights: one call of the batched forward (a vmap of a vmap too), each problem
    # summed exactly as alone
    ws = np.stack([w, -w, 2 * w])
    batched = jax.jit(jax.vmap(N.forward, (None, 0, None)))
    ys = batched(x[0], ws, e)
    assert "addervit_adder_batched_forward" in batched.lower(x[0], ws, e).as_text()
    for b in range(3):
        assert ref.rel_err(ys[b], ref.adder(u[0], ws[b])) < TOL
        np.testing.assert_array_equal(ys[b], N.forward(x[0], ws[b], e))
    xs, ws2 = x.reshape(2, 2, 6, 8), np.stack([ws[:2], ws[1:]])
    ys = jax.vmap(jax.vmap(N.forward, (0, 0, None)), (0, 0, None))(xs, ws2, e)
    for a in range(2):
        for b in range(2):
            np.testing.assert_array_equal(ys[a, b], N.forward(xs[a, b], ws2[a, b], e))
    # dL/dw (a sum over rows) maps over the batch
    dws = jax.vmap(lambda x, g: N.w_grad_exact(x, w, g, e))(x, g)
    for b in range(4):
        assert ref.rel_err(dws[b], ref.adder_grads(u[b], w, g[b], "exact")[1]) < TOL


def _native_vjp(x, w, e, g, grad, clip_scale=4.0):
    """The backward ops.adder's custom_vjp computes, built from the native kernels."""
    y = N.forward(x, w, e)
    du = N.x_grad(x, w, g, e, grad=grad, clip_scale=clip_scale)
    if grad == "exact":
        dw = N.w_grad_exact(x, w, g, e)
    else:
        u = x * e
        dw = jnp.matmul(u.T, g, precision="highest") - w * jnp.sum(g, axis=0)
    return y, du * e, dw, jnp.sum(du * x, axis=0)


@pytest.mark.parametrize("grad", ops.GRAD_RULES)
def test_native_backward_matches_xla_backend_and_float64(grad):
    x, w, g, e = ref.operands(11, 2 * 3 * 7, 13, 10)

    def fn(x, w, e):
        return ops.adder(x, w, stretch=e, grad=grad, clip_scale=2.5, backend="xla")

    y, pullback = jax.vjp(fn, *map(jnp.asarray, (x, w, e)))
    xla = (y, *pullback(jnp.asarray(g)))
    native = jax.jit(_native_vjp, static_argnums=(4, 5))(x, w, e, g, grad, 2.5)
    want = (ref.adder(x.astype(np.float64) * e, w), *ref.adder_stretch_grads(x, w, e, g, grad, 2.5))
    for got, same, expected in zip(native, xla, want, strict=True):
        assert got.shape == same.shape
        assert ref.rel_err(got, expected) < TOL
        assert ref.rel_err(got, same) < TOL


# ---------------------------------------------------------------------------------------------
# Subprocesses: 8 simulated CPU devices, the portable build, the no-compiler fallback
# ---------------------------------------------------------------------------------------------


def _run(script, env_extra=None, timeout=600):
    env = {**os.environ, **(env_extra or {})}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


SHARDED_SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from addervit_jax.kernels import cpu_native as N

mesh = jax.make_mesh((8,), ("data",))
rng = np.random.default_rng(0)
x = rng.normal(size=(8 * 5, 13)).astype(np.float32)
w = rng.normal(size=(13, 11)).astype(np.float32)
g = rng.normal(size=(8 * 5, 11)).astype(np.float32)
e = rng.uniform(0.5, 1.5, size=13).astype(np.float32)
rows = NamedSharding(mesh, P("data"))
xs, gs = jax.device_put(x, rows), jax.device_put(g, rows)

def kernels(x, g, w, e):
    return N.forward(x, w, e), N.x_grad(x, w, g, e, grad="clipped"), N.w_grad_exact(x, w, g, e)

def per_device(x, g, w, e):
    y, du, dw = kernels(x, g, w, e)
    return y, du, jax.lax.psum(dw, "data")

whole = kernels(x, g, w, e)
plain = jax.jit(kernels)
split = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()),
                              out_specs=(P("data"), P("data"), P())))
result = {}
for name, f in (("jit", plain), ("shard_map", split)):
    out = f(xs, gs, w, e)
    hlo = f.lower(xs, gs, w, e).compile().as_text()
    result[name] = {
        "err": [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(out, whole)],
        "calls": hlo.count("custom_call_target=\\"addervit_adder_"),
        "all_gather": "all-gather" in hlo,
        "y_spec": str(out[0].sharding.spec),
    }
# ops.int8_matmul under the mesh (as the trainer's evaluation sets it): each device its rows
from addervit_jax import ops
q = jax.device_put(rng.integers(-128, 128, size=(13, 11)).astype(np.int8))
with jax.set_mesh(mesh):
    f = jax.jit(lambda x, q: ops.int8_matmul(x, q, backend="cpu_native"))
    sums, scale = f(xs, q)
    hlo = f.lower(xs, q).compile().as_text()
xla_sums, xla_scale = ops.int8_matmul(x, q, backend="xla")
result["int8"] = {
    "same": bool(np.array_equal(sums, xla_sums) and np.array_equal(scale, xla_scale)),
    "all_gather": "all-gather" in hlo,
    "calls": hlo.count("custom_call_target=\\"addervit_int8_matmul"),
}
print("RESULT " + json.dumps(result))
"""


def test_on_8_cpu_devices_with_rows_sharded():
    result = _run(SHARDED_SCRIPT, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    int8 = result.pop("int8")
    assert int8["same"] and not int8["all_gather"] and int8["calls"] >= 1, int8
    for name, r in result.items():
        assert max(r["err"]) < 1e-5, (name, r)  # float32 sums of 5 or 40 rows
    # The custom calls have no partitioning rule: under plain jit XLA gathers the rows onto
    # every device; under shard_map each device runs the kernels on its own rows.
    assert result["jit"]["all_gather"]
    assert not result["shard_map"]["all_gather"]
    assert result["shard_map"]["y_spec"] == "P('data', None)"  # rows stay split


PORTABLE_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
import np_reference as ref
from addervit_jax.kernels import cpu_native as N

assert N.available(), N.unavailable_reason
rng = np.random.default_rng(1)
x, w = rng.normal(size=(37, 29)).astype(np.float32), rng.normal(size=(29, 45)).astype(np.float32)
g, e = rng.normal(size=(37, 45)).astype(np.float32), rng.uniform(0.5, 1.5, 29).astype(np.float32)
u = x.astype(np.float64) * e
errs = [ref.rel_err(N.forward(x, w, e), ref.adder(u, w))]
for grad in ("exact", "addernet", "clipped"):
    errs.append(ref.rel_err(N.x_grad(x, w, g, e, grad=grad), ref.adder_grads(u, w, g, grad)[0]))
errs.append(ref.rel_err(N.w_grad_exact(x, w, g, e), ref.adder_grads(u, w, g, "exact")[1]))
print("RESULT " + json.dumps({{"errs": errs}}))
"""


@pytest.mark.skipif(
    "avx512f" not in pathlib.Path("/proc/cpuinfo").read_text(errors="ignore")
    if pathlib.Path("/proc/cpuinfo").exists()
    else True,
    reason="the AVX-512 path is the default here only on AVX-512 machines",
)
def test_portable_vector_extension_path_without_avx512():
    # The GCC-vector-extension path that non-AVX-512 machines compile; with one thread, which
    # also exercises the ADDERVIT_CPU_THREADS cap.
    script = PORTABLE_SCRIPT.format(tests=str(pathlib.Path(__file__).parent))
    # (a later -march replaces -march=native; -mno-avx512f does not on g++ 14 with AVX10.1)
    env = {"ADDERVIT_CXXFLAGS": "-march=x86-64-v3", "ADDERVIT_CPU_THREADS": "1"}
    assert max(_run(script, env)["errs"]) < TOL


FALLBACK_SCRIPT = """
import json, os, pathlib, warnings
import numpy as np
from addervit_jax import ops  # importing compiles nothing
from addervit_jax.kernels import cpu_native as N

cache = pathlib.Path(os.environ["ADDERVIT_CACHE_DIR"])
result = {"cache_after_import": cache.exists()}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result["available"] = [N.available(), N.available()]
    try:
        N.forward(np.ones((2, 3), np.float32), np.ones((3, 4), np.float32))
        result["forward"] = "ran"
    except RuntimeError as err:
        result["forward"] = str(err)
    # ops falls back to the XLA backend: same numbers, no further warning
    result["resolved"] = [ops.resolve_backend("auto"), ops.resolve_backend("cpu_native")]
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    result["same_as_xla"] = bool(
        np.array_equal(ops.adder(x, w), ops.adder(x, w, backend="xla"))
        and np.array_equal(ops.adder(x, w, backend="cpu_native"), ops.adder(x, w, backend="xla"))
    )
result["warnings"] = [str(w.message) for w in caught]
result["reason"] = N.unavailable_reason
print("RESULT " + json.dumps(result))
"""


def test_without_a_compiler_unavailable_with_one_warning(tmp_path):
    env = {"CXX": str(tmp_path / "no-such-compiler"), "ADDERVIT_CACHE_DIR": str(tmp_path / "c")}
    result = _run(FALLBACK_SCRIPT, env)
    assert not result["cache_after_import"]
    assert result["available"] == [False, False]
    assert len(result["warnings"]) == 1
    assert "no-such-compiler" in result["warnings"][0] and "XLA backend" in result["warnings"][0]
    assert "no C++ compiler" in result["reason"]
    assert "unavailable" in result["forward"]
    assert result["resolved"] == ["xla", "xla"] and result["same_as_xla"]


# ---------------------------------------------------------------------------------------------
# Build and cache, with a stand-in compiler (a shell script): no real compile
# ---------------------------------------------------------------------------------------------


def _fake_compiler(tmp_path, *, fail=False, fail_with=None):
    """A stand-in compiler that logs its flags and writes "library"; ``fail``: it always fails,
    ``fail_with``: it fails when its flags hold that text."""
    refuse = f'case "$*" in *{fail_with}*) echo "error: no header" >&2; exit 1;; esac'
    refuse = refuse if fail_with else ""
    log = tmp_path / "calls.log"
    script = tmp_path / "fake-cxx"
    script.write_text(
        textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = "--version" ]; then echo fake-cxx 1.0; exit 0; fi
        echo "$@" >> {log}
        {'echo "error: broken" >&2; exit 1' if fail else ""}
        {refuse}
        while [ $# -gt 1 ]; do shift; done
        echo library > "$1"
        """)
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, log


def test_build_caches_by_source_compiler_and_flags(tmp_path, monkeypatch):
    script, log = _fake_compiler(tmp_path)
    monkeypatch.setenv("CXX", str(script))
    monkeypatch.setenv("ADDERVIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ADDERVIT_CXXFLAGS", raising=False)
    first = N.build()
    assert first.parent == tmp_path / "cache" and first.read_text() == "library\n"
    assert N.build() == first and len(log.read_text().splitlines()) == 1  # cached
    flags = log.read_text()
    assert "-O3" in flags and "-march=native" in flags and jax.ffi.include_dir() in flags
    monkeypatch.setenv("ADDERVIT_CXXFLAGS", "-DADDERVIT_TILES=4,4,64,64,4,3,64,64")
    assert N.build() != first  # other flags, another library
    # two libraries, each with its checksum, and no temporary file
    suffixes = sorted(p.suffix for p in (tmp_path / "cache").iterdir())
    assert suffixes == [".sha256", ".sha256", ".so", ".so"]


def test_build_failure_names_the_compiler_error(tmp_path, monkeypatch):
    script, _ = _fake_compiler(tmp_path, fail=True)
    monkeypatch.setenv("CXX", str(script))
    monkeypatch.setenv("ADDERVIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ADDERVIT_NO_ONEDNN", "1")
    with pytest.raises(RuntimeError, match="error: broken"):
        N.build()
    assert not list((tmp_path / "cache").iterdir())  # the half-built file is gone


def test_results_do_not_depend_on_the_thread_count(tmp_path):
    # Each output element is summed in the same order by whichever thread owns its tile.
    x, w, g, _ = ref.operands(2, 300, 70, 90)
    np.savez(tmp_path / "inputs.npz", x=x, w=w, g=g)
    script = f"""
        import json, numpy as np
        from addervit_jax.kernels import cpu_native as N
        a = np.load({str(tmp_path / "inputs.npz")!r})
        np.save({str(tmp_path / "du.npy")!r}, N.x_grad(a["x"], a["w"], a["g"], grad="exact"))
        print("RESULT {{}}")
        """
    _run(script, {"ADDERVIT_CPU_THREADS": "1"})
    np.testing.assert_array_equal(np.load(tmp_path / "du.npy"), N.x_grad(x, w, g, grad="exact"))


# ---------------------------------------------------------------------------------------------
# The int8 matmul (oneDNN), the int8 multi and ternary sites' product
# ---------------------------------------------------------------------------------------------

# pyproject.toml installs the oneDNN wheels on x86-64 Linux; the int8 path uses them where the CPU
# has VNNI or AMX
WHEELS_EXPECTED = sys.platform == "linux" and os.uname().machine == "x86_64"
ONEDNN_EXPECTED = WHEELS_EXPECTED and bool(set(N._cpu_signature().split()) & N.INT8_PRODUCT_FLAGS)


def test_build_links_onednn_where_installed_and_builds_without_it_if_that_fails(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("ADDERVIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ADDERVIT_NO_ONEDNN", raising=False)
    # a CPU without VNNI or AMX gets no oneDNN (its int8 sums could saturate)
    monkeypatch.setattr(N, "_cpu_signature", lambda: "flags\t: sse2 avx2 avx512bw\n")
    assert N.onednn_flags() == ([], [])
    monkeypatch.setattr(N, "_cpu_signature", lambda: "flags\t: sse2 avx2 avx512_vnni\n")
    compile_flags, link_flags = N.onednn_flags()
    # pyproject.toml installs the wheels on x86-64 Linux: a silent fallback there is a failure
    assert bool(compile_flags) == WHEELS_EXPECTED
    if not compile_flags:
        pytest.skip("no oneDNN wheels on this platform")
    include = pathlib.Path(compile_flags[compile_flags.index("-I") + 1])
    assert (include / "oneapi" / "dnnl" / "dnnl.hpp").is_file()
    assert pathlib.Path(link_flags[0]).name == "libdnnl.so.3"
    script, log = _fake_compiler(tmp_path, fail_with="ADDERVIT_ONEDNN")
    monkeypatch.setenv("CXX", str(script))
    with pytest.warns(RuntimeWarning, match="(?s)building with oneDNN failed.*error: no header"):
        library = N.build()
    first, second = log.read_text().splitlines()
    assert "-DADDERVIT_ONEDNN=1" in first and link_flags[0] in first
    assert "ADDERVIT_ONEDNN" not in second and "libdnnl" not in second
    assert library.read_text() == "library\n"
    # the failure is remembered: the next build does not try oneDNN again, and says nothing
    assert any(p.suffix == ".failed" for p in (tmp_path / "cache").iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert N.build() == library
    assert len(log.read_text().splitlines()) == 2
    monkeypatch.setenv("ADDERVIT_NO_ONEDNN", "1")
    assert N.onednn_flags() == ([], [])


def test_int8_matmul_runs_in_onednn_here():
    assert N.int8_matmul_path() == ("onednn" if ONEDNN_EXPECTED else None)


@settings(max_examples=25, deadline=None)
@given(
    length=st.integers(1, 70),
    k=st.integers(1, 300),
    n=st.integers(1, 90),
    seed=st.integers(0, 2**31 - 1),
    spread=st.floats(-6, 6),
)
def test_int8_matmul_is_exact_and_codes_as_absmax_int8(length, k, n, seed, spread):
    from addervit_jax import quantizers

    if N.int8_matmul_path() is None:
        pytest.skip("this build has no int8 matmul")
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((length, k)) * 10.0**spread).astype(np.float32)
    x[rng.random((length, k)) < 0.1] = 0.0
    x[0] = 0.0  # an all-zero row: the scale's floor
    w = rng.integers(-128, 128, size=(k, n), dtype=np.int8)
    sums, scale = N.int8_matmul(x, w)
    codes, expected_scale = quantizers.absmax_int8(jnp.asarray(x))
    assert sums.dtype == jnp.int32 and sums.shape == (length, n)
    np.testing.assert_array_equal(np.asarray(sums), N.int8_matmul_reference(codes, w))
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(expected_scale)[:, 0])


@pytest.mark.parametrize(("length", "k", "n"), [(1000, 96, 200), (3, 130, 700), (777, 33, 5)])
def test_int8_matmul_jobs_on_many_threads_at_once_stay_exact(length, k, n):
    # Blocks of rows and columns run on every thread of the pool at once, each with its own
    # scratchpad (a shared one gave wrong sums under load)
    from addervit_jax import quantizers

    if N.int8_matmul_path() is None:
        pytest.skip("this build has no int8 matmul")
    rng = np.random.default_rng()
    w = rng.integers(-128, 128, size=(k, n), dtype=np.int8)
    for _ in range(3):
        x = rng.standard_normal((length, k)).astype(np.float32)
        sums, scale = N.int8_matmul(x, w)
        codes, _ = quantizers.absmax_int8(jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(sums), N.int8_matmul_reference(codes, w))


def test_int8_matmul_codes_round_half_to_even_and_sum_extremes_exactly():
    if N.int8_matmul_path() is None:
        pytest.skip("this build has no int8 matmul")
    # a peak of 127 makes the scale 1: the ties 0.5, 1.5, 2.5 round to 0, 2, 2 (half to even)
    ties = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -127.0]], np.float32)
    eye = np.eye(8, dtype=np.int8)
    sums, scale = N.int8_matmul(ties, eye)
    assert float(scale[0]) == 1.0
    np.testing.assert_array_equal(np.asarray(sums)[0], [127, 0, 2, 2, 0, -2, 126, -127])
    # the largest terms, 127 * -128, summed over 4096 inputs: exact int32 (VNNI sums in int32)
    x = np.full((3, 4096), 5.0, np.float32)
    x[1] *= -1
    w = np.full((4096, 5), -128, np.int8)
    sums, _ = N.int8_matmul(x, w)
    expected = np.broadcast_to(np.array([[-1], [1], [-1]]) * 127 * 128 * 4096, (3, 5))
    np.testing.assert_array_equal(np.asarray(sums), expected)
    # a row with an infinity: XLA's scale (127 / inf = 0) and zero codes
    inf = np.ones((2, 9), np.float32)
    inf[1, 3] = np.inf
    w = np.ones((9, 2), np.int8)
    native, xla = N.int8_matmul(inf, w), ops.int8_matmul(inf, w, backend="xla")
    assert float(native[1][1]) == float(xla[1][1, 0]) == 0.0
    np.testing.assert_array_equal(np.asarray(native[0])[1], [0, 0])


def test_ops_int8_matmul_backends_agree_on_batches_and_odd_input():
    rng = np.random.default_rng()
    x = rng.standard_normal((2, 3, 37)).astype(np.float32)
    x[1, 2, 5] = np.nan
    w = rng.integers(-128, 128, size=(37, 19), dtype=np.int8)
    native = ops.int8_matmul(x, w, backend="cpu_native")
    xla = ops.int8_matmul(x, w, backend="xla")
    assert native[0].shape == (2, 3, 19) and native[1].shape == (2, 3, 1)
    finite = np.ones((2, 3), bool)
    finite[1, 2] = False
    for a, b in zip(native, xla, strict=True):
        np.testing.assert_array_equal(np.asarray(a)[finite], np.asarray(b)[finite])
    assert np.isnan(np.asarray(native[1])[1, 2, 0])  # a NaN token: a NaN scale, a NaN output
    bf16 = ops.int8_matmul(x[0].astype(jnp.bfloat16), w, backend="cpu_native")
    same = ops.int8_matmul(jnp.asarray(x[0], jnp.bfloat16).astype(jnp.float32), w, backend="xla")
    np.testing.assert_array_equal(np.asarray(bf16[0]), np.asarray(same[0]))
    with pytest.raises(TypeError, match=r"w must be 2-D int8, got int32 \(x.shape=\(2, 3, 37\)"):
        ops.int8_matmul(x, w.astype(np.int32))
    with pytest.raises(ValueError, match=r"same D_in, got x float32 \(x.shape=\(2, 3, 37\), w.sh"):
        ops.int8_matmul(x, w[:36])
    with pytest.raises(ValueError, match="could overflow int32"):
        ops.int8_matmul(np.zeros((1, 140_000), np.float32), np.zeros((140_000, 1), np.int8))


def test_int8_matmul_without_onednn_runs_xla_with_the_same_integers(tmp_path):
    script = f"""
        import json, numpy as np
        from addervit_jax import ops
        from addervit_jax.kernels import cpu_native as N
        rng = np.random.default_rng(0)
        x = rng.standard_normal((9, 33)).astype(np.float32)
        w = rng.integers(-128, 128, size=(33, 7), dtype=np.int8)
        sums, scale = ops.int8_matmul(x, w)
        np.save({str(tmp_path / "sums.npy")!r}, np.asarray(sums))
        print("RESULT " + json.dumps({{"path": N.int8_matmul_path(), "sad": N.available()}}))
        """
    env = {"ADDERVIT_NO_ONEDNN": "1", "ADDERVIT_CACHE_DIR": str(tmp_path / "cache")}
    assert _run(script, env) == {"path": None, "sad": True}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 33)).astype(np.float32)
    w = rng.integers(-128, 128, size=(33, 7), dtype=np.int8)
    expected = np.asarray(ops.int8_matmul(x, w)[0])
    np.testing.assert_array_equal(np.load(tmp_path / "sums.npy"), expected)


@settings(max_examples=20, deadline=None)
@given(
    k=st.integers(1, 40), n=st.integers(1, 70), length=st.integers(1, 40), seed=st.integers(0, 99)
)
def test_ternary_matmul_from_2_bit_codes_equals_the_int8_product(k, n, length, seed):
    from addervit_jax import quantizers

    rng = np.random.default_rng(seed)
    codes = rng.integers(-1, 2, size=(k, n)).astype(np.int8)
    packed = quantizers.pack_ternary(codes)
    assert packed.dtype == jnp.uint8 and packed.shape == (k, -(-n // 4))
    np.testing.assert_array_equal(quantizers.unpack_ternary(packed, n), codes)
    x = rng.standard_normal((length, k)).astype(np.float32)
    expected = ops.int8_matmul(x, codes, backend="xla")
    for backend in ("cpu_native", "xla"):
        got = ops.ternary_matmul(x, packed, n, backend=backend)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ternary_packing_refuses_what_it_cannot_hold():
    from addervit_jax import quantizers

    with pytest.raises(ValueError, match="must all be -1, 0 or 1"):
        quantizers.pack_ternary(np.array([[0, 2]], np.int8))
    with pytest.raises(ValueError, match=r"expected codes \(K, N\), got shape \(3,\)"):
        quantizers.pack_ternary(np.zeros(3, np.int8))
    with pytest.raises(ValueError, match=r"expected uint8 \(K, ceil\(9 / 4\)\) bytes, got uint8"):
        quantizers.unpack_ternary(np.zeros((2, 2), np.uint8), 9)
    packed = quantizers.pack_ternary(np.zeros((5, 9), np.int8))
    with pytest.raises(TypeError, match=r"packed must be uint8 \(D_in, ceil\(d_out / 4\)\)"):
        ops.ternary_matmul(np.ones((2, 5), np.float32), packed, 13)
    with pytest.raises(ValueError, match="with packed's D_in, got x float32"):
        ops.ternary_matmul(np.ones((2, 4), np.float32), packed, 9)


@settings(max_examples=20, deadline=None)
@given(
    length=st.integers(1, 600),
    k=st.integers(1, 200),
    n=st.integers(1, 90),
    seed=st.integers(0, 2**31 - 1),
    ternary=st.booleans(),
)
def test_int8_dense_rescales_the_exact_sums_in_the_kernel(length, k, n, seed, ternary):
    # y = sums * col * (1 / scale) + bias: against float64 from the exact integer sums, and bit
    # for bit what XLA computes from its own sums (the same integers, the same roundings)
    from addervit_jax import quantizers

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((length, k)).astype(np.float32)
    col = rng.uniform(1e-3, 1.0, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    if ternary:
        w = rng.integers(-1, 2, size=(k, n)).astype(np.int8)
        packed = quantizers.pack_ternary(w)
        dense = lambda b, bias=bias: ops.ternary_dense(x, packed, n, col, bias, backend=b)  # noqa: E731
    else:
        w = rng.integers(-128, 128, size=(k, n), dtype=np.int8)
        dense = lambda b, bias=bias: ops.int8_dense(x, w, col, bias, backend=b)  # noqa: E731
    codes, scale = quantizers.absmax_int8(jnp.asarray(x))
    sums = N.int8_matmul_reference(codes, w).astype(np.float64)
    want = sums * col / np.asarray(scale, np.float64) + bias
    got = {b: np.asarray(dense(b)) for b in ("cpu_native", "xla")}
    assert got["cpu_native"].dtype == np.float32 and got["cpu_native"].shape == (length, n)
    np.testing.assert_allclose(got["cpu_native"], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(got["cpu_native"], got["xla"])
    # no bias: zeros
    unbiased = np.asarray(dense("cpu_native", None))
    np.testing.assert_array_equal(unbiased, np.asarray(dense("xla", None)))
    np.testing.assert_allclose(unbiased, want - bias, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_int8_dense_nan_rows_and_refusals_name_the_shapes():
    if N.int8_matmul_path() is None:
        pytest.skip("this build has no int8 matmul")
    x = np.ones((4, 6), np.float32)
    x[2, 1] = np.nan
    w = np.ones((6, 5), np.int8)
    y = np.asarray(ops.int8_dense(x, w, np.ones(5), np.zeros(5), backend="cpu_native"))
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()
    with pytest.raises(ValueError, match=r"col and bias must be \(5,\), .*col.shape=\(4,\)"):
        ops.int8_dense(x, w, np.ones(4), backend="cpu_native")
    with pytest.raises(ValueError, match=r"int8_dense: expected float x .*w.shape=\(7, 5\)"):
        ops.int8_dense(x, np.ones((7, 5), np.int8), np.ones(5))
    y = ops.int8_dense(np.ones((2, 3, 6), np.float32), w, np.ones(5), backend="cpu_native")
    assert y.shape == (2, 3, 5)  # leading axes kept
