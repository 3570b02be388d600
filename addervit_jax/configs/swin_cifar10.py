"""The study's weakened Swin-T (hidden 80, depths 2/2/6/2) on CIFAR-10, patch 2 and window 4.

    TFDS_DATA_DIR=/path/to/tensorflow_datasets addervit train --config swin_cifar10 \
        --config.variant=swin_adder --workdir runs/swin_adder

Same recipe and validation slice as ``cifar10``; variants ``swin_multi``, ``swin_adder``,
``swin_euclider``. Not yet run to completion in this repository (it needs a GPU).
"""

import ml_collections

from addervit_jax.configs.cifar10 import get_config as cifar10_config


def get_config():
    c = cifar10_config()
    c.variant = "swin_adder"
    c.model = ml_collections.ConfigDict(
        {
            "patch_size": 2,
            "embed_dim": 80,
            "depths": (2, 2, 6, 2),
            "heads": (3, 6, 12, 24),
            "head_dim": 32,
            "window_size": 4,
        }
    )
    return c
