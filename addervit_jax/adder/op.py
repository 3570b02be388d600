"""``adder`` and ``adder_scores``: one custom_vjp over every backend of :mod:`.backends`.

The rules are :mod:`.rules`; what each backend computes is its module's ``forward``, ``x_grad``
and ``w_grad_exact`` (the protocol of :mod:`.backends`). What is common to all stays here: the
checks, the choice of backend, the stretch's chain rule, the dL/dw of the ``"addernet"`` and
``"clipped"`` rules (a matrix product, since the rule is linear in ``u - w``), dtypes, and running
custom calls per device (:func:`shard_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from addervit_jax.adder import backends, selfcheck
from addervit_jax.adder.options import BACKENDS, AdderOptions
from addervit_jax.adder.rules import compute_dtype

__all__ = ["adder", "adder_scores", "check_operands", "resolve_backend", "shard_rows"]


def check_operands(op: str, x: jax.Array, w: jax.Array) -> None:
    """``x`` ``(..., D_in)`` and ``w`` ``(D_in, D_out)`` of a float dtype, else an error naming
    ``op`` and both shapes."""
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


def _float64_to_xla(backend: str, *arrays) -> str:
    """The custom-call kernels compute in float32; float64 operands (``jax_enable_x64``) are
    computed in float64 by the ``"xla"`` backend instead, whatever backend was asked for."""
    dtypes = [a.dtype for a in arrays if a is not None]
    if backends.get(backend).CUSTOM_CALL and compute_dtype(*dtypes) == jnp.float64:
        return "xla"
    return backend


def resolve_backend(backend: str) -> str:
    """Map ``"auto"`` to the backend for the default device; reject unknown names.

    ``"auto"`` is ``"pallas"`` on a GPU, ``"cpu_native"`` on a CPU where the native kernels
    build, and ``"xla"`` elsewhere. ``"cpu_native"`` without a working C++ compiler falls back to
    ``"xla"`` (its ``available()`` warns once). On a GPU the op then runs each Pallas kernel only
    once it has passed a check, once per process (:mod:`addervit_jax.adder.selfcheck`).
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
        return "cpu_native" if backends.get("cpu_native").available() else "xla"
    return backend


def _lowering_platform() -> str:
    """The platform being traced for: an abstract mesh's device (``kernels.compat.lower_for_cuda``
    traces for CUDA on a CPU machine), else the default device's."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = getattr(device, "platform", None)
    return platform if platform is not None else jax.default_backend()


def _backend(options: AdderOptions, kernel: str, rows: tuple, shared: tuple, **rule) -> str:
    """The backend that runs ``kernel`` (a protocol function of :mod:`.backends`) on the
    operands: ``interpret`` selects the Pallas kernels under ``"auto"`` (interpret mode exists
    only for them), then :func:`resolve_backend`, then float64 operands go to ``"xla"``. A
    Pallas kernel that ``"auto"`` chose on a GPU runs only if it passes its once-per-process
    check with these static options (``rule``: ``grad`` and ``clip_scale`` of ``x_grad``), else
    ``"xla"`` runs in its place (:mod:`.selfcheck`)."""
    backend = options.backend
    if options.interpret and backend == "auto":
        backend = "pallas"
    resolved = _float64_to_xla(resolve_backend(backend), *rows, *shared)
    if resolved == "pallas" and not options.interpret and _lowering_platform() == "cpu":
        raise ValueError(
            "adder: backend='pallas' compiles for a GPU; on a CPU it runs only with "
            "interpret=True (slow, for tests): use backend='auto' (the native kernels) or 'xla'"
        )
    if backend == "auto" and resolved == "pallas":
        w, e = shared
        resolved = selfcheck.kernel_backend(
            resolved,
            kernel,
            dtype=jnp.result_type(*rows, w),
            stretched=e is not None,
            **rule,
            interpret=options.interpret,
        )
    return resolved


def shard_rows(kernel: Callable, rows: tuple, shared: tuple = (), *, sum_rows: bool = False):
    """Call ``kernel(*rows, *shared)``, whose ``rows`` operands split along their first axis.

    The custom-call backends run through it; a caller whose own batch is the natural split
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


# ---------------------------------------------------------------------------------------------
# adder: custom_vjp on 2-D operands
# ---------------------------------------------------------------------------------------------


