"""Selective search proposals (``cv2.ximgproc.segmentation``), a slow alternative to BING
(~1.7-2 s per 640x480 image in fast mode; SoCo's choice of proposals)."""
from __future__ import annotations

import ctypes

import numpy as np

from .common import check_bgr_u8


def selective_search(img: np.ndarray, mode: str = "fast", max_boxes: int = 2000) -> np.ndarray:
    """Selective-search boxes of a uint8 BGR image in OpenCV's ranking order.

    Args:
        img: (h, w, 3) uint8 BGR.
        mode: ``fast`` or ``quality`` (OpenCV's two strategies).
        max_boxes: keep at most this many (the ranking is hierarchical, best-first).

    Returns:
        (N, 4) int32 pixel boxes ``[x1, y1, x2, y2)``.
    """
    import cv2
    if mode not in ("fast", "quality"):
        raise ValueError(f"mode must be 'fast' or 'quality', got {mode!r}")
    img = check_bgr_u8(img)
    # OpenCV ranks regions by level * rand(): seed C's rand() so that every image's order is
    # reproducible (a resumed run must equal an uninterrupted one); cv2.setRNGSeed has no effect
    ctypes.CDLL(None).srand(0)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(img)
    (ss.switchToSelectiveSearchFast if mode == "fast" else ss.switchToSelectiveSearchQuality)()
    rects = np.asarray(ss.process(), dtype=np.int32).reshape(-1, 4)[:max_boxes]  # x, y, w, h
    rects[:, 2:] += rects[:, :2]
    return rects
