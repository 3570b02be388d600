"""int8 inference of adder layers: the SAD kernel (kernels/cpu_native.cc, every instruction path),
``ops.adder_int8`` and ``ops.int8_codes``, ``models.Int8AdderDense``, ``models.quantize`` and
``addervit eval --int8``.

Integer results are compared for equality with a NumPy integer reference; the quantised layer
against the float64 adder within the bound its grid implies.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from addervit_jax import layers, models, ops
from addervit_jax.kernels import cpu_native as N


def _codes(rng, shape, extremes: bool) -> np.ndarray:
    """Random uint8 codes; ``extremes``: only 0 and 255 (the largest differences)."""
    if extremes:
        return (rng.integers(0, 2, shape) * 255).astype(np.uint8)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def native():
    if not N.available():
        pytest.skip(f"native CPU kernels unavailable: {N.unavailable_reason}")


# ---------------------------------------------------------------------------------------------
# The kernel and the op
# ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 70),
    st.integers(1, 300),
    st.integers(1, 70),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_sad_kernel_is_exact_on_random_shapes(native, length, k, n, extremes, seed):
    rng = np.random.default_rng(seed)
    a, b = _codes(rng, (length, k), extremes), _codes(rng, (k, n), extremes)
    out = N.sad(a, b)
    assert out.dtype == jnp.int32 and out.shape == (length, n)
    np.testing.assert_array_equal(np.asarray(out), N.sad_reference(a, b))


@pytest.mark.parametrize("shape", [(1, 1, 1), (96 * 2 + 5, 1031, 97), (6, 8, 32), (200, 2049, 3)])
def test_sad_kernel_at_tile_edges_long_reductions_and_saturation(native, shape):
    length, k, n = shape
    rng = np.random.default_rng(k)
    a, b = _codes(rng, (length, k), False), _codes(rng, (k, n), False)
    np.testing.assert_array_equal(np.asarray(N.sad(a, b)), N.sad_reference(a, b))
    # every term at its largest, 255, in both directions
    full, empty = np.full((length, k), 255, np.uint8), np.zeros((k, n), np.uint8)
    np.testing.assert_array_equal(np.asarray(N.sad(full, empty)), np.full((length, n), 255 * k))
    np.testing.assert_array_equal(np.asarray(N.sad(empty.T, full.T)), np.full((n, length), 255 * k))


def test_sad_kernel_under_jit_and_vmap(native):
    rng = np.random.default_rng(3)
    a, b = _codes(rng, (3, 10, 21), False), _codes(rng, (21, 9), False)
    want = np.stack([N.sad_reference(x, b) for x in a])
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(N.sad, (0, None)))(a, b)), want)
    bs = _codes(rng, (3, 21, 9), False)  # both batched: mapped
    want = np.stack([N.sad_reference(x, y) for x, y in zip(a, bs, strict=True)])
    np.testing.assert_array_equal(np.asarray(jax.vmap(N.sad)(a, bs)), want)


def test_sad_kernel_rejects_bad_operands(native):
    a = np.zeros((2, 3), np.uint8)
    with pytest.raises(TypeError, match=r"uint8.*float32\[3, 4\]"):
        N.sad(a, np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"a.shape\[1\]=3 must equal b.shape\[0\]=5"):
        N.sad(a, np.zeros((5, 4), np.uint8))
    assert N.sad(np.zeros((0, 3), np.uint8), np.zeros((3, 4), np.uint8)).shape == (0, 4)


SAD_PATH_SCRIPT = """
import json
import numpy as np
from addervit_jax.kernels import cpu_native as N

assert N.available(), N.unavailable_reason
rng = np.random.default_rng(5)
same = []
for length, k, n in [(1, 1, 1), (7, 13, 5), (97, 301, 43), (13, 1100, 33)]:
    a, b = rng.integers(0, 256, (length, k), np.uint8), rng.integers(0, 256, (k, n), np.uint8)
    same.append(bool(np.array_equal(np.asarray(N.sad(a, b)), N.sad_reference(a, b))))
