"""adaptive_lr against its formula, its masking to adder weights, and the optimiser factory."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from addervit_jax import layers, optim


def test_adaptive_lr_matches_formula_on_hand_made_gradients():
    grads = {"a": jnp.array([[3.0, 4.0]]), "b": jnp.arange(1.0, 7.0).reshape(2, 3)}
    tx = optim.adaptive_lr(eta=0.2)
    out, _ = tx.update(grads, tx.init(grads))
    # ||a|| = 5, 2 elements; ||b|| = sqrt(91), 6 elements
    np.testing.assert_allclose(out["a"], grads["a"] * 0.2 * math.sqrt(2) / 5.0, rtol=1e-6)
    np.testing.assert_allclose(out["b"], grads["b"] * 0.2 * math.sqrt(6) / math.sqrt(91), rtol=1e-6)
    # every scaled leaf has norm eta * sqrt(size): the local learning rate of AdderNet
    for leaf in jax.tree.leaves(out):
        assert float(jnp.linalg.norm(leaf)) == pytest.approx(0.2 * math.sqrt(leaf.size), rel=1e-6)


def test_adaptive_lr_of_a_zero_gradient_stays_zero():
    tx = optim.adaptive_lr()
    zeros = {"w": jnp.zeros((3, 3))}
    out, _ = tx.update(zeros, tx.init(zeros))
    np.testing.assert_array_equal(out["w"], 0.0)


def _model():
    return nnx.Sequential(
        layers.make_linear("adder", 4, 6, rngs=nnx.Rngs(0)),
        layers.make_linear("multi", 6, 3, rngs=nnx.Rngs(1)),
    )


def test_masking_touches_adder_weights_only():
    model = _model()
    params = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    tx = optax.masked(optim.adaptive_lr(eta=0.2), optim.adder_weight_mask)
    out, _ = tx.update(grads, tx.init(params), params)
    for (path, g), (_, o) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(out), strict=True):
        g, o = np.asarray(g[...]), np.asarray(o[...])
        if path == ("layers", 0, "kernel"):
            np.testing.assert_allclose(
                o, g * 0.2 * math.sqrt(g.size) / np.linalg.norm(g), rtol=1e-6
            )
        else:
            np.testing.assert_array_equal(o, g)  # bias, E, F, and the multi layer: untouched


def test_schedule_warms_up_then_decays_to_a_tenth():
    schedule = optim.make_schedule(peak=2e-3, total_steps=100, warmup_steps=10)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(2e-3)
    assert float(schedule(100)) == pytest.approx(2e-4)
    values = [float(schedule(s)) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
@pytest.mark.parametrize("adaptive", [True, False])
def test_optimizer_updates_a_model(name, adaptive):
    model = _model()
    params = nnx.state(model, nnx.Param)
    tx = optim.make_optimizer(
        name=name,
        learning_rate=0.1,
        total_steps=10,
        warmup_steps=0,
        weight_decay=0.01,
        grad_clip=1.0,
        adaptive=adaptive,
    )
    opt_state = tx.init(params)
    x = jax.random.normal(jax.random.key(0), (5, 4))

    def loss(params):
        return jnp.sum(nnx.merge(nnx.graphdef(model), params)(x) ** 2)

    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    changed = [
        not np.array_equal(a[...], b[...])
        for (_, a), (_, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(new), strict=True)
    ]
    assert all(changed)
    assert float(loss(new)) < float(loss(params))


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="name='lamb'"):
        optim.make_optimizer(
            name="lamb", learning_rate=1.0, total_steps=1, warmup_steps=0, weight_decay=0.0
        )


def _random_grads(params, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: jnp.asarray(scale * rng.normal(size=p.shape), jnp.float32), params
    )


def _sgd(**kwargs):
    # constant learning rate 0.05: warm-up 0 and end fraction 1; no decay, no momentum effect on
    # the first step (the trace starts at zero)
    return optim.make_optimizer(
        name="sgd",
        learning_rate=0.05,
        total_steps=10,
        warmup_steps=0,
        weight_decay=0.0,
        end_fraction=1.0,
        **kwargs,
    )


def test_clip_sees_the_raw_gradient_norm_not_the_adaptive_one():
    params = nnx.state(_model(), nnx.Param)
    grads = _random_grads(params, seed=1, scale=10.0)  # raw global norm well above the clip
    raw_norm = float(optax.tree.norm(grads))
    tx = _sgd(grad_clip=1.0, adaptive=True)
    updates, _ = tx.update(grads, tx.init(params), params)
    clip = 1.0 / raw_norm  # what clip_by_global_norm(1.0) must apply: the raw norm's
    for (path, g), (_, u) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(updates), strict=True):
        g, u = np.asarray(g[...], np.float64), np.asarray(u[...], np.float64)
        if path == ("layers", 0, "kernel"):  # adaptive_lr of the clipped gradient
            expected = -0.05 * 0.2 * math.sqrt(g.size) * g / np.linalg.norm(g)
        else:
            expected = -0.05 * clip * g
        np.testing.assert_allclose(u, expected, rtol=1e-5)


def test_sgd_update_of_non_adder_parameters_is_lr_times_gradient():
    params = nnx.state(_model(), nnx.Param)
    grads = _random_grads(params, seed=2, scale=0.01)  # global norm below the clip of 1
    assert float(optax.tree.norm(grads)) < 1.0
    tx = _sgd(grad_clip=1.0, adaptive=True)
    updates, _ = tx.update(grads, tx.init(params), params)
    for (path, g), (_, u) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(updates), strict=True):
        if path != ("layers", 0, "kernel"):
            np.testing.assert_allclose(np.asarray(u[...]), -0.05 * np.asarray(g[...]), rtol=1e-6)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_adder_lr_scale_multiplies_the_adder_weight_updates_only(name):
    params = nnx.state(_model(), nnx.Param)
    grads = _random_grads(params, seed=3)
    common = dict(name=name, learning_rate=0.01, total_steps=10, warmup_steps=0, weight_decay=0.01)
    base, _ = (tx := optim.make_optimizer(**common)).update(grads, tx.init(params), params)
    scaled, _ = (tx := optim.make_optimizer(**common, adder_lr_scale=10.0)).update(
        grads, tx.init(params), params
    )
    for (path, b), (_, s) in zip(nnx.to_flat_state(base), nnx.to_flat_state(scaled), strict=True):
        factor = 10.0 if path == ("layers", 0, "kernel") else 1.0
        np.testing.assert_allclose(np.asarray(s[...]), factor * np.asarray(b[...]), rtol=1e-6)
    with pytest.raises(ValueError, match="adder_lr_scale"):
        optim.make_optimizer(**common, adder_lr_scale=0.0)
