"""Shared pieces of every proposal method: fast decoding at proposal resolution, box IoU,
non-maximum suppression across sizes before the top k.

Every method sees the same input: the image decoded (at a reduced JPEG scale where the
photo is much larger than needed) and downscaled so that its long side is at most
``PROPOSAL_MAX_SIDE`` (512) pixels.  BING's windows span 16..512 px, so larger inputs only
cost time (~3x) and give no better boxes.  Because boxes are stored normalised, the
downscale needs no undoing: a pixel box of the small image divided by the small image's
size is the same normalised box in the original.
"""
from __future__ import annotations

import os

import cv2
import numpy as np

PROPOSAL_MAX_SIDE = 512
# The project's orientation policy: every image is used in its stored pixel grid, EXIF
# orientation ignored (as DALI's decoders with adjust_orientation=False and PIL's header
# sizes), so boxes computed here are in the pixels the loader crops.
IGNORE_ORIENTATION = cv2.IMREAD_IGNORE_ORIENTATION
IMREAD_FLAG = cv2.IMREAD_COLOR | IGNORE_ORIENTATION
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def decode_flag(size: tuple[int, int] | None, max_side: int = PROPOSAL_MAX_SIDE) -> int:
    """The imdecode flag for an image of ``size`` (width, height): the largest JPEG
    reduction 1/r that still leaves the long side >= ``max_side`` (IMREAD_COLOR if none),
    always with ``IMREAD_IGNORE_ORIENTATION`` (stored pixel grid)."""
    if size is None:
        return IMREAD_FLAG
    long_side = max(int(size[0]), int(size[1]))
    for r, flag in _REDUCED:
        if long_side // r >= max_side:
            return flag | IGNORE_ORIENTATION
    return IMREAD_FLAG


def decode_bgr(path: str | os.PathLike) -> np.ndarray:
    """Full-resolution uint8 BGR pixels of an image file in its stored grid (EXIF orientation
    ignored, the project's policy); ``OSError`` naming the file if it cannot be decoded."""
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, IMREAD_FLAG) if data.size else None
    if img is None:
        raise OSError(f"cannot decode {path}")
    return img


def resize_long_side(img: np.ndarray, max_side: int = PROPOSAL_MAX_SIDE) -> np.ndarray:
    """Downscale (INTER_AREA) so that the long side is at most ``max_side``; never upscale."""
    if max_side <= 0:
        raise ValueError(f"max_side must be positive, got {max_side}")
    h, w = img.shape[:2]
    s = max_side / max(h, w)
    if s >= 1.0:
        return img
    size = (max(1, int(round(w * s))), max(1, int(round(h * s))))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def load_for_proposals(path: str | os.PathLike, size: tuple[int, int] | None = None,
                       max_side: int = PROPOSAL_MAX_SIDE) -> np.ndarray:
    """Decode an image as uint8 3-channel BGR with its long side at most ``max_side``.

    Args:
        path: image file.
        size: its (width, height) if known (from the image index); enables reduced-size
            JPEG decoding (1/2, 1/4, 1/8) for photos much larger than ``max_side``.
        max_side: long-side limit (0 or negative: no downscale is not allowed; use a big value).

    Returns:
        (h, w, 3) uint8 BGR, contiguous.

    Raises:
        ValueError: the file cannot be decoded (named in the message).
    """
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise ValueError(f"{path}: empty file")
    img = cv2.imdecode(data, decode_flag(size, max_side))
    if img is None:
        raise ValueError(f"{path}: cannot decode image")
    if img.ndim == 2:  # defensive: IMREAD_COLOR already gives 3 channels
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(resize_long_side(img, max_side))


def check_bgr_u8(img: np.ndarray) -> np.ndarray:
    """BING accepts any Mat silently and returns garbage for non-uint8 or non-3-channel input:
    fail early instead."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) BGR image, got dtype {img.dtype} shape {img.shape}")
    if img.shape[0] < 2 or img.shape[1] < 2:
        raise ValueError(f"image too small for proposals: {img.shape[1]}x{img.shape[0]}")
    return np.ascontiguousarray(img)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of ``[x1, y1, x2, y2]`` boxes (exclusive right/bottom)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms_top_k(boxes: np.ndarray, iou: float = 0.5, top_k: int | None = 10, block: int = 64) -> np.ndarray:
    """Greedy non-maximum suppression over best-first boxes; stops at ``top_k`` kept.

    A box is dropped when its IoU with an already kept box exceeds ``iou`` (``iou >= 1``
    keeps everything).  Works on blocks of ``block`` candidates, so the usual case (the
    top k found among the first few dozen of thousands of BING boxes) costs one small
    IoU matrix.

    Returns:
        int64 indices of the kept boxes, in input order.
    """
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou must be in (0, 1], got {iou}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(boxes)
    limit = n if top_k is None else top_k
    if iou >= 1.0:
        return np.arange(min(n, limit), dtype=np.int64)
    kept: list[int] = []
    start = 0
    while start < n and len(kept) < limit:
        stop = min(n, start + block) if top_k is not None else n
        cand = boxes[start:stop]
        sup = np.zeros(len(cand), dtype=bool)
        if kept:  # suppression by boxes kept in earlier blocks
            sup |= (box_iou(boxes[kept], cand) > iou).any(axis=0)
        m = box_iou(cand, cand) > iou
        for i in range(len(cand)):
            if sup[i]:
                continue
            kept.append(start + i)
            if len(kept) >= limit:
                break
            sup |= m[i]
        start = stop
    return np.asarray(kept, dtype=np.int64)


def to_normalised(boxes_px: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel boxes ``[x1, y1, x2, y2)`` of a ``width`` x ``height`` image -> float32 normalised."""
    b = np.asarray(boxes_px, dtype=np.float64).reshape(-1, 4)
    return (b / np.array([width, height, width, height], dtype=np.float64)).astype(np.float32)
