"""Knowledge distillation from a finished run's model: the :class:`Teacher`, the logit term
(:func:`distill_loss`) and the feature term (:func:`feature_loss`), whose weights and settings are
the config's ``distill.*`` fields.

The logit term is Hinton et al.'s. The feature term matches the student's token features to the
teacher's at the same depths, every block's output (``return_features`` of the models), after each
token is standardised over its features, so that the two networks' scales need not agree:

``kernel="none"``: the mean squared difference of the standardised tokens, ``mean (z_s - z_t)^2``.

``kernel="pkkd"``: our reading of PKKD (Xu et al., "Kernel Based Progressive Distillation for Adder
Neural Networks", NeurIPS 2020). PKKD compares an adder network's features with a multiplication
network's through a kernel suited to each, a Laplace kernel on the adder side (its outputs are
negative L1 distances) and a Gaussian one on the multiplication side, so that the two geometries
meet in one space; it reports +0.9 points for an adder ResNet-20 on CIFAR-10 (92.0 -> 93.0) and
+4.3 for VGG-small on CIFAR-100 (72.6 -> 76.9). Its method section (the kernels' exact form, the
bandwidths, the learned linear map after the kernel, the layers distilled, the progressively
trained teacher) was not reachable to check, so this form is ours: per image and block, the
token-by-token kernel matrices ``K_s[i, j] = exp(-|z_s,i - z_s,j|_1 / sigma_1)`` (Laplace, of the
student) and ``K_t[i, j] = exp(-|z_t,i - z_t,j|_2^2 / (2 sigma_2^2))`` (Gaussian, of the teacher)
are matched in mean square. The bandwidths are fixed so that two independent standardised tokens
of ``D`` features sit at kernel value ``exp(-1)``: ``sigma_1 = 2 D / sqrt(pi)`` (the mean of
``|N(0, 2)|`` is ``2 / sqrt(pi)``) and ``2 sigma_2^2 = 2 D``. Kernel matrices of tokens need no
learned map between the two networks' features, and the teacher is a finished run, not trained
alongside the student.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from addervit_jax import ops

__all__ = ["FEATURE_KERNELS", "Teacher", "distill_loss", "feature_loss", "inference_model"]

FEATURE_KERNELS = ("none", "pkkd")
_EPSILON = 1e-5  # of the token standardisation, as the models' LayerNorms


def inference_model(graphdef, params, rest) -> nnx.Module:
    """The model of a state's parts in evaluation mode: batch norms use their running statistics
    (``model.eval()``), as every evaluation, teacher and int8 conversion does."""
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    return model


@struct.dataclass
class Teacher:
    """A finished run's model for knowledge distillation (``train.load_teacher``), evaluated as
    at inference; ``return_features`` as the models' (block outputs)."""

    params: nnx.State
    rest: nnx.State
    graphdef: Any = struct.field(pytree_node=False)

    def __call__(self, images, *, return_features: bool = False):
        model = inference_model(self.graphdef, self.params, self.rest)
        return model(images, return_features=return_features)


def distill_loss(student_logits, teacher_logits, temperature: float) -> jax.Array:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per example.

    Hinton et al., "Distilling the Knowledge in a Neural Network" (2015): the ``T^2`` keeps the
    gradient's scale independent of ``T``. It is PKKD's output (logit) term.
    """
    t = teacher_logits.astype(jnp.float32) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    kl = optax.kl_divergence(jax.nn.log_softmax(s), jax.nn.softmax(t))
    return temperature**2 * kl


def _standardize(x):
    return jax.nn.standardize(x.astype(jnp.float32), axis=-1, epsilon=_EPSILON)


def _l1_distances(z):
    """``(B, N, D) -> (B, N, N)``: ``|z_i - z_j|_1`` per image, through the adder op (bounded
    memory) with its exact gradient."""
    exact = ops.AdderOptions.of(grad="exact")

    def one(z):
        return -ops.adder_scores(z, z, options=exact)

    return ops.shard_rows(jax.vmap(one), (z,))


def _squared_distances(z):
    """``(B, N, D) -> (B, N, N)``: ``|z_i - z_j|_2^2`` per image."""
    sq = jnp.sum(jnp.square(z), axis=-1)
    gram = jnp.einsum("bnd,bmd->bnm", z, z)
    return jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2.0 * gram, 0.0)


def feature_loss(student_features, teacher_features, kernel: str = "none") -> jax.Array:
    """The feature term per example, the mean over the matched blocks (see the module's
    docstring for both ``kernel`` forms); each feature is ``(B, N, D)``, the student's and the
    teacher's of the same shape."""
    if kernel not in FEATURE_KERNELS:
        raise ValueError(f"feature_loss: kernel={kernel!r}; expected one of {FEATURE_KERNELS}")
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(
            f"feature_loss: {len(student_features)} student and {len(teacher_features)} teacher "
            "features; they must be the same, nonzero number"
        )
    terms = []
    for s, t in zip(student_features, teacher_features, strict=True):
        if s.shape != t.shape:
            raise ValueError(f"feature_loss: student feature {s.shape} != teacher's {t.shape}")
        z_s, z_t = _standardize(s), _standardize(t)
        if kernel == "none":
            terms.append(jnp.mean(jnp.square(z_s - z_t), axis=(1, 2)))
            continue
        d = s.shape[-1]
        k_s = jnp.exp(-_l1_distances(z_s) / (2.0 * d / math.sqrt(math.pi)))
        k_t = jnp.exp(-_squared_distances(z_t) / (2.0 * d))
        terms.append(jnp.mean(jnp.square(k_s - k_t), axis=(1, 2)))
    return jnp.mean(jnp.stack(terms), axis=0)
