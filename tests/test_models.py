"""Every named variant builds, runs under jit, and trains (finite, non-zero gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from addervit_jax import layers, models


def _images(batch, size=32, channels=3, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, channels))


_forward = nnx.jit(lambda model, images: model(images))


@nnx.jit
def _loss_and_grads(model, images, labels):
    def loss_fn(model):
        logits = model(images)
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))
        return loss, logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return loss, logits, grads


@pytest.mark.parametrize("variant", sorted(models.VARIANTS))
def test_variant_runs_and_differentiates(variant):
    model = models.build(variant, num_classes=7, rngs=nnx.Rngs(0))
    images, labels = _images(3), jnp.array([0, 3, 6])
    loss, logits, grads = _loss_and_grads(model, images, labels)
    assert logits.shape == (3, 7)
    assert np.all(np.isfinite(logits)) and np.isfinite(loss)
    flat = nnx.to_flat_state(grads)
    assert len(flat) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, grad in flat:
        g = np.asarray(grad[...])
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0), f"{variant}: zero gradient for {'.'.join(map(str, path))}"
    # the same module on another batch size (no shape frozen at the first call)
    assert _forward(model, _images(1, seed=1)).shape == (1, 7)


def test_variant_sites_are_what_the_study_names():
    def kinds(model):
        return {type(m).__name__ for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}

    rngs = nnx.Rngs(0)
    assert "AdderDense" not in kinds(models.build("multi", rngs=rngs))
    qkv_1ffn = models.build("qkv_1ffn", rngs=rngs)
    block = qkv_1ffn.blocks[0]
    assert isinstance(block.attn.to_q, layers.AdderDense)
    assert isinstance(block.attn.to_out, layers.Dense)
    assert block.ffn.fc2 is None and block.ffn.fc1.out_features == qkv_1ffn.cfg.dim
    assert models.build("qkv_2ffn_wopout", rngs=rngs).blocks[0].attn.to_out is None
    assert isinstance(
        models.build("qkv_1ffn_addpout", rngs=rngs).blocks[0].attn.to_out, layers.AdderDense
    )
    orig = models.build("adder", rngs=rngs).blocks[0].attn.to_k
    # AdderNet's layer keeps a learnable gain F, the scale of its batch norm
    assert (orig.options.grad, orig.stretch) == ("addernet", None) and orig.mask is not None
    multi_ln = models.build("multi_ln", rngs=rngs).blocks[0]
    for site in (multi_ln.attn.to_q, multi_ln.attn.to_v, multi_ln.ffn.fc1, multi_ln.ffn.fc2):
        assert isinstance(site, layers.NormedDense) and site.mask is not None
        assert site.bias is not None and site.norm == "layer"
    assert isinstance(multi_ln.attn.to_out, layers.Dense)
    assert isinstance(models.build("euclider", rngs=rngs).blocks[0].ffn.fc1, layers.EuclidDense)
    all_adder = models.build("all_adder", rngs=rngs)
    assert isinstance(all_adder.embed, layers.AdderDense)
    assert isinstance(all_adder.head, layers.AdderDense)
    assert all_adder.cfg.attn == "l1"
    assert models.VARIANTS["qkv_1ffn_noupdtm"].adaptive_lr is False
    assert models.VARIANTS["qkv_1ffn"].adaptive_lr is True
    for variant, cls in (
        ("qkv_2ffn_ternary", layers.TernaryDense),
        ("qkv_2ffn_shift", layers.ShiftDense),
    ):  # the other families at qkv_2ffn's sites, without AdderNet's adaptive learning rate
        block = models.build(variant, rngs=rngs).blocks[0]
        for site in (block.attn.to_q, block.attn.to_k, block.ffn.fc1, block.ffn.fc2):
            assert isinstance(site, cls) and site.bias is not None
        assert isinstance(block.attn.to_out, layers.Dense)
        assert models.VARIANTS[variant].adaptive_lr is False
    swin = models.build("swin_adder", rngs=rngs)
    merges = [m for m in swin.stages if isinstance(m, models.PatchMerging)]
    assert len(merges) == 3 and all(isinstance(m.reduction, layers.AdderDense) for m in merges)


def test_zeroed_ffn_mask_makes_the_block_skip_its_ffn():
    # the study's Problem 3 at the model level: F = 0 and b = 0 in the one-layer adder FFN
    model = models.build("qkv_1ffn", rngs=nnx.Rngs(0))
    block = model.blocks[0]
    block.ffn.fc1.mask[...] = jnp.zeros_like(block.ffn.fc1.mask[...])
    block.ffn.fc1.bias[...] = jnp.zeros_like(block.ffn.fc1.bias[...])
    x = jax.random.normal(jax.random.key(0), (2, 64, model.cfg.dim))
    out, after_attn = nnx.jit(lambda b, x: (b(x), x + b.attn(b.attn_norm(x))))(block, x)
    np.testing.assert_array_equal(out, after_attn)


def test_original_128px_patch16_setting():
    model = models.build("qkv_2ffn", image_size=128, patch_size=16, rngs=nnx.Rngs(0))
    assert _forward(model, _images(2, size=128)).shape == (2, 10)


def test_digits_sized_single_channel_input():
    model = models.build("qkv_2ffn", image_size=8, patch_size=2, channels=1, rngs=nnx.Rngs(0))
    assert _forward(model, _images(5, size=8, channels=1)).shape == (5, 10)


def test_wopout_with_mismatched_width_fails_at_construction():
    with pytest.raises(ValueError, match=r"heads=4 \* dim_head=16 = 64 != dim=128"):
        models.build("qkv_2ffn_wopout", dim_head=16, rngs=nnx.Rngs(0))


def test_bad_configs_name_the_field():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="unknown variant 'vit'"):
        models.build("vit", rngs=rngs)
    with pytest.raises(TypeError, match="depht"):
        models.build("multi", depht=3, rngs=rngs)
    with pytest.raises(ValueError, match="qkv='add'"):
        models.build("multi", qkv="add", rngs=rngs)
    with pytest.raises(ValueError, match="attn='cos'"):
        models.build("multi", attn="cos", rngs=rngs)
    with pytest.raises(ValueError, match="patch_size=5"):
        models.build("multi", patch_size=5, rngs=rngs)
    with pytest.raises(ValueError, match="2\\*\\*3"):
        models.build("swin_multi", image_size=36, patch_size=6, rngs=rngs)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        models.build("multi", rngs=rngs)(jnp.zeros((2, 32, 32, 1)))


def test_swin_shift_mask_separates_wrapped_regions():
    mask = models.shifted_window_mask(side=8, window=4, shift=2)
    assert mask.shape == (4, 16, 16)
    np.testing.assert_array_equal(mask[0], 0)  # the top-left window holds no wrapped tokens
    for window in mask:
        np.testing.assert_array_equal(window, window.T)
        np.testing.assert_array_equal(np.diag(window), 0)
    # bottom-right window: 4 regions of 2x2 tokens, each attending only within itself
    assert (mask[3] == 0).sum() == 4 * 4 * 4
    index = models.relative_position_index(3)
    assert index.shape == (9, 9) and index.min() == 0 and index.max() == 24
    assert len(np.unique(np.diag(index))) == 1


def test_an_option_no_site_honours_is_refused():
    rngs = nnx.Rngs(0)
    # grad and clip_scale go to the adder sites; the multi embedding and head do not get them
    model = models.build("qkv_2ffn", grad="exact", clip_scale=2.0, rngs=rngs)
    assert isinstance(model.embed, layers.Dense)
    to_q = model.blocks[0].attn.to_q
    assert (to_q.options.grad, to_q.options.clip_scale) == ("exact", 2.0)
    # adder_orig sites have AdderNet's rule: a study labelled by a rule must not train them
    for variant, option in [
        ("adder", {"grad": "exact"}),
        ("adder", {"clip_scale": 2.0}),
        ("multi", {"stretch": False}),
        ("euclider", {"grad": "clipped"}),
    ]:
        ((name, value),) = option.items()
        with pytest.raises(ValueError, match=rf"{name}={value!r} is honoured by no site"):
            models.build(variant, rngs=rngs, **option)
    # the L1 attention scores honour the rule even where every linear site is a multiplication
    assert models.build("multi", attn="l1", grad="exact", rngs=rngs).cfg.grad == "exact"


@pytest.mark.parametrize("attn", ["l1", "l1_identity"])
def test_l1_attention_matches_float64(attn):
    cfg = models.config("all_adder", dim=16, heads=2, dim_head=8, attn=attn)
    module = models.Attention(16, 2, 8, cfg, qkv_bias=True, proj=("adder", True), rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
    out = nnx.jit(lambda m, x: m(x))(module, x)

    def split(site):
        y = np.asarray(site(x), np.float64)
        return y.reshape(2, 5, 2, 8).transpose(0, 2, 1, 3)  # (b, h, n, d)

    q, k, v = split(module.to_q), split(module.to_k), split(module.to_v)
    t = np.asarray(module.temperature[...], np.float64)
    s = -np.abs(q[:, :, :, None] - k[:, :, None]).sum(-1) * t[:, None, None]
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    heads = a @ v + (v if attn == "l1_identity" else 0.0)
    merged = heads.transpose(0, 2, 1, 3).reshape(2, 5, 16)
    expected = np.asarray(module.to_out(merged.astype(np.float32)), np.float64)
    assert np.linalg.norm(out - expected) / np.linalg.norm(expected) < 1e-4
    spread = 1.0 if attn == "l1" else 2.0 - 4.0 / np.pi
    np.testing.assert_allclose(t, 1.0 / np.sqrt(spread * 8), rtol=1e-6)


def test_shift_weight_bits_is_a_model_option():
    small = {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "mlp_dim": 32}
    model = models.build("qkv_2ffn_shift", rngs=nnx.Rngs(0), weight_bits=4, **small)
    ranges = {s.shift_range for _, s in nnx.iter_modules(model) if isinstance(s, layers.ShiftDense)}
    assert ranges == {(-7, 0)}  # DeepShift's 4 bits: a sign and exponents 2^-7..2^0
    with pytest.raises(ValueError, match="weight_bits=4 is honoured by no site of this model"):
        models.build("multi", rngs=nnx.Rngs(0), weight_bits=4, **small)
