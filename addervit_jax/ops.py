"""The three similarity operations of an (adder) vision transformer and their backward rules.

Shapes follow SPEC section 1: ``x`` is ``(..., D_in)``, ``w`` is ``(D_in, D_out)`` and the result is
``(..., D_out)``. ``l`` indexes the flattened leading dimensions of ``x`` and ``g[l, d]`` is the
cotangent of ``y[l, d]``.

* ``dense``:  ``y[l, d] =  sum_i x[l, i] * w[i, d]`` (the multiplication baseline).
* ``adder``:  ``y[l, d] = -sum_i |x[l, i] - w[i, d]|`` (AdderNet's L1 similarity; Chen et al.,
  "AdderNet: Do we really need multiplications in deep learning?", CVPR 2020).
* ``euclid``: ``y[l, d] = -sum_i (x[l, i] - w[i, d])^2`` (EuclidNet's squared L2 similarity;
  Li et al., "EuclidNets: An alternative operation for efficient inference of deep learning
  models", 2022).

``adder`` is not differentiable at ``x == w`` and its true gradient, a sign, trains badly, so its
backward pass is a choice (``grad``):

* ``"exact"``:    dL/dw[i, d] = sum_l g[l,d] * sign(x[l,i] - w[i,d]),
                  dL/dx[l, i] = sum_d g[l,d] * sign(w[i,d] - x[l,i]);
* ``"addernet"``: dL/dw[i, d] = sum_l g[l,d] * (x[l,i] - w[i,d]),
                  dL/dx[l, i] = sum_d g[l,d] * hardtanh(w[i,d] - x[l,i]);
* ``"clipped"``:  dL/dw[i, d] = sum_l g[l,d] * (x[l,i] - w[i,d]),
                  dL/dx[l, i] = sum_d g[l,d] * hardtanh(clip_scale * (w[i,d] - x[l,i])),

with ``hardtanh(z) = clip(z, -1, 1)``. ``"addernet"`` is AdderNet's full-precision gradient for the
weights with a HardTanh-clipped input gradient. ``"clipped"`` is the fix of the *Exploration of
AdderViT* study (its Problem 1): scaling by 4 before the clip brings the x gradient closer to the
true sign while keeping it bounded.

Implementation (memory and speed):

* Nothing materialises the ``(L, D_in, D_out)`` difference tensor (9.7 GB for a ViT-S MLP layer on
  4,096 tokens). The forward and the sign/clip parts of the backward are "pseudo-matmuls" computed
  as a loop of rank-``_ROWS_PER_STEP`` updates of an accumulator the size of the output
  (:func:`_rank1_sum`), so extra memory is ``O(L*D_in + D_in*D_out + L*D_out)``.
* For ``"addernet"``/``"clipped"``, dL/dw is ``x^T g - w * sum_l g``: one matrix product and a
  column sum, because the rule is linear in ``x - w``.
* ``backend="naive"`` is the opposite, kept as the baseline the speed table measures against:
  the broadcast formula with plain autodiff (the original study's "Adder"), which materialises
  the difference tensor and always has the ``"exact"`` gradient.
* The same custom_vjp dispatches to the kernels of ``kernels/`` for ``backend="pallas"`` (GPU)
  and ``"cpu_native"`` (CPU, AVX-512 or portable vector code, about 2.5x a matmul forward),
  which run per device under ``jax.shard_map`` when a mesh is set (:func:`shard_rows`).
* Inputs of any float dtype are computed in at least float32 and results are returned in the
  input dtype (bfloat16 in, bfloat16 out, float32 accumulation). float64 inputs (with
  ``jax_enable_x64``) are computed in float64 by the ``"xla"`` backend whatever ``backend`` says:
  the kernels compute in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from addervit_jax.kernels import adder_pallas, cpu_native

__all__ = [
    "BACKENDS",
    "GRAD_RULES",
    "adder",
    "adder_scores",
    "dense",
    "euclid",
    "resolve_backend",
    "shard_rows",
]

GRAD_RULES = ("clipped", "addernet", "exact")
# "naive" is the broadcast formula with plain autodiff, a baseline for comparisons only: "auto"
# never selects it.
BACKENDS = ("auto", "xla", "pallas", "cpu_native", "naive")

# Rows of the reduction operand folded into the accumulator per loop step. Measured on a 2-core
# AMD EPYC (AVX2) with experiments/bench_ops.py: 8 gives the forward at 2.9x a matmul of the
# same shape (L=4096, 384->1536); 4 and 16 are within 30% of it, 32 is twice as slow (the fused
# update no longer fits in registers).
_ROWS_PER_STEP = 8


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _check_operands(op: str, x: jax.Array, w: jax.Array) -> None:
    x_shape, w_shape = x.shape, w.shape
    shapes = f"x.shape={tuple(x_shape)}, w.shape={tuple(w_shape)}"
    if len(w_shape) != 2:
        raise ValueError(
            f"{op}: w must be a 2-D (D_in, D_out) weight matrix, got rank {len(w_shape)} ({shapes})"
        )
    if len(x_shape) < 1:
        raise ValueError(
            f"{op}: x must have shape (..., D_in) with at least one dimension ({shapes})"
        )
    if x_shape[-1] != w_shape[0]:
        raise ValueError(
            f"{op}: feature mismatch, x.shape[-1]={x_shape[-1]} must equal w.shape[0]={w_shape[0]} "
            f"({shapes})"
        )
    if w_shape[0] == 0:
        raise ValueError(f"{op}: w must have at least one input feature ({shapes})")
    for name, arr in (("x", x), ("w", w)):
        dtype = arr.dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{op}: {name} must have a floating dtype (float32, bfloat16, ...), "
                f"got {name}.dtype={dtype} ({shapes})"
            )


def _check_rule(op: str, grad, clip_scale) -> tuple[str, float]:
    if grad not in GRAD_RULES:
        raise ValueError(f"{op}: unknown grad={grad!r}; expected one of {GRAD_RULES}")
    if isinstance(clip_scale, bool) or not isinstance(clip_scale, int | float | np.number):
        raise TypeError(
            f"{op}: clip_scale must be a Python number (it selects the backward rule at trace "
            f"time), got {type(clip_scale).__name__}"
        )
    clip_scale = float(clip_scale)
    if not (clip_scale > 0 and math.isfinite(clip_scale)):
        raise ValueError(f"{op}: clip_scale must be positive and finite, got {clip_scale}")
    return grad, clip_scale


def _compute_dtype(*dtypes) -> jnp.dtype:
    """At least float32: bfloat16/float16 inputs accumulate in float32, float64 stays float64."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _float64_to_xla(backend: str, *arrays) -> str:
    """The kernels of ``kernels/`` compute in float32; float64 operands (``jax_enable_x64``) are
    computed in float64 by the ``"xla"`` backend instead, whatever backend was asked for."""
    dtypes = [a.dtype for a in arrays if a is not None]
    if backend in _KERNELS and _compute_dtype(*dtypes) == jnp.float64:
        return "xla"
    return backend


