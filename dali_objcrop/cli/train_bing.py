"""``dali-objcrop train-bing``: train a BING model on COCO-format boxes."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-bing", help="train a BING model (two-stage linear SVMs) on COCO-format boxes")
    p.add_argument("--coco", required=True, help="COCO annotation JSON")
    p.add_argument("--images", help="its image folder (default <json dir>/images)")
    p.add_argument("--out", required=True, help="model folder to write (ObjNessB2W8<color>.*.yml.gz)")
    p.add_argument("--color", default="MAXBGR", choices=["MAXBGR", "HSV", "I"])
    p.add_argument("--max-images", type=int, default=None, help="use the first N images")
    p.add_argument("--negatives-per-image", type=int, default=100)
    p.add_argument("--min-size-count", type=int, default=50, help="positives a size needs to be active")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..proposals.train_bing import TrainConfig, train_bing
    cfg = TrainConfig(color=args.color, max_images=args.max_images, negatives_per_image=args.negatives_per_image,
                      min_size_count=args.min_size_count, seed=args.seed)
    train_bing(args.coco, args.images, args.out, cfg)
    return 0
