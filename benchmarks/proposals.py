"""Proposal throughput and quality on the real COCO photos in ../shared.

Measures, side by side on the same machine and images:

* end-to-end proposals/s of each method through the real driver (``run_proposals``: JPEG
  decoding, downscale to 512, proposals, NMS, top 10, chunk files, final store), with every
  core as a worker process: OpenCV's BING, our BING (the default: exact, lazy top 10), and
  selective search on a few images; wall-clock and CPU time per image;
* single-thread BING latency without decoding (preloaded images, the two implementations
  interleaved image by image so load from other processes hits both alike);
* recall@{1,5,10} at IoU {0.5,0.7} on the 200 held-out photos (never used for training) of
  the shipped model next to OpenCV's pretrained model, both run with our BING.

Writes a JSON file and a PNG plot.  Usage::

    .venv/bin/python benchmarks/proposals.py --out=out/proposals.json --plot=out/proposals.png
    .venv/bin/python benchmarks/proposals.py --images=200 --quick   # a smaller run (--help: the settings)
"""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from dali_objcrop.dataset import ImageIndex
from dali_objcrop.proposals.bing import Bing
from dali_objcrop.proposals.bing_cv import OpenCVBing
from dali_objcrop.proposals.common import load_for_proposals
from dali_objcrop.proposals.evaluate import evaluate_store
from dali_objcrop.proposals.methods import default_model_dir
from dali_objcrop.proposals.run import ProposalJob, run_proposals
from dali_objcrop.train.config import parse_or_exit

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco_val2017_subset"
ANN = COCO / "annotations" / "instances.json"
OPENCV_MODEL = REPO.parent / "shared" / "models" / "bing"


def subset_index(full: ImageIndex, rows: slice) -> ImageIndex:
    return ImageIndex(root=full.root, keys=full.keys[rows], sizes=full.sizes[rows], bad={})


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the driver's worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def driver_rate(index: ImageIndex, job: ProposalJob, workers: int, tmp: Path, name: str) -> dict:
    """Wall-clock images/s through the driver, and CPU seconds per image (robust to other
    users of a shared machine: ``workers / cpu_per_image`` is the rate on idle cores)."""
    out = tmp / f"{name}.boxes"
    t0, c0 = time.perf_counter(), _cpu_seconds()
    store, rep = run_proposals(index, out, job, workers=workers, chunk_size=16, restart=True, progress=False)
    dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0  # includes starting the worker processes
    return {"images": len(index), "seconds": round(dt, 2), "images_per_s": round(len(index) / dt, 1),
            "cpu_ms_per_image": round(1000 * cpu / len(index), 2),
            "images_per_s_on_idle_cores": round(workers * len(index) / cpu, 1),
            "failed": rep.failed, "workers": workers}


def single_thread_ms(n: int) -> dict:
    """Per-image BING time (no decoding), one thread, implementations interleaved image by image."""
    cv2.setNumThreads(1)
    files = sorted((COCO / "images").glob("*.jpg"))[:n]
    imgs = [load_for_proposals(f) for f in files]
    cvb, ours, r5 = OpenCVBing(OPENCV_MODEL), Bing.load(OPENCV_MODEL), Bing.load(OPENCV_MODEL, nms_rounds=5)
    runs = {"bing-opencv (full list)": cvb,
            "bing (ours, full list)": ours,
            "bing (ours, lazy exact top 10 after NMS; the driver's default)": lambda im: ours.top(im, 10, 0.5),
            "bing (ours, 5 NMS rounds, full list, approximate)": r5}
    tot = {k: 0.0 for k in runs}
    for img in imgs:
        for k, d in runs.items():
            t = time.process_time()
            d(img)
            tot[k] += time.process_time() - t
    cv2.setNumThreads(-1)
    return {k: round(1000 * v / len(imgs), 2) for k, v in tot.items()}


@dataclass
class ProposalsBenchConfig:
    """Images per measurement and where results go (typed --field=value flags)."""

    images: int = 1200                # COCO photos for the throughput runs
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    ss_images: int = 8                # photos for selective search (slow)
    latency_images: int = 100
    quick: bool = False               # fewer images everywhere
    out: str = "out/proposals.json"
    plot: str = "out/proposals.png"


