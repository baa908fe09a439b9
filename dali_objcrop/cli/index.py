"""``dali-objcrop index``: build (or check) the memory-mapped image index of a folder or COCO json."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build the image index of a dataset once (later runs and every rank map it)")
    p.add_argument("source", help="an image folder, or a COCO .json (images in --images or beside it)")
    p.add_argument("--images", help="image folder of a COCO json (default: images/ beside the json or its folder)")
    p.add_argument("--no-check", action="store_true", help="skip the per-file header scan (sizes, truncation)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept COCO file_name entries that are absolute or climb out of the image folder")
    p.add_argument("--workers", type=int, default=None, help="header-scan processes (default: all cores)")
    p.add_argument("--rebuild", action="store_true", help="build even if a current index exists")
    p.add_argument("--cache-dir", help="where index files live (default: $DALI_OBJCROP_HOME/index)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time
    from ..index import gt_path, open_index
    t0 = time.perf_counter()
    idx = open_index(args.source, args.images, check=not args.no_check, allow_outside_root=args.allow_outside_root,
                     cache_dir=args.cache_dir, workers=args.workers, progress=not args.no_progress,
                     rebuild=args.rebuild)
    dt = time.perf_counter() - t0
    n = len(idx) + len(idx.bad)
    built = idx.meta.get("build_seconds")
    what = (f"built in {dt:.1f} s ({n / max(dt, 1e-9):,.0f} images/s)" if dt >= 0.8 * (built or 0) and built
            else f"already built ({built} s when built), mapped in {dt * 1000:.0f} ms")
    print(f"{idx.path}: {len(idx)} images, {len(idx.bad)} rejected by the header scan; {what}")
    for key, why in list(idx.bad.items())[:10]:
        print(f"  rejected: {key}: {why}", file=sys.stderr)
    if idx.meta.get("kind") == "coco":
        print(f"{gt_path(idx.path)}: the json's ground-truth boxes (boxes='gt', pack --boxes gt)")
    return 0