full, empty = np.full((9, 777), 255, np.uint8), np.zeros((777, 10), np.uint8)
same.append(bool(np.all(np.asarray(N.sad(full, empty)) == 255 * 777)))
print("RESULT " + json.dumps({"path": N.sad_path(), "same": same}))
"""

_CPU_FLAGS = (
    pathlib.Path("/proc/cpuinfo").read_text(errors="ignore").split()
    if pathlib.Path("/proc/cpuinfo").exists()
    else []
)


@pytest.mark.parametrize(
    ("flags", "path", "needs"),
    [
        ("-march=x86-64-v3", "avx2", ("avx2", "fma", "bmi2", "movbe")),
        ("-march=x86-64-v2", "portable", ("sse4_2", "popcnt")),
    ],
)
def test_every_instruction_path_of_the_sad_kernel_is_exact(native, flags, path, needs):
    # The default build here takes the best path this CPU has (avx512bw on AVX-512 machines: the
    # tests above); the others are built for an older target. A later -march replaces
    # -march=native; -mno-avx512f does not do it everywhere (g++ 14 on CPUs it takes for AVX10.1
    # keeps __AVX512F__ and __AVX512BW__ defined and only warns).
    if not set(needs) <= set(_CPU_FLAGS):
        pytest.skip(f"this CPU lacks one of {needs}")
    env = {**os.environ, "ADDERVIT_CXXFLAGS": flags, "ADDERVIT_CPU_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SAD_PATH_SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["path"] == path and all(result["same"]), result


def test_native_path_is_the_best_this_cpu_has(native):
    expected = (
        "avx512bw"
        if {"avx512f", "avx512bw"} <= set(_CPU_FLAGS)
        else "avx2"
        if "avx2" in _CPU_FLAGS
        else "portable"
    )
    if not _CPU_FLAGS or os.environ.get("ADDERVIT_CXXFLAGS"):
        pytest.skip("no /proc/cpuinfo, or build flags set by the environment")
    assert N.sad_path() == expected


@pytest.mark.parametrize("backend", ["auto", "xla", "cpu_native", "pallas"])
def test_adder_int8_is_minus_the_sad_on_every_backend(backend):
    rng = np.random.default_rng(7)
    qx, qw = _codes(rng, (2, 9, 37), False), _codes(rng, (37, 11), False)
    want = -np.stack([N.sad_reference(x, qw) for x in qx])
    out = jax.jit(lambda a, b: ops.adder_int8(a, b, backend=backend))(qx, qw)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), want)
    # int8 codes: the same differences (the sign bit flipped is +128 on both)
    signed = lambda q: (q.astype(np.int16) - 128).astype(np.int8)  # noqa: E731
    np.testing.assert_array_equal(
        np.asarray(ops.adder_int8(signed(qx), signed(qw), backend=backend)), want
    )


def test_adder_int8_rejects_bad_operands():
    q = np.zeros((4, 3), np.uint8)
    with pytest.raises(TypeError, match=r"both be uint8 or both int8, got uint8 and int8"):
        ops.adder_int8(q, np.zeros((3, 2), np.int8))
    with pytest.raises(ValueError, match=r"qx.shape=\(4, 3\), qw.shape=\(4, 2\)"):
        ops.adder_int8(q, np.zeros((4, 2), np.uint8))


def test_int8_codes_put_values_on_the_grid_and_clip_at_its_ends():
    low, scale = -0.5, 0.01
    grid = low + scale * np.arange(256)
    np.testing.assert_array_equal(np.asarray(ops.int8_codes(grid, low, scale)), np.arange(256))
    outside = np.array([-100.0, low - scale, low + 300 * scale, 1e30])
    np.testing.assert_array_equal(np.asarray(ops.int8_codes(outside, low, scale)), [0, 0, 255, 255])
    assert ops.int8_codes(grid, low, scale).dtype == jnp.uint8


# ---------------------------------------------------------------------------------------------
# The layer and the model
# ---------------------------------------------------------------------------------------------


def _adder_layer(seed, d_in, d_out, norm="layer"):
    rng = np.random.default_rng(seed)
    layer = layers.AdderDense(d_in, d_out, norm=norm, rngs=nnx.Rngs(seed))
    layer.stretch[...] = jnp.asarray(rng.uniform(0.5, 1.5, d_in), jnp.float32)
    layer.mask[...] = jnp.asarray(rng.uniform(0.5, 1.5, d_out), jnp.float32)
    layer.bias[...] = jnp.asarray(rng.normal(size=d_out), jnp.float32)
    x = jnp.asarray(rng.normal(size=(300, d_in)), jnp.float32)
    return layer, x


def _outside_ref(w, low, scale):
    """float64: each output's weight distance beyond the grid [low, low + 255 scale]."""
    w, high = np.asarray(w, np.float64), low + 255 * scale
    return np.sum(np.maximum(w - high, 0) + np.maximum(low - w, 0), axis=0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weight_spread", [1.0, 10.0])
def test_int8_layer_is_within_its_grid_error_of_the_float64_adder(seed, weight_spread):
    # The grid spans u (no clipping), so each u is rounded by at most scale / 2, and each w
    # inside it too; a w outside it is kept exactly (its distance beyond the grid moves into the
    # bias), so each |u - w| moves by at most scale: |sum| error <= D_in * scale, with the scale
    # of u's range however far the weights spread (x10: most of them outside).
    layer, x = _adder_layer(seed, 57, 23, norm="none")
    layer.kernel[...] = layer.kernel[...] * weight_spread
    q = models.Int8AdderDense.calibrate(layer, x, clip_fractions=(0.0,))
    low, scale = float(q.low[...]), float(q.scale[...])
    u = np.asarray(x, np.float64) * np.asarray(layer.stretch[...], np.float64)
    w = np.asarray(layer.kernel[...], np.float64)
    similarity = ref.adder(u, w)
    got = (np.asarray(q(x), np.float64) - np.asarray(layer.bias[...])) / np.asarray(layer.mask[...])
    assert np.max(np.abs(got - similarity)) <= 57 * scale * (1 + 1e-5)
    # the grid spans the inputs: the lowest at code 0, the highest at code 255
    assert low == pytest.approx(u.min(), rel=1e-6, abs=1e-6)
    assert scale == pytest.approx((u.max() - u.min()) / 255, rel=1e-5)
    assert q.kernel[...].dtype == jnp.uint8
    outside = _outside_ref(w, low, scale)
    assert (outside > 0).all() if weight_spread > 1 else (outside >= 0).all()
    np.testing.assert_allclose(
        q.bias[...],
        np.asarray(layer.bias[...]) - np.asarray(layer.mask[...]) * outside,
        rtol=1e-5,
        atol=1e-3,
    )


def test_a_site_without_gain_or_bias_keeps_the_weights_outside_its_grid_in_a_bias():
    rng = np.random.default_rng(5)
    layer = layers.AdderDense(
        29, 11, stretch=False, mask=False, use_bias=False, norm="none", rngs=nnx.Rngs(5)
    )
    layer.kernel[...] = layer.kernel[...] * 10.0  # most weights outside the inputs' range
    x = jnp.asarray(rng.normal(size=(200, 29)), jnp.float32)
    q = models.Int8AdderDense.calibrate(layer, x, clip_fractions=(0.0,))
    low, scale = float(q.low[...]), float(q.scale[...])
    w = np.asarray(layer.kernel[...], np.float64)
    np.testing.assert_allclose(q.bias[...], -_outside_ref(w, low, scale), rtol=1e-5, atol=1e-3)
    similarity = ref.adder(np.asarray(x, np.float64), w)
    assert np.max(np.abs(np.asarray(q(x), np.float64) - similarity)) <= 29 * scale * (1 + 1e-4)


def test_a_layer_normalised_site_spans_its_weights_with_its_grid():
    # a LayerNorm over the outputs comes before F and b: the weights outside a grid of u's range
    # could not be kept, so the grid holds them (and the bias stays the layer's)
    layer, x = _adder_layer(4, 33, 17, norm="layer")
    layer.kernel[...] = layer.kernel[...] * 10.0
    q = models.Int8AdderDense.calibrate(layer, x, clip_fractions=(0.0,))
    u = np.asarray(x, np.float64) * np.asarray(layer.stretch[...], np.float64)
    w = np.asarray(layer.kernel[...], np.float64)
    lo, hi = min(u.min(), w.min()), max(u.max(), w.max())
    assert float(q.low[...]) == pytest.approx(lo, rel=1e-6, abs=1e-6)
    assert float(q.scale[...]) == pytest.approx((hi - lo) / 255, rel=1e-5)
    np.testing.assert_array_equal(q.bias[...], layer.bias[...])


def test_a_batch_norm_site_folds_its_running_statistics_into_gain_and_bias():
    layer, x = _adder_layer(3, 40, 24, norm="batch")
    layer.kernel[...] = layer.kernel[...] * 3.0  # some weights outside the grid of u
    for i in range(3):  # running statistics away from their initial values
        nnx.jit(lambda m, x: m(x))(layer, x[100 * i : 100 * (i + 1)] * (1 + i))
    before = np.asarray(layer.batch_norm.mean[...])
    q = models.Int8AdderDense.calibrate(layer, x, clip_fractions=(0.0,))
    assert not layer.batch_norm.use_running_average  # the layer given is not changed
    np.testing.assert_array_equal(layer.batch_norm.mean[...], before)
    bn = layer.batch_norm
    inv = 1 / np.sqrt(np.asarray(bn.var[...], np.float64) + 1e-5)
    mask = np.asarray(layer.mask[...], np.float64)
    outside = _outside_ref(layer.kernel[...], float(q.low[...]), float(q.scale[...]))
    assert (outside > 0).any()
    np.testing.assert_allclose(q.mask[...], mask * inv, rtol=1e-6)
    np.testing.assert_allclose(
        q.bias[...],
        np.asarray(layer.bias[...]) - mask * inv * (np.asarray(bn.mean[...]) + outside),
        rtol=1e-5,
        atol=1e-3,
    )
    # the int8 layer is within its grid error of the float layer at inference
    u = np.asarray(x, np.float64) * np.asarray(layer.stretch[...], np.float64)
    similarity = ref.adder(u, np.asarray(layer.kernel[...], np.float64))
    expected = (similarity - np.asarray(bn.mean[...])) * mask * inv + np.asarray(layer.bias[...])
    bound = 40 * float(q.scale[...]) * np.max(mask * inv) * (1 + 1e-4) + 1e-3
    assert np.max(np.abs(np.asarray(q(x), np.float64) - expected)) <= bound


def test_calibration_picks_the_grid_with_the_smallest_output_error():
    layer, x = _adder_layer(2, 64, 32)
    reference = np.asarray(layer(x))
    errors = {
        f: float(
            np.mean(
                (
                    np.asarray(models.Int8AdderDense.calibrate(layer, x, clip_fractions=(f,))(x))
                    - reference
                )
                ** 2
            )
        )
        for f in models.Int8AdderDense.CLIP_FRACTIONS
    }
    best = models.Int8AdderDense.calibrate(layer, x)
    assert float(np.mean((np.asarray(best(x)) - reference) ** 2)) == pytest.approx(
        min(errors.values())
    )
    # normalised outputs (unit variance before F, b) move by little: about 1e-2 rms
    assert min(errors.values()) < 1e-3


@pytest.mark.parametrize(
    ("variant", "overrides", "sites"),
    [
        ("qkv_2ffn", {}, 10),  # 2 blocks x (q, k, v, fc1, fc2)
        ("all_adder", {"attn": "l1_identity"}, 14),  # + embed, 2 proj, head
        ("adder", {}, 10),  # AdderNet's layer (adder_orig)
    ],
)
def test_quantize_replaces_every_adder_site_and_stays_close(variant, overrides, sites):
    model = models.build(
        variant, rngs=nnx.Rngs(0), dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64, **overrides
    )
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(4, 32, 32, 3)).astype(np.float32) for _ in range(2)]
    before = nnx.state(model)
    quantized = models.quantize(model, batches)
    kinds = [type(m).__name__ for _, m in nnx.iter_modules(quantized)]
    assert kinds.count("Int8AdderDense") == sites and "AdderDense" not in kinds
    # the float model is untouched
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), before, nnx.state(model)))
    images = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
    floats, ints = np.asarray(model(images)), np.asarray(quantized(images))
    assert np.sqrt(np.mean((floats - ints) ** 2)) < 0.05 * np.std(floats)
    # it jits and splits like any NNX model; the codes are not parameters
    graphdef, params, rest = nnx.split(quantized, nnx.Param, ...)
    assert not any(v.dtype == jnp.uint8 for v in jax.tree.leaves(params))
    jitted = jax.jit(lambda p, r, x: nnx.merge(graphdef, p, r)(x))(params, rest, images)
    # (XLA may fuse (u - low) / scale differently under jit, moving a value across a rounding
    # boundary: a code one step away changes a term by one grid step)
    np.testing.assert_allclose(np.asarray(jitted), ints, atol=2e-3)


