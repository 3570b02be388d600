"""Float64 NumPy implementations of the operations, written directly from the formulas.

They broadcast the full (L, D_in, D_out) difference tensor, which is the point: they are the
obvious reading of the formulas, for small test shapes only.
"""

import numpy as np


def _flat(x, w):
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    return x.reshape(-1, x.shape[-1]), w


def dense(x, w):
    x2, w = _flat(x, w)
    return (x2 @ w).reshape(*np.shape(x)[:-1], w.shape[1])


def adder(x, w):
    x2, w = _flat(x, w)
    y = -np.abs(x2[:, :, None] - w[None]).sum(axis=1)
    return y.reshape(*np.shape(x)[:-1], w.shape[1])


def euclid(x, w):
    x2, w = _flat(x, w)
    y = -((x2[:, :, None] - w[None]) ** 2).sum(axis=1)
    return y.reshape(*np.shape(x)[:-1], w.shape[1])


def hardtanh(z):
    return np.clip(z, -1.0, 1.0)


def adder_grads(x, w, g, grad, clip_scale=4.0):
    """(dL/dx, dL/dw) of ``adder`` under the rule ``grad`` for the cotangent ``g``."""
    x2, w = _flat(x, w)
    g2 = np.asarray(g, np.float64).reshape(-1, w.shape[1])
    diff = x2[:, :, None] - w[None]  # (L, D_in, D_out): x[l, i] - w[i, d]
    if grad == "exact":
        dx_term, dw_term = np.sign(-diff), np.sign(diff)
    elif grad == "addernet":
        dx_term, dw_term = hardtanh(-diff), diff
    elif grad == "clipped":
        dx_term, dw_term = hardtanh(clip_scale * -diff), diff
    else:
        raise ValueError(grad)
    dx = np.einsum("ld,lid->li", g2, dx_term).reshape(np.shape(x))
    dw = np.einsum("ld,lid->id", g2, dw_term)
    return dx, dw


def adder_stretch_grads(x, w, e, g, grad, clip_scale=4.0):
    """(dL/dx, dL/dw, dL/de) of ``adder(x * e, w)``: the rule applies to u = x * e, then the
    chain rule of the product (dx = e * du, de = sum over rows of x * du)."""
    x = np.asarray(x, np.float64)
    e = np.asarray(e, np.float64)
    du, dw = adder_grads(x * e, w, g, grad, clip_scale)
    return du * e, dw, (du * x).reshape(-1, x.shape[-1]).sum(axis=0)


def adder_scores_grads(q, k, g, grad, clip_scale=4.0):
    """(dL/dq, dL/dk) of ``s[n, m] = -sum_d |q[n, d] - k[m, d]|`` when both operands get the
    input rule of ``grad``: surrogate(k - q) for q, surrogate(q - k) for k."""
    q, k, g = (np.asarray(a, np.float64) for a in (q, k, g))
    diff = q[:, None, :] - k[None, :, :]  # (N, M, D): q[n, d] - k[m, d]
    surrogate = {
        "exact": np.sign,
        "addernet": hardtanh,
        "clipped": lambda z: hardtanh(clip_scale * z),
    }[grad]
    return np.einsum("nm,nmd->nd", g, surrogate(-diff)), np.einsum("nm,nmd->md", g, surrogate(diff))


def operands(seed, length, d_in, d_out, dtype=np.float32):
    """Fresh random 2-D operands of the kernels: x (L, D_in), w (D_in, D_out), the cotangent g
    (L, D_out) and a stretch e (D_in,) in [0.5, 1.5]."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(length, d_in)).astype(dtype)
    w = rng.normal(size=(d_in, d_out)).astype(dtype)
    g = rng.normal(size=(length, d_out)).astype(dtype)
    e = rng.uniform(0.5, 1.5, size=d_in).astype(dtype)
    return x, w, g, e


def float64(*arrays):
    """The arrays (NumPy or JAX, bfloat16 included) as float64, rounding already done."""
    return [np.asarray(a).astype(np.float64) for a in arrays]


def rel_err(actual, expected):
    """Relative Frobenius error, the measure the tests state their tolerances in."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    denom = np.linalg.norm(expected)
    return np.linalg.norm(actual - expected) / (denom if denom > 0 else 1.0)
