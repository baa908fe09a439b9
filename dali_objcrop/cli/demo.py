"""``dali-objcrop demo``: the loader end to end on the embedded synthetic set.

Makes the synthetic set if it is missing, builds its box store (the
ground-truth boxes of its COCO json, saved beside it as ``gt.boxes``), runs
:class:`~dali_objcrop.loader.ObjCropLoader` in every crop mode, and writes a
PNG grid: per sample the image with its proposals, the chosen box and both
windows, then the two crops exactly as the loader delivered them.  Beside the
grid it writes a JSON record of what it did (``<grid>.json``: every mode's
images, fallbacks and CPU time, and where each row's panels sit in the grid).

With ``--local-crops M`` the image also shows the M local views' windows
(``--local-from``; ``scene-scene`` draws them from the scene), and, where the
loader's batches carry the local views (``batch["local"]``), their thumbnails
follow the two views; the JSON rows then hold the local windows.  Without the
flag the grid is the two-view one.

Speed: each mode runs one untimed epoch (pipeline build, warm-up, the grid's
batch), then one whole timed epoch.  It says which pipeline ran and why
(``loader.stats["pipeline"]`` / ``["pipeline_reason"]``: the C++ operators, or the
DALI-ops graph where they cannot be built).  The demo prints one figure: CPU
milliseconds per image over all modes' timed epochs, summed over every thread
of the process (DALI's workers and the input-preparation thread included),
which other load on a shared machine distorts far less than images/s.  Per
mode it prints no speed: a few hundred images per mode varied by 20-30% from
run to run on a shared 2-core machine, more than the modes differ (the earlier
per-mode images/s put obj-obj-dilate at 0.50x and 1.27x of scene-scene in two
runs; the benchmark measures 1.16x); the all-mode figure stayed within
6.5-7.5 ms over four runs while the load changed.  The per-mode CPU times are
kept in the JSON record; ``benchmarks/throughput.py`` is the measurement that
compares modes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..windows import LOCAL_SOURCES, MODES, CropConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the loader in every crop mode on the synthetic set; write a crop grid "
                                    "and a JSON of what ran")
    p.add_argument("--images", type=int, default=256, help="images per mode and epoch (default 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--modes", default="all", help="comma-separated crop modes or 'all'")
    p.add_argument("--rows", type=int, default=2, help="grid rows per mode (default 2)")
    p.add_argument("--out", default="out/demo_grid.png", help="PNG grid path (default out/demo_grid.png); "
                                                             "the JSON record goes beside it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set-size", type=int, default=512, help="images in the synthetic set (default 512)")
    p.add_argument("--local-crops", type=int, default=0, metavar="M",
                   help="local (multi-crop) views per sample, drawn on the grid (default 0: none)")
    p.add_argument("--local-from", default="box", choices=LOCAL_SOURCES,
                   help="where local views are drawn (default box; scene-scene always uses scene)")
    p.add_argument("--local-size", type=int, default=CropConfig.local_size,
                   help="local crop side in pixels (default %(default)s)")
    p.set_defaults(func=run)


def local_config(mode: str, local_crops: int, local_from: str, local_size: int) -> CropConfig | None:
    """The local-view fields for ``mode`` (None without local views): ``scene-scene`` has no proposal, so
    its local views come from the scene."""
    if not local_crops:
        return None
    return CropConfig(mode=mode, local_crops=local_crops, local_size=local_size,
                      local_from="scene" if mode == "scene-scene" else local_from)


def ensure_demo_data(n: int = 512, seed: int = 0) -> tuple[Path, Path]:
    """The synthetic set's annotations and its GT box store (both created if missing)."""
    from ..boxstore import BoxStore
    from ..synth import ensure_default_dataset
    ann = Path(ensure_default_dataset(n=n, seed=seed))
    boxes = ann.parent / "gt.boxes"
    if not boxes.exists():
        BoxStore.from_coco(ann).save(boxes)
    return ann, boxes


def grid_rows(loader, batch: dict, k: int, epoch: int, local: CropConfig | None = None) -> list[dict]:
    """``crop_grid`` rows for the first ``k`` samples of a loader batch of ``epoch`` (its real crops); with
    ``local`` (or a loader that samples local views itself) the local windows, and the local crops where
    the batch carries them."""
    from ..proposals.common import decode_bgr
    from ..tools import loader_windows, local_crops_of, local_rows
    idx = batch["index"][:k].cpu().numpy()
    cw = loader_windows(loader, idx, epoch, local)
    local_cfg = loader.config if loader.config.local_crops or local is None else local
    store, rows = loader.store, loader.store_rows
    out = []
    for r, i in enumerate(idx):
        img = decode_bgr(loader.index.paths[i])[:, :, ::-1]  # stored grid, as the loader
        h, w = img.shape[:2]
        props = None
        if store is not None:
            props = store.boxes_of(rows[i])[: loader.config.top_k] * np.array([w, h, w, h], np.float32)
        row = {"image": img, "proposals": props, "box": cw.box[r], "windows": cw.windows[r],
               "flips": cw.flip[r], "crops": [batch["view1"][r].float().cpu(), batch["view2"][r].float().cpu()],
               "key": loader.index.keys[i], "mode": loader.mode, "fallback": bool(cw.fallback[r]),
               "title": f"{loader.mode}  {loader.index.keys[i]}"
                        f"{'  (no box: scene fallback)' if cw.fallback[r] else ''}"}
        row.update(local_rows(cw, r, local_cfg))
        thumbs = local_crops_of(batch, r, cw.num_local) if cw.num_local else None
        if thumbs is not None:   # the local views exactly as the loader delivered them
            row["local_crops"] = thumbs
        out.append(row)
    return out


