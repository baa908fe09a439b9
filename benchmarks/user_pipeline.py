"""A user's own DALI pipeline on the operators against ``ObjCropLoader``: CPU ms per image, same run.

The pipelines of docs/plugin.md, as a user writes them (their reader, ``plugin.object_views``,
``plugin.reader_epoch``, ``DALIGenericIterator`` with ``auto_reset``), beside the loader on the same
images, mode, recipe, batch size and threads:

* ``user:readers.coco`` -- ``fn.readers.coco(ltrb=True, ratio=True)`` boxes as an input (docs example 1);
* ``user:readers.file`` -- ``fn.readers.file`` over the store's files, label = store row, ``boxes_store``
  (docs example 2);
* ``ObjCropLoader`` -- its own sampler, the per-batch hand-over, the same operators.

Method (``throughput.py``'s): every configuration built once, ``--reps`` rounds round-robin, each
discarding ``--warmup`` batches then counting ``--seconds``; CPU time = every thread of the process.
Prints one JSON object (rows, ratios user / loader of CPU ms per image, machine) and writes it to
``--json``.

    python benchmarks/user_pipeline.py --coco ../shared/data/coco_val2017_subset/annotations/instances.json \\
        --images ../shared/data/coco_val2017_subset/images --json out/user_pipeline_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from throughput import add_round_arguments, machine_info, measure_rounds   # benchmarks/throughput.py


class _Iterated:
    """A ``DALIGenericIterator`` as ``measure_once`` iterates a loader: each ``iter()`` is one epoch of
    dicts with an ``index``; the iterator resets itself (``auto_reset``)."""

    def __init__(self, it, key: str) -> None:
        self.it, self.key = it, key

    def __iter__(self):
        for batch in self.it:
            yield {"index": batch[0][self.key]}


def user_coco(ann: str, images: str, mode: str, batch: int, threads: int, box_scale, recipe: str, seed: int):
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    from dali_objcrop import CropConfig, plugin

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, seed=seed)
    def pipe():
        jpegs, boxes, _, ids = fn.readers.coco(file_root=images, annotations_file=ann, ltrb=True, ratio=True,
                                               image_ids=True, random_shuffle=True, pad_last_batch=True,
                                               name="Reader")
        q, k = plugin.object_views(jpegs, ids, boxes, epoch=plugin.reader_epoch("Reader"), seed=seed, size=224,
                                   recipe=recipe, config=CropConfig(mode=mode, box_scale=box_scale))
        return q, k, ids

    return _Iterated(DALIGenericIterator(pipe(), ["view1", "view2", "id"], reader_name="Reader",
                                         auto_reset=True), "id")


def user_files(store_path: str, images: str, mode: str, batch: int, threads: int, recipe: str, seed: int):
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    from dali_objcrop import BoxStore, CropConfig, plugin
    files = [os.path.join(images, k) for k in BoxStore.load(store_path).keys]

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, seed=seed)
    def pipe():
        jpegs, rows = fn.readers.file(files=files, labels=list(range(len(files))), random_shuffle=True,
                                      pad_last_batch=True, name="Reader")
        q, k = plugin.object_views(jpegs, rows, boxes_store=store_path, epoch=plugin.reader_epoch("Reader"),
                                   seed=seed, size=224, recipe=recipe, config=CropConfig(mode=mode))
        return q, k, rows

    return _Iterated(DALIGenericIterator(pipe(), ["view1", "view2", "row"], reader_name="Reader",
                                         auto_reset=True), "row")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coco", required=True, help="COCO annotations json")
    p.add_argument("--images", required=True, help="its image folder")
    p.add_argument("--mode", default="obj-obj-dilate")
    p.add_argument("--recipe", default="mocov2")
    add_round_arguments(p)
    p.add_argument("--json", help="also write the JSON here")
    a = p.parse_args(argv)
    from dali_objcrop import BoxStore, ObjCropLoader, box_scale_from_mean_area
    tmp = tempfile.TemporaryDirectory(prefix="user_pipeline_")
    store = BoxStore.from_coco(a.coco)
    store_path = str(store.save(Path(tmp.name) / "gt.boxes"))
    box_scale = box_scale_from_mean_area(store.mean_area_fraction(10))
    loader = ObjCropLoader(a.coco, boxes=store_path, images_dir=a.images, mode=a.mode, batch_size=a.batch_size,
                           size=224, recipe=a.recipe, seed=a.seed, num_threads=a.threads, device="cpu")
    configs = {
        "ObjCropLoader": loader,
        "user:readers.coco": user_coco(a.coco, a.images, a.mode, a.batch_size, a.threads, box_scale, a.recipe, a.seed),
        "user:readers.file": user_files(store_path, a.images, a.mode, a.batch_size, a.threads, a.recipe, a.seed),
    }
    machine = machine_info()                      # load average at the start
    rounds = measure_rounds(configs, a.reps, a.warmup, a.seconds)
    rows = [{"pipeline": name, "images_per_s": round(statistics.median(r[0] for r in rs), 1),
             "cpu_ms_per_image": round(statistics.median(r[1] for r in rs), 3),
             "cpu_ms_per_image_rounds": [round(r[1], 3) for r in rs]} for name, rs in rounds.items()]
    ref = rows[0]["cpu_ms_per_image"]
    out = {"settings": {**vars(a), "images": len(loader.index), "loader_pipeline": loader.stats["pipeline"],
                        "loader_pipeline_reason": loader.stats["pipeline_reason"]},
           "results": rows,
           "ratios": {f"cpu ms: {r['pipeline']} / ObjCropLoader": round(r["cpu_ms_per_image"] / ref, 3)
                      for r in rows[1:]},
           "ratios_paired": {f"cpu ms: {name} / ObjCropLoader": round(statistics.median(
               u[1] / l[1] for u, l in zip(rounds[name], rounds["ObjCropLoader"])), 3) for name in list(configs)[1:]},
           "machine": {**machine, "load_average_end": os.getloadavg()}}
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
