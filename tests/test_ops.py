"""ops.adder / ops.euclid / ops.dense against float64 NumPy implementations of their formulas."""

import functools

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from addervit_jax import ops

TOL = 1e-5  # relative Frobenius error against float64 for float32 inputs

shapes = st.tuples(
    st.lists(st.integers(1, 4), min_size=0, max_size=3),  # leading dims
    st.integers(1, 21),  # D_in: includes 1 and sizes that are not multiples of the 8-row step
    st.integers(1, 13),  # D_out
)
seeds = st.integers(0, 2**31 - 1)


def _inputs(seed, lead, d_in, d_out, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*lead, d_in)).astype(dtype)
    w = rng.normal(size=(d_in, d_out)).astype(dtype)
    g = rng.normal(size=(*lead, d_out)).astype(dtype)
    return x, w, g


def _vjp(fn, x, w, g):
    y, pullback = jax.vjp(fn, jnp.asarray(x), jnp.asarray(w))
    return y, *pullback(jnp.asarray(g))


@given(shapes, seeds)
def test_forward_matches_float64(shape, seed):
    lead, d_in, d_out = shape
    x, w, _ = _inputs(seed, lead, d_in, d_out)
    for name in ("adder", "euclid", "dense"):
        y = jax.jit(getattr(ops, name))(x, w)
        assert y.shape == (*lead, d_out) and y.dtype == jnp.float32, name
        assert ref.rel_err(y, getattr(ref, name)(x, w)) < TOL, name


CPU_BACKENDS = ["xla", "cpu_native"]  # "auto" is cpu_native here; the XLA reference is tested too


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(shapes, seeds, st.sampled_from(ops.GRAD_RULES), st.sampled_from([0.5, 1.0, 4.0, 7.5]))
def test_adder_grads_match_float64(backend, shape, seed, grad, clip_scale):
    lead, d_in, d_out = shape
    x, w, g = _inputs(seed, lead, d_in, d_out)
    fn = jax.jit(functools.partial(ops.adder, grad=grad, clip_scale=clip_scale, backend=backend))
    y, dx, dw = _vjp(fn, x, w, g)
    dx_ref, dw_ref = ref.adder_grads(x, w, g, grad, clip_scale)
    assert dx.shape == x.shape and dw.shape == w.shape
    assert ref.rel_err(y, ref.adder(x, w)) < TOL
    assert ref.rel_err(dx, dx_ref) < TOL
    assert ref.rel_err(dw, dw_ref) < TOL


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(
    st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 19)),
    seeds,
    st.sampled_from(ops.GRAD_RULES),
)
def test_adder_scores_give_both_operands_the_input_rule(backend, shape, seed, grad):
    n, m, d = shape
    rng = np.random.default_rng(seed)
    q, k, g = (rng.normal(size=s).astype(np.float32) for s in ((n, d), (m, d), (n, m)))
    fn = jax.jit(functools.partial(ops.adder_scores, grad=grad, clip_scale=2.5, backend=backend))
    s, pullback = jax.vjp(fn, jnp.asarray(q), jnp.asarray(k))
    dq, dk = pullback(jnp.asarray(g))
    dq_ref, dk_ref = ref.adder_scores_grads(q, k, g, grad, clip_scale=2.5)
    assert s.shape == (n, m)
    assert ref.rel_err(s, ref.adder(q, k.T)) < TOL
    assert ref.rel_err(dq, dq_ref) < TOL
    assert ref.rel_err(dk, dk_ref) < TOL


def test_adder_scores_exact_rule_is_the_true_gradient_and_shapes_are_checked():
    rng = np.random.default_rng(7)
    q, k = rng.normal(size=(4, 6)), rng.normal(size=(5, 6))
    with jax.enable_x64():
        dq, dk = jax.grad(lambda q, k: ops.adder_scores(q, k, grad="exact").sum(), (0, 1))(q, k)
        tq, tk = jax.grad(lambda q, k: -jnp.abs(q[:, None] - k[None]).sum(), (0, 1))(q, k)
    np.testing.assert_allclose(dq, tq, rtol=1e-12)
    np.testing.assert_allclose(dk, tk, rtol=1e-12)
    with pytest.raises(ValueError, match=r"q.shape=\(4, 6\), k.shape=\(5, 3\)"):
        ops.adder_scores(q, k[:, :3])


def test_addernet_is_clipped_with_scale_one():
    x, w, g = _inputs(0, (6,), 9, 5)
    _, dx_a, dw_a = _vjp(functools.partial(ops.adder, grad="addernet"), x, w, g)
    _, dx_c, dw_c = _vjp(functools.partial(ops.adder, grad="clipped", clip_scale=1.0), x, w, g)
    np.testing.assert_array_equal(dx_a, dx_c)
    np.testing.assert_array_equal(dw_a, dw_c)


