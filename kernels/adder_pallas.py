"""Fused Pallas GPU kernels (Triton backend) for the adder similarity and its backward rules.

Three "pseudo-matmuls" (the rules of :mod:`addervit_jax.adder.rules`), each tiled like a matmul:
the grid runs over output tiles, one program loops over the reduction dimension in chunks, and
float32 accumulators (the size of the tile, or ``reduce`` times that) live in registers.
``u = x * e`` is the input after the stretch E of the *Exploration of AdderViT* study, applied as
``x`` is loaded (no ``u`` in memory):

==================== ============================================== ================ ==========
kernel               out[p, q] = sum over r of                       out tile         reduction
==================== ============================================== ================ ==========
:func:`forward`      ``-|u[l, i] - w[i, d]|``                         (l, d)           i
:func:`x_grad`       ``g[l, d] * s(w[i, d] - u[l, i])``               (l, i)           d
:func:`w_grad_exact` ``g[l, d] * sign(u[l, i] - w[i, d])``            (i, d)           l
==================== ============================================== ================ ==========

``s`` is the rule's surrogate (:func:`addervit_jax.adder.rules.surrogate`). ``x_grad`` returns
the gradient with respect to ``u``; the caller (:mod:`addervit_jax.adder.op`) multiplies by ``e``
and sums for dL/de. dL/dw of ``"addernet"``/``"clipped"`` is a matrix product and stays in XLA.

A loop step computes a broadcast ``(reduce, rows, cols)`` of terms in registers, the reduction axis
leading: Triton keeps that axis inside each thread, so nothing is summed across threads (the
operand chunks come as ``(reduce, rows)`` and ``(reduce, cols)``, from float32 transposed copies
where the reduction is the operand's last axis). The forward sums the step's terms into a ``(rows,
cols)`` accumulator, each ``|.|`` folded into its FADD (:func:`_abs`); the backward kernels keep a
``(reduce, rows, cols)`` accumulator, so that every term ends in FFMA into it (one, two for the
exact rule), and sum its leading axis after the loop. The exact rule's sign is two comparisons a
term (:func:`_add_sign_terms`). The static check of the machine code (:mod:`kernels.sass`,
``addervit check-kernels --sass``) measures what each loop spends on arithmetic: every shipped tile
spends at least 80% of its loop's instructions on the terms' own. Triton needs power-of-two block
shapes and Pallas' interpret mode does not check that, so every operand is zero-padded to whole
blocks here (a zero row or column contributes ``|0 - 0| = 0`` or a zero cotangent to every sum) and
the tests lower every kernel for CUDA on a CPU machine. Block sizes come from one table,
:data:`BLOCKS`, by shape class.

Each kernel has a plain ``jnp`` ``*_reference`` beside it (the broadcast formula, which does
materialise the 3-D difference; only for tests at small sizes).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from addervit_jax.adder.rules import surrogate
from addervit_jax.kernels import compat

__all__ = [
    "BLOCKS",
    "Blocks",
    "blocks_for",
    "forward",
    "forward_reference",
    "w_grad_exact",
    "w_grad_exact_reference",
    "x_grad",
    "x_grad_reference",
]


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile of one program: ``rows x cols`` of the output, ``reduce`` terms per loop step."""

    rows: int
    cols: int
    reduce: int
    num_warps: int = 4
    num_stages: int = 2


# Chosen with the static check of the Hopper machine code (kernels/sass.py; every candidate's
# numbers in experiments/results/sass/candidates.md): per thread and loop step 128 terms in the
# forward (2 instructions a term; 64 leave the loop's fixed cost, shared-memory loads, barrier and
# loop control, at a quarter) and 64 in the backward kernels (4 a term, and a (reduce, rows, cols)
# accumulator: 128 spill in dL/dx, and in dL/dW reach 0.90 instead of 0.84-0.88 with 190-243
# registers). Large outputs use bigger tiles (more terms per loaded operand) with 8 warps and a
# deeper software pipeline; small ones more, smaller programs. Registers, about: forward 167
# (small: 3 programs an SM) and 188 (large: 1), x_grad 160 and 175-236 (1), w_grad_exact 120 and
# 124 (2). GPU timing (experiments/bench_kernels.py) is to refine them.
BLOCKS: dict[str, dict[str, Blocks]] = {
    "forward": {
        "small": Blocks(rows=32, cols=64, reduce=8, num_warps=4, num_stages=2),
        "large": Blocks(rows=128, cols=64, reduce=4, num_warps=8, num_stages=3),
    },
    "x_grad": {
        "small": Blocks(rows=32, cols=32, reduce=8, num_warps=4, num_stages=2),
        "large": Blocks(rows=64, cols=64, reduce=4, num_warps=8, num_stages=3),
    },
    "w_grad_exact": {
        "small": Blocks(rows=32, cols=32, reduce=8, num_warps=4, num_stages=2),
        "large": Blocks(rows=64, cols=64, reduce=4, num_warps=8, num_stages=3),
    },
}

