"""``dali-objcrop eval-proposals``: recall of a box store against COCO ground-truth boxes."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-proposals", help="recall@{1,5,10} at IoU {0.5,0.7} of a box store against COCO boxes")
    p.add_argument("store", help="box store (.boxes)")
    p.add_argument("--coco", required=True, help="COCO annotation JSON (file_name = store keys)")
    p.add_argument("--top-k", type=int, default=None, help="count only each image's first k proposals")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..proposals.evaluate import evaluate_store
    res = evaluate_store(args.store, args.coco, top_k=args.top_k)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0
