"""CPU cost of the crop-and-augment stage: ``fn.objcrop.crop`` vs today's DALI-ops graph, same inputs.

    PYTHONPATH=. python benchmarks/crop_op_speed.py [--images 256] [--batch 64] [--rounds 4]
        [--recipe mocov2] [--mode scene-scene] [--threads 2] [--json OUT]

Both pipelines get the same decoded COCO photos (decoded once, fed by ``external_source``), the same
windows (``sample_windows``) and flips, the same augmentation draws (``reference.aug_table``):

* ``dali_graph``: the loader's DALI-ops stage: ``fn.resize`` of each view's ROI to uint8, cast,
  ``color_twist`` + clamp / two ``fn.filter`` blur passes / solarise under DALI conditionals,
  ``crop_mirror_normalize`` (``loader.dali_crop`` + ``loader._finish_views``);
* ``crop_op``: ``fn.objcrop.crop`` (CPU backend), ``contrast_center=0.5`` (the same pixels).

Decoding is left out (identical for both).  Reported: CPU milliseconds per image (user + system time
of the process over all DALI threads, which other load distorts less than wall time) and images/s,
for rounds that alternate the two pipelines; the ratio op / graph is the figure to read.  Asserts
nothing about speed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = next((str(d / "shared/data/coco_val2017_subset/images") for d in (REPO.parent, REPO.parents[1])
                       if (d / "shared/data/coco_val2017_subset/images").is_dir()),
                      str(REPO.parent / "shared/data/coco_val2017_subset/images"))


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_inputs(images_dir: str, n: int, mode: str, recipe: str, seed: int = 0):
    """Decoded RGB photos, windows (N, 2, 4), flips (N, 2), draws (N, 2, 9)."""
    import cv2

    from dali_objcrop.kernels.reference import aug_table
    from dali_objcrop.windows import CropConfig, sample_windows
    files = sorted(glob.glob(os.path.join(images_dir, "*.jpg")))[:n]
    if not files:
        raise SystemExit(f"no .jpg files in {images_dir} (pass --images-dir)")
    ims = [np.ascontiguousarray(cv2.imread(f)[:, :, ::-1]) for f in files]
    sizes = np.array([[im.shape[1], im.shape[0]] for im in ims])
    rng = np.random.default_rng(seed)   # one made-up box per image for the object modes
    c = rng.uniform(0.3, 0.7, (len(ims), 2))
    wh = rng.uniform(0.1, 0.5, (len(ims), 2))
    boxes = np.clip(np.concatenate([c - wh / 2, c + wh / 2], 1), 0, 1).astype(np.float32)
    cfg = CropConfig(mode=mode, box_scale=(0.5, 1.0))
    cw = sample_windows(sizes, boxes, np.arange(len(ims) + 1), np.arange(len(ims)), seed, 0, cfg)
    return ims, cw.windows.astype(np.int32), cw.flip.astype(np.uint8), aug_table(cw.keys, recipe)


def graph_fields(win, flip, aug, recipe):
    """The DALI-ops stage's per-sample inputs (as the loader's batch callback makes them)."""
    from dali_objcrop import augment, loader
    n = len(win)
    d = {}
    s0, e0, s1, e1 = loader.window_rois(win, flip.astype(bool))
    d.update({"roi_start0": s0, "roi_end0": e0, "roi_start1": s1, "roi_end1": e1})
    one = np.ones((1, 1), np.float32)
    for v in (0, 1):
        col = {j: np.ascontiguousarray(aug[:, v, j]) for j in range(9)}
        kern, ksize = augment.gaussian_kernels(col[6])
        d.update({f"colour{v}": col[0] != 0, f"brightness{v}": col[1], f"contrast{v}": col[2],
                  f"saturation{v}": col[3], f"hue{v}": col[4], f"blur{v}": col[5] != 0, f"solarize{v}": col[8] != 0,
                  f"blur_h{v}": [kern[i, None, :ksize[i]] if col[5][i] else one for i in range(n)],
                  f"blur_v{v}": [kern[i, :ksize[i], None] if col[5][i] else one for i in range(n)]})
    fields = [f for f in loader.input_fields("dali", roi_decode=False, recipe=recipe)
              if f not in ("jpegs", "index")]
    return fields, d


def build(kind: str, batches: list, size: int, recipe: str, threads: int):
    """A CPU pipeline cycling over ``batches`` (lists of per-field sample lists)."""
    from nvidia.dali import fn, pipeline_def, types

    from dali_objcrop import augment, loader
    names = list(batches[0].keys())
    state = {"i": 0}

    def source():
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        return tuple(b[k] for k in names)

    @pipeline_def(batch_size=len(batches[0]["images"]), num_threads=threads, device_id=None,
                  enable_conditionals=True, prefetch_queue_depth=2)
    def pipe():
        nodes = fn.external_source(source=source, num_outputs=len(names), batch=True)
        inp = dict(zip(names, nodes))
        images = fn.reshape(inp["images"], layout="HWC")
        if kind == "crop_op":
            return tuple(fn.objcrop.crop(images, inp["windows"], inp["flip"], inp["aug"], size=size,
                                         mean=[m * 255 for m in loader.IMAGENET_MEAN],
                                         std=[s * 255 for s in loader.IMAGENET_STD], contrast_center=0.5))
        views = loader.dali_crop(images, inp, size)
        return loader._finish_views(views, False, inp, augment.get_recipe(recipe), "cpu", types.FLOAT)

    p = pipe()
    p.build()
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images-dir", default=DEFAULT_IMAGES)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds, each a pass over --images")
    ap.add_argument("--recipe", default="mocov2")
    ap.add_argument("--mode", default="scene-scene")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from dali_objcrop import plugin
    if not plugin.load():
        raise SystemExit(f"the operators cannot be built: {plugin.error()}")
    ims, win, flip, aug = load_inputs(args.images_dir, args.images, args.mode, args.recipe)
    fields, d = graph_fields(win, flip, aug, args.recipe)
    batches = {"dali_graph": [], "crop_op": []}
    for s in range(0, len(ims) - args.batch + 1, args.batch):
        sl = slice(s, s + args.batch)
        common = {"images": ims[sl]}
        g = dict(common)
        for f in fields:
            g[f] = d[f][sl]
        batches["dali_graph"].append(g)
        batches["crop_op"].append({**common, "windows": list(win[sl]), "flip": list(flip[sl]), "aug": list(aug[sl])})
    per_round = len(batches["crop_op"])
    if per_round == 0:
        raise SystemExit("--images must be at least --batch")
    pipes = {k: build(k, b, args.size, args.recipe, args.threads) for k, b in batches.items()}
    for p in pipes.values():  # warm-up: buffers, first-touch allocations
        p.run()
    stats = {k: {"cpu_s": 0.0, "wall_s": 0.0, "images": 0} for k in pipes}
    for _ in range(args.rounds):
        for k, p in pipes.items():
            c0, t0 = cpu_seconds(), time.perf_counter()
            for _ in range(per_round):
                p.run()
            stats[k]["cpu_s"] += cpu_seconds() - c0
            stats[k]["wall_s"] += time.perf_counter() - t0
            stats[k]["images"] += per_round * args.batch
    out = {"config": {**vars(args), "images_used": per_round * args.batch},
           "results": {}, "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(),
                                      "platform": platform.platform(), "python": sys.version.split()[0]}}
    for k, s in stats.items():
        out["results"][k] = {"cpu_ms_per_image": 1e3 * s["cpu_s"] / s["images"],
                             "images_per_s": s["images"] / s["wall_s"], "images": s["images"]}
        print(f"{k:11s} {out['results'][k]['cpu_ms_per_image']:7.2f} CPU ms/image "
              f"{out['results'][k]['images_per_s']:8.1f} images/s")
    r = out["results"]
    out["ratio_cpu_ms_op_over_graph"] = r["crop_op"]["cpu_ms_per_image"] / r["dali_graph"]["cpu_ms_per_image"]
    out["ratio_images_per_s_op_over_graph"] = r["crop_op"]["images_per_s"] / r["dali_graph"]["images_per_s"]
    print(f"op / graph: {out['ratio_cpu_ms_op_over_graph']:.2f}x CPU time, "
          f"{out['ratio_images_per_s_op_over_graph']:.2f}x images/s (load average {os.getloadavg()[0]:.1f})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
