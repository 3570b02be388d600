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

    def reference(x, kernel, mask, bias):
        y = x @ kernel
        mean = y.mean(-1, keepdims=True)
        z = (y - mean) / jnp.sqrt(((y - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
        return jnp.sum((z * mask + bias) * r)

    with jax.enable_x64():
        args = [jnp.asarray(a, jnp.float64) for a in (x, p["kernel"], p["mask"], p["bias"])]
        want = [np.asarray(g) for g in jax.grad(reference, argnums=(0, 1, 2, 3))(*args)]
    got = [dx, grads.kernel[...], grads.mask[...], grads.bias[...]]
    for name, a, b in zip(("x", "kernel", "mask", "bias"), got, want, strict=True):
        assert ref.rel_err(a, b) < 1e-5, name


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
    with pytest.raises(ValueError, match="norm='batch'"):
        layers.make_linear("euclid", 3, 4, rngs=rngs, norm="batch")
    with pytest.raises(ValueError, match="in_features"):
        layers.make_linear("multi", 0, 4, rngs=rngs)
