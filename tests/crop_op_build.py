"""Test helper: build and load the objcrop__Crop DALI operator (CPU backend) for the tests.

Uses ``dali_objcrop.plugin.build.library_path`` when the package has it (the plugin's own build);
otherwise compiles ``csrc/dali/*.cc`` here with g++ and ``nvidia.dali.sysconfig`` flags into
``$DALI_OBJCROP_HOME/test-crop/<sha of sources + flags>/`` (default ``~/.cache/dali_objcrop``), so a
second test session on the same sources does not compile again (the 2-core machine is slow).
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DALI_SRC = REPO / "csrc" / "dali"


def cuda_include() -> str | None:
    """A folder with ``cuda_runtime.h`` (DALI's headers include it even for CPU code)."""
    cands = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return str(Path(c) / "include")
    try:
        import nvidia.cu13 as cu  # pip CUDA headers
        inc = Path(list(cu.__path__)[0]) / "include"
        if (inc / "cuda_runtime.h").is_file():
            return str(inc)
    except ImportError:
        pass
    return None


def dali_flags() -> tuple[list[str], list[str]]:
    import nvidia.dali.sysconfig as sc
    return list(sc.get_compile_flags()), list(sc.get_link_flags())


def _sources() -> list[Path]:
    return sorted(DALI_SRC.glob("*.cc")) + sorted(DALI_SRC.glob("*.h")) + [REPO / "csrc" / "objcrop_core.h"]


@functools.lru_cache(maxsize=None)
def crop_op_library() -> Path:
    """Path of a shared library that registers objcrop__Crop (built here if needed)."""
    try:
        from dali_objcrop.plugin import build as plugin_build  # the plugin helper's build, once it exists
        return Path(plugin_build.library_path(cuda=False))
    except ImportError:
        pass
    cflags, lflags = dali_flags()
    inc = cuda_include()
    if inc is None:
        raise RuntimeError("cuda_runtime.h not found (DALI's headers need it); set CUDA_HOME")
    cmd_flags = ["-std=c++20", "-O2", "-fPIC", "-shared", f"-I{inc}", *cflags]
    h = hashlib.sha256()
    for f in _sources():
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(" ".join(cmd_flags + lflags).encode())
    import nvidia.dali as dali
    h.update(dali.__version__.encode())
    home = Path(os.environ.get("DALI_OBJCROP_HOME", Path.home() / ".cache" / "dali_objcrop"))
    out_dir = home / "test-crop" / h.hexdigest()[:16]
    lib = out_dir / "libdali_objcrop_crop.so"
    if not lib.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f"tmp-{os.getpid()}.so"
        srcs = [str(s) for s in sorted(DALI_SRC.glob("*.cc"))]
        res = subprocess.run(["g++", *cmd_flags, *srcs, "-o", str(tmp), *lflags], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"g++ failed on {srcs}:\n{res.stderr[-4000:]}")
        os.replace(tmp, lib)  # atomic: a concurrent session sees the whole file or none
    return lib


@functools.lru_cache(maxsize=None)
def load_crop_op() -> Path:
    """Build (if needed) and load the operator into DALI; returns the library path."""
    from nvidia.dali import plugin_manager
    lib = crop_op_library()
    plugin_manager.load_library(str(lib))
    return lib


@functools.lru_cache(maxsize=None)
def load_gpu_emulator():
    """ctypes handle of csrc/objcrop_crop_emulate.cpp (the GPU kernels run serially on the CPU), cached."""
    import ctypes
    src = REPO / "csrc" / "objcrop_crop_emulate.cpp"
    deps = [src, DALI_SRC / "objcrop_crop_kernels.h", DALI_SRC / "objcrop_augment.h", REPO / "csrc" / "objcrop_core.h"]
    h = hashlib.sha256(b"".join(d.read_bytes() for d in deps)).hexdigest()[:16]
    home = Path(os.environ.get("DALI_OBJCROP_HOME", Path.home() / ".cache" / "dali_objcrop"))
    lib = home / "test-crop" / f"emu-{h}" / "liboc_crop_emu.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.parent / f"tmp-{os.getpid()}.so"
        res = subprocess.run(["g++", "-std=c++17", "-O2", "-fPIC", "-shared", str(src), "-o", str(tmp)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"g++ failed on {src}:\n{res.stderr[-4000:]}")
        os.replace(tmp, lib)
    return ctypes.CDLL(str(lib))


def emulate_gpu_crop(ims, windows, flips, aug, size: int, norm, kind: int, contrast_center: float = 128.0,
                     row_threads: int = 128, col_threads: int = 256):
    """Both views as the GPU backend's kernels compute them (emulated): two (N, 3, S, S) arrays, float32
    for kind 0, uint16 bit patterns for 1 (float16) / 2 (bfloat16)."""
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
                             ctypes.c_float(contrast_center), ctypes.c_int(kind), p(out_ptrs.ctypes.data),
                             ctypes.c_int(row_threads), ctypes.c_int(col_threads))
    if rc != 0:
        raise ValueError(f"invalid aug row for view {rc - 1}")
    return outs