def resolve_backend(backend: str) -> str:
    """Map ``"auto"`` to the backend for the default device; reject unknown names.

    ``"auto"`` is ``"pallas"`` on a GPU, ``"cpu_native"`` on a CPU where the native kernels
    build, and ``"xla"`` elsewhere. ``"cpu_native"`` without a working C++ compiler falls back to
    ``"xla"`` (``cpu_native.available()`` warns once).
    """
    if backend not in BACKENDS:
        raise ValueError(f"adder: unknown backend={backend!r}; expected one of {BACKENDS}")
    platform = jax.default_backend()
    if backend == "auto":
        if platform == "gpu":
            return "pallas"
        backend = "cpu_native" if platform == "cpu" else "xla"
    if backend == "cpu_native":
        if platform != "cpu":
            raise ValueError(
                f"adder: backend='cpu_native' runs on the CPU, and the default device is "
                f"{platform!r}; use backend='auto'"
            )
        return "cpu_native" if cpu_native.available() else "xla"
    return backend


# ---------------------------------------------------------------------------------------------
# Pseudo-matmul: the bounded-memory core of every L1 computation
# ---------------------------------------------------------------------------------------------


def _rank1_sum(
    term: Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array],
    a: jax.Array,
    b: jax.Array,
    c: jax.Array | None = None,
) -> jax.Array:
    """``out[p, q] = sum_r term(a[r, p], b[r, q], c[p, q])`` without an ``(R, P, Q)`` temporary.

    ``a`` is ``(R, P)``, ``b`` is ``(R, Q)``, ``c`` is ``(P, Q)`` or None; ``term`` is elementwise
    and is called with ``a[r][:, None]``, ``b[r][None, :]`` and ``c``. ``R`` is padded with zero
    rows to a multiple of ``_ROWS_PER_STEP``, so ``term`` must vanish when ``a`` or ``b`` rows are
    zero in the way each caller pads (an L1 distance of two zeros, or a zero cotangent weight).

    Each loop step adds ``_ROWS_PER_STEP`` rank-1 terms in one fused elementwise pass over the
    ``(P, Q)`` accumulator. The rows used at step ``t`` are sliced at step ``t - 1`` and carried:
    if the slice sits inside the fused update instead, XLA:CPU evaluates the dynamic-slice per
    element and the loop runs 5x slower (measured).
    """
    k = _ROWS_PER_STEP
    num_rows, p = a.shape
    q = b.shape[1]
    if num_rows == 0:
        return jnp.zeros((p, q), a.dtype)
    steps = -(-num_rows // k)
    pad = steps * k - num_rows
    a = jnp.pad(a, ((0, pad), (0, 0))).reshape(steps, k, p)
    b = jnp.pad(b, ((0, pad), (0, 0))).reshape(steps, k, q)

    def step(t, carry):
        acc, a_rows, b_rows = carry
        nxt = jnp.minimum(t + 1, steps - 1)
        for j in range(k):
            acc = acc + term(a_rows[j][:, None], b_rows[j][None, :], c)
        return acc, a[nxt], b[nxt]

    init = (jnp.zeros((p, q), a.dtype), a[0], b[0])
    acc, _, _ = lax.fori_loop(0, steps, step, init)
    return acc


def _l1_distance(x: jax.Array, w: jax.Array) -> jax.Array:
    """``sum_i |x[l, i] - w[i, d]|`` for 2-D ``x`` (L, D_in); zero padding of D_in adds zero."""
    return _rank1_sum(lambda xi, wi, _: jnp.abs(xi - wi), x.T, w)


def _x_grad(x: jax.Array, w: jax.Array, g: jax.Array, surrogate: Callable) -> jax.Array:
    """``dx[l, i] = sum_d g[l, d] * surrogate(w[i, d] - x[l, i])``; zero-padded g adds zero."""
    return _rank1_sum(lambda gd, wd, xx: gd * surrogate(wd - xx), g.T, w.T, x)


def _w_grad_exact(x: jax.Array, w: jax.Array, g: jax.Array) -> jax.Array:
    """``dw[i, d] = sum_l g[l, d] * sign(x[l, i] - w[i, d])``; zero-padded g adds zero."""
    return _rank1_sum(lambda gl, xl, ww: gl * jnp.sign(xl - ww), g, x, w.T).T


# ---------------------------------------------------------------------------------------------
# adder: custom_vjp on 2-D operands
# ---------------------------------------------------------------------------------------------


# Backends whose kernels live in kernels/: the same three functions (forward, x_grad,
# w_grad_exact) with the same signatures, so the custom_vjp below is shared.
_KERNELS = {"pallas": adder_pallas, "cpu_native": cpu_native}


def _kernel(backend: str, name: str, interpret: bool) -> Callable:
    fn = getattr(_KERNELS[backend], name)
    return partial(fn, interpret=interpret) if backend == "pallas" else fn


def shard_rows(kernel: Callable, rows: tuple, shared: tuple = (), *, sum_rows: bool = False):
    """Call ``kernel(*rows, *shared)``, whose ``rows`` operands split along their first axis.

    The kernel backends call it for every kernel; a caller whose own batch is the natural split
    (the L1 attention scores, one adder per example under ``vmap``) calls it around the
    ``vmap``, so the batch, not each example's rows, is what the devices share.

    Under a mesh (``jax.set_mesh``, as the trainer sets) the kernel runs per device through
    ``jax.shard_map``: a custom call has no partitioning rule, so without this XLA would gather
    every operand onto each device (seen for the native kernel: an all-gather in the HLO).
    Row-wise results stay split; ``sum_rows`` results (a sum over the rows, like the exact dL/dw)
    are summed across devices. Only the mesh axes that are not already manual are used (inside a
    caller's own ``jax.shard_map`` the kernel sees that shard's arrays). Without such axes, or when
    the rows do not divide evenly, the kernel sees the whole arrays.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(*rows, *shared)
    axes = tuple(
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind != jax.sharding.AxisType.Manual
    )
    devices = math.prod(mesh.shape[name] for name in axes)
    if devices == 1 or rows[0].shape[0] % devices:
        return kernel(*rows, *shared)
    split, whole = jax.sharding.PartitionSpec(axes), jax.sharding.PartitionSpec()

    def local(*args):
        out = kernel(*args)
        return lax.psum(out, axes) if sum_rows else out

    return jax.shard_map(
        local,
        mesh=mesh,
        axis_names=set(axes),
        in_specs=(split,) * len(rows) + tuple(None if a is None else whole for a in shared),
        out_specs=whole if sum_rows else split,
        check_vma=False,
    )(*rows, *shared)


def _stretched(x: jax.Array, e: jax.Array | None) -> jax.Array:
    return x if e is None else x * e


def _input_grad(x, w, e, g, u, wc, gc, grad, clip_scale, backend, interpret):
    """The rule's dL/du of ``adder(u, w)`` with ``u = x * e``, by the backend's kernel (which
    takes the raw ``x``, ``e``) or in XLA (which takes ``u``, ``wc``, ``gc`` in compute dtype)."""
    if backend in _KERNELS:
        x_grad = partial(_kernel(backend, "x_grad", interpret), grad=grad, clip_scale=clip_scale)
        du = shard_rows(lambda x, g, w, e: x_grad(x, w, g, e), (x, g), (w, e))
        return du.astype(gc.dtype)
    return _x_grad(u, wc, gc, adder_pallas.surrogate(grad, clip_scale))


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _adder_2d(x, w, e, grad: str, clip_scale: float, backend: str, interpret: bool):
    """``-sum_i |x[l, i] * e[i] - w[i, d]|`` (``e`` None: no stretch) with the rule ``grad``."""
    del grad, clip_scale  # they only select the backward rule
    if backend in _KERNELS:
        forward = _kernel(backend, "forward", interpret)
        return shard_rows(lambda x, w, e: forward(x, w, e), (x,), (w, e))
    out_dtype = jnp.result_type(x, w)
    dtype = _compute_dtype(x, w)
    u = _stretched(x.astype(dtype), None if e is None else e.astype(dtype))
    return (-_l1_distance(u, w.astype(dtype))).astype(out_dtype)


def _adder_2d_fwd(x, w, e, grad, clip_scale, backend, interpret):
    return _adder_2d(x, w, e, grad, clip_scale, backend, interpret), (x, w, e)


def _adder_2d_bwd(grad, clip_scale, backend, interpret, residuals, g):
    x, w, e = residuals
    dtype = _compute_dtype(x, w, g)
    xc, wc, gc = x.astype(dtype), w.astype(dtype), g.astype(dtype)
    ec = None if e is None else e.astype(dtype)
    u = _stretched(xc, ec)  # the adder's input; XLA fuses the product into its consumers
    du = _input_grad(x, w, e, g, u, wc, gc, grad, clip_scale, backend, interpret)
    if grad == "exact" and backend in _KERNELS:
        w_grad = _kernel(backend, "w_grad_exact", interpret)
        dw = shard_rows(lambda x, g, w, e: w_grad(x, w, g, e), (x, g), (w, e), sum_rows=True)
        dw = dw.astype(dtype)
    elif grad == "exact":
        dw = _w_grad_exact(u, wc, gc)
    else:
        # sum_l g[l, d] * (u[l, i] - w[i, d]) = (u^T g)[i, d] - w[i, d] * sum_l g[l, d].
        # HIGHEST keeps GPUs from running this float32 product in TF32.
        utg = jnp.matmul(u.T, gc, precision=lax.Precision.HIGHEST)
        dw = utg - wc * jnp.sum(gc, axis=0)
    # u = x * e: the chain rule of the stretch
    dx = du if ec is None else du * ec
    de = None if e is None else jnp.sum(du * xc, axis=0).astype(e.dtype)
    return dx.astype(x.dtype), dw.astype(w.dtype), de


_adder_2d.defvjp(_adder_2d_fwd, _adder_2d_bwd)


def adder(
    x: jax.Array,
    w: jax.Array,
    *,
    stretch: jax.Array | None = None,
    grad: str = "clipped",
    clip_scale: float = 4.0,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """AdderNet's L1 similarity ``y[..., d] = -sum_i |x[..., i] - w[i, d]|``.

    Args:
      x: ``(..., D_in)`` float array (any number of leading dimensions, bfloat16 allowed).
      w: ``(D_in, D_out)`` float array.
      stretch: optional ``(D_in,)`` input stretch E: computes ``adder(x * stretch, w)``, with
        the product fused into the kernels' loads (the Pallas kernels never store ``x * E``);
        gradients flow to ``stretch`` by the chain rule.
      grad: backward rule, ``"clipped"`` (default), ``"addernet"`` or ``"exact"``; see the module
        docstring for the formulas.
      clip_scale: the factor inside ``hardtanh`` of the ``"clipped"`` x-gradient (4 in the
        *Exploration of AdderViT* study). A positive Python number; ignored by other rules.
      backend: ``"auto"`` (``"pallas"`` on a GPU, ``"cpu_native"`` on a CPU, else ``"xla"``),
        ``"xla"`` (pure JAX, runs everywhere), ``"pallas"`` (fused GPU kernels),
        ``"cpu_native"`` (C++ kernels through the XLA FFI, compiled on first use; ``"xla"`` when
        no compiler works, with one warning), or ``"naive"`` (the broadcast formula with plain
        autodiff: a baseline for speed and memory comparisons, which ignores ``grad`` and
        ``clip_scale`` and always has the ``"exact"`` gradient; ``"auto"`` never selects it).
      interpret: run the Pallas kernels in interpret mode (on CPU, for tests; slow); with
        ``backend="auto"`` it selects ``"pallas"``; ignored by other backends.

    Returns:
      ``(..., D_out)`` array of dtype ``result_type(x, w)``, accumulated in at least float32.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    _check_operands("adder", x, w)
    if interpret and backend == "auto":
        backend = "pallas"  # interpret mode only exists for the Pallas kernels
    grad, clip_scale = _check_rule("adder", grad, clip_scale)
    backend = _float64_to_xla(resolve_backend(backend), x, w, stretch)
    if stretch is not None:
        stretch = jnp.asarray(stretch)
        if stretch.shape != (x.shape[-1],):
            raise ValueError(
                f"adder: stretch must have shape (D_in,) = ({x.shape[-1]},), got "
                f"{stretch.shape} (x {x.shape}, w {w.shape})"
            )
    if backend == "naive":
        u = x if stretch is None else (x * stretch).astype(x.dtype)
        return _adder_naive(u, w)
    lead, (d_in, d_out) = x.shape[:-1], w.shape
    y = _adder_2d(x.reshape(-1, d_in), w, stretch, grad, clip_scale, backend, bool(interpret))
    return y.reshape(*lead, d_out)


def _adder_naive(x: jax.Array, w: jax.Array) -> jax.Array:
    """``-sum_i |x[..., i, None] - w[i, :]|`` by broadcasting, differentiated by plain autodiff.

    The "Adder" of the original *Exploration of AdderViT* code, kept as the baseline of the speed
    table (``ops.adder(..., backend="naive")``): it materialises the ``(L, D_in, D_out)``
    difference tensor in the forward and again in the backward, and its gradient is autodiff's
    derivative of ``|.|`` (``sign``, 0 at 0), i.e. the ``"exact"`` rule whatever ``grad`` says.
    Computed in at least float32, returned in ``result_type(x, w)``.
    """
    dtype = _compute_dtype(x, w)
    diff = x.astype(dtype)[..., :, None] - w.astype(dtype)
    return (-jnp.sum(jnp.abs(diff), axis=-2)).astype(jnp.result_type(x, w))


# ---------------------------------------------------------------------------------------------
# adder_scores: L1 similarity of two activations, one rule for both
# ---------------------------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _scores_2d(q, k, grad: str, clip_scale: float, backend: str, interpret: bool):
    return _adder_2d(q, k.T, None, grad, clip_scale, backend, interpret)


def _scores_2d_fwd(q, k, grad, clip_scale, backend, interpret):
    return _scores_2d(q, k, grad, clip_scale, backend, interpret), (q, k)


def _scores_2d_bwd(grad, clip_scale, backend, interpret, residuals, g):
    q, k = residuals
    dtype = _compute_dtype(q, k, g)
    qc, kc, gc = q.astype(dtype), k.astype(dtype), g.astype(dtype)
    # s[n, m] = -sum_d |q[n, d] - k[m, d]| is adder(q, k^T) and also adder(k, q^T)^T: each
    # operand's gradient is the input rule of the adder in which it is the input.
    dq = _input_grad(q, k.T, None, g, qc, kc.T, gc, grad, clip_scale, backend, interpret)
    dk = _input_grad(k, q.T, None, g.T, kc, qc.T, gc.T, grad, clip_scale, backend, interpret)
    return dq.astype(q.dtype), dk.astype(k.dtype)


_scores_2d.defvjp(_scores_2d_fwd, _scores_2d_bwd)


def adder_scores(
    q: jax.Array,
    k: jax.Array,
    *,
    grad: str = "clipped",
    clip_scale: float = 4.0,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """L1 attention logits ``s[n, m] = -sum_d |q[n, d] - k[m, d]|`` of ``(N, D)`` and ``(M, D)``.

    Unlike ``adder(q, k.T)``, whose ``k`` would get the full-precision weight rule, both operands
    are activations and get the same rule: the input rule of ``grad`` (module docstring),

        dL/dq[n, d] = sum_m g[n, m] * surrogate(k[m, d] - q[n, d]),
        dL/dk[m, d] = sum_n g[n, m] * surrogate(q[n, d] - k[m, d]),

    with ``surrogate`` ``hardtanh(clip_scale * .)`` for ``"clipped"`` (default),
    ``hardtanh(.)`` for ``"addernet"`` and ``sign`` for ``"exact"`` (the true gradient).
    ``backend`` and ``interpret`` are those of :func:`adder` (``"naive"`` is not offered).
    Batch it with ``jax.vmap``.
    """
    q, k = jnp.asarray(q), jnp.asarray(k)
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(
            f"adder_scores: q and k must be (N, D) and (M, D) with the same D, got "
            f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}"
        )
    if backend == "naive":
        raise ValueError("adder_scores: backend='naive' is not offered; use 'auto' or 'xla'")
    _check_operands("adder_scores", q, k.T)
    if interpret and backend == "auto":
        backend = "pallas"
    grad, clip_scale = _check_rule("adder_scores", grad, clip_scale)
    backend = _float64_to_xla(resolve_backend(backend), q, k)
    return _scores_2d(q, k, grad, clip_scale, backend, bool(interpret))


# ---------------------------------------------------------------------------------------------
# euclid and dense: plain matrix products, exact gradients by autodiff
# ---------------------------------------------------------------------------------------------


def euclid(x: jax.Array, w: jax.Array) -> jax.Array:
    """EuclidNet's squared L2 similarity ``y[..., d] = -sum_i (x[..., i] - w[i, d])^2``.

    Computed as ``2 x @ w - sum_i x_i^2 - sum_i w_id^2`` (no difference tensor) in at least
    float32 and at full float32 matmul precision; gradients are exact, by autodiff.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    _check_operands("euclid", x, w)
    out_dtype = jnp.result_type(x, w)
    dtype = _compute_dtype(x, w)
    xc, wc = x.astype(dtype), w.astype(dtype)
    xw = jnp.matmul(xc, wc, precision=lax.Precision.HIGHEST)
    y = 2.0 * xw - jnp.sum(xc * xc, axis=-1, keepdims=True) - jnp.sum(wc * wc, axis=0)
    return y.astype(out_dtype)


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """The multiplication baseline ``y[..., d] = sum_i x[..., i] * w[i, d]``.

    Accumulates in at least float32 and returns ``result_type(x, w)``; the matmul runs at the
    backend's default precision, as a ``flax`` Dense layer does, so speed comparisons are fair.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    _check_operands("dense", x, w)
    out_dtype = jnp.result_type(x, w)
    y = jnp.matmul(x, w, preferred_element_type=_compute_dtype(x, w))
    return y.astype(out_dtype)