def test_exact_grad_matches_central_finite_differences():
    # Every x[l, i] and w[i, d] is at least 0.2 from every other value, so a step of 0.05
    # never crosses a kink of |x - w| and the difference quotient is the true derivative.
    rng = np.random.default_rng(1)
    values = rng.permutation(32) * 0.25 + rng.uniform(-0.02, 0.02, 32) - 4.0
    x = values[:12].reshape(3, 4).astype(np.float32)
    w = values[12:].reshape(4, 5).astype(np.float32)
    r = rng.normal(size=(3, 5)).astype(np.float32)
    h = 0.05

    @jax.jit
    def loss(x, w):
        return jnp.sum(ops.adder(x, w, grad="exact") * r)

    dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
    for arr, grad_arr, which in ((x, dx, 0), (w, dw, 1)):
        fd = np.zeros(arr.shape)
        for idx in np.ndindex(arr.shape):
            step = np.zeros(arr.shape, np.float32)
            step[idx] = h
            args_p, args_m = [x, w], [x, w]
            args_p[which], args_m[which] = arr + step, arr - step
            fd[idx] = (float(loss(*args_p)) - float(loss(*args_m))) / (2 * h)
        np.testing.assert_allclose(grad_arr, fd, atol=2e-3)


@given(shapes, seeds)
def test_euclid_and_dense_grads_match_autodiff_of_naive_formula(shape, seed):
    lead, d_in, d_out = shape
    x, w, g = _inputs(seed, lead, d_in, d_out)

    def naive_euclid(x, w):
        return -jnp.sum((x[..., :, None] - w) ** 2, axis=-2)

    def naive_dense(x, w):
        return jnp.sum(x[..., :, None] * w, axis=-2)

    for fn, naive in ((ops.euclid, naive_euclid), (ops.dense, naive_dense)):
        _, dx, dw = _vjp(jax.jit(fn), x, w, g)
        _, dx_n, dw_n = _vjp(jax.jit(naive), x, w, g)
        assert ref.rel_err(dx, dx_n) < TOL and ref.rel_err(dw, dw_n) < TOL, fn.__name__


@pytest.mark.parametrize("grad", ops.GRAD_RULES)
def test_bfloat16_inputs_accumulate_in_float32(grad):
    x, w, g = _inputs(3, (4, 7), 37, 11)
    xb, wb, gb = (jnp.asarray(a, jnp.bfloat16) for a in (x, w, g))
    # the float64 reference sees exactly the bfloat16 values
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (xb, wb, gb))
    y, dx, dw = _vjp(functools.partial(ops.adder, grad=grad), xb, wb, gb)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    dx_ref, dw_ref = ref.adder_grads(x64, w64, g64, grad)
    # float32 accumulation, one bfloat16 rounding of the result: relative error <= 2^-8
    bf16_tol = 2.0**-8
    assert ref.rel_err(y, ref.adder(x64, w64)) < bf16_tol
    assert ref.rel_err(dx, dx_ref) < bf16_tol
    assert ref.rel_err(dw, dw_ref) < bf16_tol
    for name in ("euclid", "dense"):
        yb = getattr(ops, name)(xb, wb)
        assert yb.dtype == jnp.bfloat16
        assert ref.rel_err(yb, getattr(ref, name)(x64, w64)) < bf16_tol, name


def test_mixed_dtypes_promote():
    x, w, _ = _inputs(4, (3,), 5, 2)
    y = ops.adder(jnp.asarray(x, jnp.bfloat16), w)
    assert y.dtype == jnp.float32
    dx, dw = jax.grad(lambda a, b: ops.adder(a, b).sum(), argnums=(0, 1))(
        jnp.asarray(x, jnp.bfloat16), w
    )
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32


@pytest.mark.parametrize("grad", ops.GRAD_RULES)
def test_vmap_over_inputs_and_weights(grad):
    x, w, g = _inputs(5, (3, 6), 10, 4)
    op = functools.partial(ops.adder, grad=grad)
    # batch over x: same as the leading dimension it already supports
    np.testing.assert_allclose(jax.vmap(op, in_axes=(0, None))(x, w), op(x, w), rtol=1e-6)
    # batch over w (an ensemble of weight matrices)
    ws = np.stack([w, w[::-1], -w])
    y_v = jax.vmap(op, in_axes=(None, 0))(x, ws)
    for k in range(3):
        np.testing.assert_allclose(y_v[k], op(x, ws[k]), rtol=1e-6)

    # per-example gradients through vmap(grad)
    def loss(xi, w, gi):
        return jnp.sum(op(xi, w) * gi)

    dx_v, dw_v = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None, 0))(x, w, g)
    for b in range(x.shape[0]):
        dx_ref, dw_ref = ref.adder_grads(x[b], w, g[b], grad)
        assert ref.rel_err(dx_v[b], dx_ref) < TOL
        assert ref.rel_err(dw_v[b], dw_ref) < TOL


