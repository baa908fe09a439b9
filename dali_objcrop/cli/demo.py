"""``dali-objcrop demo``: the loader end to end on the embedded synthetic set.

Makes the synthetic set if it is missing, builds its box store (the
ground-truth boxes of its COCO json, saved beside it as ``gt.boxes``), runs
:class:`~dali_objcrop.loader.ObjCropLoader` over a few hundred images in every
crop mode, prints images/s per mode, and writes a PNG grid: per sample the
image with its proposals, the chosen box and both windows, then the two crops
exactly as the loader delivered them.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ..windows import MODES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the loader in every crop mode on the synthetic set; print images/s, "
                                    "write a crop grid")
    p.add_argument("--images", type=int, default=256, help="images per mode (default 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--modes", default="all", help="comma-separated crop modes or 'all'")
    p.add_argument("--rows", type=int, default=2, help="grid rows per mode (default 2)")
    p.add_argument("--out", default="out/demo_grid.png", help="PNG grid path (default out/demo_grid.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set-size", type=int, default=512, help="images in the synthetic set (default 512)")
    p.set_defaults(func=run)


def ensure_demo_data(n: int = 512, seed: int = 0) -> tuple[Path, Path]:
    """The synthetic set's annotations and its GT box store (both created if missing)."""
    from ..boxstore import BoxStore
    from ..synth import ensure_default_dataset
    ann = Path(ensure_default_dataset(n=n, seed=seed))
    boxes = ann.parent / "gt.boxes"
    if not boxes.exists():
        BoxStore.from_coco(ann).save(boxes)
    return ann, boxes


def grid_rows(loader, batch: dict, k: int) -> list[dict]:
    """``crop_grid`` rows for the first ``k`` samples of a loader batch (its real crops)."""
    import cv2
    idx = batch["index"][:k].cpu().numpy()
    cw = loader.windows_for(idx, loader.epoch - 1)  # the epoch that produced the batch
    store, rows = loader.store, loader.store_rows
    out = []
    for r, i in enumerate(idx):
        img = cv2.imread(loader.index.paths[i], cv2.IMREAD_COLOR)[:, :, ::-1]
        h, w = img.shape[:2]
        props = None
        if store is not None:
            props = store.boxes_of(rows[i])[: loader.config.top_k] * np.array([w, h, w, h], np.float32)
        out.append({"image": img, "proposals": props, "box": cw.box[r], "windows": cw.windows[r],
                    "flips": cw.flip[r], "crops": [batch["view1"][r].float().cpu(), batch["view2"][r].float().cpu()],
                    "title": f"{loader.mode}  {loader.index.keys[i]}"
                             f"{'  (no box: scene fallback)' if cw.fallback[r] else ''}"})
    return out


def run(args: argparse.Namespace) -> int:
    from ..loader import ObjCropLoader
    from ..visualize import crop_grid
    modes = list(MODES) if args.modes == "all" else [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown modes {bad}; choose from {MODES}")
    t0 = time.perf_counter()
    ann, boxes = ensure_demo_data(n=args.set_size, seed=args.seed)
    print(f"synthetic set: {ann} ; boxes: {boxes} ({time.perf_counter() - t0:.1f} s)")
    rows, results = [], []
    for mode in modes:
        ld = ObjCropLoader(str(ann), boxes=str(boxes), mode=mode, batch_size=args.batch_size,
                           num_threads=args.threads, device=args.device, seed=args.seed,
                           max_images=args.images, drop_last=False)
        it = iter(ld)
        first = next(it)                 # pipeline build + first batch: not timed
        n, t = 0, time.perf_counter()
        for b in it:
            n += len(b["index"])
        dt = time.perf_counter() - t
        rate = n / dt if dt > 0 else float("nan")
        results.append((mode, rate))
        print(f"  {mode:15s} {rate:7.1f} images/s  ({ld.device}, {n} images timed after a first batch of "
              f"{len(first['index'])}; fallback {ld.stats['fallback']}, skipped {ld.stats['skipped']})", flush=True)
        rows += grid_rows(ld, first, args.rows)
    out = Path(args.out)
    crop_grid(rows, out, height=192)
    print(f"wrote {out} ({len(rows)} rows: image + proposals + chosen box + windows, then view 1 and view 2)")
    base = dict(results).get("scene-scene")
    if base:
        print("relative to scene-scene: " + ", ".join(f"{m} {r / base:.2f}" for m, r in results))
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0
