"""Conversion of a trained model into another variant of the same family and shape
(``config.init_from``): what a user with a trained multiplication ViT does to ask what replacing
its products by additions costs.

A new run whose config names ``init_from`` (a finished run) starts, instead of from its random
initialisation, from:

1. every parameter (and batch-norm running statistic) of the finished run whose module has the
   same type and whose array has the same shape at the same path (embedding, LayerNorms, the sites
   that stay multiplication, the head) copied;
2. each site whose type or structure differs (a ``Dense`` that becomes an ``AdderDense``, a
   ``norm="layer"`` site that becomes ``norm="batch"``) fitted to reproduce the finished run's site
   on the converted model's own inputs: site by site in the order the forward pass calls them, each
   on the inputs it receives once the sites before it are fitted, ``init_fit_batches`` training
   batches without augmentation and without labels, by ``init_fit_steps`` full-batch Adam steps on
   the mean squared error relative to the target's mean square. A ``norm="batch"`` site is fitted as
   it trains (batch statistics of those inputs) and its running statistics are then set to them
   (``set_running_statistics``), so that it evaluates as it was fitted. Each site's relative error
   (``|y - y_teacher| / |y_teacher|``, evaluation mode) before and after the fit goes into
   ``conversion.json`` and the run's summary.

Then the whole model trains for the config's epochs, with distillation from that run when
``distill.teacher`` names it (the screen's conversion arm does). Every multiplication-free family
that reaches parity on ViTs starts from a trained full-precision model this way (DeepShift's
pretrained start, ShiftAddViT, TerViT); the site-by-site fit on the model's own inputs is our
choice of how to start the distance sites, which have no weights in common with a dot product.
"""

from __future__ import annotations

import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from addervit_jax import data, models
from addervit_jax.models import sites
from addervit_jax.train.checkpoints import restore
from addervit_jax.train.config import model_overrides
from addervit_jax.train.distill import inference_model
from addervit_jax.train.evaluation import feature_shapes, finished_run
from addervit_jax.train.state import TrainState
from addervit_jax.train.workdir import CONVERSION_FILE

__all__ = ["CONVERSION_FILE", "budget_epochs", "check_source", "convert"]

_MAX_TOKENS = 4096  # of each site's inputs, drawn with the run's seed
_LEARNING_RATE = 1e-2  # of the fit's Adam; the distance weights start from N(0, 1)


def check_source(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of the finished run ``config.init_from``, refused, naming the field and why,
    unless it is a finished run (``evaluation.finished_run``, as a teacher is checked) of the same
    family, dataset and feature shapes whose final state reads back (``restore``: its
    ``params.msgpack``, verified), all before the new run's directory exists."""
    workdir = pathlib.Path(config.init_from)
    _, source = finished_run("init_from", workdir, whose="its")
    family = models.VARIANTS[config.variant].family
    if models.VARIANTS[source.variant].family != family:
        raise ValueError(
            f"init_from={str(workdir)!r} is a {source.variant!r} run, not a {family} like "
            f"{config.variant!r}"
        )
    if source.dataset != config.dataset:
        raise ValueError(
            f"init_from={str(workdir)!r} was trained on {source.dataset!r}, this run is on "
            f"{config.dataset!r}"
        )
    mine, theirs = feature_shapes(config), feature_shapes(source)
    if mine != theirs:
        raise ValueError(
            f"init_from={str(workdir)!r}: its model ({source.variant}, features {theirs}) is "
            f"not of this run's shape ({config.variant}, features {mine})"
        )
    # every site is fitted to (or copied from) the source's site at its path: same in and out
    source_sites = dict(_site_shapes(source))
    for path, shape in _site_shapes(config):
        if source_sites.get(path) != shape:
            raise ValueError(
                f"init_from={str(workdir)!r}: its site {'.'.join(map(str, path))} is "
                f"{_describe(source_sites.get(path))}, this run's is {_describe(shape)} "
                f"({source.variant} -> {config.variant}); a converted site keeps its shape"
            )
    try:
        restore(workdir)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"init_from={str(workdir)!r}: {err}") from err
    return source


def _site_shapes(config: ml_collections.ConfigDict) -> list[tuple[tuple, tuple[int, int]]]:
    """``(path, (in_features, out_features))`` of every linear site of ``config``'s model."""
    model = nnx.eval_shape(
        lambda: models.build(config.variant, rngs=nnx.Rngs(0), **model_overrides(config))
    )
    return [(p, (m.in_features, m.out_features)) for p, m in sites.linear_sites(model)]


def _describe(shape) -> str:
    return "absent" if shape is None else f"{shape[0]} -> {shape[1]} features"


def _copy_parameters(student: nnx.Module, teacher: nnx.Module) -> list[str]:
    """Copy every parameter and batch statistic of a module of the same type and shape; the
    dotted names copied."""
    copied = []
    for path, module in nnx.iter_modules(student):
        try:
            theirs = sites.module_at(teacher, path)
        except (AttributeError, IndexError, KeyError, TypeError):
            continue
        if type(theirs) is not type(module):
            continue
        for name, variable in vars(module).items():
            other = getattr(theirs, name, None)
            if (
                isinstance(variable, (nnx.Param, nnx.BatchStat))
                and type(other) is type(variable)
                and variable.shape == other.shape
            ):
                variable[...] = other[...]
                copied.append(".".join(map(str, (*path, name))))
    return copied