def main(argv=None) -> int:
    args, = parse_or_exit([ProposalsBenchConfig], argv, "proposals.py")
    if not ANN.exists():
        print(f"{ANN} not present", file=sys.stderr)
        return 1
    if args.quick:
        args = replace(args, images=min(args.images, 200), ss_images=4, latency_images=30)
    full = ImageIndex.from_coco(ANN, COCO / "images", check=False)
    res = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "opencv": cv2.__version__,
                       "load_average_start": os.getloadavg()},
           "args": asdict(args)}
    print("single-thread latency ...", flush=True)
    res["single_thread_ms_per_image_no_decode"] = single_thread_ms(args.latency_images)
    print(json.dumps(res["single_thread_ms_per_image_no_decode"]), flush=True)

    rates = {}
    index = subset_index(full, slice(0, args.images))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = [("bing-opencv", ProposalJob(method="bing-opencv", model_dir=str(OPENCV_MODEL))),
                ("bing (ours, default: exact, lazy top 10)", ProposalJob(method="bing",
                                                                         model_dir=str(OPENCV_MODEL)))]
        for name, job in runs:
            print(f"throughput: {name} ...", flush=True)
            rates[name] = driver_rate(index, job, args.workers, tmp, name.split()[0] + str(len(rates)))
            print(json.dumps(rates[name]), flush=True)
        print("throughput: selective-search ...", flush=True)
        rates["selective-search (fast)"] = driver_rate(subset_index(full, slice(0, args.ss_images)),
                                                       ProposalJob(method="selective-search"), args.workers, tmp, "ss")
        res["throughput_decode_included"] = rates
        res["speedup_vs_opencv"] = {k: round(v["images_per_s"] / rates["bing-opencv"]["images_per_s"], 2)
                                    for k, v in rates.items()}
        res["cpu_speedup_vs_opencv"] = {k: round(rates["bing-opencv"]["cpu_ms_per_image"] / v["cpu_ms_per_image"], 2)
                                        for k, v in rates.items()}
        # recall on the held-out photos: shipped model vs OpenCV's pretrained, our exact BING
        held = subset_index(full, slice(1000, 1200))
        recall = {}
        for name, mdir in [("shipped (trained by train-bing)", default_model_dir()),
                           ("opencv pretrained", OPENCV_MODEL)]:
            out = tmp / f"held_{len(recall)}.boxes"
            store, _ = run_proposals(held, out, ProposalJob(method="bing", model_dir=str(mdir)),
                                     workers=args.workers, chunk_size=16, restart=True, progress=False)
            recall[name] = evaluate_store(store, ANN, only_store_images=True)
            print(name, json.dumps({k: v for k, v in recall[name].items() if k.startswith("recall@10")}), flush=True)
        res["recall_heldout_200"] = recall
    res["machine"]["load_average_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    plot(res, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return 0


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    rates = res["throughput_decode_included"]
    names = list(rates)
    y = np.arange(len(names))
    wall = [rates[n]["images_per_s"] for n in names]
    idle = [rates[n]["images_per_s_on_idle_cores"] for n in names]
    a.barh(y - 0.2, wall, height=0.4, label="measured (shared machine)")
    a.barh(y + 0.2, idle, height=0.4, label="workers / CPU time per image")
    for i in range(len(names)):
        a.text(idle[i], i + 0.2, f" {idle[i]:.0f}", va="center", fontsize=8)
        a.text(wall[i], i - 0.2, f" {wall[i]:.0f}", va="center", fontsize=8)
    a.set_yticks(y, names, fontsize=8)
    a.legend(fontsize=8)
    a.set_xlabel(f"images/s, decoding included, {res['args']['workers']} worker processes")
    a.set_title("proposal throughput on COCO photos")
    rec = res["recall_heldout_200"]
    keys = ["recall@1_iou0.5", "recall@5_iou0.5", "recall@10_iou0.5", "recall@10_iou0.7"]
    x = np.arange(len(keys))
    for i, (n, r) in enumerate(rec.items()):
        b.bar(x + 0.4 * i - 0.2, [r[k] for k in keys], width=0.4, label=n)
    b.set_xticks(x, keys, fontsize=8)
    b.set_title("recall, 200 held-out COCO photos, top 10 after NMS 0.5")
    b.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