def test_quantize_refuses_models_without_sites_of_its_kinds_and_empty_batches():
    small = {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "mlp_dim": 64}
    with pytest.raises(ValueError, match="no adder sites"):
        models.quantize(models.build("multi", rngs=nnx.Rngs(0), **small), [], kinds=("adder",))
    with pytest.raises(ValueError, match=r"euclid sites have no int8 form: not built"):
        models.quantize(models.build("euclider", rngs=nnx.Rngs(0), **small), [], kinds=("euclid",))
    with pytest.raises(ValueError, match="batches is empty"):  # adder sites are calibrated
        models.quantize(models.build("qkv_2ffn", rngs=nnx.Rngs(0), **small), [])


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 29, 45), (300, 130, 70), (200, 1100, 33)])
def test_fused_int8_layer_kernel_matches_its_composition(native, shape, norm):
    # Inputs a safe distance from rounding ties (code k +- 0.4 steps), so the kernel and XLA
    # code every value alike and the integer sums are equal: only float rounding differs.
    length, d_in, d_out = shape
    rng = np.random.default_rng(d_in)
    low, scale = -2.0, 4.0 / 255
    steps = rng.integers(0, 256, (length, d_in)) + rng.uniform(-0.4, 0.4, (length, d_in))
    x = jnp.asarray(low + scale * steps, jnp.float32)
    codes_w = jnp.asarray(rng.integers(0, 256, (d_in, d_out), np.uint8))
    mask = jnp.asarray(rng.uniform(0.5, 1.5, d_out), jnp.float32)
    bias = jnp.asarray(rng.normal(size=d_out), jnp.float32)
    kw = dict(low=low, scale=scale, mask=mask, bias=bias, norm=norm)
    fused = ops.adder_int8_layer(x, codes_w, backend="cpu_native", **kw)
    composed = ops.adder_int8_layer(x, codes_w, backend="xla", **kw)
    # float64 of the same integer sums
    sums = N.sad_reference(np.asarray(ops.int8_codes(x, low, scale)), np.asarray(codes_w))
    y = -scale * sums.astype(np.float64)
    if norm and d_out > 1:
        y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5)
    elif norm:
        y = np.zeros_like(y)
    want = y * np.asarray(mask, np.float64) + np.asarray(bias, np.float64)
    # the kernel normalises in double, two passes; jax.nn.standardize in float32 as
    # E[y^2] - E[y]^2, which loses digits when the mean is large against the spread
    for got, tol in ((fused, 2e-5), (composed, 1e-3)):
        assert got.dtype == jnp.float32 and got.shape == (length, d_out)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)


