"""train-concept's flags for aspect-ratio buckets (buckets.py), the validation loss
(trackers.py's metrics.jsonl and TensorBoard) and pivotal tuning (pivotal.py); each flag is the
ConceptConfig field of the same name."""

from __future__ import annotations

import argparse

from ..common_kernels.args import (
    existing_dir,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

CONCEPT_EXTRAS = (
    "buckets",
    "bucket_step",
    "bucket_min_side",
    "bucket_max_side",
    "validation_images",
    "validation_fraction",
    "report_to",
    "new_token",
    "init_word",
    "token_vectors",
    "token_lr",
)


def add_concept_extras(parser: argparse.ArgumentParser) -> None:
    """train-concept's flags for aspect buckets, the validation loss and pivotal tuning."""
    group = parser.add_argument_group("aspect-ratio buckets")
    group.add_argument(
        "--buckets",
        action="store_true",
        help="crop each image to the bucket of ~resolution^2 pixels nearest its aspect ratio "
        "instead of a center square; batches come from one bucket",
    )
    group.add_argument("--bucket-step", type=positive_int, default=64, help="bucket side step")
    for side, meaning in (("min", "resolution/2"), ("max", "2 x resolution")):
        group.add_argument(
            f"--bucket-{side}-side",
            type=non_negative_int,
            default=0,
            help=f"{side}imum bucket side (0: {meaning})",
        )
    group = parser.add_argument_group("validation loss")
    group.add_argument(
        "--validation-images",
        type=existing_dir,
        help="held-out images (captions as for --images), scored at fixed noise and timesteps",
    )
    group.add_argument(
        "--validation-fraction",
        type=non_negative_float,
        default=0.0,
        help="hold out this share of --images instead (seeded), e.g. 0.2",
    )
    group.add_argument(
        "--eval-every",
        type=non_negative_int,
        default=0,
        help="score the fixed instance and validation losses every N steps (0: a tenth of "
        "the steps when validating, else at the end); all go to <output>/metrics.jsonl",
    )
    group.add_argument(
        "--report-to",
        choices=["none", "tensorboard"],
        default="none",
        help="also write the losses (and validation images) to TensorBoard in <output>/logs",
    )
    group = parser.add_argument_group("pivotal tuning")
    group.add_argument(
        "--new-token",
        help="train a new token's embeddings with the adapter, e.g. '<sks>' (use it in --prompt)",
    )
    group.add_argument("--init-word", help="word the new token starts from, e.g. 'dog'")
    group.add_argument(
        "--token-vectors", type=positive_int, default=1, help="vectors of the new token"
    )
    group.add_argument(
        "--token-lr", type=positive_float, default=1e-3, help="learning rate of the new token"
    )
