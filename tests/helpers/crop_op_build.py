"""Test helpers for fn.objcrop.crop: load the operators, run the CPU operator, and run the GPU kernels emulated
on the CPU.

The operators are built and loaded by the package itself (``dali_objcrop.plugin.load``: g++ and, where
nvcc is found, nvcc against the installed DALI, cached by DALI version and source hash), so every test
module of a session registers the same library once.  The emulator
(csrc/check/crop_emulate.cpp, with the operator's own launch plan csrc/dali/objcrop_crop_plan.h) is compiled
with g++ into ``$DALI_OBJCROP_HOME/test-crop/emu-<sha>/`` (default ``~/.cache/dali_objcrop``).
"""
from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DALI_SRC = REPO / "csrc" / "dali"


@functools.lru_cache(maxsize=None)
def load_crop_op() -> bool:
    """Build (if needed) and load the operators (True).

    Raises:
        RuntimeError: they cannot be built (the compiler's message).
    """
    from dali_objcrop import plugin
    if not plugin.load():
        raise RuntimeError(f"dali_objcrop operators not built: {plugin.error()}")
    return True


@functools.lru_cache(maxsize=None)
def load_gpu_emulator():
    """ctypes handle of csrc/check/crop_emulate.cpp (the GPU kernels run serially on the CPU), cached."""
    import ctypes
    src = REPO / "csrc" / "check" / "crop_emulate.cpp"
    deps = [src, REPO / "csrc" / "check" / "crop_check.h", *sorted(DALI_SRC.glob("*.h")), REPO / "csrc" / "objcrop_core.h"]
    h = hashlib.sha256(b"".join(d.read_bytes() for d in deps)).hexdigest()[:16]
    home = Path(os.environ.get("DALI_OBJCROP_HOME", Path.home() / ".cache" / "dali_objcrop"))
    lib = home / "test-crop" / f"emu-{h}" / "liboc_crop_emu.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.parent / f"tmp-{os.getpid()}.so"
        res = subprocess.run(["g++", "-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", f"-I{DALI_SRC}",
                              f"-I{src.parent}", str(src), "-o", str(tmp)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"g++ failed on {src}:\n{res.stderr[-4000:]}")
        os.replace(tmp, lib)
    return ctypes.CDLL(str(lib))


def emulate_gpu_crop(ims, windows, flips, aug, size: int, norm, kind: int, contrast_center: float = 128.0):
    """Both views as the GPU backend's kernels compute them with its launch plan (emulated): two
    (N, 3, S, S) arrays, float32 for kind 0, uint16 bit patterns for 1 (float16) / 2 (bfloat16)."""
    import ctypes

    import numpy as np
    emu = load_gpu_emulator()
    n = len(ims)
    ims = [np.ascontiguousarray(im, dtype=np.uint8) for im in ims]
    ptrs = np.array([im.ctypes.data for im in ims], np.uint64)
    sizes = np.array([[im.shape[1], im.shape[0]] for im in ims], np.int32)
    dt = np.float32 if kind == 0 else np.uint16
    outs = [np.zeros((n, 3, size, size), dt) for _ in (0, 1)]
    out_ptrs = np.array([[outs[v][i].ctypes.data for v in (0, 1)] for i in range(n)], np.uint64)
    win = np.ascontiguousarray(windows, np.int32)
    fl = np.ascontiguousarray(flips, np.uint8)
    au = np.ascontiguousarray(aug, np.float32)
    nm = np.ascontiguousarray(norm, np.float32)
    p = ctypes.c_void_p
    rc = emu.oc_emu_crop_aug(ctypes.c_int(n), p(ptrs.ctypes.data), p(sizes.ctypes.data), p(win.ctypes.data),
                             p(fl.ctypes.data), p(au.ctypes.data), ctypes.c_int(size), p(nm.ctypes.data),
                             ctypes.c_float(contrast_center), ctypes.c_int(kind), p(out_ptrs.ctypes.data))
    if rc == -1:
        raise ValueError("the launch plan refuses the batch (size or batch over the GPU limits)")
    if rc != 0:
        raise ValueError(f"invalid aug row for view {rc - 1}")
    return outs


def run_cpu_crop(ims, win, flip, aug, size, dtype="float32", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                 num_threads: int = 2, **kw):
    """Both views from fn.objcrop.crop (CPU), as float32 (bfloat16 bits widened)."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    n = len(ims)

    @pipeline_def(batch_size=n, num_threads=num_threads, device_id=None, prefetch_queue_depth=1)
    def pipe():
        im = fn.external_source(source=lambda: ims, batch=True, layout="HWC")
        w = fn.external_source(source=lambda: list(win), batch=True)
        f = fn.external_source(source=lambda: list(flip), batch=True)
        a = fn.external_source(source=lambda: list(aug), batch=True)
        return tuple(fn.objcrop.crop(im, w, f, a, size=size, dtype=dtype, mean=list(map(float, mean)),
                                     std=list(map(float, std)), **kw))

    p = pipe()
    p.build()
    outs = p.run()
    views = []
    for tl in outs:
        arr = np.stack([np.array(tl[i]) for i in range(n)])
        if dtype == "bfloat16":
            assert arr.dtype == np.uint16
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif dtype == "float16":
            assert arr.dtype == np.float16
        views.append(arr.astype(np.float32))
    assert outs[0].layout() == "CHW"
    return views
