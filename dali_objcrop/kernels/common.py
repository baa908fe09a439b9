"""What the CUDA kernel, its CPU test build and the Python wrappers share.

The kernel sources are found in the source checkout (``<repo>/csrc``) or, in an
installed package, in ``dali_objcrop/kernels/csrc`` (``setup.py`` copies
``csrc/*.cu`` and ``*.h`` there at build time, so there is one copy in git and
no symlink).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ..windows import CropConfig

KERNEL_FILE = "objcrop_kernel.cu"
CORE_FILE = "objcrop_core.h"

# view kinds and the parameter block: must equal the OC_KIND_* / OC_P_* macros of objcrop_core.h
KIND_CODES = {"scene": 0, "box": 1, "dilated": 2, "shifted": 3}
PARAM_NAMES = ("kind0", "kind1", "uses_boxes", "scale_lo", "scale_hi", "box_lo", "box_hi", "log_r0", "log_r1",
               "ratio0", "ratio1", "dilate", "shift_r0", "shift_r1", "min_box", "top_k", "num_tries", "flip_p")


def csrc_dir() -> Path:
    """The folder holding ``objcrop_kernel.cu`` and ``objcrop_core.h``.

    Raises:
        FileNotFoundError: neither the packaged copy nor the checkout's ``csrc/`` exists.
    """
    here = Path(__file__).resolve().parent
    for d in (here / "csrc", here.parents[1] / "csrc"):
        if (d / KERNEL_FILE).is_file() and (d / CORE_FILE).is_file():
            return d
    raise FileNotFoundError(f"CUDA sources not found in {here / 'csrc'} nor {here.parents[1] / 'csrc'}; "
                            "reinstall dali_objcrop or run from a source checkout")


def inline_includes(text: str, folder: Path) -> str:
    """Replace ``#include "x.h"`` lines by the file's text (one level, local headers only)."""
    def repl(m: re.Match) -> str:
        return (folder / m.group(1)).read_text()
    return re.sub(r'^#include "([^"]+)"\s*$', repl, text, flags=re.MULTILINE)


def kernel_source() -> str:
    """The self-contained CUDA source NVRTC compiles (the header inlined).

    Inlining means no include path for NVRTC and a CuPy cache key that changes
    when the header does.
    """
    d = csrc_dir()
    return inline_includes((d / KERNEL_FILE).read_text(), d)


def kernel_params(config: CropConfig) -> np.ndarray:
    """The (18,) float64 parameter block of ``config`` (layout: :data:`PARAM_NAMES`).

    ``log_r0``/``log_r1`` are computed here with :func:`math.log`, exactly as
    ``windows.random_resized_crop`` does, so the kernel needs no ``log``.
    """
    kinds = config.view_kinds
    box_lo, box_hi = config.box_scale if config.box_scale is not None else (1.0, 1.0)
    values = {
        "kind0": KIND_CODES[kinds[0]], "kind1": KIND_CODES[kinds[1]], "uses_boxes": float(config.uses_boxes),
        "scale_lo": config.scale[0], "scale_hi": config.scale[1], "box_lo": box_lo, "box_hi": box_hi,
        "log_r0": math.log(config.ratio[0]), "log_r1": math.log(config.ratio[1]),
        "ratio0": config.ratio[0], "ratio1": config.ratio[1], "dilate": config.effective_dilate,
        "shift_r0": config.shift_range[0], "shift_r1": config.shift_range[1],
        "min_box": config.min_box_size, "top_k": config.top_k, "num_tries": config.num_tries,
        "flip_p": config.flip_p,
    }
    return np.array([float(values[k]) for k in PARAM_NAMES], dtype=np.float64)


def norm_params(mean, std) -> np.ndarray:
    """(6,) float32 ``mean[3], 1/std[3]`` in pixel units (0..255), as DALI's ``crop_mirror_normalize``.

    Raises:
        ValueError: not three values each, or a non-positive std.
    """
    mean = np.broadcast_to(np.asarray(mean, dtype=np.float64), (3,)) if np.ndim(mean) == 0 else np.asarray(mean, np.float64)
    std = np.broadcast_to(np.asarray(std, dtype=np.float64), (3,)) if np.ndim(std) == 0 else np.asarray(std, np.float64)
    if mean.shape != (3,) or std.shape != (3,):
        raise ValueError(f"mean and std need 3 values (RGB), got {mean!r} and {std!r}")
    if not (std > 0).all():
        raise ValueError(f"std must be positive, got {std!r}")
    return np.concatenate([mean, 1.0 / std]).astype(np.float32)


def check_batch_arrays(sizes, boxes, offsets, index) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Host copies of the batch description in the kernel's dtypes, validated like ``sample_windows``.

    Returns:
        ``sizes`` (N, 2) int32, ``boxes`` (M, 4) float32, ``offsets`` (N + 1,) int64, ``index`` (N,) int64.
    """
    sizes = np.ascontiguousarray(sizes, dtype=np.int32).reshape(-1, 2)
    index = np.ascontiguousarray(index, dtype=np.int64).reshape(-1)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64).reshape(-1)
    boxes = np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4)
    n = len(index)
    if sizes.shape != (n, 2) or offsets.shape != (n + 1,):
        raise ValueError(f"sizes must be ({n}, 2) and offsets ({n + 1},), got {sizes.shape} and {offsets.shape}")
    if n and sizes.min() < 1:
        raise ValueError(f"image sizes must be >= 1 pixel, got min {sizes.min()}")
    if n and index.min() < 0:
        raise ValueError(f"sample indices must be non-negative, got min {index.min()}")
    if n and (offsets[0] != 0 or offsets[-1] > len(boxes) or (np.diff(offsets) < 0).any()):
        raise ValueError(f"offsets must rise from 0 to at most {len(boxes)} boxes, got {offsets[:3]}...{offsets[-3:]}")
    return sizes, boxes, offsets, index