def budget_epochs(summary: dict) -> float:
    """The epochs of training that made a finished run (its ``summary.json``): its own, plus, for
    a converted run, those that made its source (``source_epochs`` of its conversion record,
    which this function computed for the source when it was converted)."""
    own = summary["total_steps"] / summary["steps_per_epoch"]
    return own + summary.get("conversion", {}).get("source_epochs", 0)


def _relative_error(y, target) -> float:
    return float(jnp.linalg.norm(y - target) / jnp.linalg.norm(target))


def _set_running_statistics(site: nnx.Module, x: jax.Array) -> None:
    if hasattr(site, "set_running_statistics"):
        site.set_running_statistics(x)


def _fit(site: nnx.Module, x: jax.Array, target: jax.Array, steps: int) -> None:
    """Fit ``site``'s parameters in place: Adam on ``mean((site(x) - target)^2)`` relative to
    ``mean(target^2)``, in training mode (a batch norm normalises by the statistics of ``x``),
    then the site's running statistics set to those of ``x``."""
    site.train()
    graphdef, params, rest = nnx.split(site, nnx.Param, ...)
    site.eval()
    tx = optax.adam(_LEARNING_RATE)
    scale = jnp.mean(jnp.square(target))

    @jax.jit
    def step(params, opt_state):
        def loss(params):
            # a copy: a batch norm in training mode updates its statistics, which are discarded
            y = nnx.merge(graphdef, params, rest, copy=True)(x)
            return jnp.mean(jnp.square(y - target)) / scale

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    nnx.update(site, params)
    _set_running_statistics(site, x)


def _differs(site: nnx.Module, source_site: nnx.Module) -> bool:
    """Whether a site computes another function than the finished run's: another type, or the
    same type with another structure (norm, E or F present or not, options)."""
    return nnx.graphdef(site) != nnx.graphdef(source_site)


def convert(
    config: ml_collections.ConfigDict, state: TrainState, inputs: data.Inputs, workdir
) -> TrainState:
    """``state`` (a new run's) started from the finished run ``config.init_from`` (the module's
    docstring); writes ``workdir/conversion.json``."""
    source_state, _, _ = restore(config.init_from)
    source_summary, _ = finished_run("init_from", pathlib.Path(config.init_from), whose="its")
    teacher = inference_model(source_state.graphdef, source_state.params, source_state.rest)
    # a copy: the parameters of ``state`` itself are left as they are
    params, rest = jax.tree.map(jnp.copy, (state.params, state.rest))
    student = inference_model(state.graphdef, params, rest)
    copied = _copy_parameters(student, teacher)
    to_fit = [
        path
        for path, module in sites.linear_sites(student)
        if _differs(module, sites.module_at(teacher, path))
    ]
    images = [
        data.preprocess(None, batch["image"], inputs.info, train=False)
        for _, batch in itertools.islice(inputs.train_batches(0), config.init_fit_batches)
    ]
    rng = np.random.default_rng(config.seed)
    _, order = sites.record_inputs(student, to_fit, images[:1])
    print(
        f"converting init_from={str(config.init_from)!r}: {len(copied)} parameters copied, "
        f"{len(order)} sites to fit ({config.init_fit_steps} steps each, {len(images)} batches)",
        flush=True,
    )
    fits = []
    for path in order:  # depth order: each site sees the inputs the fitted ones before it give
        recorded, _ = sites.record_inputs(student, [path], images)
        x = recorded[path]
        if x.shape[0] > _MAX_TOKENS:
            x = x[np.sort(rng.choice(x.shape[0], _MAX_TOKENS, replace=False))]
        x = jnp.asarray(x)
        site, target_site = sites.module_at(student, path), sites.module_at(teacher, path)
        target = target_site(x)
        _set_running_statistics(site, x)
        before = _relative_error(site(x), target)
        _fit(site, x, target, config.init_fit_steps)
        after = _relative_error(site(x), target)
        name = ".".join(map(str, path))
        print(f"  fitted {name}: relative error {before:.3g} -> {after:.3g}", flush=True)
        fits.append(
            {
                "site": ".".join(map(str, path)),
                "from": type(target_site).__name__,
                "to": type(site).__name__,
                "relative_error_before": before,
                "relative_error_after": after,
            }
        )
    record = {
        "init_from": str(config.init_from),
        "source_epochs": budget_epochs(source_summary),
        "source_params_checksum": source_summary.get("params_checksum"),
        "copied": len(copied),
        "fitted": fits,
        "fit": {
            "batches": len(images),
            "tokens_per_site": int(min(_MAX_TOKENS, x.shape[0])) if fits else 0,
            "steps": config.init_fit_steps,
            "optimizer": f"adam {_LEARNING_RATE:g}",
        },
    }
    if jax.process_index() == 0:
        (pathlib.Path(workdir) / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    _, params, rest = nnx.split(student, nnx.Param, ...)
    return state.replace(params=params, rest=rest, opt_state=state.tx.init(params))