def test_fused_int8_layer_with_stretch_under_jit_and_vmap(native):
    layer, x = _adder_layer(4, 48, 40)
    q = models.Int8AdderDense.calibrate(layer, x)
    xs = x.reshape(3, 100, 48)
    fused = jax.jit(jax.vmap(q))(xs)
    q.backend = "xla"
    composed = q(xs)
    # random inputs: a rare value codes one step apart in the two (a rounding tie)
    assert np.mean(np.abs(np.asarray(fused) - np.asarray(composed)) > 1e-4) < 1e-3
    np.testing.assert_allclose(np.asarray(fused), np.asarray(composed), atol=5e-2)


# ---------------------------------------------------------------------------------------------
# int8 multiplication and ternary sites; shift sites have none
# ---------------------------------------------------------------------------------------------


def _site(kind, d_in, d_out, seed, **options):
    """A site of ``kind`` with fresh random parameters."""
    layer = layers.make_linear(kind, d_in, d_out, rngs=nnx.Rngs(seed), **options)
    rng = np.random.default_rng(seed)
    for var in vars(layer).values():
        if isinstance(var, nnx.Param):
            var[...] = jnp.asarray(rng.normal(size=var.shape), jnp.float32)
    return layer


_INT8_FORMS = {
    "multi": models.Int8DenseMulti,
    "multi_ln": models.Int8DenseMulti,
    "ternary": models.Int8Ternary,
}