@pytest.mark.parametrize("grad", ops.GRAD_RULES)
def test_remat_gives_same_gradients(grad):
    x, w, g = _inputs(6, (5,), 12, 9)

    def loss(x, w):
        h = ops.adder(x, w, grad=grad)
        return jnp.sum(jnp.tanh(h) * g)

    plain = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(x, w)
    for a, b in zip(plain, remat, strict=True):
        np.testing.assert_array_equal(a, b)


def _gradient_of_gradient(x, w, **settings):
    """d/dx sum(dL/dx) of L = sum(adder(x, w) ** 2): a gradient penalty's derivative."""

    def loss(x):
        return jnp.sum(ops.adder(x, w, **settings) ** 2)

    return jax.grad(lambda x: jnp.sum(jax.grad(loss)(x)))(x)


@pytest.mark.parametrize("grad", ["exact", "clipped"])
def test_gradient_of_gradient_with_the_xla_backend(grad):
    x, w, _ = _inputs(12, (5,), 7, 4)
    got = jax.jit(functools.partial(_gradient_of_gradient, grad=grad, backend="xla"))(x, w)
    # sum(dL/dx) = sum_{l,i,d} g[l,d] s(w[i,d] - x[l,i]) with g = 2 y and the rule's surrogate s.
    # Its derivative: through s (s' is zero for sign), and through y, whose derivative is the
    # rule's again: dL/dx of the adder for the cotangent 2 S, S[l,d] = sum_i s(w[i,d] - x[l,i]).
    x64, w64 = ref.float64(x, w)
    diff = w64[None] - x64[:, :, None]  # (L, D_in, D_out): w[i, d] - x[l, i]
    if grad == "exact":
        s, ds = np.sign(diff), np.zeros_like(diff)
    else:
        s, ds = ref.hardtanh(4 * diff), 4.0 * (np.abs(4 * diff) < 1)
    g = 2 * ref.adder(x64, w64)
    through_s = -np.einsum("ld,lid->li", g, ds)
    through_y = 2 * ref.adder_grads(x64, w64, s.sum(axis=1), grad)[0]
    assert ref.rel_err(got, through_s + through_y) < TOL


@pytest.mark.parametrize("backend", ["cpu_native", "pallas"])
def test_gradient_of_gradient_on_a_kernel_backend_raises_naming_it(backend):
    x, w, _ = _inputs(12, (5,), 7, 4)
    message = (
        f"adder: backend='{backend}' has no second derivatives: its x_grad kernel .*"
        r"Use backend='xla' \(plain JAX"
    )
    fn = functools.partial(_gradient_of_gradient, backend=backend, interpret=backend == "pallas")
    with pytest.raises(NotImplementedError, match=message):
        fn(x, w)
    with pytest.raises(NotImplementedError, match=message):  # traced, batched
        jax.jit(jax.vmap(fn, in_axes=(0, None)))(x[None], w)


def test_empty_leading_dims():
    x, w = np.zeros((0, 3, 5), np.float32), np.ones((5, 2), np.float32)
    for name in ("adder", "euclid", "dense"):
        assert getattr(ops, name)(x, w).shape == (0, 3, 2)
    dx, dw = jax.grad(lambda a, b: ops.adder(a, b, grad="exact").sum(), argnums=(0, 1))(x, w)
    assert dx.shape == x.shape and not np.any(dw)


def test_auto_backend_is_cpu_native_on_cpu_and_pallas_needs_interpret_mode():
    # On a CPU with a compiler; on a GPU "auto" is "pallas" (tests/test_kernels.py); without a
    # compiler "xla" (tests/test_cpu_native.py). Never "naive", the baseline.
    assert ops.resolve_backend("auto") == "cpu_native"
    x, w, _ = _inputs(7, (2,), 3, 4)
    np.testing.assert_array_equal(
        ops.adder(x, w, backend="auto"), ops.adder(x, w, backend="cpu_native")
    )
    with pytest.raises(ValueError, match="interpret"):  # Pallas on CPU needs interpret mode
        ops.adder(x, w, backend="pallas")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(shapes, seeds, st.sampled_from(ops.GRAD_RULES))
