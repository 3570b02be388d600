"""The CIFAR-10 study at the original study's budget: 100 epochs, seed 0 (and 1: ``--seeds 0 1``).

    TFDS_DATA_DIR=../shared/datasets/tfds python experiments/study_cifar10_100ep.py \\
        --out experiments/results/study_cifar10_100ep

The 30-epoch study's recipe and arms (``study_cifar10.py``, whose runner this is) at 100 epochs
with 10 warm-up epochs (the same 10%), ``train[:45000]`` to fit and ``train[45000:]`` to
validate. From 10 to 30 epochs the ternary arm's lead over ``multi_ln`` shrank from +4.3 to
-0.1 points and the from-scratch adder arm's gap to ``multi`` grew from +0.1 to -3.1; the
original study saw its gap grow over 100 epochs. This study asks whether parity survives the
longer budget. Arms, trained in this order (seed 0 of every arm before any seed 1):

* ``multi``: the multiplication baseline and the teacher of the distilled arms (its own 100-epoch
  seed-0 run, not the 30-epoch study's);
* ``multi + distill``: the distilled multiplication control, the same teacher and loss as the
  distilled multiplication-free arms. Of the two distilled multiplication controls of the
  30-epoch study this is the cheaper (``multi_ln + distill`` trains at about 0.6x its speed);
  where the 30-epoch controls show ``multi_ln + distill`` to be the stronger, it takes this
  place (one label in ``LABELS``), so that the multiplication-free arms meet the stronger
  control;
* ``qkv_2ffn_ternary + distill``: BitNet b1.58's ternary sites at ``qkv_2ffn``'s places,
  distilled: level with ``multi_ln`` at 30 epochs;
* ``qkv_2ffn + distill + features, norm=batch``: the best adder recipe from scratch, last.

The report adds, beside the 30-epoch report's tables, every arm's gap to ``multi + distill`` at
epochs 10, 30, 60 and 100, and the validation curves of all arms on one plot. Interrupted runs
resume exactly where they stopped (the trainer's checkpoints), so a run may span sessions.
"""

from __future__ import annotations

import study_cifar10

DEFAULT_SET = ("num_epochs=100", "warmup_epochs=10")
LABELS = (
    "multi",
    "multi + distill",
    "qkv_2ffn_ternary + distill",
    study_cifar10.BEST_ADDER,
)
EPOCHS = (10.0, 30.0, 60.0, 100.0)


def main(argv=None) -> None:
    study_cifar10.main(
        argv,
        name="study_cifar10_100ep",
        doc=__doc__,
        default_set=DEFAULT_SET,
        default_seeds=(0,),
        labels=LABELS,
        epoch_gaps=("multi + distill", EPOCHS),
    )


if __name__ == "__main__":
    main()
