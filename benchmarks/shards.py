"""Shards against files, and proposals per core, on the real COCO photos in ../shared.

* Loader throughput: the same photos and boxes read by ``ObjCropLoader`` from the files
  (``io.file.read`` by position + the windows operator reading the ``.boxes`` store) and
  from WebDataset shards (``readers.webdataset`` + the windows operator on the sample's own
  boxes); rounds alternate between the two so that load from other processes hits both
  alike; images/s (wall) and CPU milliseconds per image (process CPU time, all threads).
* Pack speed (images/s, MiB/s) of ``dali-objcrop pack``.
* Proposals per CPU core: our BING through ``run_proposals`` with one worker process and
  single-threaded OpenCV (decode, downscale to 512, proposals, NMS, top 10, store), and the
  wall time extrapolated to 1.9M images on one 64-core machine and on 8 such machines
  (``proposals --part``: no communication between parts; assumes per-core speed holds with
  64 processes per machine, i.e. memory bandwidth and disk do not saturate).

Usage::

    .venv/bin/python benchmarks/shards.py --out benchmarks/results/shards_cpu.json
    .venv/bin/python benchmarks/shards.py --images 200 --rounds 2 --proposal-images 60   # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

COCO = REPO.parent / "shared" / "data" / "coco_val2017_subset"


def _loader_rate(make, batches: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) over ``batches`` batches after one warm-up batch."""
    ld = make()
    it = iter(ld)
    next(it)
    n, w0, c0 = 0, time.perf_counter(), time.process_time()
    for _ in range(batches):
        n += len(next(it)["index"])
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    del it
    return n / wall, 1000 * cpu / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mode", default="obj-obj-dilate")
    ap.add_argument("--proposal-images", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results/shards_cpu.json")
    ap.add_argument("--coco", default=str(COCO), help="the COCO subset folder (default ../shared/data/...)")
    a = ap.parse_args()
    coco = Path(a.coco)
    if not coco.exists():
        raise SystemExit(f"{coco} not found (the real photos live in ../shared; or pass --coco)")
    import torch
    from dali_objcrop import ObjCropLoader, plugin
    from dali_objcrop.boxstore import BoxStore
    from dali_objcrop.dataset import ImageIndex
    from dali_objcrop.loader import resolve_data
    from dali_objcrop.proposals.run import ProposalJob, run_proposals
    from dali_objcrop.shards import pack
    torch.set_num_threads(1)
    if not plugin.load():
        raise SystemExit(f"the operators are needed: {plugin.error()}")
    ann = coco / "annotations" / "instances.json"
    index, _ = resolve_data(str(ann), max_images=a.images)
    tmp = Path(tempfile.mkdtemp(prefix="objcrop_shards_bench_"))
    store = BoxStore.from_coco(ann)
    store_path = store.save(tmp / "gt.boxes")
    t0 = time.perf_counter()
    rep = pack(index, tmp / "shards", store, shard_bytes=16 << 20, progress=False)
    pack_s = time.perf_counter() - t0
    res: dict = {"machine": f"{platform.node()} {os.cpu_count()} cores (shared with other jobs: loaded)",
                 "images": len(index), "batch_size": a.batch_size, "threads": a.threads, "mode": a.mode,
                 "pack": {"seconds": pack_s, "images_per_s": len(index) / pack_s, "shards": rep.shards,
                          "mib_per_s": rep.bytes / 2**20 / pack_s}}
    batches = len(index) // a.batch_size - 2
    kw = dict(mode=a.mode, batch_size=a.batch_size, size=224, device="cpu", num_threads=a.threads, seed=0)
    rows = {"files": [], "shards": []}
    for r in range(a.rounds):
        order = ("files", "shards") if r % 2 == 0 else ("shards", "files")
        for what in order:
            if what == "files":
                rate = _loader_rate(lambda: ObjCropLoader(index, boxes=str(store_path), use_plugin=True, **kw), batches)
            else:
                rate = _loader_rate(lambda: ObjCropLoader.from_shards(tmp / "shards", **kw), batches)
            rows[what].append(rate)
            print(f"round {r} {what}: {rate[0]:.1f} images/s, {rate[1]:.2f} CPU ms/image", flush=True)
    res["loader"] = {k: {"images_per_s": [x[0] for x in v], "cpu_ms_per_image": [x[1] for x in v],
                         "median_images_per_s": float(np.median([x[0] for x in v])),
                         "median_cpu_ms_per_image": float(np.median([x[1] for x in v]))} for k, v in rows.items()}
    res["loader"]["shards_over_files_images_per_s"] = (res["loader"]["shards"]["median_images_per_s"]
                                                       / res["loader"]["files"]["median_images_per_s"])

    pidx = ImageIndex(root=index.root, keys=index.keys[:a.proposal_images], sizes=index.sizes[:a.proposal_images])
    job = ProposalJob(method="bing", top_k=10)
    import cv2
    cv2.setNumThreads(1)   # one core: OpenCV would otherwise spread the resize / decode over the others
    run_proposals(pidx, tmp / "warm.boxes", job, workers=1, chunk_size=16, progress=False)   # model load, caches
    c0 = time.process_time()
    _, prep = run_proposals(pidx, tmp / "p.boxes", job, workers=1, chunk_size=16, progress=False)
    cpu = time.process_time() - c0
    per_core = prep.computed / cpu            # CPU seconds: what one core does, less distorted by other load
    res["proposals"] = {"method": "bing (ours, exact, top 10 after NMS, long side 512)", "images": prep.computed,
                        "seconds": prep.seconds, "wall_images_per_s": prep.computed / prep.seconds, "images_per_s_per_core": per_core,
                        "cpu_s_per_image": cpu / prep.computed,
                        "hours_1.9M_one_64_core_machine": 1.9e6 / (per_core * 64) / 3600,
                        "hours_1.9M_eight_64_core_machines": 1.9e6 / (per_core * 64 * 8) / 3600}
    print(json.dumps(res, indent=1))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
