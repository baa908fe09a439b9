"""Crop-stage throughput on a GPU: the fused CUDA kernel (CuPy) against the DALI-ops crop.

Batch 256, two 224 px views per image, obj-obj-dilate windows, images/s (one
image = both views).  Rows (each skipped, with the reason, when its needs are
missing; a failing row records its error and the others still run):

decode excluded (decoded images already in GPU memory):
  * ``cupy-fused`` float32 / bfloat16: :func:`crop_views`, windows derived in the kernel.
  * ``cupy-apply+numpy-windows``: windows from ``windows.sample_windows`` on the CPU, then
    the given-windows kernel to HWC float32 (what ``crop_backend="cupy"`` runs inside DALI).
  * ``dali-ops``: DALI ``fn.resize`` (ROI per view, antialias) + ``crop_mirror_normalize``
    on the same GPU images fed by ``external_source`` (DALI only).
  * ``numpy-windows``: ``sample_windows`` alone for the batch (CPU), for scale.
  * ``objcrop-crop-op``: ``fn.objcrop.crop(device="gpu")`` (the plugin's fused operator) on the photos
    resampled to one 640x480 shape and fed as one dense GPU batch, every view colour-jittered and blurred
    (DALI and the operators needed).
  * ``dali-ops+colour+blur``: DALI's own stages doing the same work on the same batch: ROI ``fn.resize`` +
    ``fn.color_twist`` + ``fn.gaussian_blur`` (per-sample sigma and window) + ``crop_mirror_normalize``.
decode included (JPEG bytes in host memory):
  * ``dali-ops``: DALI ``decoders.image(device="mixed")`` + ROI resize + normalise.
  * ``cupy-in-dali``: DALI decode + ``python_function`` (the loader's ``cupy`` backend) + normalise.
  * ``cupy-fused-after-dali``: DALI decode as the pipeline output, the fused kernel on it.
  * ``cupy-fused+nvjpeg-torch``: ``torchvision.io.decode_jpeg(device="cuda")`` + fused kernel
    (no DALI needed).

Images: ``--images DIR`` (the first ``--batch`` JPEGs, random proposals), else
synthetic COCO-like scenes (``dali_objcrop.synth.make_scene``, 225-640 px sides).

Usage::

    python benchmarks/kernel_bench.py --out=gpu_results/kernel_bench.json [--seconds=4]   # --help: the settings

Without a GPU it writes the JSON with every row skipped (so CPU CI can run it).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dali_objcrop.constants import IMAGENET_MEAN_PX, IMAGENET_STD_PX
from dali_objcrop.train.config import ConfigError, parse_or_exit
from dali_objcrop.windows import CropConfig, sample_windows

MEAN_PX, STD_PX = list(IMAGENET_MEAN_PX), list(IMAGENET_STD_PX)


# ---- data ---------------------------------------------------------------------------------------
def _synthetic_scene_numpy(r: np.random.Generator) -> np.ndarray:
    """A COCO-sized smooth colour field with noise (when OpenCV is missing), RGB uint8."""
    w, h = int(r.integers(225, 641)), int(r.integers(225, 481))
    grid = r.uniform(30, 225, (6, 8, 3))
    ys, xs = np.linspace(0, 5, h), np.linspace(0, 7, w)
    y0, x0 = np.floor(ys).astype(int).clip(0, 4), np.floor(xs).astype(int).clip(0, 6)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = (grid[y0][:, x0] * (1 - fy) * (1 - fx) + grid[y0 + 1][:, x0] * fy * (1 - fx)
           + grid[y0][:, x0 + 1] * (1 - fy) * fx + grid[y0 + 1][:, x0 + 1] * fy * fx)
    return np.clip(img + r.normal(0, 14, img.shape), 0, 255).astype(np.uint8)


def load_images(n: int, images_dir: str | None, seed: int = 0) -> tuple[list[np.ndarray], list[bytes]]:
    """n RGB uint8 images and their JPEG bytes (real files from images_dir, else synthetic scenes).

    Uses OpenCV when present (``synth.make_scene``), else NumPy scenes and PIL (GPU boxes may lack OpenCV).
    """
    import io

    from PIL import Image
    try:
        import cv2
        if not hasattr(cv2, "imencode"):  # a stand-in for a missing OpenCV
            cv2 = None
    except ImportError:
        cv2 = None
    rgb, jpegs = [], []
    if images_dir:
        files = sorted(p for p in Path(images_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:n]
        if not files:
            raise ValueError(f"no JPEGs in {images_dir}")
        for i in range(n):
            data = files[i % len(files)].read_bytes()
            jpegs.append(data)
            rgb.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        return rgb, jpegs
    r = np.random.default_rng(seed)
    for i in range(n):
        if cv2 is not None:
            from dali_objcrop.synth import make_scene
            bgr, _ = make_scene(seed, i)
            im = np.ascontiguousarray(bgr[:, :, ::-1])
        else:
            im = _synthetic_scene_numpy(r)
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
        rgb.append(im)
    return rgb, jpegs


def random_proposals(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """1..10 proposals per image (normalised, best-first order irrelevant here)."""
    r = np.random.default_rng(seed)
    counts = r.integers(1, 11, n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    m = int(offsets[-1])
    x1, y1 = r.random(m) * 0.6, r.random(m) * 0.6
    boxes = np.stack([x1, y1, x1 + 0.1 + r.random(m) * 0.3, y1 + 0.1 + r.random(m) * 0.3], 1)
    return np.clip(boxes, 0, 1).astype(np.float32), offsets


# ---- timing -------------------------------------------------------------------------------------
def timed(step, sync, batch: int, seconds: float, warmup: int) -> dict:
    """Run ``step(it)`` repeatedly; images/s over at least ``seconds`` after ``warmup`` calls."""
    for it in range(warmup):
        step(it)
    sync()
    iters, t0 = 0, time.perf_counter()
    while True:
        step(warmup + iters)
        iters += 1
        if iters % 4 == 0 or iters < 4:
            sync()
            el = time.perf_counter() - t0
            if el >= seconds and iters >= 3:
                break
    sync()
    el = time.perf_counter() - t0
    return {"images_per_s": round(iters * batch / el, 1), "ms_per_batch": round(1000 * el / iters, 3),
            "iterations": iters}


def run_row(results: list, name: str, decode: bool, fn, **extra) -> None:
    """Append one result row; a skip (``RuntimeError`` starting with 'skip:') or error is recorded."""
    row = {"backend": name, "decode_included": decode, **extra}
    t0 = time.perf_counter()
    try:
        row.update(fn())
        row["status"] = "ok"
    except Exception as e:  # record and continue: one broken row must not hide the others
        msg = str(e)
        if msg.startswith("skip:"):
            row.update(status="skipped", reason=msg[5:].strip())
        else:
            row.update(status="error", error=f"{type(e).__name__}: {msg}",
                       traceback=traceback.format_exc(limit=6))
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    results.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)


def _need_gpu():
    from dali_objcrop.kernels.cupy_backend import gpu_available
    if not gpu_available():
        raise RuntimeError("skip: no CuPy or no CUDA GPU")
    import cupy
    return cupy


def _need_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise RuntimeError("skip: DALI not importable (set PYTHONPATH to a DALI install)") from None
    import nvidia.dali as dali
    return dali


@dataclass
class KernelBenchConfig:
    """Batch, sizes and timing of the rows (typed --field=value flags, dali_objcrop.train.config)."""

    batch: int = 256
    size: int = 224
    seconds: float = 4.0              # timed seconds per row
    warmup: int = 3
    threads: int = field(default_factory=lambda: min(8, os.cpu_count() or 2))  # DALI CPU threads
    images: str = ""                  # folder of JPEGs (default: synthetic scenes)
    mode: str = "obj-obj-dilate"
    out: str = "gpu_results/kernel_bench.json"
    dali_cpu: bool = False            # run the dali-ops rows on the CPU (a smoke test of their graphs without a GPU)

    def __post_init__(self) -> None:
        if self.batch < 1 or self.size < 1 or self.seconds <= 0:
            raise ConfigError(f"batch, size and seconds must be positive, got {self.batch}, {self.size}, "
                              f"{self.seconds}")


# ---- rows ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args, = parse_or_exit([KernelBenchConfig], argv, "kernel_bench.py")

    t_start = time.perf_counter()
    B, S = args.batch, args.size
    cfg = CropConfig(mode=args.mode, box_scale=(0.5, 1.0))
    boxes, offsets = random_proposals(B)
    index = np.arange(B, dtype=np.int64)
    results: list[dict] = []
    info = {"batch": B, "size": S, "mode": args.mode, "threads": args.threads, "seconds_per_row": args.seconds,
            "images": args.images or "synthetic (dali_objcrop.synth.make_scene)", "python": sys.version.split()[0],
            "platform": platform.platform()}
    try:
        cupy = _need_gpu()
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        info["cupy"] = cupy.__version__
    except RuntimeError as e:
        info["gpu"] = None
        info["gpu_reason"] = str(e)
    try:
        import nvidia.dali as _d
        info["dali"] = _d.__version__
    except ImportError:
        info["dali"] = None

    rgb, jpegs = load_images(B, args.images or None)
    sizes = np.array([[im.shape[1], im.shape[0]] for im in rgb], dtype=np.int64)
    info["mean_image_px"] = [float(sizes[:, 0].mean()), float(sizes[:, 1].mean())]
    info["mean_jpeg_kb"] = round(float(np.mean([len(j) for j in jpegs])) / 1024, 1)
    state = {}

    def gpu_images():
        cupy = _need_gpu()
        if "dev" not in state:
            state["dev"] = [cupy.asarray(im) for im in rgb]
        return cupy, state["dev"]

    def sync():
        import cupy
        cupy.cuda.Stream.null.synchronize()
        cupy.cuda.get_current_stream().synchronize()

    # -- decode excluded ------------------------------------------------------------------------
    def fused(dtype):
        def run():
            from dali_objcrop.kernels.cupy_backend import crop_views
            cupy, dev = gpu_images()
            step = lambda it: crop_views(dev, None, boxes, offsets, index, 0, it, cfg, S, MEAN_PX, STD_PX, dtype)
            t = time.perf_counter()
            step(0)
            sync()
            compile_s = time.perf_counter() - t
            return {**timed(step, sync, B, args.seconds, args.warmup), "first_call_s": round(compile_s, 3)}
        return run

    def apply_numpy_windows():
        from dali_objcrop.kernels.cupy_backend import apply_windows
        cupy, dev = gpu_images()

        def step(it):
            cw = sample_windows(sizes, boxes, offsets, index, 0, it, cfg)
            return apply_windows(dev, cw.windows, cw.flip, S)
        return timed(step, sync, B, args.seconds, args.warmup)

    def numpy_windows():
        def step(it):
            sample_windows(sizes, boxes, offsets, index, 0, it, cfg)
        return timed(step, lambda: None, B, min(args.seconds, 2.0), args.warmup)

    def windows_kernel():
        from dali_objcrop.kernels.cupy_backend import windows_gpu
        _need_gpu()
        return timed(lambda it: windows_gpu(sizes, boxes, offsets, index, 0, it, cfg), sync, B,
                     min(args.seconds, 2.0), args.warmup)

    def dali_rois(it):
        from dali_objcrop.feed import window_rois
        cw = sample_windows(sizes, boxes, offsets, index, 0, it, cfg)
        return window_rois(cw.windows, cw.flip)

    dali_gpu = not args.dali_cpu
    decoder = "mixed" if dali_gpu else "cpu"

    def dali_pipe(graph):
        _need_dali()
        if dali_gpu:
            _need_gpu()
        from nvidia.dali import pipeline_def
        pipe = pipeline_def(graph)(batch_size=B, num_threads=args.threads, device_id=0 if dali_gpu else None,
                                   prefetch_queue_depth=2)
        pipe.build()
        return pipe

    def resize_views(images, rois, fn, types):
        outs = []
        for v in (0, 1):
            r = fn.resize(images, size=[S, S], roi_start=rois[2 * v], roi_end=rois[2 * v + 1], roi_relative=False,
                          interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.UINT8)
            outs.append(fn.crop_mirror_normalize(r, dtype=types.FLOAT, output_layout="CHW", mean=MEAN_PX,
                                                 std=STD_PX))
        return outs

    def dali_ops_predecoded():
        _need_dali()
        dev = gpu_images()[1] if dali_gpu else rgb
        from nvidia.dali import fn, types
        counter = {"it": 0}

        def rois():
            counter["it"] += 1
            return dali_rois(counter["it"])

        def graph():
            # the same decoded images every batch (no_copy: DALI reads our buffers, which stay alive and
            # unchanged), ROIs on the CPU as resize needs them
            ims = fn.external_source(source=lambda: dev, batch=True, device="gpu" if dali_gpu else "cpu",
                                     layout="HWC", no_copy=True)
            r = fn.external_source(source=rois, num_outputs=4, batch=True)
            return tuple(resize_views(ims, r, fn, types))
        pipe = dali_pipe(graph)
        return timed(lambda it: pipe.run(), lambda: None, B, args.seconds, args.warmup)

    # The two rows below feed everything as dense batches (one (B, 480, 640, 3) GPU array of the photos
    # resampled to one shape, windows / flips / draws as (B, ...) arrays): a list of 256 arrays per input costs
    # DALI's external_source ~4 ms a batch on the host (measured on the CPU), which would swamp both rows.
    UH, UW = 480, 640
    usizes = np.array([[UW, UH]] * B, dtype=np.int64)

    def uniform_images():
        if "uniform" not in state:
            ys = lambda h: np.linspace(0, h - 1, UH).round().astype(np.int64)
            xs = lambda w: np.linspace(0, w - 1, UW).round().astype(np.int64)
            host = np.ascontiguousarray(np.stack([im[ys(im.shape[0])][:, xs(im.shape[1])] for im in rgb]))
            state["uniform"] = host
            if dali_gpu:
                cupy = _need_gpu()
                state["uniform"] = cupy.asarray(host)
        return state["uniform"]

    def full_aug(it):
        """windows (B, 2, 4), flips (B, 2), aug (B, 2, 9) with colour and blur on for every view."""
        cw = sample_windows(usizes, boxes, offsets, index, 0, it, cfg)
        r = np.random.default_rng(it)
        aug = np.zeros((B, 2, 9), np.float32)
        sigma = r.uniform(0.1, 2.0, (B, 2))
        aug[..., 0], aug[..., 1:4] = 1, r.uniform(0.6, 1.4, (B, 2, 3))
        aug[..., 4], aug[..., 5], aug[..., 6] = r.uniform(-36, 36, (B, 2)), 1, sigma
        aug[..., 7] = 2 * np.ceil(3 * sigma) + 1
        return cw, aug

    def objcrop_crop_op():
        _need_dali()
        from dali_objcrop import plugin
        from nvidia.dali import fn
        device = "gpu" if dali_gpu else "cpu"
        if not (plugin.load() and plugin.crop_op_registered(device)):
            raise RuntimeError(f"fn.objcrop.crop has no {device} backend here: {plugin.error()}")
        dev = uniform_images()
        counter = {"it": 0}

        def inputs():
            counter["it"] += 1
            cw, aug = full_aug(counter["it"])
            return cw.windows.astype(np.int32), cw.flip.astype(np.uint8), aug

        def graph():
            ims = fn.external_source(source=lambda: dev, batch=True, device=device, layout="HWC", no_copy=True)
            w, f, a = fn.external_source(source=inputs, num_outputs=3, batch=True)
            return tuple(fn.objcrop.crop(ims, w, f, a, size=S, mean=MEAN_PX, std=STD_PX, device=device))
        pipe = dali_pipe(graph)
        return timed(lambda it: pipe.run(), lambda: None, B, args.seconds, args.warmup)

    def dali_ops_full():
        _need_dali()
        from dali_objcrop.feed import window_rois
        dev = uniform_images()
        from nvidia.dali import fn, types
        counter = {"it": 0}

        def inputs():
            counter["it"] += 1
            cw, aug = full_aug(counter["it"])
            rois = window_rois(cw.windows, cw.flip)
            per_view = []
            for v in (0, 1):
                per_view += [aug[:, v, 1].copy(), aug[:, v, 2].copy(), aug[:, v, 3].copy(), aug[:, v, 4].copy(),
                             aug[:, v, 6].copy(), aug[:, v, 7].astype(np.int32)]
            return [*rois, *per_view]

        def graph():
            ims = fn.external_source(source=lambda: dev, batch=True, device="gpu" if dali_gpu else "cpu",
                                     layout="HWC", no_copy=True)
            x = fn.external_source(source=inputs, num_outputs=16, batch=True)
            outs = []
            for v in (0, 1):
                r = fn.resize(ims, size=[S, S], roi_start=x[2 * v], roi_end=x[2 * v + 1], roi_relative=False,
                              interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
                b, c, sat, hue, sig, win = x[4 + 6 * v: 10 + 6 * v]
                r = fn.color_twist(r, brightness=b, contrast=c, saturation=sat, hue=hue)
                r = fn.gaussian_blur(r, sigma=sig, window_size=win)
                outs.append(fn.crop_mirror_normalize(r, dtype=types.FLOAT, output_layout="CHW", mean=MEAN_PX,
                                                     std=STD_PX))
            return tuple(outs)
        pipe = dali_pipe(graph)
        return timed(lambda it: pipe.run(), lambda: None, B, args.seconds, args.warmup)

    # -- decode included ------------------------------------------------------------------------
    jpeg_arrays = [np.frombuffer(j, np.uint8) for j in jpegs]

    def dali_decode_ops():
        _need_dali()
        from nvidia.dali import fn, types
        counter = {"it": 0}

        def source():
            rois = dali_rois(counter["it"])
            counter["it"] += 1
            return (jpeg_arrays,) + tuple(rois)

        def graph():
            enc, *rois = fn.external_source(source=source, num_outputs=5, batch=True)
            ims = fn.decoders.image(enc, device=decoder, output_type=types.RGB, adjust_orientation=False)
            return tuple(resize_views(ims, rois, fn, types))
        pipe = dali_pipe(graph)
        return timed(lambda it: pipe.run(), lambda: None, B, args.seconds, args.warmup)

    def dali_decode_cupy_stage():
        _need_dali()
        _need_gpu()
        from nvidia.dali import fn, types
        from dali_objcrop.kernels.cupy_backend import dali_crop_stage
        counter = {"it": 0}

        def source():
            cw = sample_windows(sizes, boxes, offsets, index, 0, counter["it"], cfg)
            counter["it"] += 1
            return jpeg_arrays, cw.windows, cw.flip.astype(np.uint8)

        def graph():
            enc, win, flip = fn.external_source(source=source, num_outputs=3, batch=True)
            ims = fn.decoders.image(enc, device="mixed", output_type=types.RGB, adjust_orientation=False)
            views = dali_crop_stage(ims, {"window": win, "flip": flip}, S)
            return tuple(fn.crop_mirror_normalize(v, dtype=types.FLOAT, output_layout="CHW", mean=MEAN_PX,
                                                  std=STD_PX) for v in views)
        pipe = dali_pipe(graph)
        return timed(lambda it: pipe.run(), lambda: None, B, args.seconds, args.warmup)

    def dali_decode_then_fused():
        _need_dali()
        cupy = _need_gpu()
        from nvidia.dali import fn, types
        from dali_objcrop.kernels.cupy_backend import crop_views

        def graph():
            enc = fn.external_source(source=lambda: jpeg_arrays, batch=True)
            return fn.decoders.image(enc, device="mixed", output_type=types.RGB, adjust_orientation=False)
        pipe = dali_pipe(graph)

        def step(it):
            (tl,) = pipe.run()
            ims = [cupy.asarray(tl[i]) for i in range(len(tl))]   # zero-copy (__cuda_array_interface__)
            return crop_views(ims, None, boxes, offsets, index, 0, it, cfg, S, MEAN_PX, STD_PX)
        return timed(step, sync, B, args.seconds, args.warmup)

    def nvjpeg_torch_fused():
        _need_gpu()
        try:
            import torch
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError:
            raise RuntimeError("skip: torch/torchvision not importable") from None
        if not torch.cuda.is_available():
            raise RuntimeError("skip: torch sees no CUDA device")
        from dali_objcrop.kernels.cupy_backend import crop_views
        data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]

        def step(it):
            # list of (3, H, W) uint8; RGB also for the grayscale JPEGs COCO holds
            chw = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
            hwc = [x.permute(1, 2, 0).contiguous() for x in chw]    # the kernel reads HWC
            return crop_views(hwc, None, boxes, offsets, index, 0, it, cfg, S, MEAN_PX, STD_PX)
        return timed(step, torch.cuda.synchronize, B, args.seconds, args.warmup)

    run_row(results, "numpy-windows", False, numpy_windows, note="CPU, one thread, windows only")
    run_row(results, "cupy-windows-kernel", False, windows_kernel, note="windows only, incl. H2D of boxes")
    run_row(results, "cupy-fused", False, fused("float32"), dtype="float32")
    run_row(results, "cupy-fused", False, fused("bfloat16"), dtype="bfloat16")
    run_row(results, "cupy-apply+numpy-windows", False, apply_numpy_windows, dtype="float32 HWC")
    dali_dev = {} if dali_gpu else {"device": "cpu"}
    run_row(results, "dali-ops", False, dali_ops_predecoded, dtype="float32", **dali_dev)
    uniform = {"aug": "colour+blur on every view", "images": "resampled to 640x480, dense batches"}
    run_row(results, "objcrop-crop-op", False, objcrop_crop_op, dtype="float32", **uniform, **dali_dev)
    run_row(results, "dali-ops+colour+blur", False, dali_ops_full, dtype="float32", **uniform, **dali_dev)
    run_row(results, "dali-ops", True, dali_decode_ops, dtype="float32", **dali_dev)
    run_row(results, "cupy-in-dali", True, dali_decode_cupy_stage, dtype="float32")
    run_row(results, "cupy-fused-after-dali", True, dali_decode_then_fused, dtype="float32")
    run_row(results, "cupy-fused+nvjpeg-torch", True, nvjpeg_torch_fused, dtype="float32")

    def rate(name, decode, dtype="float32"):
        for r in results:
            if r["backend"] == name and r["decode_included"] == decode and r.get("dtype") == dtype \
                    and r["status"] == "ok":
                return r["images_per_s"]
        return None

    ratios = {}
    for key, num, den in (("fused_vs_dali_ops_decode_excluded", rate("cupy-fused", False), rate("dali-ops", False)),
                          ("crop_op_vs_dali_ops_full_decode_excluded", rate("objcrop-crop-op", False),
                           rate("dali-ops+colour+blur", False)),
                          ("cupy_stage_vs_dali_ops_decode_included", rate("cupy-in-dali", True),
                           rate("dali-ops", True)),
                          ("fused_after_dali_vs_dali_ops_decode_included", rate("cupy-fused-after-dali", True),
                           rate("dali-ops", True))):
        if num and den:
            ratios[key] = round(num / den, 3)
    out = {"info": info, "config": asdict(args), "results": results, "ratios": ratios,
           "total_s": round(time.perf_counter() - t_start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}; ratios {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