# Outputs with at least this many elements use the "large" tiles (a ViT-S MLP layer on a batch
# has millions; small outputs need more, smaller programs to fill the GPU's SMs).
_LARGE_OUTPUT = 1 << 20


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def blocks_for(kernel: str, rows: int, cols: int, reduce: int) -> Blocks:
    """The tile of ``kernel`` for an output of ``rows x cols`` summed over ``reduce`` terms.

    Table entries shrink to the next power of two of a smaller dimension (a 10-class head needs
    no 32-wide tile, and padding it would be wasted work).
    """
    entry = BLOCKS[kernel]["large" if rows * cols >= _LARGE_OUTPUT else "small"]

    def fit(block: int, size: int) -> int:
        return min(block, _next_power_of_two(size))

    return dataclasses.replace(
        entry,
        rows=fit(entry.rows, rows),
        cols=fit(entry.cols, cols),
        reduce=fit(entry.reduce, reduce),
    )


def _pad_to(a: jax.Array, multiples: tuple[int, ...]) -> jax.Array:
    """``a`` in float32, zero-padded to whole blocks: every kernel operand comes through here, so
    the kernels read float32 only. They sum in float32 anyway, and a float32 operand spares the
    loop a conversion per loaded element (bfloat16's shifts and permutes: 3% of the forward's
    loop); the copy is O(operand), the kernel O(L D_in D_out)."""
    a = a.astype(jnp.float32)
    pads = [(0, -s % m) for s, m in zip(a.shape, multiples, strict=True)]
    return jnp.pad(a, pads) if any(p for _, p in pads) else a


def _compiler_params(blocks: Blocks, interpret: bool):
    """Triton's launch parameters; none in interpret mode, which runs without the GPU backend."""
    if interpret:
        return None
    triton = compat.pallas_triton()
    return triton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _ones_if_none(e: jax.Array | None, size: int, dtype) -> jax.Array:
    return jnp.ones((size,), dtype) if e is None else e


def _zeros(reduce: int, rows: int, cols: int) -> jax.Array:
    """A kernel's accumulator: one float32 partial sum per term of a loop step, ``(reduce, rows,
    cols)``, summed over its leading axis once, after the loop. Every term then adds into its own
    accumulator (FFMA): no sum across the step's terms inside the loop, and Triton
    keeps the leading axis inside each thread, so nothing crosses threads either."""
    return jnp.zeros((reduce, rows, cols), jnp.float32)


def _abs(v: jax.Array, interpret: bool) -> jax.Array:
    """``|v|`` as PTX ``abs.f32`` on the GPU, which ptxas folds into the FADD that consumes it
    (an operand modifier, no instruction of its own). ``jnp.abs`` lowers to libdevice's
    ``__nv_fabsf``, which Triton builds with flush-to-zero: ``abs.ftz.f32`` does not fold into a
    non-ftz add and costs an FADD per term. Interpret mode (no GPU backend) takes ``jnp.abs``."""
    if interpret:
        return jnp.abs(v)
    [result] = compat.pallas_triton().elementwise_inline_asm(
        "abs.f32 $0, $1;",
        args=[v],
        constraints="=f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, v.dtype)],
    )
    return result


