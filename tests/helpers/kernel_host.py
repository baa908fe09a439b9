"""Test harness: the CUDA kernel's body (``csrc/objcrop_core.h``) compiled for the CPU with g++, through ctypes.

For tests on machines without a GPU: the functions here run exactly the
arithmetic of the CUDA kernels (the same source text), serially.  Not a
production backend (no threads, no SIMD), so it lives with the tests: the
wrappers are ``tests/helpers/csrc/objcrop_host.cpp`` (the core's functions, looped)
and ``tests/helpers/csrc/objcrop_emulate.cpp`` (the CUDA kernels themselves, run
block by block), compiled against the package's ``csrc/``.

    lib = load_host_library()          # compiles once per source hash into a cache folder
    out = host_windows(lib, sizes, boxes, offsets, index, seed, epoch, config)
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from dali_objcrop.kernels.common import check_batch_arrays, csrc_dir, kernel_params, norm_params
from dali_objcrop.kernels.cupy_backend import _BLOCK, _grid
from dali_objcrop.windows import CropConfig

HARNESS_DIR = Path(__file__).resolve().parent / "csrc"
HOST_FILE = "objcrop_host.cpp"
EMULATE_FILE = "objcrop_emulate.cpp"

_P = ctypes.c_void_p
_SIGNATURES = {
    "oc_host_windows": [_P, _P, _P, _P, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, _P, _P, _P, _P, _P, _P, _P],
    "oc_host_crop_f32": [_P, _P, _P, _P, _P, ctypes.c_uint64, ctypes.c_uint64, _P, _P, ctypes.c_int, _P, _P, _P, _P,
                         ctypes.c_int],
    "oc_host_apply_u8": [_P, _P, _P, _P, ctypes.c_int, _P, _P, ctypes.c_int],
    "oc_host_to_f16": [_P, _P, ctypes.c_longlong],
    "oc_host_to_bf16": [_P, _P, ctypes.c_longlong],
}
_I, _U64 = ctypes.c_int, ctypes.c_uint64
_EMU_SIGNATURES = {
    "oc_emu_windows": [_I, _I, _P, _P, _P, _P, _I, _U64, _U64, _P, _P, _P, _P, _P, _P, _P],
    "oc_emu_crop": [_I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _U64, _U64, _P, _P, _I, _P, _P, _P, _P],
    "oc_emu_apply": [_I, _I, _I, _I, _I, _P, _P, _P, _P, _I, _P, _P],
}


def compiler() -> str | None:
    """The C++ compiler used for the host build (``$CXX`` or g++), None if absent."""
    return shutil.which(os.environ.get("CXX", "g++"))


def _build(source: str, build_dir, signatures: dict) -> ctypes.CDLL:
    """Compile ``tests/helpers/csrc/<source>`` against ``csrc/`` into a shared library (cached by the hash of every
    source file) and load it."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set $CXX or install g++)")
    src = csrc_dir()
    h = hashlib.sha256(source.encode())
    for f in sorted(src.glob("*")) + [HARNESS_DIR / source]:
        if f.suffix in (".h", ".cu", ".cpp"):
            h.update(f.name.encode() + f.read_bytes())
    out_dir = Path(build_dir) if build_dir else Path(tempfile.gettempdir()) / f"dali_objcrop_host_{os.getuid()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib_path = out_dir / f"lib{Path(source).stem}_{h.hexdigest()[:16]}.so"
    if not lib_path.exists():
        tmp = lib_path.with_suffix(f".{os.getpid()}.tmp")
        # -ffp-contract=off: no FMA contraction, as the device code (__dmul_rn/__dadd_rn) and NumPy
        cmd = [cxx, "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", f"-I{src}", "-o", str(tmp),
               str(HARNESS_DIR / source)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"host build failed: {' '.join(cmd)}\n{res.stderr}")
        os.replace(tmp, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    for name, argtypes in signatures.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    return lib


def load_host_library(build_dir: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Compile ``tests/helpers/csrc/objcrop_host.cpp`` (``-O2 -ffp-contract=off``) and load it.

    Args:
        build_dir: where to put the library (default: a per-user temp folder);
            the file name carries the sources' hash, so edits rebuild.

    Raises:
        RuntimeError: no compiler, or the compilation failed (with its output).
    """
    return _build(HOST_FILE, build_dir, _SIGNATURES)


def load_emulator(build_dir: str | os.PathLike | None = None) -> ctypes.CDLL:
    """Compile ``tests/helpers/csrc/objcrop_emulate.cpp``: the CUDA kernels themselves, run serially on the CPU.

    Use with :func:`emulate_crop_views` / :func:`emulate_windows` / :func:`emulate_apply`,
    which launch them with the grid of :mod:`dali_objcrop.kernels.cupy_backend`.
    """
    return _build(EMULATE_FILE, build_dir, _EMU_SIGNATURES)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


# Output arrays of the windows kernel, in the order its C signature takes them (flags as uint8 there).
_WINDOW_FIELDS = ("windows", "regions", "flip", "box_index", "fallback", "shift")


def _window_outputs(n: int) -> dict[str, np.ndarray]:
    return {"windows": np.zeros((n, 2, 4), np.int32), "regions": np.zeros((n, 2, 4), np.int32),
            "flip": np.zeros((n, 2), np.uint8), "box_index": np.zeros(n, np.int32),
            "fallback": np.zeros(n, np.uint8), "shift": np.zeros((n, 2), np.int32)}


def _as_bools(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out["flip"] = out["flip"].astype(bool)
    out["fallback"] = out["fallback"].astype(bool)
    return out


def host_windows(lib: ctypes.CDLL, sizes, boxes, offsets, index, seed: int, epoch: int,
                 config: CropConfig) -> dict[str, np.ndarray]:
    """The windows kernel on the CPU.

    Returns:
        dict with ``windows`` (N, 2, 4) int32, ``regions`` (N, 2, 4) int32, ``flip`` (N, 2) bool,
        ``box_index`` (N,) int32, ``fallback`` (N,) bool, ``shift`` (N, 2) int32.
    """
    sizes, boxes, offsets, index = check_batch_arrays(sizes, boxes, offsets, index)
    n = len(index)
    out = _window_outputs(n)
    params = kernel_params(config)
    lib.oc_host_windows(_ptr(sizes), _ptr(boxes), _ptr(offsets), _ptr(index), n, seed, epoch, _ptr(params),
                        *(_ptr(out[k]) for k in _WINDOW_FIELDS))
    return _as_bools(out)


def _image_pointers(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    ims = [np.ascontiguousarray(im, dtype=np.uint8) for im in images]
    for im in ims:
        if im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f"images must be HWC RGB uint8, got shape {im.shape}")
    sizes = np.array([[im.shape[1], im.shape[0]] for im in ims], dtype=np.int32).reshape(-1, 2)
    return np.array([im.ctypes.data for im in ims], dtype=np.uint64), sizes, ims


def host_crop_views(lib: ctypes.CDLL, images: list[np.ndarray], boxes, offsets, index, seed: int, epoch: int,
                    config: CropConfig, size: int, mean=0.0, std=1.0) -> dict[str, np.ndarray]:
    """The fused crop kernel (float32 output) on the CPU.

    Returns:
        dict with ``view0``, ``view1`` (N, 3, size, size) float32, ``windows`` (N, 2, 4) int32,
        ``flip`` (N, 2) bool.
    """
    ptrs, sizes, keep = _image_pointers(images)
    sizes, boxes, offsets, index = check_batch_arrays(sizes, boxes, offsets, index)
    n = len(index)
    out0 = np.zeros((n, 3, size, size), np.float32)
    out1 = np.zeros_like(out0)
    win = np.zeros((n, 2, 4), np.int32)
    flip = np.zeros((n, 2), np.uint8)
    params, norm = kernel_params(config), norm_params(mean, std)
    lib.oc_host_crop_f32(_ptr(ptrs), _ptr(sizes), _ptr(boxes), _ptr(offsets), _ptr(index), seed, epoch,
                         _ptr(params), _ptr(norm), size, _ptr(out0), _ptr(out1), _ptr(win), _ptr(flip), n)
    del keep
    return {"view0": out0, "view1": out1, "windows": win, "flip": flip.astype(bool)}


def host_apply_u8(lib: ctypes.CDLL, images: list[np.ndarray], windows, flip, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The given-windows uint8 kernel on the CPU: two (N, size, size, 3) uint8 batches."""
    ptrs, sizes, keep = _image_pointers(images)
    n = len(ptrs)
    windows = np.ascontiguousarray(windows, dtype=np.int32).reshape(n, 2, 4)
    flip = np.ascontiguousarray(flip, dtype=np.uint8).reshape(n, 2)
    out0 = np.zeros((n, size, size, 3), np.uint8)
    out1 = np.zeros_like(out0)
    lib.oc_host_apply_u8(_ptr(ptrs), _ptr(sizes), _ptr(windows), _ptr(flip), size, _ptr(out0), _ptr(out1), n)
    del keep
    return out0, out1


def host_to_f16_bits(lib: ctypes.CDLL, x: np.ndarray) -> np.ndarray:
    """The kernel's float32 -> fp16 conversion (uint16 bit patterns)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.zeros(x.shape, np.uint16)
    lib.oc_host_to_f16(_ptr(x), _ptr(y), x.size)
    return y


def host_to_bf16_bits(lib: ctypes.CDLL, x: np.ndarray) -> np.ndarray:
    """The kernel's float32 -> bf16 conversion (uint16 bit patterns)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.zeros(x.shape, np.uint16)
    lib.oc_host_to_bf16(_ptr(x), _ptr(y), x.size)
    return y


# ---- the CUDA kernels, emulated (grid and block as cupy_backend launches them) --------------------
def emulate_windows(lib: ctypes.CDLL, sizes, boxes, offsets, index, seed: int, epoch: int,
                    config: CropConfig) -> dict[str, np.ndarray]:
    """The ``objcrop_windows`` kernel run on the CPU (same outputs as :func:`host_windows`)."""
    sizes, boxes, offsets, index = check_batch_arrays(sizes, boxes, offsets, index)
    n = len(index)
    out = _window_outputs(n)
    params = kernel_params(config)
    block = 128  # as cupy_backend.windows_gpu
    lib.oc_emu_windows(-(-n // block), block, _ptr(sizes), _ptr(boxes), _ptr(offsets), _ptr(index), n, seed, epoch,
                       _ptr(params),
                       *(_ptr(out[k]) for k in _WINDOW_FIELDS))
    return _as_bools(out)


def emulate_crop_views(lib: ctypes.CDLL, images: list[np.ndarray], boxes, offsets, index, seed: int, epoch: int,
                       config: CropConfig, size: int, mean=0.0, std=1.0, dtype: str = "float32") -> dict:
    """The fused ``objcrop_crop_*`` kernel run on the CPU with cupy_backend's grid and block.

    Returns:
        dict with ``view0``, ``view1`` (N, 3, size, size) float32 / float16 / uint16 (bfloat16 bits),
        ``windows`` (N, 2, 4) int32, ``flip`` (N, 2) bool.
    """
    kind = {"float32": 0, "float16": 1, "bfloat16": 2}[dtype]
    ptrs, sizes, keep = _image_pointers(images)
    sizes, boxes, offsets, index = check_batch_arrays(sizes, boxes, offsets, index)
    boxes = boxes if len(boxes) else np.zeros((1, 4), np.float32)
    n = len(index)
    dt = (np.float32, np.float16, np.uint16)[kind]
    out0 = np.full((n, 3, size, size), 7, dt)   # a fill the kernel must overwrite everywhere
    out1 = np.full_like(out0, 7)
    win = np.full((n, 2, 4), -1, np.int32)
    flip = np.full((n, 2), 9, np.uint8)
    params, norm = kernel_params(config), norm_params(mean, std)
    if n:
        gx, gy, gz = _grid(size, n)
        lib.oc_emu_crop(kind, gx, gy, gz, _BLOCK, _ptr(ptrs), _ptr(sizes), _ptr(boxes), _ptr(offsets), _ptr(index),
                        seed, epoch, _ptr(params), _ptr(norm), size, _ptr(out0), _ptr(out1), _ptr(win), _ptr(flip))
    del keep
    return {"view0": out0, "view1": out1, "windows": win, "flip": flip.astype(bool)}


def emulate_apply(lib: ctypes.CDLL, images: list[np.ndarray], windows, flip, size: int, dtype: str = "uint8"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The ``objcrop_apply_{u8,f32}`` kernels run on the CPU with cupy_backend's grid and block:
    two (N, size, size, 3) uint8 or float32 batches."""
    kind = {"uint8": 0, "float32": 1}[dtype]
    ptrs, sizes, keep = _image_pointers(images)
    n = len(ptrs)
    windows = np.ascontiguousarray(windows, dtype=np.int32).reshape(n, 2, 4)
    flip = np.ascontiguousarray(flip, dtype=np.uint8).reshape(n, 2)
    out0 = np.full((n, size, size, 3), 7, (np.uint8, np.float32)[kind])
    out1 = np.full_like(out0, 7)
    if n:
        gx, gy, gz = _grid(size, n)
        lib.oc_emu_apply(kind, gx, gy, gz, _BLOCK, _ptr(ptrs), _ptr(sizes), _ptr(windows), _ptr(flip), size,
                         _ptr(out0), _ptr(out1))
    del keep
    return out0, out1