def _integer_reference(q, codes):
    """The site's int32 sums in NumPy int64 from its codes: products of int8 codes."""
    codes = np.asarray(codes, np.int64)
    if isinstance(q, models.Int8Ternary):  # its 2-bit bytes, unpacked here by hand
        packed = np.asarray(q.packed[...], np.int64)
        fields = (packed[:, :, None] >> np.arange(0, 8, 2)) & 3  # column 4 j + i: byte j, bits 2i
        weights = fields.reshape(packed.shape[0], -1)[:, : q.out_features] - 1
        return codes @ weights
    return codes @ np.asarray(q.kernel[...], np.int64)


@pytest.mark.parametrize("kind", ["multi", "multi_ln", "ternary"])
def test_int8_site_sums_equal_an_integer_numpy_reference(kind):
    layer = _site(kind, 57, 23, seed=5)
    q = _INT8_FORMS[kind](layer)
    x = np.random.default_rng(6).normal(size=(3, 40, 57)).astype(np.float32)
    codes, scale = q.activation_codes(x)
    assert codes.dtype == jnp.int8 and int(jnp.max(jnp.abs(codes))) == 127
    sums = jax.jit(q.integer_similarity)(x)
    assert sums.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(sums), _integer_reference(q, codes))
    # the codes are per-token absmax codes of the site's input (BitNet's RMSNorm(x) for ternary)
    h = np.asarray(x, np.float64)
    if kind == "ternary":
        h = h / np.sqrt(np.mean(h**2, -1, keepdims=True) + 1e-6)
    want = np.round(h * 127 / np.abs(h).max(-1, keepdims=True))
    assert np.mean(np.asarray(codes) != want) < 1e-3  # float32 vs float64 at a rounding tie
    assert np.max(np.abs(np.asarray(codes) - want)) <= 1


