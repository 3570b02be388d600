"""A small Adder-ViT (qkv_2ffn: adder q/k/v and two adder FFN layers) on scikit-learn's digits.

    addervit train                                  # this config is the default
    addervit train --config digits --config.variant=multi

The bundled 8x8 digits (1,437 train / 360 test images) need no download. Patch 2 gives 16 tokens;
dim 64, depth 2, 4 heads of 16, MLP 128, 40 epochs (880 steps of 64). The learning rate 0.012,
label smoothing 0.1 and RandAugment (1, 5) were chosen on a validation slice of the training split
(``experiments/first_run.py``: fit on ``train[:1150]``, validate on the other 287 images; the recipe
before, lr 0.002 and neither, overfitted: train accuracy 1.00, validation 0.82). Test accuracy at
the end (measured once, after the choice), seeds 0 / 1 / 2: qkv_2ffn 0.911 / 0.906 / 0.903, multi
0.933 / 0.914 / 0.914; 29 s of training for qkv_2ffn (1,960 images/s) on 2 AMD EPYC cores while two
other trainings shared them.
"""

from addervit_jax.configs import default_config


def get_config():
    c = default_config()
    c.variant = "qkv_2ffn"
    c.dataset = "digits"
    c.model.patch_size = 2
    c.model.dim = 64
    c.model.depth = 2
    c.model.heads = 4
    c.model.dim_head = 16
    c.model.mlp_dim = 128
    c.batch_size = 64
    c.num_epochs = 40.0
    c.warmup_epochs = 3.0
    # chosen on a validation slice of the training split: experiments/first_run.py
    c.learning_rate = 0.012
    c.label_smoothing = 0.1
    c.randaugment = (1, 5)
    c.crop_padding = 0  # a 1-pixel shift of an 8x8 digit cost 9 to 12 points (first_run.py)
    c.log_every_steps = 22
    return c
