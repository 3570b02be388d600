"""AdderDense / EuclidDense / Dense against direct float64 formulas, and make_linear."""

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from flax import nnx

from addervit_jax import layers


def _randomise(layer, seed):
    """Replace every parameter by fresh random values (E, F and b are ones/zeros at init)."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(layer):
        if isinstance(var, nnx.Param):
            var[...] = jnp.asarray(rng.normal(size=var.shape), jnp.float32)
    return layer


def _standardize(y, eps=1e-5):
    mean = y.mean(-1, keepdims=True)
    var = ((y - mean) ** 2).mean(-1, keepdims=True)
    return (y - mean) / np.sqrt(var + eps)


def _params(layer):
    return {
        name: None
        if getattr(layer, name, None) is None
        else np.asarray(getattr(layer, name)[...], np.float64)
        for name in ("kernel", "stretch", "mask", "bias")
    }


def _distance_layer_reference(layer, x, similarity):
    p = _params(layer)
    h = np.asarray(x, np.float64)
    if p["stretch"] is not None:
        h = h * p["stretch"]
    y = similarity(h, p["kernel"])
    if layer.norm == "layer":
        y = _standardize(y)
    if p["mask"] is not None:
        y = y * p["mask"]
    if p["bias"] is not None:
        y = y + p["bias"]
    return y


@pytest.mark.parametrize("cls", [layers.AdderDense, layers.EuclidDense, layers.NormedDense])
@pytest.mark.parametrize("norm", ["layer", "none"])
@pytest.mark.parametrize(("lead", "d_in", "d_out"), [((5,), 13, 7), ((2, 3), 1, 9), ((4,), 33, 2)])
def test_distance_layer_matches_float64_formula(cls, norm, lead, d_in, d_out):
    layer = _randomise(cls(d_in, d_out, norm=norm, rngs=nnx.Rngs(0)), seed=d_in)
    x = np.random.default_rng(1).normal(size=(*lead, d_in)).astype(np.float32)
    similarity = {
        layers.AdderDense: ref.adder,
        layers.EuclidDense: ref.euclid,
        layers.NormedDense: ref.dense,
    }[cls]
    expected = _distance_layer_reference(layer, x, similarity)
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    assert y.shape == (*lead, d_out)
    # LayerNorm subtracts the large common part of -sum_i |x_i - w_id|, which amplifies float32
    # rounding of the sum; 1e-4 leaves room for that and nothing else.
    assert ref.rel_err(y, expected) < (1e-4 if norm == "layer" else 1e-5)


@pytest.mark.parametrize("cls", [layers.AdderDense, layers.EuclidDense, layers.NormedDense])
def test_batch_norm_site_statistics_running_averages_and_eval_mode(cls):
    # norm="batch": each output unit standardised over the batch and the tokens (AdderNet's
    # BatchNorm, no affine of its own), the running averages updated with momentum 0.9 (of the
    # biased variance, as flax computes it), and used once the model is in evaluation mode.
    layer = _randomise(cls(11, 6, norm="batch", rngs=nnx.Rngs(0)), seed=3)
    similarity = {
        layers.AdderDense: ref.adder,
        layers.EuclidDense: ref.euclid,
        layers.NormedDense: ref.dense,
    }[cls]
    p = _params(layer)
    rng = np.random.default_rng(4)
    running_mean, running_var = np.zeros(6), np.ones(6)
    for _ in range(2):
        x = rng.normal(size=(4, 5, 11)).astype(np.float32)
        y = similarity(
            np.asarray(x, np.float64) * (1 if p["stretch"] is None else p["stretch"]), p["kernel"]
        )
        mean, var = y.mean(axis=(0, 1)), y.var(axis=(0, 1))
        expected = (y - mean) / np.sqrt(var + 1e-5) * p["mask"] + p["bias"]
        got = nnx.jit(lambda m, x: m(x))(layer, x)
        assert ref.rel_err(got, expected) < 1e-4
        running_mean = 0.9 * running_mean + 0.1 * mean
        running_var = 0.9 * running_var + 0.1 * var
        np.testing.assert_allclose(layer.batch_norm.mean[...], running_mean, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(layer.batch_norm.var[...], running_var, rtol=1e-4)
    layer.eval()
    x = rng.normal(size=(3, 11)).astype(np.float32)
    y = similarity(
        np.asarray(x, np.float64) * (1 if p["stretch"] is None else p["stretch"]), p["kernel"]
    )
    expected = (y - running_mean) / np.sqrt(running_var + 1e-5) * p["mask"] + p["bias"]
    assert ref.rel_err(nnx.jit(lambda m, x: m(x))(layer, x), expected) < 1e-4
    np.testing.assert_allclose(layer.batch_norm.mean[...], running_mean, rtol=1e-5, atol=1e-4)


def test_dense_matches_float64_formula():
    layer = _randomise(layers.Dense(11, 6, rngs=nnx.Rngs(0)), seed=3)
    x = np.random.default_rng(2).normal(size=(3, 4, 11)).astype(np.float32)
    p = _params(layer)
    assert ref.rel_err(layer(x), ref.dense(x, p["kernel"]) + p["bias"]) < 1e-5


@pytest.mark.parametrize("lead", [(7,), (2, 5)])
def test_normalisation_gradients_match_float64_autodiff(lead):
    # The norm's backward is written out (layers._normalize_affine): against autodiff of the
    # formula F * (y - mean) / sqrt(var + eps) + b in float64, on a multi_ln site (whose
    # similarity, a dot product, has exact autodiff gradients).
    layer = _randomise(layers.NormedDense(10, 6, rngs=nnx.Rngs(0)), seed=6)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(*lead, 10)).astype(np.float32)
    r = rng.normal(size=(*lead, 6)).astype(np.float32)
    grads, dx = nnx.grad(lambda m, x: jnp.sum(m(x) * r), argnums=(0, 1))(layer, x)
    p = _params(layer)

    got = [dx, grads.kernel[...], grads.mask[...], grads.bias[...]]
    want = _normalised_site_grads(x, r, p, axes=(-1,))
    for name, a, b in zip(("x", "kernel", "mask", "bias"), got, want, strict=True):
        assert ref.rel_err(a, b) < 1e-5, name


def _normalised_site_grads(x, r, p, *, axes):
    """float64 autodiff of ``sum(r * (mask * N(x @ kernel) + bias))``, N the normalisation over
    ``axes``: the gradients of x, kernel, mask and bias."""

    def reference(x, kernel, mask, bias):
        y = x @ kernel
        mean = y.mean(axes, keepdims=True)
        z = (y - mean) / jnp.sqrt(((y - mean) ** 2).mean(axes, keepdims=True) + 1e-5)
        return jnp.sum((z * mask + bias) * r)

    with jax.enable_x64():
        args = [jnp.asarray(a, jnp.float64) for a in (x, p["kernel"], p["mask"], p["bias"])]
        return [np.asarray(g) for g in jax.grad(reference, argnums=(0, 1, 2, 3))(*args)]


@pytest.mark.parametrize("lead", [(40,), (4, 9)])
def test_batch_norm_gradients_match_float64_autodiff_and_its_statistics_nnx(lead):
    # norm="batch" in training: the same written-out backward over the batch and the tokens,
    # against float64 autodiff; its forward and running statistics are nnx.BatchNorm's, bit for
    # bit (the trained runs' numbers are unchanged)
    layer = _randomise(layers.NormedDense(10, 6, norm="batch", rngs=nnx.Rngs(0)), seed=6)
    layer.batch_norm.mean[...] = jnp.linspace(-1, 1, 6)
    layer.batch_norm.var[...] = jnp.linspace(0.5, 2, 6)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(*lead, 10)).astype(np.float32) * 3 + 1
    r = rng.normal(size=(*lead, 6)).astype(np.float32)
    p = _params(layer)
    twin = nnx.clone(layer)

    @nnx.jit
    def nnx_batch_norm(m, x):  # what the layer computed with nnx.BatchNorm in training
        return m.batch_norm(m._site_similarity(x)) * m.mask[...] + m.bias[...]

    want_y = nnx_batch_norm(twin, x)
    got_y = nnx.jit(lambda m, x: m(x))(layer, x)
    np.testing.assert_array_equal(np.asarray(got_y), np.asarray(want_y))
    for name in ("mean", "var"):
        np.testing.assert_array_equal(
            np.asarray(getattr(layer.batch_norm, name)[...]),
            np.asarray(getattr(twin.batch_norm, name)[...]),
        )
    grads, dx = nnx.grad(lambda m, x: jnp.sum(m(x) * r), argnums=(0, 1))(layer, x)
    want = _normalised_site_grads(x, r, p, axes=tuple(range(x.ndim - 1)))
    got = [dx, grads.kernel[...], grads.mask[...], grads.bias[...]]
    for name, a, b in zip(("x", "kernel", "mask", "bias"), got, want, strict=True):
        assert ref.rel_err(a, b) < 1e-4, name


@pytest.mark.parametrize("grad", ["clipped", "addernet", "exact"])
def test_adder_layer_gradients_follow_the_rule(grad):
    # Without the norm, y = F * adder(E * x, W) + b, so every gradient is a rule of ops.adder
    # composed with elementwise products, computed here in float64.
    layer = _randomise(layers.AdderDense(10, 6, grad=grad, norm="none", rngs=nnx.Rngs(0)), seed=4)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(7, 10)).astype(np.float32)
    r = rng.normal(size=(7, 6)).astype(np.float32)

    def loss(layer, x):
        return jnp.sum(layer(x) * r)

    grads, dx = nnx.grad(loss, argnums=(0, 1))(layer, x)
    p = _params(layer)
    h = x * p["stretch"]
    g = r * p["mask"]
    dh, dw = ref.adder_grads(h, p["kernel"], g, grad)
    assert ref.rel_err(grads.kernel[...], dw) < 1e-5
    assert ref.rel_err(dx, dh * p["stretch"]) < 1e-5
    assert ref.rel_err(grads.stretch[...], (dh * x).sum(0)) < 1e-5
    assert ref.rel_err(grads.mask[...], (ref.adder(h, p["kernel"]) * r).sum(0)) < 1e-5
    assert ref.rel_err(grads.bias[...], r.sum(0)) < 1e-5


@pytest.mark.parametrize("kind", ["adder", "euclid"])
def test_zero_mask_and_bias_make_the_residual_block_the_identity(kind):
    layer = layers.make_linear(kind, 8, 8, rngs=nnx.Rngs(0))
    layer.mask[...] = jnp.zeros(8)
    layer.bias[...] = jnp.zeros(8)
    x = jax.random.normal(jax.random.key(0), (4, 5, 8))
    y = layer(x)
    np.testing.assert_array_equal(y, np.zeros_like(y))
    np.testing.assert_array_equal(x + y, x)


def test_no_shape_is_frozen_at_first_call():
    layer = layers.AdderDense(6, 4, rngs=nnx.Rngs(0))
    for shape in [(2, 6), (7, 6), (3, 4, 5, 6), (6,)]:
        x = jax.random.normal(jax.random.key(len(shape)), shape)
        assert layer(x).shape == (*shape[:-1], 4)


def test_adder_weight_is_marked_for_the_optimiser():
    model = nnx.Sequential(
        layers.make_linear("adder", 4, 5, rngs=nnx.Rngs(0)),
        layers.make_linear("euclid", 5, 5, rngs=nnx.Rngs(1)),
        layers.make_linear("multi", 5, 3, rngs=nnx.Rngs(2)),
    )
    adder_state = nnx.state(model, layers.AdderWeight)
    leaves = jax.tree.leaves(adder_state)
    assert len(leaves) == 1 and leaves[0].shape == (4, 5)
    assert isinstance(model.layers[0].kernel, layers.AdderWeight)
    assert not isinstance(model.layers[1].kernel, layers.AdderWeight)
    assert not isinstance(model.layers[2].kernel, layers.AdderWeight)
    # still an ordinary trainable parameter
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 4 + 4 + 2


def test_make_linear_kinds_and_options():
    rngs = nnx.Rngs(0)
    opts = {"grad": "exact", "clip_scale": 2.0, "stretch": False, "norm": "none"}
    adder = layers.make_linear("adder", 3, 4, rngs=rngs, **opts)
    assert (adder.options.grad, adder.options.clip_scale) == ("exact", 2.0)
    assert (adder.stretch, adder.norm) == (None, "none")
    assert adder.mask is not None
    # AdderNet's layer: its rule, no stretch, and a learnable gain F (the batch norm's scale)
    orig = layers.make_linear("adder_orig", 3, 4, rngs=rngs, norm="none")
    assert (orig.options.grad, orig.stretch, orig.norm) == ("addernet", None, "none")
    assert orig.mask is not None and orig.mask[...].shape == (4,)
    euclid = layers.make_linear("euclid", 3, 4, rngs=rngs, stretch=False, norm="none")
    assert type(euclid) is layers.EuclidDense and euclid.stretch is None
    multi = layers.make_linear("multi", 3, 4, rngs=rngs, use_bias=False)
    assert type(multi) is layers.Dense and multi.bias is None
    normed = layers.make_linear("multi_ln", 3, 4, rngs=rngs)
    assert type(normed) is layers.NormedDense and normed.stretch is None
    assert normed.mask is not None and normed.norm == "layer"
    # an option the site cannot honour raises, naming the option and the kind
    for kind, option in [
        ("multi", "grad"),
        ("adder_orig", "grad"),
        ("adder_orig", "clip_scale"),
        ("adder_orig", "stretch"),
        ("euclid", "grad"),
        ("multi_ln", "stretch"),
    ]:
        with pytest.raises(
            TypeError, match=rf"'{kind}' site does not honour option\(s\) \['{option}'\]"
        ):
            layers.make_linear(kind, 3, 4, rngs=rngs, **{option: opts.get(option, True)})
    with pytest.raises(ValueError, match="kind='adderr'"):
        layers.make_linear("adderr", 3, 4, rngs=rngs)
    with pytest.raises(TypeError, match="strech"):
        layers.make_linear("adder", 3, 4, rngs=rngs, strech=True)
    with pytest.raises(ValueError, match="grad='sign'"):
        layers.make_linear("adder", 3, 4, rngs=rngs, grad="sign")
    with pytest.raises(ValueError, match="norm='group'"):
        layers.make_linear("euclid", 3, 4, rngs=rngs, norm="group")
    with pytest.raises(ValueError, match="in_features"):
        layers.make_linear("multi", 0, 4, rngs=rngs)


# ---------------------------------------------------------------------------------------------
# The other multiplication-free families: BitNet b1.58's ternary layer, DeepShift-Q's shift layer
# ---------------------------------------------------------------------------------------------


def _ternary_reference(x, kernel):
    """float64 BitLinear of the BitNet FAQ: the per-token codes of RMSNorm(x), the absmean
    ternary codes of W, and their product rescaled; returns (y, codes_x, scale_x, codes_w,
    gamma, rms) with rms = 1 / sqrt(mean(x^2) + 1e-6)."""
    x = np.asarray(x, np.float64)
    rms = 1 / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6)
    h = x * rms
    scale = 127 / np.maximum(np.abs(h).max(-1, keepdims=True), 1e-5)
    codes_x = np.clip(np.round(h * scale), -128, 127)
    gamma = max(np.abs(kernel).mean(), 1e-5)
    codes_w = np.clip(np.round(kernel / gamma), -1, 1)
    return codes_x @ codes_w * gamma / scale, codes_x, scale, codes_w, gamma, rms


def _power_of_two_reference(kernel, low=-15, high=0):
    magnitude = np.where(kernel == 0, 1.0, np.abs(kernel))
    return np.sign(kernel) * 2.0 ** np.clip(np.round(np.log2(magnitude)), low, high)


def _shift_kernel(rng, shape):
    """Weights over and beyond DeepShift's exponent range (clipped at both ends), one exactly 0."""
    kernel = rng.choice([-1.0, 1.0], shape) * 2.0 ** rng.uniform(-18, 2, shape)
    kernel.flat[0] = 0.0
    return kernel