def test_int8_weight_codes():
    multi = _site("multi", 30, 12, seed=1)
    q = models.Int8DenseMulti(multi)
    w = np.asarray(multi.kernel[...], np.float64)
    scale = np.abs(w).max(0) / 127  # one scale per output channel
    np.testing.assert_allclose(q.weight_scale[...], scale, rtol=1e-6)
    np.testing.assert_array_equal(q.kernel[...], np.round(w / scale))
    ternary = _site("ternary", 30, 12, seed=2)
    codes, _ = ternary.weight_codes()
    int8 = models.Int8Ternary(ternary)
    np.testing.assert_array_equal(int8.integer_weights(), codes)
    # stored in 2 bits, four per byte: a quarter of the int8 codes' bytes (12 columns: 3 bytes)
    assert int8.packed[...].dtype == jnp.uint8 and int8.packed[...].shape == (30, 3)


@pytest.mark.parametrize(
    ("kind", "options", "tolerance"),
    [
        ("multi", {}, 2e-2),
        ("multi_ln", {"norm": "batch"}, 2e-2),
        ("ternary", {}, 1e-6),  # the float layer computes the same integer sums
        ("ternary", {"norm": "layer", "mask": True}, 1e-5),
    ],
)
def test_int8_site_is_close_to_its_float_site(kind, options, tolerance):
    layer = _site(kind, 64, 32, seed=7, **options)
    x = np.random.default_rng(8).normal(size=(200, 64)).astype(np.float32)
    if options.get("norm") == "batch":
        nnx.jit(lambda m, x: m(x))(layer, x * 2 + 1)  # running statistics away from (0, 1)
        layer.eval()
    q = _INT8_FORMS[kind](layer)
    assert ref.rel_err(jax.jit(q)(x), layer(x)) < tolerance


def test_shift_sites_have_no_int8_form_and_say_why():
    model = models.build(
        "qkv_2ffn_shift", rngs=nnx.Rngs(0), dim=32, depth=1, heads=2, dim_head=16, mlp_dim=64
    )
    with pytest.raises(ValueError, match=r"shift sites have no int8 form: .*16 exponents"):
        models.quantize(model, [], kinds=["multi", "shift"])
    with pytest.warns(UserWarning, match=r"\(shift: no int8 form, .*NO_INT8_FORM.*shift x5"):
        quantized = models.quantize(model, [])  # the multiplication sites, the shift ones float
    assert {type(m).__name__ for _, m in nnx.iter_modules(quantized)} & {"Int8DenseMulti"}
    assert sum(kind == "shift" for _, kind in models.float_sites(quantized)) == 5


