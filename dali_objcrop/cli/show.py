"""``dali-objcrop show``: a PNG grid of images, proposals, chosen box, both windows and both crops (and,
with ``--local-crops``, the local views' windows and crops)."""
from __future__ import annotations

import argparse
import time

from ..windows import LOCAL_SOURCES, MODES, CropConfig


def add_tool_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``show`` and ``crop-stats``: data, proposals and crop-window parameters."""
    p.add_argument("--coco", required=True, help="COCO-format annotations (image list and ground-truth boxes)")
    p.add_argument("--images", default=None, help="image folder (default: images/ beside the JSON)")
    p.add_argument("--boxes", default=None, help="box store (.boxes); default: ground-truth boxes as proposals")
    p.add_argument("--seed", type=int, default=0, help="random seed of the windows (default 0)")
    p.add_argument("--top-k", type=int, default=CropConfig.top_k,
                   help="proposals considered per image (default %(default)s)")
    p.add_argument("--dilate", type=float, default=CropConfig.dilate,
                   help="delta of obj-obj-dilate (default %(default)s, COCO)")
    p.add_argument("--shift-range", type=float, nargs=2, default=CropConfig.shift_range, metavar=("LO", "HI"),
                   help="shift radius range in pixels of obj-obj-shift (default %(default)s)")
    p.add_argument("--min-box-size", type=int, default=CropConfig.min_box_size,
                   help="regions smaller than this are widened (default %(default)s)")
    p.add_argument("--box-scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="area range of box crops (default: (0.2 / mean top-k proposal area, 1), capped to 1)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept file_name entries that are absolute or climb out of the image folder")
    p.add_argument("--local-crops", type=int, default=0, metavar="M",
                   help="local (multi-crop) views per sample (default 0: none)")
    p.add_argument("--local-scale", type=float, nargs=2, default=CropConfig.local_scale, metavar=("LO", "HI"),
                   help="area range of local crops, a fraction of their region (default %(default)s)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="draw images with proposals, chosen box, both windows and both crops (PNG)")
    add_tool_arguments(p)
    p.add_argument("--mode", default="obj-obj-dilate", choices=MODES, help="crop mode (default obj-obj-dilate)")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("-n", type=int, default=6, help="number of images (default 6)")
    p.add_argument("--epoch", type=int, default=0, help="epoch of the windows (default 0)")
    p.add_argument("--size", type=int, default=224, help="crop side in pixels (default 224)")
    p.add_argument("--height", type=int, default=256, help="panel height in the PNG (default 256)")
    p.add_argument("--local-from", default=None, choices=LOCAL_SOURCES,
                   help="where local views are drawn: box (the global object views' regions), boxes (local view "
                        "j in proposal b + j), scene (default: box; scene for scene-scene)")
    p.add_argument("--local-size", type=int, default=CropConfig.local_size,
                   help="local crop side in pixels (default %(default)s)")
    p.add_argument("--loader", action="store_true",
                   help="take the crops from ObjCropLoader's DALI pipeline (CPU; augmented, first batch of the "
                        "epoch) instead of cutting them with OpenCV")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..tools import crop_config, load_tool_data, loader_local_kwargs, show_rows
    from ..visualize import crop_grid
    if args.n < 1:
        raise SystemExit(f"-n must be >= 1, got {args.n}")
    t0 = time.perf_counter()
    data = load_tool_data(args.coco, args.images, args.boxes, allow_outside_root=args.allow_outside_root)
    config = crop_config(data.store, args.mode, args.top_k, args.dilate, tuple(args.shift_range),
                         args.min_box_size, tuple(args.box_scale) if args.box_scale else None,
                         local_crops=args.local_crops, local_from=args.local_from, local_size=args.local_size,
                         local_scale=tuple(args.local_scale))
    n = min(args.n, len(data.index))
    # which images: a seeded draw, shown in dataset order
    positions = np.sort(np.random.default_rng(args.seed).choice(len(data.index), n, replace=False))
    if args.loader:
        from ..loader import ObjCropLoader
        from ..tools import show_rows_from_loader
        loader = ObjCropLoader(args.coco, boxes=args.boxes or "gt", mode=args.mode, batch_size=n, size=args.size,
                               seed=args.seed, device="cpu", drop_last=False, images_dir=args.images,
                               dilate=args.dilate, shift_range=tuple(args.shift_range), box_scale=config.box_scale,
                               top_k=args.top_k, min_box_size=args.min_box_size,
                               allow_outside_root=args.allow_outside_root,
                               **loader_local_kwargs(ObjCropLoader, config))
        rows = show_rows_from_loader(loader, data, n, args.epoch, local=config)
    else:
        rows = show_rows(data, positions, config, args.seed, args.epoch, args.size)
    grid = crop_grid(rows, args.out, height=args.height)
    local = (f", {config.local_crops} local views from {config.local_from}"
             f"{'' if any('local_crops' in r for r in rows) else ' (windows only: the batches carry no local crops)'}"
             if config.local_crops else "")
    print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]} px, {n} images, mode {args.mode}, "
          f"box scale {config.box_scale}{local}) in {time.perf_counter() - t0:.1f} s")
    return 0
