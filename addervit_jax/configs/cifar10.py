"""A SimpleViT variant on CIFAR-10 with the study's recipe, validated on a held-out slice.

    TFDS_DATA_DIR=/path/to/tensorflow_datasets addervit train --config cifar10 \
        --config.variant=qkv_2ffn --workdir runs/cifar10_qkv_2ffn

Recipe of the *Exploration of AdderViT* study for SimpleViT: AdamW, lr 2e-3, weight decay 0.002,
batch 64, 5 warm-up epochs then cosine decay to 0.1x, random crop (padding 4) and horizontal flip.
``train[:45000]`` fits, ``train[45000:]`` validates (the test split is kept for final evaluation).
The variant study (issue 6) records what each variant reaches with this config.
"""

from addervit_jax.configs import default_config


def get_config():
    c = default_config()
    c.variant = "qkv_2ffn"
    c.dataset = "cifar10"
    # SimpleViT's defaults for 32x32 inputs, listed so that --config.model.<field> can change them
    c.model.patch_size = 4
    c.model.dim = 128
    c.model.depth = 4
    c.model.heads = 4
    c.model.dim_head = 32
    c.model.mlp_dim = 256
    c.train_split = "train[:45000]"
    c.eval_split = "train[45000:]"
    c.batch_size = 64
    c.num_epochs = 100.0
    c.learning_rate = 2e-3
    c.weight_decay = 0.002
    c.warmup_epochs = 5.0
    c.crop_padding = 4
    c.log_every_steps = 100
    return c