def test_every_cpu_backend_matches_float64_with_a_stretch(backend, shape, seed, grad):
    lead, d_in, d_out = shape
    x, w, g = _inputs(seed, lead, d_in, d_out)
    e = np.random.default_rng(seed + 1).uniform(0.5, 1.5, size=d_in).astype(np.float32)
    fn = functools.partial(ops.adder, grad=grad, backend=backend)
    y, pullback = jax.vjp(lambda x, w, e: fn(x, w, stretch=e), *map(jnp.asarray, (x, w, e)))
    assert ref.rel_err(y, ref.adder(x.astype(np.float64) * e, w)) < TOL
    for got, want in zip(
        pullback(jnp.asarray(g)), ref.adder_stretch_grads(x, w, e, g, grad), strict=True
    ):
        assert ref.rel_err(got, want) < TOL


def test_stretch_shape_is_checked():
    x, w, _ = _inputs(3, (2,), 3, 4)
    with pytest.raises(ValueError, match=r"stretch must have shape \(D_in,\) = \(3,\)"):
        ops.adder(x, w, stretch=np.ones(4, np.float32))


@pytest.mark.parametrize("grad", ops.GRAD_RULES)
def test_naive_backend_is_the_broadcast_formula_with_the_exact_gradient(grad):
    # The speed table's baseline: autodiff through -sum|x - w|, whatever grad says.
    x, w, g = _inputs(9, (3, 5), 13, 7)
    naive = functools.partial(ops.adder, grad=grad, backend="naive")
    exact = functools.partial(ops.adder, grad="exact", backend="xla")
    y_n, dx_n, dw_n = _vjp(jax.jit(naive), x, w, g)
    y_e, dx_e, dw_e = _vjp(jax.jit(exact), x, w, g)
    assert y_n.shape == (3, 5, 7) and y_n.dtype == jnp.float32
    assert ref.rel_err(y_n, y_e) < TOL
    assert ref.rel_err(dx_n, dx_e) < TOL
    assert ref.rel_err(dw_n, dw_e) < TOL
    dx_ref, dw_ref = ref.adder_grads(x, w, g, "exact")
    assert ref.rel_err(dx_n, dx_ref) < TOL and ref.rel_err(dw_n, dw_ref) < TOL
    assert ops.resolve_backend("naive") == "naive"
    yb = ops.adder(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), backend="naive")
    assert yb.dtype == jnp.bfloat16


_F32 = np.float32
ERROR_CASES = [
    # (op kwargs, x, w, exception, every fragment the message must contain)
    ({}, np.ones((2, 3), _F32), np.ones((), _F32), ValueError, ["w", "rank 0", "w.shape=()"]),
    ({}, np.ones((2, 3), _F32), np.ones((3,), _F32), ValueError, ["w", "rank 1", "w.shape=(3,)"]),
    ({}, np.ones((), _F32), np.ones((3, 4), _F32), ValueError, ["x", "x.shape=()"]),
    (
        {},
        np.ones((2, 5), _F32),
        np.ones((3, 4), _F32),
        ValueError,
        ["x.shape[-1]=5", "w.shape[0]=3", "x.shape=(2, 5)", "w.shape=(3, 4)"],
    ),
    ({}, np.ones((2, 3), np.int32), np.ones((3, 4), _F32), TypeError, ["x.dtype=int32", "x.shape"]),
    ({}, np.ones((2, 3), _F32), np.ones((3, 4), np.int8), TypeError, ["w.dtype=int8", "w.shape"]),
    ({"grad": "sign"}, np.ones((2, 3), _F32), np.ones((3, 4), _F32), ValueError, ["grad='sign'"]),
    ({"backend": "cuda"}, np.ones((2, 3), _F32), np.ones((3, 4), _F32), ValueError, ["backend"]),
    ({"clip_scale": 0.0}, np.ones((2, 3), _F32), np.ones((3, 4), _F32), ValueError, ["clip_scale"]),
    ({"clip_scale": -4}, np.ones((2, 3), _F32), np.ones((3, 4), _F32), ValueError, ["clip_scale"]),
    ({"clip_scale": "4"}, np.ones((2, 3), _F32), np.ones((3, 4), _F32), TypeError, ["clip_scale"]),
]


@pytest.mark.parametrize(("kwargs", "x", "w", "exc", "fragments"), ERROR_CASES)
def test_bad_input_raises_clear_error(kwargs, x, w, exc, fragments):
    with pytest.raises(exc) as info:
        ops.adder(x, w, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)
    if not kwargs:  # shape and dtype checks are shared by all three ops
        for name in ("euclid", "dense"):
            with pytest.raises(exc) as info:
                getattr(ops, name)(x, w)
            assert name in str(info.value)
            for fragment in fragments:
                assert fragment in str(info.value)