def _add_sign_terms(acc: jax.Array, g: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``acc + g * ([a > b] + [a >= b])``, i.e. ``acc + g * (sign(a - b) + 1)`` for ordered
    ``a``, ``b``: two comparisons (FSET, 1.0 or 0.0) and two FFMA into ``acc`` a term. There is
    no one-instruction sign with ``sign(0) = 0`` on the GPU (``copysign`` is a bit operation that
    makes it +-1); the ``- g`` is summed once per output by :func:`_sign_fixup`."""
    f32 = jnp.float32
    acc = acc + g * (a > b).astype(f32)
    return acc + g * (a >= b).astype(f32)


def _sign_fixup(acc: jax.Array, x, w, g, e, *, axis: int) -> jax.Array:
    """An exact-rule kernel's sums (of :func:`_add_sign_terms`, sliced to the output) less ``g``
    summed over the reduction, ``g``'s ``axis`` (1: dL/du, over d; 0: dL/dw, over l), and NaN
    where ``sign`` has a NaN term that the comparisons do not see (:func:`_sign_nan`). A NaN in
    ``g`` propagates by itself; an infinite ``g`` gives NaN where ``sign`` would give +-inf (its
    ``inf - inf`` in the subtraction), which only a step that is lost anyway sees."""
    f32 = jnp.float32
    g_sum = g.astype(f32).sum(axis=axis, keepdims=True)
    nan = _sign_nan(x.astype(f32) * e.astype(f32), w.astype(f32), axis)
    return jnp.where(nan, jnp.nan, acc - g_sum)


def _sign_nan(u: jax.Array, w: jax.Array, axis: int) -> jax.Array:
    """Where ``sign(u[l, i] - w[i, d])`` is NaN for some term of an output (a NaN operand, or
    equal infinities), by ``u``'s and ``w``'s own elements: ``u`` (L, D_in) and, reduced over
    ``axis`` (the kernel's reduction), ``w`` (D_in, D_out), each broadcast to the output of the
    kernel (``axis=1``: dL/du, (L, D_in); ``axis=0``: dL/dw, (D_in, D_out))."""
    if axis == 1:  # dL/du[l, i]: every d, one u
        return (
            jnp.isnan(u)
            | jnp.isnan(w).any(axis=1)[None, :]
            | (jnp.isposinf(u) & jnp.isposinf(w).any(axis=1)[None, :])
            | (jnp.isneginf(u) & jnp.isneginf(w).any(axis=1)[None, :])
        )
    # dL/dw[i, d]: every l, one w
    return (
        jnp.isnan(u).any(axis=0)[:, None]
        | jnp.isnan(w)
        | (jnp.isposinf(u).any(axis=0)[:, None] & jnp.isposinf(w))
        | (jnp.isneginf(u).any(axis=0)[:, None] & jnp.isneginf(w))
    )


# ---------------------------------------------------------------------------------------------
# forward: y[l, d] = -sum_i |x[l, i] * e[i] - w[i, d]|
# ---------------------------------------------------------------------------------------------


def _forward_kernel(xt_ref, w_ref, e_ref, y_ref, *, reduce: int, interpret: bool):
    rows, cols = y_ref.shape

    def step(k, acc):
        chunk = pl.ds(pl.multiple_of(k * reduce, reduce), reduce)
        ut = xt_ref[chunk, :] * e_ref[chunk][:, None]  # (reduce, rows)
        w = w_ref[chunk, :]  # (reduce, cols)
        # The reduction axis leads the broadcast: Triton keeps it inside each thread, so the sum
        # needs no shuffles or barriers. Each |.| folds into the FADD of the sum (a (reduce,
        # rows, cols) accumulator, as in the backward kernels, adds the same FADDs and costs
        # reduce times the registers).
        return acc + jnp.sum(_abs(ut[:, :, None] - w[:, None, :], interpret), axis=0)

    acc = lax.fori_loop(0, xt_ref.shape[0] // reduce, step, jnp.zeros((rows, cols), jnp.float32))
    y_ref[...] = (-acc).astype(y_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def forward(
    x: jax.Array, w: jax.Array, e: jax.Array | None = None, *, interpret: bool = False
) -> jax.Array:
    """``y[l, d] = -sum_i |x[l, i] * e[i] - w[i, d]|`` for 2-D ``x`` (L, D_in), ``w`` (D_in, D_out).

    ``e`` (D_in,) is the stretch (None: ones). Accumulates in float32 and returns
    ``result_type(x, w)``.
    """
    (length, d_in), d_out = x.shape, w.shape[1]
    if length * d_in * d_out == 0:  # an empty sum, or no output: no grid to launch
        return jnp.zeros((length, d_out), jnp.result_type(x, w))
    b = blocks_for("forward", length, d_out, d_in)
    e = _ones_if_none(e, d_in, x.dtype)
    xt = _pad_to(x, (b.rows, b.reduce)).T  # a chunk of x^T is contiguous along the rows
    wp = _pad_to(w, (b.reduce, b.cols))
    ep = _pad_to(e, (b.reduce,))
    (kp, lp), dp = xt.shape, wp.shape[1]
    y = pl.pallas_call(
        functools.partial(_forward_kernel, reduce=b.reduce, interpret=interpret),
        out_shape=jax.ShapeDtypeStruct((lp, dp), jnp.result_type(x, w)),
        grid=(lp // b.rows, dp // b.cols),
        in_specs=[
            pl.BlockSpec((kp, b.rows), lambda i, j: (0, i)),
            pl.BlockSpec((kp, b.cols), lambda i, j: (0, j)),
            pl.BlockSpec((kp,), lambda i, j: (0,)),
        ],
        out_specs=pl.BlockSpec((b.rows, b.cols), lambda i, j: (i, j)),
        compiler_params=_compiler_params(b, interpret),
        interpret=interpret,
        name="adder_forward",
    )(xt, wp, ep)
    return y[:length, :d_out]


def forward_reference(x: jax.Array, w: jax.Array, e: jax.Array | None = None) -> jax.Array:
    u = x.astype(jnp.float32) * (1.0 if e is None else e.astype(jnp.float32))
    y = -jnp.sum(jnp.abs(u[:, :, None] - w.astype(jnp.float32)[None]), axis=1)
    return y.astype(jnp.result_type(x, w))


# ---------------------------------------------------------------------------------------------
# dL/du: dx[l, i] = sum_d g[l, d] * s(w[i, d] - x[l, i] * e[i])
# ---------------------------------------------------------------------------------------------


def _x_grad_kernel(
    x_ref, e_ref, wt_ref, gt_ref, dx_ref, *, reduce: int, s: Callable | None, scale: float
):
    rows, cols = dx_ref.shape
    # s(c * (w - u)) as s(c w - c u): the factor of the "clipped" rule once per operand, not per
    # term (``scale`` is c and ``s`` the unscaled clip then; 1 otherwise)
    u = x_ref[...] * e_ref[...][None, :]  # (rows, cols): l, i
    if scale != 1.0:
        u = u * scale

    def step(k, acc):
        chunk = pl.ds(pl.multiple_of(k * reduce, reduce), reduce)
        gt = gt_ref[chunk, :]  # (reduce, rows): d, l
        wt = wt_ref[chunk, :]  # (reduce, cols): d, i
        if scale != 1.0:
            wt = wt * scale
        if s is None:  # "exact": g * (sign(w - u) + 1), the - g after the kernel
            return _add_sign_terms(acc, gt[:, :, None], wt[:, None, :], u[None, :, :])
        return acc + gt[:, :, None] * s(wt[:, None, :] - u[None, :, :])

    acc = lax.fori_loop(0, gt_ref.shape[0] // reduce, step, _zeros(reduce, rows, cols))
    dx_ref[...] = jnp.sum(acc, axis=0).astype(dx_ref.dtype)


@functools.partial(jax.jit, static_argnames=("grad", "clip_scale", "interpret"))
def x_grad(
    x: jax.Array,
    w: jax.Array,
    g: jax.Array,
    e: jax.Array | None = None,
    *,
    grad: str,
    clip_scale: float = 4.0,
    interpret: bool = False,
) -> jax.Array:
    """dL/du ``[l, i] = sum_d g[l, d] * s(w[i, d] - x[l, i] * e[i])`` in float32.

    ``s`` is ``grad``'s surrogate (:func:`surrogate`). Returns float32 (L, D_in); the caller
    casts after applying the stretch's chain rule.
    """
    surrogate(grad, clip_scale)  # an unknown rule raises, naming the rules
    (length, d_in), d_out = x.shape, w.shape[1]
    if length * d_in * d_out == 0:
        return jnp.zeros((length, d_in), jnp.float32)
    b = blocks_for("x_grad", length, d_in, d_out)
    e = _ones_if_none(e, d_in, x.dtype)
    xp = _pad_to(x, (b.rows, b.cols))
    ep = _pad_to(e, (b.cols,))
    wt = _pad_to(w, (b.cols, b.reduce)).T  # chunks of w^T and g^T: contiguous rows
    gt = _pad_to(g, (b.rows, b.reduce)).T
    (lp, ip), dp = xp.shape, wt.shape[0]
    dx = pl.pallas_call(
        functools.partial(
            _x_grad_kernel,
            reduce=b.reduce,
            s=None if grad == "exact" else surrogate("addernet", clip_scale),
            scale=float(clip_scale) if grad == "clipped" else 1.0,
        ),
        out_shape=jax.ShapeDtypeStruct((lp, ip), jnp.float32),
        grid=(lp // b.rows, ip // b.cols),
        in_specs=[
            pl.BlockSpec((b.rows, b.cols), lambda i, j: (i, j)),
            pl.BlockSpec((b.cols,), lambda i, j: (j,)),
            pl.BlockSpec((dp, b.cols), lambda i, j: (0, j)),
            pl.BlockSpec((dp, b.rows), lambda i, j: (0, i)),
        ],
        out_specs=pl.BlockSpec((b.rows, b.cols), lambda i, j: (i, j)),
        compiler_params=_compiler_params(b, interpret),
        interpret=interpret,
        name=f"adder_x_grad_{grad}",
    )(xp, ep, wt, gt)
    dx = dx[:length, :d_in]
    return _sign_fixup(dx, x, w, g, e, axis=1) if grad == "exact" else dx


def x_grad_reference(x, w, g, e=None, *, grad: str, clip_scale: float = 4.0) -> jax.Array:
    f32 = jnp.float32
    u = x.astype(f32) * (1.0 if e is None else e.astype(f32))
    diff = w.astype(f32)[None, :, :] - u[:, :, None]  # (l, i, d)
    return jnp.sum(g.astype(f32)[:, None, :] * surrogate(grad, clip_scale)(diff), axis=2)


# ---------------------------------------------------------------------------------------------
# dL/dw of "exact": dw[i, d] = sum_l g[l, d] * sign(x[l, i] * e[i] - w[i, d])
# ---------------------------------------------------------------------------------------------


def _w_grad_exact_kernel(x_ref, e_ref, w_ref, g_ref, dw_ref, *, reduce: int):
    rows, cols = dw_ref.shape
    w = w_ref[...]  # (rows, cols): i, d
    e = e_ref[...]

    def step(k, acc):
        chunk = pl.ds(pl.multiple_of(k * reduce, reduce), reduce)
        u = x_ref[chunk, :] * e[None, :]  # (reduce, rows): l, i
        g = g_ref[chunk, :]  # (reduce, cols): l, d
        # g * (sign(u - w) + 1); the - g after the kernel
        return _add_sign_terms(acc, g[:, None, :], u[:, :, None], w[None, :, :])

    acc = lax.fori_loop(0, x_ref.shape[0] // reduce, step, _zeros(reduce, rows, cols))
    dw_ref[...] = jnp.sum(acc, axis=0).astype(dw_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def w_grad_exact(
    x: jax.Array,
    w: jax.Array,
    g: jax.Array,
    e: jax.Array | None = None,
    *,
    interpret: bool = False,
) -> jax.Array:
    """dL/dw ``[i, d] = sum_l g[l, d] * sign(x[l, i] * e[i] - w[i, d])`` in float32."""
    (length, d_in), d_out = x.shape, w.shape[1]
    if length * d_in * d_out == 0:
        return jnp.zeros((d_in, d_out), jnp.float32)
    b = blocks_for("w_grad_exact", d_in, d_out, length)
    e = _ones_if_none(e, d_in, x.dtype)
    xp = _pad_to(x, (b.reduce, b.rows))
    ep = _pad_to(e, (b.rows,))
    wp = _pad_to(w, (b.rows, b.cols))
    gp = _pad_to(g, (b.reduce, b.cols))
    lp, (ip, dp) = xp.shape[0], wp.shape
    dw = pl.pallas_call(
        functools.partial(_w_grad_exact_kernel, reduce=b.reduce),
        out_shape=jax.ShapeDtypeStruct((ip, dp), jnp.float32),
        grid=(ip // b.rows, dp // b.cols),
        in_specs=[
            pl.BlockSpec((lp, b.rows), lambda i, j: (0, i)),
            pl.BlockSpec((b.rows,), lambda i, j: (i,)),
            pl.BlockSpec((b.rows, b.cols), lambda i, j: (i, j)),
            pl.BlockSpec((lp, b.cols), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((b.rows, b.cols), lambda i, j: (i, j)),
        compiler_params=_compiler_params(b, interpret),
        interpret=interpret,
        name="adder_w_grad_exact",
    )(xp, ep, wp, gp)
    return _sign_fixup(dw[:d_in, :d_out], x, w, g, e, axis=0)


def w_grad_exact_reference(x, w, g, e=None) -> jax.Array:
    f32 = jnp.float32
    u = x.astype(f32) * (1.0 if e is None else e.astype(f32))
    diff = u[:, :, None] - w.astype(f32)[None, :, :]  # (l, i, d)
    return jnp.sum(g.astype(f32)[:, None, :] * jnp.sign(diff), axis=0)