def _run(options: AdderOptions, name: str, rows: tuple, shared: tuple, *, sum_rows=False, **rule):
    """The protocol function ``name`` (with the ``rule``'s ``grad`` and ``clip_scale`` for
    ``x_grad``) of the backend that :func:`_backend` picks, on ``(x, w[, g], e)``, given as the
    operands split by rows (``x``, and ``g`` if any) and the shared ones (``w``, ``e``). A custom
    call runs per device (:func:`shard_rows`) and refuses to be differentiated
    (:func:`_first_order_only`)."""
    backend = _backend(options, name, rows, shared, **rule)
    module = backends.get(backend)
    fn = partial(getattr(module, name), **rule, interpret=options.interpret)

    def call(*args):
        x, *g, w, e = args  # shard_rows passes the rows first
        return fn(x, w, *g, e)

    if module.CUSTOM_CALL:
        return shard_rows(_first_order_only(call, backend, name), rows, shared, sum_rows=sum_rows)
    return call(*rows, *shared)


def _first_order_only(kernel: Callable, backend: str, name: str) -> Callable:
    """``kernel``, a custom call of ``backend``, whose derivative raises an error naming it.

    The kernels have no derivatives of their own. A gradient only calls them (the custom_vjp
    below); a derivative of a gradient (a gradient penalty, ``jax.grad`` of ``jax.grad``,
    ``jax.jacrev`` of ``jax.jacrev``) differentiates the backward pass, and would otherwise fail
    inside JAX, naming neither the op nor the remedy. (Forward mode, ``jax.jvp`` or
    ``jax.hessian``, stops earlier on every backend: JAX does not differentiate a custom_vjp in
    forward mode.)
    """
    kernel = jax.custom_jvp(kernel)

    def jvp(primals, tangents):
        raise NotImplementedError(
            f"adder: backend={backend!r} has no second derivatives: its {name} kernel is a "
            f"custom call without a derivative, and a derivative of a gradient (a gradient "
            f"penalty, jax.grad of jax.grad) differentiates it. Use backend='xla' (plain JAX, "
            f"differentiable to any order in reverse mode)."
        )

    kernel.defjvp(jvp)
    return kernel


def _input_grad(x, w, e, g, options: AdderOptions):
    """The rule's dL/du of ``adder(u, w)`` with ``u = x * e``, by the backend, at least float32."""
    du = _run(options, "x_grad", (x, g), (w, e), grad=options.grad, clip_scale=options.clip_scale)
    return du.astype(compute_dtype(x, w, g))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _adder_2d(x, w, e, options: AdderOptions):
    """``-sum_i |x[l, i] * e[i] - w[i, d]|`` (``e`` None: no stretch) with the rule of
    ``options``, whose backend is chosen per kernel (:func:`_backend`)."""
    return _run(options, "forward", (x,), (w, e))


def _adder_2d_fwd(x, w, e, options):
    return _adder_2d(x, w, e, options), (x, w, e)


