"""SimpleViT at the study's 128px / patch-16 setting on ImageNet-1k (``imagenet2012``).

    TFDS_DATA_DIR=/path/to/tensorflow_datasets addervit train --config imagenet \
        --config.variant=qkv_2ffn --workdir runs/imagenet_qkv_2ffn

ImageNet needs TFDS's manual download (``$TFDS_DATA_DIR/downloads/manual``) and is streamed through
Grain worker processes (resized and centre-cropped to 128 px). The study trained for 25 epochs
only; this config does the same. Not yet run in this repository (no ImageNet copy, no GPU here).
"""

from addervit_jax.configs import default_config


def get_config():
    c = default_config()
    c.variant = "qkv_2ffn"
    c.dataset = "imagenet2012"
    c.train_split = "train"
    c.eval_split = "validation"
    c.model.image_size = 128
    c.model.patch_size = 16
    c.model.dim = 384
    c.model.depth = 12
    c.model.heads = 6
    c.model.dim_head = 64
    c.model.mlp_dim = 1536
    c.batch_size = 256
    c.num_epochs = 25.0
    c.learning_rate = 2e-3
    c.crop_padding = 16
    c.log_every_steps = 200
    c.checkpoint_every_steps = 2000
    c.eval_every_steps = 5000
    return c