@pytest.mark.parametrize(
    ("variant", "int8_sites"),
    [
        ("qkv_2ffn_ternary", {"Int8Ternary": 10, "Int8DenseMulti": 4}),
        ("multi", {"Int8DenseMulti": 14}),
        ("euclider", {"Int8DenseMulti": 4}),
    ],
)
def test_quantize_converts_every_kind_and_names_the_sites_left_float(variant, int8_sites):
    model = models.build(
        variant, rngs=nnx.Rngs(0), dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64
    )
    rng = np.random.default_rng(1)
    with pytest.warns(UserWarning, match="stay float") as warned:
        quantized = models.quantize(model, [])  # no adder site: nothing to calibrate
    kinds = [type(m).__name__ for _, m in nnx.iter_modules(quantized)]
    assert {k: kinds.count(k) for k in int8_sites} == int8_sites
    left = models.float_sites(quantized)
    expected = [(f"blocks.{i}.attn", k) for i in (0, 1) for k in ("scores_dot", "attention_values")]
    if variant == "euclider":  # q, k, v and both FFN layers of each block
        assert sum(kind == "euclid" for _, kind in left) == 10
    assert [site for site in left if site[1] != "euclid"] == expected
    message = str(warned[0].message)
    assert "scores_dot x2" in message and "attention_values x2" in message
    assert ("euclid x10" in message) == (variant == "euclider")
    images = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
    floats, ints = np.asarray(model(images)), np.asarray(quantized(images))
    assert np.sqrt(np.mean((floats - ints) ** 2)) < 0.05 * np.std(floats)


def _committed_run(name):
    run = pathlib.Path(__file__).resolve().parents[1] / "experiments/results/study_cifar10/runs"
    data_dir = os.environ.get("TFDS_DATA_DIR") or str(
        pathlib.Path(__file__).resolve().parents[2] / "shared/datasets/tfds"
    )
    if not (run / name / "params.msgpack").is_file():
        pytest.skip(f"the committed run {name} is absent")
    if not (pathlib.Path(data_dir) / "cifar10").is_dir():
        pytest.skip(f"CIFAR-10 in TFDS format not found at {data_dir}")
    return run / name, data_dir


def test_int8_multi_keeps_the_accuracy_of_the_trained_cifar10_model(monkeypatch):
    run, data_dir = _committed_run("multi_seed0")
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    from addervit_jax import train

    with pytest.warns(UserWarning, match="stay float"):
        result = train.evaluate_workdir(run, split="train[45000:47000]", int8=True)
    assert result["float"]["count"] == result["int8"]["count"] == 2000
    assert abs(result["int8"]["accuracy"] - result["float"]["accuracy"]) <= 0.003
    assert result["float"]["accuracy"] > 0.75
    assert result["int8_sites"] == {"multi": 26}  # embed, 4 x (q, k, v, proj, fc1, fc2), head
    assert result["float_sites"] == [
        f"blocks.{i}.attn ({kind})" for i in range(4) for kind in ("scores_dot", "attention_values")
    ]
    assert result["calibration"]["images"] == 0  # no adder site to calibrate


def test_quantize_refuses_what_it_cannot_calibrate_in_one_line():
    model = models.build(
        "qkv_2ffn", rngs=nnx.Rngs(0), dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32
    )
    images = np.random.default_rng().normal(size=(2, 32, 32, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"batches=None, but 5 adder sites need calibration"):
        models.quantize(model, None)
    bad = images.copy()
    bad[0, 3, 4, 1] = np.nan
    with pytest.raises(ValueError, match=r"calibration inputs of site blocks\.0\.\S+ hold NaN"):
        models.quantize(model, [bad])
    with pytest.raises(ValueError, match=r"kinds is empty; name at least one of \('adder'"):
        models.quantize(model, [images], kinds=[])
    # one kind named alone is that kind, not its letters
    with pytest.warns(UserWarning, match="stay float"):
        one = models.quantize(model, [images], kinds="adder")
    kinds = {type(m).__name__ for _, m in nnx.iter_modules(one)}
    assert "Int8AdderDense" in kinds and "Int8DenseMulti" not in kinds
    # a model without adder sites needs no batches at all
    size = {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "mlp_dim": 32}
    multi = models.build("multi", rngs=nnx.Rngs(0), **size)
    with pytest.warns(UserWarning, match="stay float"):
        models.quantize(multi, None)