def test_traced_clip_scale_is_rejected():
    x, w, _ = _inputs(8, (2,), 3, 4)
    with pytest.raises(TypeError, match="clip_scale must be a Python number"):
        jax.jit(lambda s: ops.adder(x, w, clip_scale=s))(4.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("grad", ops.GRAD_RULES)
def test_memory_stays_bounded_at_vit_scale(grad, backend):
    # L=4096 tokens, a ViT-S MLP layer 384 -> 1536: the (L, D_in, D_out) difference tensor would
    # take 9.7 GB in float32; the compiled forward+backward must need under 256 MiB of scratch.
    x = jax.ShapeDtypeStruct((4096, 384), jnp.float32)
    w = jax.ShapeDtypeStruct((384, 1536), jnp.float32)

    def loss(x, w):
        return jnp.sum(ops.adder(x, w, grad=grad, backend=backend))

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(x, w).lower().compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 256 * 2**20, f"{grad}, {backend}: {temp / 2**20:.0f} MiB of temporaries"


def test_memory_check_would_catch_the_broadcast_formula():
    x = jax.ShapeDtypeStruct((4096, 384), jnp.float32)
    w = jax.ShapeDtypeStruct((384, 1536), jnp.float32)

    def loss(x, w):
        return -jnp.sum(jnp.abs(x[:, :, None] - w[None]))

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(x, w).lower().compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 2**30


def test_every_backend_module_provides_the_protocol():
    # addervit_jax/adder/backends: one module per backend, found by name, one protocol
    from addervit_jax.adder import backends

    assert backends.NAMES == ("xla", "pallas", "cpu_native", "naive")
    assert ops.BACKENDS == ("auto", *backends.NAMES)
    for name in backends.NAMES:
        module = backends.get(name)
        assert isinstance(module.ORDER, int) and callable(module.available), name
        assert isinstance(module.CUSTOM_CALL, bool) and isinstance(module.AUTODIFF, bool), name
        functions = ("forward",) if module.AUTODIFF else ("forward", "x_grad", "w_grad_exact")
        for fn in functions:
            assert callable(getattr(module, fn)), (name, fn)
    # the custom calls compute in float32 and run per device; the pure-JAX ones do neither
    assert [n for n in backends.NAMES if backends.get(n).CUSTOM_CALL] == ["pallas", "cpu_native"]
    assert [n for n in backends.NAMES if backends.get(n).AUTODIFF] == ["naive"]


def test_adder_options_are_one_checked_value():
    # the four settings of the op, checked once, hashable (a custom_vjp static argument)
    default = ops.AdderOptions()
    assert default == ops.AdderOptions("clipped", 4.0, "auto", False)
    options = ops.AdderOptions(grad="exact", clip_scale=2)
    assert isinstance(options.clip_scale, float) and hash(options) == hash(
        ops.AdderOptions(grad="exact", clip_scale=2.0)
    )
    assert ops.AdderOptions.of(options, grad="addernet", backend=None) == ops.AdderOptions(
        grad="addernet", clip_scale=2.0
    )
    for fields, exc, fragment in [
        ({"grad": "sign"}, ValueError, "grad='sign'"),
        ({"backend": "cuda"}, ValueError, "backend='cuda'"),
        ({"clip_scale": float("inf")}, ValueError, "clip_scale"),
        ({"clip_scale": True}, TypeError, "clip_scale"),
        ({"interpret": "yes"}, TypeError, "interpret"),
    ]:
        with pytest.raises(exc, match=fragment):
            ops.AdderOptions(**fields)
    with pytest.raises(TypeError, match="options must be an AdderOptions"):
        ops.adder(np.ones((2, 3), np.float32), np.ones((3, 4), np.float32), options={"grad": "x"})
    # passing the value whole computes what the keywords compute, and a keyword replaces a field
    x, w, g = _inputs(11, (5,), 6, 3)
    for grad in ops.GRAD_RULES:
        by_value = _vjp(functools.partial(ops.adder, options=ops.AdderOptions(grad=grad)), x, w, g)
        by_keyword = _vjp(functools.partial(ops.adder, grad=grad), x, w, g)
        exact = ops.AdderOptions(grad="exact")
        replaced = _vjp(functools.partial(ops.adder, grad=grad, options=exact), x, w, g)
        for a, b, c in zip(by_value, by_keyword, replaced, strict=True):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)
