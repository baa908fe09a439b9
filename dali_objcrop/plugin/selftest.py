"""First-use self-test of ``fn.objcrop.crop``'s GPU backend: a GPU user never gets an unproven kernel.

The first time a process wants the GPU crop operator on a device, :func:`gpu_crop_verified` runs a tiny
batch (odd image shapes, enlarging and 1-pixel windows, colour, blur, solarise, flips) through the GPU and
the CPU operators and compares every value (at most one pixel level apart; the kernels are built to be
bit-identical).  The verdict is cached on disk beside the library, per library build and GPU model
(``gpu-selftest-<model>.json``), so it costs once per machine and build, and in memory per process and
device.  A mismatch or a launch error ("no kernel image is available", out of resources) gives ONE
warning naming the cause, and the callers (:func:`dali_objcrop.plugin.crop_op_usable`, the loaders) fall
back to the DALI-ops crop stage, with ``stats["pipeline"]`` saying so.
"""
from __future__ import annotations

import json
import os
import re
import threading
import warnings
from pathlib import Path

import numpy as np

_lock = threading.Lock()
_verdicts: dict[int, tuple[bool, str]] = {}    # device_id -> (ok, reason), this process
_warned: set[int] = set()
SIZE = 24                                        # output side of the test views
LEVELS = 1.0                                     # tolerance in pixel levels (1/255 of the range)


def _gpu_name(device_id: int) -> str:
    import torch
    return torch.cuda.get_device_name(device_id)


def _cache_file(library: Path, gpu: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", gpu).strip("_") or "gpu"
    return Path(library).parent / f"gpu-selftest-{slug}.json"


def selftest_batch(seed: int = 0):
    """The self-test's inputs: (images, windows, flips, aug) for 4 samples, as numpy arrays/lists."""
    rng = np.random.default_rng(seed)
    shapes = [(37, 53), (480, 640), (3, 5), (61, 29)]
    ims = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    win = np.zeros((4, 2, 4), np.int32)
    for i, (h, w) in enumerate(shapes):
        for v in (0, 1):
            x1, y1 = rng.integers(0, w), rng.integers(0, h)
            win[i, v] = (x1, y1, rng.integers(x1 + 1, w + 1), rng.integers(y1 + 1, h + 1))
    win[2, 0] = (0, 0, 1, 1)                     # a 1-pixel window
    win[1, 1] = (0, 0, 640, 480)                 # the whole image
    flip = np.array([[0, 1], [1, 0], [1, 1], [0, 0]], np.uint8)
    aug = np.zeros((4, 2, 9), np.float32)
    # colour, brightness, contrast, saturation, hue, blur, sigma, blur_window, solarize
    aug[0, 0] = (1, 1.2, 0.8, 1.1, 10, 1, 1.5, 11, 0)
    aug[0, 1] = (0, 1, 1, 1, 0, 0, 0, 0, 1)
    aug[1, 0] = (1, 0.9, 1.3, 0.0, -20, 1, 0.3, 3, 1)
    aug[1, 1] = (1, 1.1, 1.1, 1.2, 5, 1, 2.0, 13, 0)
    aug[2, 0] = (0, 1, 1, 1, 0, 1, 1.0, 7, 0)
    aug[2, 1] = (1, 0.7, 1.0, 1.0, 30, 0, 0, 0, 0)
    aug[3, 0] = (0, 1, 1, 1, 0, 1, 5.0, 31, 0)   # a window wider than the 24-px view: the border reflects
    aug[3, 1] = (1, 1.4, 0.6, 0.5, 0, 0, 0, 0, 1)
    return ims, win, flip, aug


def run_selftest(device_id: int) -> tuple[bool, str]:
    """Run the comparison now (no cache): ``(True, "")`` or ``(False, why)``.  Never raises."""
    try:
        from nvidia.dali import fn, pipeline_def
        ims, win, flip, aug = selftest_batch()
        mean, std = [124.0, 116.0, 104.0], [58.0, 57.0, 57.5]

        @pipeline_def(batch_size=len(ims), num_threads=1, device_id=device_id, prefetch_queue_depth=1)
        def pipe():
            im = fn.external_source(source=lambda: ims, batch=True, layout="HWC")
            w = fn.external_source(source=lambda: list(win), batch=True)
            f = fn.external_source(source=lambda: list(flip), batch=True)
            a = fn.external_source(source=lambda: list(aug), batch=True)
            cpu = fn.objcrop.crop(im, w, f, a, size=SIZE, mean=mean, std=std, device="cpu")
            gpu = fn.objcrop.crop(im.gpu(), w, f, a, size=SIZE, mean=mean, std=std, device="gpu")
            return (*cpu, *gpu)

        p = pipe()
        p.build()
        outs = p.run()
        worst = 0.0
        for v in (0, 1):
            c = np.stack([np.array(outs[v][i]) for i in range(len(ims))])
            g = np.stack([np.array(outs[2 + v].as_cpu()[i]) for i in range(len(ims))])
            if c.shape != g.shape:
                return False, f"view {v}: GPU output shape {g.shape} != CPU {c.shape}"
            if not np.isfinite(g).all():
                return False, f"view {v}: the GPU operator wrote non-finite values"
            levels = np.abs(g - c) * np.array(std, np.float32)[None, :, None, None]
            worst = max(worst, float(levels.max()))
        if worst > LEVELS:
            return False, f"GPU and CPU operators differ by {worst:.3g} pixel levels (allowed {LEVELS})"
        return True, ""
    except Exception as e:  # noqa: BLE001 -- a launch error is a verdict, not a crash
        text = str(e).strip().splitlines()
        return False, f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def gpu_crop_verified(device_id: int | None = None, library: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Whether ``fn.objcrop.crop(device="gpu")`` may be used on ``device_id``: ``(ok, reason)``.

    Runs :func:`run_selftest` once per (library build, GPU model) and caches the verdict beside ``library``
    (the loaded operators' file; None: in memory only) and per process; a failure warns once per process and
    device, naming the cause.
    """
    if device_id is None:
        import torch
        device_id = torch.cuda.current_device()
    with _lock:
        if device_id in _verdicts:
            return _verdicts[device_id]
        gpu = _gpu_name(device_id)
        cache = _cache_file(Path(library), gpu) if library else None
        verdict = None
        if cache is not None and cache.is_file():
            try:
                data = json.loads(cache.read_text())
                if data.get("gpu") == gpu and isinstance(data.get("ok"), bool):
                    verdict = (data["ok"], str(data.get("reason", "")))
            except (OSError, ValueError):
                verdict = None                       # unreadable: test again, rewrite
        if verdict is None:
            verdict = run_selftest(device_id)
            if cache is not None:
                from ..fileio import atomic_write_json
                try:
                    atomic_write_json(cache, {"gpu": gpu, "ok": verdict[0], "reason": verdict[1],
                                              "library": str(library)}, indent=1)
                except OSError:
                    pass                             # a read-only cache: the verdict holds for this process
        _verdicts[device_id] = verdict
        if not verdict[0] and device_id not in _warned:
            _warned.add(device_id)
            warnings.warn(f"dali_objcrop: fn.objcrop.crop's GPU backend failed its self-test on {gpu} "
                          f"(device {device_id}): {verdict[1]}; using the DALI-ops crop stage instead",
                          RuntimeWarning, stacklevel=3)
        return verdict
