"""Data: datasets, batch order, streaming, augmentation, and the trainer's one input object.

What calls what: a trainer asks :func:`make_inputs` (``inputs.py``) for an :class:`Inputs`, whose
batches come either from :func:`load` (``datasets.py``: the dataset table, decoding and caching)
through the in-memory iterators of ``order.py``, or from the Grain streams of ``stream.py``; both
take their example indices from one :class:`BatchOrder` (``order.py``), a pure function of
``(seed, step)``, so a run resumes exactly from a checkpoint's step. :func:`preprocess`
(``augment.py``: crop, flip, RandAugment, normalisation) then runs on the accelerator, inside the
jitted train step.
"""

from addervit_jax.data.augment import RANDAUGMENT_OPS, preprocess, rand_augment
from addervit_jax.data.datasets import (
    DATASETS,
    DatasetInfo,
    InMemoryData,
    clear_cache,
    is_streamed,
    load,
    num_examples,
)
from addervit_jax.data.inputs import Inputs, make_inputs
from addervit_jax.data.order import BatchOrder, eval_batches, steps_per_epoch, train_batches
from addervit_jax.data.stream import stream_batches, stream_eval_batches

__all__ = [
    "DATASETS",
    "RANDAUGMENT_OPS",
    "BatchOrder",
    "DatasetInfo",
    "InMemoryData",
    "Inputs",
    "clear_cache",
    "eval_batches",
    "is_streamed",
    "load",
    "make_inputs",
    "num_examples",
    "preprocess",
    "rand_augment",
    "stream_batches",
    "stream_eval_batches",
    "steps_per_epoch",
    "train_batches",
]
