"""Proposal methods behind one signature, and the per-image step every method shares.

A *detector* is a callable ``img (h, w, 3) uint8 BGR -> (boxes_px (N, 4), scores (N,) or None)``
returning best-first pixel boxes ``[x1, y1, x2, y2)`` of that image.  :func:`propose_image`
turns its output into the stored form: normalised, non-maximum suppressed across sizes,
top k.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .common import nms_top_k, to_normalised

METHODS = ("bing", "bing-opencv", "selective-search", "gt")
Detector = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray | None]"]


def default_model_dir() -> Path:
    """The BING model shipped with the package (trained by ``dali-objcrop train-bing``)."""
    return Path(__file__).resolve().parents[1] / "models" / "bing"


def resolve_model_dir(model_dir: str | os.PathLike | None) -> Path:
    return Path(model_dir) if model_dir else default_model_dir()


def model_digest(model_dir: str | os.PathLike, color: str = "MAXBGR") -> str:
    """sha256 over one colour model's three files (recorded in the store's params)."""
    from .bing_cv import model_files
    h = hashlib.sha256()
    for f in model_files(model_dir, color):
        h.update(f.read_bytes())
    return h.hexdigest()


def make_detector(method: str, model_dir: str | os.PathLike | None = None, color: str = "MAXBGR",
                  ss_mode: str = "fast", bing_nms_rounds: int | None = None, top_k: int | None = None,
                  nms_iou: float = 0.5) -> Detector:
    """Build a detector for ``method`` (one per process: OpenCV's BING is not thread-safe).

    Args:
        method: ``bing`` (our vectorised BING), ``bing-opencv`` (cv2.saliency reference) or
            ``selective-search`` (``gt`` needs no detector).
        model_dir: BING model folder (default: the packaged model).
        color: BING colour model.
        ss_mode: selective search strategy, ``fast`` or ``quality``.
        bing_nms_rounds: cap on our BING's per-size NMS rounds (None: exact).
        top_k, nms_iou: when given, our exact BING computes only what the final top k after
            NMS needs (:meth:`Bing.top`, the same boxes as the full list would give, faster).
    """
    if method == "bing":
        from .bing import Bing
        det = Bing.load(resolve_model_dir(model_dir), color, nms_rounds=bing_nms_rounds)
        if top_k is not None and bing_nms_rounds is None:
            return lambda img: det.top(img, top_k, nms_iou)
        return lambda img: det(img)
    if method == "bing-opencv":
        from .bing_cv import OpenCVBing
        cvdet = OpenCVBing(resolve_model_dir(model_dir), color)
        return lambda img: (cvdet(img), None)
    if method == "selective-search":
        from .selective_search import selective_search
        return lambda img: (selective_search(img, mode=ss_mode), None)
    raise ValueError(f"method must be one of {METHODS[:3]} here, got {method!r}")


def propose_image(img: np.ndarray, detector: Detector, top_k: int = 10, nms_iou: float = 0.5
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Run a detector on one image and keep its top k after NMS across sizes.

    Returns:
        ``(boxes (k, 4) float32 normalised, scores (k,) float32 or None)``, best-first.
    """
    h, w = img.shape[:2]
    boxes_px, scores = detector(img)
    keep = nms_top_k(boxes_px, iou=nms_iou, top_k=top_k)
    boxes = to_normalised(np.asarray(boxes_px)[keep], w, h)
    return boxes, (None if scores is None else np.asarray(scores, dtype=np.float32)[keep])
