"""``dali-objcrop synth``: write the synthetic cluttered-scene set."""
from __future__ import annotations

import argparse
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write N synthetic cluttered multi-object scenes (JPEG + COCO JSON)")
    p.add_argument("--out", required=True, help="output folder (images/ and annotations.json)")
    p.add_argument("-n", type=int, default=256, help="number of images (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..synth import make_synthetic
    t0 = time.perf_counter()
    ann = make_synthetic(args.out, n=args.n, seed=args.seed, quality=args.quality, progress=True)
    dt = time.perf_counter() - t0
    print(f"wrote {args.n} images and {ann} in {dt:.1f} s ({args.n / dt:.0f} images/s)")
    return 0
