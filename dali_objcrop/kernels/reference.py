"""NumPy reference of the fused crop kernel's resampling (``csrc/objcrop_core.h``).

The kernel cuts each view's window ``[x1, y1, x2, y2)`` out of an HWC uint8
image and resizes it to ``size`` x ``size`` with a separable triangle filter:
for output coordinate ``o`` the source centre is
``c = lo + (o + 0.5) * scale - 0.5`` with ``scale = (hi - lo) / size``, the
filter radius is ``support = max(scale, 1)`` (plain bilinear when enlarging,
antialiasing over the whole footprint when shrinking, like PIL's BILINEAR),
taps are the window's pixels ``t`` with weight ``max(0, 1 - |t - c| / support)``
(crop-then-resize: nothing outside the window leaks in) and the weights are
normalised.  A horizontal flip mirrors the output columns.  Normalisation is
``(value - mean) / std`` in pixel units (0..255), as DALI's
``crop_mirror_normalize``.

Here the same float32 weights are built as (size, window) matrices and applied
with two float64 matrix products per image (vectorised over pixels), so the
kernel (float32 accumulation) must match within far less than 1/255.
"""
from __future__ import annotations

import numpy as np

from ..windows import CropConfig, sample_windows
from .common import norm_params


def axis_weights(lo: int, hi: int, size: int, flip: bool = False) -> np.ndarray:
    """(size, hi - lo) float32 filter matrix of one axis (rows sum to 1).

    Args:
        lo, hi: the window ``[lo, hi)`` on this axis, in pixels.
        size: output length.
        flip: mirror the output (row ``o`` uses the centre of ``size - 1 - o``).
    """
    if not (hi > lo and size > 0):
        raise ValueError(f"need hi > lo and size > 0, got lo={lo}, hi={hi}, size={size}")
    f32 = np.float32
    scale = f32(hi - lo) / f32(size)
    support = max(scale, f32(1.0))
    inv = f32(1.0) / support
    o = np.arange(size, dtype=f32)
    if flip:
        o = o[::-1]
    c = f32(lo) + (o + f32(0.5)) * scale - f32(0.5)                 # (size,) float32, as the kernel
    t = np.arange(lo, hi, dtype=f32)
    w = np.maximum(f32(1.0) - np.abs(t[None, :] - c[:, None]) * inv, f32(0.0))
    s = w.sum(axis=1, keepdims=True, dtype=np.float64)
    return (w / np.where(s > 0, s, 1.0)).astype(np.float32)


def resample_window(image: np.ndarray, window, flip: bool, size: int) -> np.ndarray:
    """One view: (3, size, size) float64 in pixel units (0..255) of ``image[window]``.

    Args:
        image: (H, W, 3) uint8.
        window: ``[x1, y1, x2, y2)`` ints inside the image.
        flip: horizontal flip.
        size: output side.
    """
    x1, y1, x2, y2 = (int(v) for v in window)
    h, w = image.shape[:2]
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise ValueError(f"window {window!r} is not inside a {w}x{h} image")
    wy = axis_weights(y1, y2, size).astype(np.float64)              # (S, wh)
    wx = axis_weights(x1, x2, size, flip).astype(np.float64)        # (S, ww)
    crop = image[y1:y2, x1:x2].astype(np.float64)                   # (wh, ww, 3)
    return np.einsum("yh,hwc,xw->cyx", wy, crop, wx, optimize=True)


def apply_windows(images: list[np.ndarray], windows: np.ndarray, flip: np.ndarray, size: int,
                  mean=0.0, std=1.0) -> tuple[np.ndarray, np.ndarray]:
    """Both views of a batch from given windows: two (N, 3, size, size) float32, normalised."""
    norm = norm_params(mean, std).astype(np.float64)
    mean_c, inv_c = norm[:3, None, None], norm[3:, None, None]
    views = []
    for v in (0, 1):
        out = np.zeros((len(images), 3, size, size), np.float32)
        for i, im in enumerate(images):
            out[i] = (resample_window(im, windows[i, v], bool(flip[i, v]), size) - mean_c) * inv_c
        views.append(out)
    return views[0], views[1]


def crop_views_reference(images: list[np.ndarray], boxes, offsets, index, seed: int, epoch: int,
                         config: CropConfig, size: int = 224, mean=0.0, std=1.0):
    """What the fused kernel computes, in NumPy: windows from ``windows.sample_windows``, then resampling.

    Args:
        images: N HWC uint8 RGB arrays (their shapes give the sizes).
        boxes, offsets, index, seed, epoch, config: as :func:`~dali_objcrop.sample_windows`.
        size: output side.
        mean, std: per-channel normalisation in pixel units (scalars broadcast).

    Returns:
        ``(view0, view1, crop_windows)``: two (N, 3, size, size) float32 and the
        :class:`~dali_objcrop.CropWindows`.
    """
    sizes = np.array([[im.shape[1], im.shape[0]] for im in images], dtype=np.int64).reshape(-1, 2)
    cw = sample_windows(sizes, boxes, offsets, index, seed, epoch, config)
    v0, v1 = apply_windows(images, cw.windows, cw.flip, size, mean, std)
    return v0, v1, cw