@pytest.mark.parametrize("norm", ["none", "layer"])
@pytest.mark.parametrize(("lead", "d_in", "d_out"), [((5,), 13, 7), ((2, 3), 33, 9)])
def test_ternary_layer_matches_float64_bitlinear(norm, lead, d_in, d_out):
    # BitLinear as the paper has it (norm="none"), and with the distance sites' F * N(.) + b
    options = {"norm": "layer", "mask": True} if norm == "layer" else {}
    layer = layers.make_linear("ternary", d_in, d_out, rngs=nnx.Rngs(0), **options)
    layer = _randomise(layer, seed=d_in)
    x = np.random.default_rng(d_out).normal(size=(*lead, d_in)).astype(np.float32)
    p = _params(layer)
    similarity = lambda h, w: _ternary_reference(h, w)[0]  # noqa: E731
    expected = _distance_layer_reference(layer, x, similarity)
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    assert y.shape == (*lead, d_out) and layer.stretch is None
    assert ref.rel_err(y, expected) < (1e-4 if norm == "layer" else 1e-5)
    # the codes are BitNet's: three values, one scale per matrix
    _, _, _, codes_w, gamma, _ = _ternary_reference(x, p["kernel"])
    got_codes, got_gamma = layer.weight_codes()
    np.testing.assert_array_equal(got_codes, codes_w)
    assert float(got_gamma) == pytest.approx(gamma, rel=1e-6)
    assert layer.zero_fraction() == pytest.approx(np.mean(codes_w == 0))


