"""``dali-objcrop crop-stats``: the paper's appendix-D crop diagnostics as JSON (with ``--local-crops``, also
the local views', per local source, on the same samples)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..windows import LOCAL_SOURCES, MODES
from .show import add_tool_arguments


def local_sources_arg(text: str) -> tuple[str, ...]:
    """``--local-from``: comma-separated local sources, or ``all``."""
    if text == "all":
        return LOCAL_SOURCES
    out = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in out if s not in LOCAL_SOURCES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"choose among {', '.join(LOCAL_SOURCES)} or 'all', got {text!r}")
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("crop-stats", help="overlap-on-object, view IoU, window area, views with an object (JSON)")
    add_tool_arguments(p)
    p.add_argument("--mode", default="obj-obj-dilate", choices=MODES + ("all",),
                   help="crop mode, or 'all' for every mode on the same samples (default obj-obj-dilate)")
    p.add_argument("--json", required=True, help="output JSON")
    p.add_argument("--samples", type=int, default=20000,
                   help="two-view samples (sample s = image s %% N at epoch s // N; default 20000)")
    p.add_argument("--local-from", type=local_sources_arg, default=LOCAL_SOURCES, metavar="SOURCES",
                   help="with --local-crops: the local sources measured, comma-separated or 'all' (default all: "
                        "box, boxes and scene on the same samples; scene-scene measures scene only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tools import crop_config, crop_stats, load_tool_data
    if args.samples < 1:
        raise SystemExit(f"--samples must be >= 1, got {args.samples}")
    t0 = time.perf_counter()
    data = load_tool_data(args.coco, args.images, args.boxes, allow_outside_root=args.allow_outside_root)
    modes = MODES if args.mode == "all" else (args.mode,)
    results = []
    for mode in modes:
        config = crop_config(data.store, mode, args.top_k, args.dilate, tuple(args.shift_range), args.min_box_size,
                             tuple(args.box_scale) if args.box_scale else None, local_crops=args.local_crops,
                             local_scale=tuple(args.local_scale))
        r = crop_stats(data, config, args.samples, args.seed, local_sources=args.local_from)
        results.append(r)
        print(f"{mode:15s} intersection_on_object {r['intersection_on_object']:.3f}  touches "
              f"{r['intersection_touches_object']:.3f}  view_iou "
              f"{r['view_iou']:.3f}  mean_window_area {r['mean_window_area']:.3f}  views_with_object "
              f"{r['views_with_object']:.3f}  fallback {r['fallback']}")
        for src, f in r.get("local", {}).get("sources", {}).items():
            print(f"  {args.local_crops} local from {src:6s} intersection_on_object {f['intersection_on_object']:.3f}"
                  f"  touches {f['intersection_touches_object']:.3f}  overlap {f['views_overlap']:.3f}  "
                  f"window_on_object {f['window_on_object']:.3f}  mean_window_area {f['mean_window_area']:.3f}")
        for src, why in r.get("local", {}).get("sources_skipped", {}).items():
            print(f"  local from {src}: skipped ({why})")
    out = dict(results[0]) if len(results) == 1 else {"modes": {r["mode"]: r for r in results}}
    out["source"] = {"coco": str(args.coco), "images": str(args.images), "boxes": args.boxes or "ground truth",
                     "proposal_method": data.store.meta.get("method"), "samples": args.samples,
                     "seconds": round(time.perf_counter() - t0, 2)}
    if args.local_crops:
        out["source"]["local_crops"], out["source"]["local_from"] = args.local_crops, list(args.local_from)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path} in {out['source']['seconds']} s")
    return 0
