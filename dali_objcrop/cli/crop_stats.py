"""``dali-objcrop crop-stats``: the paper's appendix-D crop diagnostics as JSON."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..windows import MODES
from .show import add_tool_arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("crop-stats", help="overlap-on-object, view IoU, window area, views with an object (JSON)")
    add_tool_arguments(p)
    p.add_argument("--mode", default="obj-obj-dilate", choices=MODES + ("all",),
                   help="crop mode, or 'all' for every mode on the same samples (default obj-obj-dilate)")
    p.add_argument("--json", required=True, help="output JSON")
    p.add_argument("--samples", type=int, default=20000,
                   help="two-view samples (sample s = image s %% N at epoch s // N; default 20000)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tools import crop_config, crop_stats, load_tool_data
    if args.samples < 1:
        raise SystemExit(f"--samples must be >= 1, got {args.samples}")
    t0 = time.perf_counter()
    data = load_tool_data(args.coco, args.images, args.boxes)
    modes = MODES if args.mode == "all" else (args.mode,)
    results = []
    for mode in modes:
        config = crop_config(data.store, mode, args.top_k, args.dilate, tuple(args.shift_range), args.min_box_size,
                             tuple(args.box_scale) if args.box_scale else None)
        r = crop_stats(data, config, args.samples, args.seed)
        results.append(r)
        print(f"{mode:15s} intersection_on_object {r['intersection_on_object']:.3f}  touches "
              f"{r['intersection_touches_object']:.3f}  view_iou "
              f"{r['view_iou']:.3f}  mean_window_area {r['mean_window_area']:.3f}  views_with_object "
              f"{r['views_with_object']:.3f}  fallback {r['fallback']}")
    out = dict(results[0]) if len(results) == 1 else {"modes": {r["mode"]: r for r in results}}
    out["source"] = {"coco": str(args.coco), "images": str(args.images), "boxes": args.boxes or "ground truth",
                     "proposal_method": data.store.meta.get("method"), "samples": args.samples,
                     "seconds": round(time.perf_counter() - t0, 2)}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path} in {out['source']['seconds']} s")
    return 0