@pytest.mark.parametrize("weight_bits", [5, 3])
def test_shift_layer_matches_float64_power_of_two_weights(weight_bits):
    layer = layers.make_linear("shift", 21, 6, weight_bits=weight_bits, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(weight_bits)
    layer.kernel[...] = jnp.asarray(_shift_kernel(rng, (21, 6)), jnp.float32)
    layer.bias[...] = jnp.asarray(rng.normal(size=6), jnp.float32)
    low = -(2 ** (weight_bits - 1) - 1)
    assert layer.shift_range == (low, 0)
    kernel = np.asarray(layer.kernel[...], np.float64)
    expected_w = _power_of_two_reference(kernel, low)
    np.testing.assert_array_equal(layer.weight(), expected_w)
    x = rng.normal(size=(4, 3, 21)).astype(np.float32)
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    assert ref.rel_err(y, ref.dense(x, expected_w) + np.asarray(layer.bias[...])) < 1e-6


def test_ternary_and_shift_gradients_are_straight_through():
    # BitNet's x + (quant(x) - x).detach() and DeepShift's RoundPowerOf2: the quantisers pass the
    # gradient unchanged and their scales are constants, so with y = Q(x) @ Q(W) + b,
    # dL/dW = Q(x)^T g and dL/dQ(x) = g @ Q(W)^T (then through BitNet's RMSNorm, exactly).
    rng = np.random.default_rng(11)
    x = rng.normal(size=(7, 10)).astype(np.float32)
    r = rng.normal(size=(7, 6)).astype(np.float32)

    def grads(layer):
        return nnx.grad(lambda m, x: jnp.sum(m(x) * r), argnums=(0, 1))(layer, x)

    ternary = _randomise(layers.make_linear("ternary", 10, 6, rngs=nnx.Rngs(0)), seed=12)
    g_layer, dx = grads(ternary)
    kernel = _params(ternary)["kernel"]
    _, codes_x, scale, codes_w, gamma, rms = _ternary_reference(x, kernel)
    g = r.astype(np.float64)
    assert ref.rel_err(g_layer.kernel[...], (codes_x / scale).T @ g) < 1e-6
    dh = g @ (gamma * codes_w).T  # at the quantiser's input, RMSNorm(x)
    x64 = x.astype(np.float64)
    dx_want = rms * dh - rms**3 * x64 * np.mean(dh * x64, axis=-1, keepdims=True)
    assert ref.rel_err(dx, dx_want) < 1e-5
    assert ref.rel_err(g_layer.bias[...], g.sum(0)) < 1e-6

    shift = layers.make_linear("shift", 10, 6, rngs=nnx.Rngs(0))
    shift.kernel[...] = jnp.asarray(_shift_kernel(rng, (10, 6)), jnp.float32)
    g_layer, dx = grads(shift)
    w = _power_of_two_reference(np.asarray(shift.kernel[...], np.float64))
    assert ref.rel_err(g_layer.kernel[...], x64.T @ g) < 1e-6  # every weight, clipped or 0
    assert ref.rel_err(dx, g @ w.T) < 1e-6


def test_ternary_and_shift_kinds_and_options():
    rngs = nnx.Rngs(0)
    ternary = layers.make_linear("ternary", 3, 4, rngs=rngs, use_bias=False)
    assert type(ternary) is layers.TernaryDense and ternary.bias is None
    assert (ternary.norm, ternary.mask, ternary.stretch) == ("none", None, None)
    shift = layers.make_linear("shift", 3, 4, rngs=rngs, norm="layer", mask=True)
    assert type(shift) is layers.ShiftDense and shift.norm == "layer" and shift.mask is not None
    for kind, option in [("ternary", "grad"), ("ternary", "stretch"), ("shift", "clip_scale")]:
        with pytest.raises(TypeError, match=rf"'{kind}' site does not honour option"):
            layers.make_linear(kind, 3, 4, rngs=rngs, **{option: True})
    with pytest.raises(TypeError, match="weight_bits"):
        layers.make_linear("ternary", 3, 4, rngs=rngs, weight_bits=4)
    with pytest.raises(ValueError, match="weight_bits must be an int >= 2"):
        layers.make_linear("shift", 3, 4, rngs=rngs, weight_bits=1)
    # the ternary fraction of zero weights over a model, weighted by the layers' sizes
    model = nnx.Sequential(ternary, layers.make_linear("ternary", 4, 8, rngs=rngs), shift)
    fractions = [ternary.zero_fraction(), model.layers[1].zero_fraction()]
    assert layers.zero_weight_fraction(model) == pytest.approx(
        (12 * fractions[0] + 32 * fractions[1]) / 44
    )