def _adder_2d_bwd(options, residuals, g):
    x, w, e = residuals
    dtype = compute_dtype(x, w, g)
    xc, wc, gc = x.astype(dtype), w.astype(dtype), g.astype(dtype)
    ec = None if e is None else e.astype(dtype)
    du = _input_grad(x, w, e, g, options)
    if options.grad == "exact":
        dw = _run(options, "w_grad_exact", (x, g), (w, e), sum_rows=True).astype(dtype)
    else:
        # sum_l g[l, d] * (u[l, i] - w[i, d]) = (u^T g)[i, d] - w[i, d] * sum_l g[l, d], and
        # u^T g = e[i] * (x^T g)[i, d]: u = x * e is not formed (XLA:CPU computed it for every
        # site at the start of the backward, a tensor of each site's input size kept alive at the
        # peak). HIGHEST keeps GPUs from running this float32 product in TF32.
        utg = jnp.matmul(xc.T, gc, precision=lax.Precision.HIGHEST)
        if ec is not None:
            utg = ec[:, None] * utg
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
    grad: str | None = None,
    clip_scale: float | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
    options: AdderOptions | None = None,
) -> jax.Array:
    """AdderNet's L1 similarity ``y[..., d] = -sum_i |x[..., i] - w[i, d]|``.

    Args:
      x: ``(..., D_in)`` float array (any number of leading dimensions, bfloat16 allowed).
      w: ``(D_in, D_out)`` float array.
      stretch: optional ``(D_in,)`` input stretch E: computes ``adder(x * stretch, w)``, with
        the product fused into the kernels' loads (the Pallas kernels never store ``x * E``);
        gradients flow to ``stretch`` by the chain rule.
      grad: backward rule, ``"clipped"`` (default), ``"addernet"`` or ``"exact"``; the formulas
        are in :mod:`addervit_jax.adder.rules`.
      clip_scale: the factor inside ``hardtanh`` of the ``"clipped"`` x-gradient (4, the
        default, in the *Exploration of AdderViT* study). A positive Python number; ignored by
        other rules.
      backend: ``"auto"`` (default: ``"pallas"`` on a GPU, where a kernel that fails its check,
        once per process, is replaced by ``"xla"`` with one warning
        (:mod:`addervit_jax.adder.selfcheck`); ``"cpu_native"`` on a CPU; else ``"xla"``),
        ``"xla"`` (pure JAX, runs everywhere), ``"pallas"`` (fused GPU kernels),
        ``"cpu_native"`` (C++ kernels through the XLA FFI, compiled on first use; ``"xla"`` when
        no compiler works, with one warning), or ``"naive"`` (the broadcast formula with plain
        autodiff: a baseline for speed and memory comparisons, which ignores ``grad`` and
        ``clip_scale`` and always has the ``"exact"`` gradient; ``"auto"`` never selects it).
        Each is a module of :mod:`addervit_jax.adder.backends`. A derivative of a gradient
        needs ``"xla"``: the kernels of ``"pallas"`` and ``"cpu_native"`` raise
        ``NotImplementedError``.
      interpret: run the Pallas kernels in interpret mode (on CPU, for tests; slow); with
        ``backend="auto"`` it selects ``"pallas"``; ignored by other backends. Default False.
      options: the four settings above as one :class:`AdderOptions` (how layers pass them);
        a setting also given as a keyword replaces the one in ``options``.

    Returns:
      ``(..., D_out)`` array of dtype ``result_type(x, w)``, accumulated in at least float32.
      float64 inputs (with ``jax_enable_x64``) are computed in float64 by ``"xla"`` whatever
      ``backend`` says: the kernels compute in float32.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    check_operands("adder", x, w)
    options = AdderOptions.of(
        options, grad=grad, clip_scale=clip_scale, backend=backend, interpret=interpret
    )
    if stretch is not None:
        stretch = jnp.asarray(stretch)
        if stretch.shape != (x.shape[-1],):
            raise ValueError(
                f"adder: stretch must have shape (D_in,) = ({x.shape[-1]},), got "
                f"{stretch.shape} (x {x.shape}, w {w.shape})"
            )
    module = backends.get(_backend(options, "forward", (x,), (w, stretch)))
    if module.AUTODIFF:
        return module.forward(x, w, stretch)
    lead, (d_in, d_out) = x.shape[:-1], w.shape
    y = _adder_2d(x.reshape(-1, d_in), w, stretch, options)
    return y.reshape(*lead, d_out)


# ---------------------------------------------------------------------------------------------
# adder_scores: L1 similarity of two activations, one rule for both
# ---------------------------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _scores_2d(q, k, options: AdderOptions):
    return _adder_2d(q, k.T, None, options)


def _scores_2d_fwd(q, k, options):
    return _scores_2d(q, k, options), (q, k)


def _scores_2d_bwd(options, residuals, g):
    q, k = residuals
    # s[n, m] = -sum_d |q[n, d] - k[m, d]| is adder(q, k^T) and also adder(k, q^T)^T: each
    # operand's gradient is the input rule of the adder in which it is the input.
    dq = _input_grad(q, k.T, None, g, options)
    dk = _input_grad(k, q.T, None, g.T, options)
    return dq.astype(q.dtype), dk.astype(k.dtype)


_scores_2d.defvjp(_scores_2d_fwd, _scores_2d_bwd)


def adder_scores(
    q: jax.Array,
    k: jax.Array,
    *,
    grad: str | None = None,
    clip_scale: float | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
    options: AdderOptions | None = None,
) -> jax.Array:
    """L1 attention logits ``s[n, m] = -sum_d |q[n, d] - k[m, d]|`` of ``(N, D)`` and ``(M, D)``.

    Unlike ``adder(q, k.T)``, whose ``k`` would get the full-precision weight rule, both operands
    are activations and get the same rule, the input rule of ``grad``
    (:mod:`addervit_jax.adder.rules`):

        dL/dq[n, d] = sum_m g[n, m] * s(k[m, d] - q[n, d]),
        dL/dk[m, d] = sum_n g[n, m] * s(q[n, d] - k[m, d]).

    The settings (``grad``, ``clip_scale``, ``backend``, ``interpret``, ``options``) are those of
    :func:`adder` (``backend="naive"`` is not offered). Batch it with ``jax.vmap``.
    """
    q, k = jnp.asarray(q), jnp.asarray(k)
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(
            f"adder_scores: q and k must be (N, D) and (M, D) with the same D, got "
            f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}"
        )
    options = AdderOptions.of(
        options, grad=grad, clip_scale=clip_scale, backend=backend, interpret=interpret
    )
    if options.backend == "naive":
        raise ValueError("adder_scores: backend='naive' is not offered; use 'auto' or 'xla'")
    check_operands("adder_scores", q, k.T)
    return _scores_2d(q, k, options)
