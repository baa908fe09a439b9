"""Stage-by-stage profile of the loader's pipeline: where the time goes after (and in) decoding.

Cumulative DALI pipelines on the same images and batches, each row one more stage than the last
(images/s, one image = both views; CPU ms per image over all threads):

  read            fn.io.file.read of the batch's files (paths handed over per batch, as the loader)
  decode          + decoders.image of the whole image (``mixed`` on a GPU)          <- decode-only
  decode-roi      fn.objcrop.windows + decoders.image_slice of the union of both windows
  crop            + fn.resize of both views (ROI, antialias)                         (DALI-ops crop stage)
  colour          + colour twist / grayscale on the drawn samples
  blur            + separable Gaussian blur on the drawn samples
  normalise       + crop_mirror_normalize to NCHW float       == the operators' loader with DALI's crop
  fused-crop      decode-roi + fn.objcrop.crop (one op: crop, colour, blur, solarise, normalise), where built
  loader-plugin   ObjCropLoader(use_plugin=True): + the hand-over to torch tensors
  loader-dali-ops ObjCropLoader(use_plugin=False): today's DALI-ops graph fed by the NumPy callback
  loader-local    loader-plugin with ``--local-crops`` local views of ``--local-size`` px (multi-crop; from the
                  object views' region in an object mode, the scene otherwise); 0 leaves the row out

On a GPU the decode rows run per ``--hw-decoder-load`` value (0 / 0.65 / 0.9: the share of JPEGs
the hardware decoder takes), and the ratios say full loader / decode-only and ROI / full decode.

Usage::

    python benchmarks/gpu_profile.py --coco ../shared/data/coco_val2017_subset/annotations/instances.json \\
        --batch 256 --threads 8 --seconds 4 --json gpu_results/gpu_profile.json
    python benchmarks/gpu_profile.py --device cpu --batch 4 --size 64 --seconds 0.3 --max-images 16   # smoke test

Without the C++ operators the rows that need them are recorded as skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

STAGES = ("read", "decode", "decode-roi", "crop", "colour", "blur", "normalise")


def _source(paths: list[np.ndarray], batch: int, seed: int):
    """Per-batch hand-over (file paths, positions, epoch), cycling over shuffled batches forever."""
    from dali_objcrop.sampling import shard_batches
    state = {"epoch": 0, "batches": iter(())}

    def next_batch():
        while True:
            try:
                idx = next(state["batches"])
                break
            except StopIteration:
                state["batches"] = iter(shard_batches(len(paths), batch, seed, state["epoch"]))
                state["epoch"] += 1
        return [paths[i] for i in idx], idx.astype(np.int64), np.full(len(idx), state["epoch"], np.int64)
    return next_batch


def build(stage: str, args, paths, config, recipe, store: str | None, rows: np.ndarray | None,
          decoder_kwargs: dict):
    """The pipeline of ``stage`` (cumulative), built."""
    from nvidia.dali import fn, pipeline_def, types

    from dali_objcrop import plugin
    from dali_objcrop.ops_graph import aug_stages, dali_crop, finish_views
    gpu = args.device == "gpu"
    dec = "mixed" if gpu else "cpu"
    src = _source(paths, args.batch, args.seed)

    def graph():
        p, index, epoch = fn.external_source(source=src, num_outputs=3, batch=True)
        jpegs = fn.io.file.read(p)
        if stage == "read":
            return jpegs
        if stage == "decode":
            return fn.decoders.image(jpegs, device=dec, output_type=types.RGB, adjust_orientation=False,
                                     **decoder_kwargs)
        fused = stage == "fused-crop"
        w = plugin.windows(fn.peek_image_shape(jpegs, adjust_orientation=False), index, epoch=epoch, config=config,
                           recipe=recipe, seed=args.seed, boxes_store=store,  # its rows are the positions
                           resize_rois=not fused, blur_kernels=not fused)
        images = fn.decoders.image_slice(jpegs, w.roi[0:2], w.roi[2:4], axis_names="WH", device=dec,
                                         output_type=types.RGB, adjust_orientation=False, **decoder_kwargs)
        if stage == "decode-roi":
            return images
        if fused:
            v1, v2 = fn.objcrop.crop(images, w.windows, w.flip, w.aug, size=args.size,
                                     mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])
            return v1, v2
        inp: dict = {}
        for v in (0, 1):
            inp[f"roi_start{v}"], inp[f"roi_end{v}"] = w.resize_rois[v, 0:2], w.resize_rois[v, 2:4]
            for c, name in enumerate(plugin.AUG_COLUMNS):
                inp[f"{name}{v}"] = (fn.cast(w.aug[v, c], dtype=types.BOOL)
                                     if name in ("colour", "blur", "solarize") else w.aug[v, c])
            inp[f"blur_h{v}"] = fn.expand_dims(w.blur_kernels[v], axes=[0])
            inp[f"blur_v{v}"] = fn.expand_dims(w.blur_kernels[v], axes=[1])
        views = dali_crop(images, inp, args.size)
        if stage == "crop":
            return views
        keep = {"colour": ("colour",), "blur": ("colour", "blur"),
                "normalise": ("colour", "blur", "solarize")}[stage]
        partial = type(recipe)(recipe.name, tuple(
            type(va)(**{**va.__dict__, **{k: 0.0 for k, on in (("jitter_p", "colour" in keep),
                                                                ("gray_p", "colour" in keep),
                                                                ("blur_p", "blur" in keep),
                                                                ("solarize_p", "solarize" in keep)) if not on}})
            for va in recipe.views))
        if stage == "normalise":
            return finish_views(views, False, inp, partial, dec, types.FLOAT)
        from dali_objcrop.ops_graph import augment_view
        return tuple(augment_view(fn.cast(views[v], dtype=types.FLOAT), inp, v, aug_stages(partial.views[v]), gpu)
                     for v in (0, 1))

    pipe = pipeline_def(graph, enable_conditionals=True)(batch_size=args.batch, num_threads=args.threads,
                                                          device_id=0 if gpu else None, seed=args.seed,
                                                          prefetch_queue_depth=2)
    pipe.build()
    return pipe


def timed(step, n_per_step: int, seconds: float, warmup: int) -> dict:
    """images/s and CPU ms per image of ``step`` over ``seconds`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        n += step()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images_per_s": round(n / dt, 2), "cpu_ms_per_image": round(1000 * cpu / max(n, 1), 3), "images": n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coco", default="", help="COCO json (images/ beside annotations/); default: synthetic set")
    ap.add_argument("--device", default="gpu", choices=("gpu", "cpu"))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--mode", default="obj-obj-dilate")
    ap.add_argument("--recipe", default="mocov2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-images", type=int, default=0)
    ap.add_argument("--hw-decoder-load", default="0,0.65,0.9",
                    help="comma-separated values for the GPU decode rows (the first also for the others)")
    ap.add_argument("--local-crops", type=int, default=6, help="local views of the loader-local row (0: no row)")
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)

    from dali_objcrop import ObjCropLoader, plugin
    from dali_objcrop.augment import get_recipe
    from dali_objcrop.loader import resolve_data
    from dali_objcrop.plugin import crop_op_registered
    from dali_objcrop.windows import CropConfig, box_scale_from_mean_area
    if args.coco:
        data, images_dir = args.coco, None
    else:
        from dali_objcrop.synth import ensure_default_dataset
        data, images_dir = str(ensure_default_dataset()), None
    index, coco = resolve_data(data, images_dir, args.max_images or None)
    paths = [np.frombuffer(p.encode(), np.uint8) for p in index.paths]
    if len(paths) < args.batch:
        paths = (paths * (args.batch // len(paths) + 1))
    recipe = get_recipe(args.recipe)
    ops = plugin.load()
    store_path, rows, config = None, None, CropConfig(mode=args.mode)
    if ops and coco and config.uses_boxes:
        import tempfile

        from dali_objcrop.boxstore import BoxStore
        store = BoxStore.from_coco(coco)
        rows = store.rows_for(index.keys)
        if len(paths) > len(index) or not np.array_equal(rows, np.arange(len(rows))):
            # a store whose rows are the dataset positions (the rows above in dataset order)
            b, off = store.gather(rows[np.arange(len(paths)) % len(index)])
            pos = np.arange(len(paths)) % len(index)
            store = BoxStore.from_arrays([str(i) for i in range(len(paths))],
                                         np.asarray(index.sizes, np.int32)[pos],
                                         [b[off[i]:off[i + 1]] for i in range(len(paths))])
        config = CropConfig(mode=args.mode, box_scale=box_scale_from_mean_area(store.mean_area_fraction(10)))
        store_path = str(store.save(Path(tempfile.mkdtemp(prefix="gpu_profile_")) / "b.boxes"))
    loads = [float(x) for x in args.hw_decoder_load.split(",") if x] if args.device == "gpu" else [None]
    results = []

    def row(name: str, fn, **extra):
        rec = {"stage": name, **extra}
        try:
            rec.update(fn())
        except Exception as e:  # noqa: BLE001 - one failing row must not stop the profile
            rec.update(error=f"{type(e).__name__}: {e}"[:800])
            traceback.print_exc()
        results.append(rec)
        print(json.dumps(rec), flush=True)

    def pipe_row(stage, hw):
        kw = {"hw_decoder_load": hw} if hw is not None else {}
        if stage not in ("read", "decode") and not ops:
            return {"skipped": f"C++ operators unavailable: {plugin.error()}"}
        if stage == "fused-crop" and not crop_op_registered(args.device):
            return {"skipped": f"fn.objcrop.crop has no {args.device} backend"}
        p = build(stage, args, paths, config, recipe, store_path, None, kw)
        return timed(lambda: (p.run(), args.batch)[1], args.batch, args.seconds, args.warmup)

    for stage in STAGES + ("fused-crop",):
        for hw in (loads if stage in ("decode", "decode-roi") else loads[:1]):
            row(stage, lambda: pipe_row(stage, hw), hw_decoder_load=hw)

    def loader_row(use_plugin: bool, local_crops: int = 0):
        if use_plugin and not ops:
            return {"skipped": f"C++ operators unavailable: {plugin.error()}"}
        kw = {"hw_decoder_load": loads[0]} if loads[0] is not None else {}
        local = dict(local_crops=local_crops, local_size=args.local_size,
                     local_from="box" if coco else "scene") if local_crops else {}
        ld = ObjCropLoader(data, boxes="gt" if coco else None, mode=args.mode if coco else "scene-scene",
                           batch_size=args.batch, size=args.size, recipe=args.recipe, num_threads=args.threads,
                           device=args.device, seed=args.seed, use_plugin=use_plugin, decoder_kwargs=kw,
                           max_images=args.max_images or None, rank=0, world_size=1, **local)
        state = {"it": iter(ld)}

        def step():
            try:
                b = next(state["it"])
            except StopIteration:
                state["it"] = iter(ld)
                b = next(state["it"])
            if args.device == "gpu":
                import torch
                torch.cuda.synchronize()
            return len(b["index"])
        return {**timed(step, args.batch, args.seconds, args.warmup), "pipeline": ld.stats["pipeline"]}

    row("loader-plugin", lambda: loader_row(True), hw_decoder_load=loads[0])
    row("loader-dali-ops", lambda: loader_row(False), hw_decoder_load=loads[0])
    if args.local_crops:
        row("loader-local", lambda: loader_row(True, args.local_crops), hw_decoder_load=loads[0],
            local_crops=args.local_crops, local_size=args.local_size)

    def ips(stage, hw=loads[0]):
        r = next((x for x in results if x["stage"] == stage and x.get("hw_decoder_load") == hw), {})
        return r.get("images_per_s")
    ratios = {}
    for a, b in (("loader-plugin", "decode"), ("loader-dali-ops", "decode"), ("decode-roi", "decode"),
                 ("normalise", "decode-roi"), ("fused-crop", "decode-roi"), ("loader-plugin", "loader-dali-ops"),
                 ("loader-local", "loader-plugin")):
        if ips(a) and ips(b):
            ratios[f"{a} / {b}"] = round(ips(a) / ips(b), 3)
    out = {"results": results, "ratios": ratios,
           "settings": {**vars(args), "images": len(index), "data": data, "command": " ".join(sys.argv)}}
    try:
        import torch
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        out["gpu"] = None
    for k, v in ratios.items():
        print(f"  {k}: {v}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0 if not any("error" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