def run_mode(loader, rows: int, local: CropConfig | None = None) -> tuple[dict, list[dict]]:
    """One untimed epoch (its first batch feeds the grid), then one timed epoch; the mode's record."""
    loader.set_epoch(0)
    grid, warm = [], 0
    for b in loader:
        if not grid:
            grid = grid_rows(loader, b, rows, epoch=0, local=local)
        warm += len(b["index"])
    loader.set_epoch(1)
    n, batches = 0, 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    for b in loader:
        n += len(b["index"])
        batches += 1
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    rec = {"mode": loader.mode, "device": loader.device, "pipeline": loader.stats.get("pipeline"),
           "pipeline_reason": loader.stats.get("pipeline_reason"), "images_warmup": warm, "images_timed": n,
           "batches_timed": batches, "cpu_s": round(cpu, 4), "wall_s": round(wall, 4),
           "cpu_ms_per_image": round(1000 * cpu / n, 3) if n else None,
           "fallback": int(loader.stats["fallback"]), "skipped": int(loader.stats["skipped"])}
    return rec, grid


def run(args: argparse.Namespace) -> int:
    from ..loader import ObjCropLoader
    from ..tools import loader_local_kwargs
    from ..visualize import crop_grid
    modes = list(MODES) if args.modes == "all" else [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown modes {bad}; choose from {MODES}")
    for m in modes:   # a bad --local-crops / --local-size: one message before any loader runs
        local_config(m, args.local_crops, args.local_from, args.local_size)
    t0 = time.perf_counter()
    ann, boxes = ensure_demo_data(n=args.set_size, seed=args.seed)
    print(f"synthetic set: {ann} ; boxes: {boxes} ({time.perf_counter() - t0:.1f} s)")
    rows, records = [], []
    for mode in modes:
        local = local_config(mode, args.local_crops, args.local_from, args.local_size)
        ld = ObjCropLoader(str(ann), boxes=str(boxes), mode=mode, batch_size=args.batch_size,
                           num_threads=args.threads, device=args.device, seed=args.seed,
                           max_images=args.images, drop_last=False,
                           **(loader_local_kwargs(ObjCropLoader, local) if local else {}))
        rec, grid = run_mode(ld, args.rows, local)
        if local:
            rec["local"] = {"crops": local.local_crops, "from": local.local_from, "size": local.local_size,
                            "thumbnails": any("local_crops" in g for g in grid)}
        records.append(rec)
        rows += grid
        if not records[:-1] or records[-2]["pipeline"] != rec["pipeline"]:   # said once, unless it changes
            print(f"pipeline: {rec['pipeline']} ({rec['pipeline_reason']})", flush=True)
        print(f"  {mode:15s} ran on {rec['device']}: {rec['images_warmup']} + {rec['images_timed']} images "
              f"(2 epochs), scene fallbacks {rec['fallback']}, skipped {rec['skipped']}", flush=True)
    n = sum(r["images_timed"] for r in records)
    cpu_ms = 1000 * sum(r["cpu_s"] for r in records) / n if n else float("nan")
    print(f"loader CPU cost: {cpu_ms:.1f} ms per image pair (all threads, {n} images over {len(records)} modes; "
          f"modes differ by less than this demo resolves, compare them with benchmarks/throughput.py)")
    out = Path(args.out)
    layout: list[dict] = []
    grid = crop_grid(rows, out, height=192, layout=layout)
    for row, lay in zip(rows, layout):
        lay.update({"mode": row["mode"], "key": row["key"], "fallback": row["fallback"]})
        if "local_windows" in row:   # where the image panel's local windows are, in image pixels
            lay.update({"windows": np.asarray(row["windows"]).tolist(),
                        "local_windows": np.asarray(row["local_windows"]).tolist(),
                        "local_flips": [bool(f) for f in row["local_flips"]]})
    record = {"set": str(ann), "boxes": str(boxes), "seed": args.seed, "batch_size": args.batch_size,
              "threads": args.threads, "cpu_ms_per_image_all_modes": round(cpu_ms, 3), "modes": records,
              "grid": {"path": str(out), "height": int(grid.shape[0]), "width": int(grid.shape[1]), "rows": layout}}
    js = out.with_suffix(".json")
    js.write_text(json.dumps(record, indent=1))
    local = ""
    if args.local_crops:
        thumbs = all(r.get("local", {}).get("thumbnails") for r in records)
        local = (f"; {args.local_crops} local windows per image" +
                 (" and their crops" if thumbs else " (no crops: the loader's batches carry no local views yet)"))
    print(f"wrote {out} ({len(rows)} rows: image + proposals + chosen box + windows, then view 1 and view 2"
          f"{local}) and {js}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0
