"""BING training (Cheng et al., CVPR 2014), two stages, with NumPy and scikit-learn's liblinear.

Stage I learns one 8x8 linear filter on normed-gradient windows: positives are the windows
of the quantised sizes (w, h in 16..512, powers of two) that overlap a ground-truth box
with IoU >= 0.5 (and their mirror images), negatives random windows overlapping no box by
0.5 or more; a linear SVM (L1-regularised, squared hinge: liblinear's L1R_L2LOSS_SVC, as
the original) separates them.  Sizes that received at least ``min_size_count`` positives
become the model's active sizes.  Stage II runs stage I (with per-size NMS) on the
training images and, per size, fits a 1-D linear SVM on the window score (object or not,
IoU >= 0.5), giving the calibration ``score * a + b`` that makes sizes comparable.

Unlike the original, features are read from the same resized-image gradient maps that
inference uses (the window at the grid position nearest the box), so training sees
exactly what inference scores.  The output is the three ``ObjNessB2W8<color>.*.yml.gz``
files that ``cv2.saliency.ObjectnessBING`` and :class:`~dali_objcrop.proposals.bing.Bing` load.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from ..dataset import load_coco
from .bing import BASE, MAX_T, MIN_T, NUM_T, W, Bing, BingModel, normed_gradient, size_of
from .common import PROPOSAL_MAX_SIDE, box_iou, load_for_proposals


@dataclass(frozen=True)
class TrainConfig:
    """BING training parameters (defaults follow the original where it states them)."""

    color: str = "MAXBGR"
    max_images: int | None = None       # use the first N images of the annotation file
    negatives_per_image: int = 100
    c_stage1: float = 10.0
    c_stage2: float = 100.0
    min_size_count: int = 50            # positives needed for a size to be active
    stage2_per_size: int = 100          # windows per size scored for stage II
    max_side: int = PROPOSAL_MAX_SIDE
    seed: int = 0


def _image_data(coco, images_dir: Path, limit: int | None, max_side: int):
    """Yield ``(small BGR image, gt boxes in its pixels (g, 4) [x1, y1, x2, y2))``."""
    ims = coco.images[:limit] if limit else coco.images
    for im in ims:
        anns = [a for a in coco.anns_by_image.get(im["id"], []) if not a.get("iscrowd", 0)]
        try:
            img = load_for_proposals(images_dir / im["file_name"], (im["width"], im["height"]), max_side)
        except (ValueError, OSError):
            continue
        sx, sy = img.shape[1] / im["width"], img.shape[0] / im["height"]
        b = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        b[:, 2:] += b[:, :2]
        yield img, b * np.array([sx, sy, sx, sy])


def _size_maps(img: np.ndarray, color: str):
    """Per quantised size: (r, width, height, full-precision gradient map of the resized image).

    The same resize and window geometry as inference (:meth:`Bing.raw`)."""
    ih, iw = img.shape[:2]
    for r in range(NUM_T * NUM_T):
        width, height = size_of(r)
        if height > ih * BASE or width > iw * BASE:
            continue
        height, width = min(height, ih), min(width, iw)
        size = (int(round(W * iw / width)), int(round(W * ih / height)))
        im = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR_EXACT)
        yield r, width, height, normed_gradient(im, color)


def _window_box(x: np.ndarray, y: np.ndarray, width: int, height: int, iw: int, ih: int) -> np.ndarray:
    x0, y0 = x * (width // W), y * (height // W)
    return np.stack([x0, y0, np.minimum(x0 + width, iw), np.minimum(y0 + height, ih)], 1).astype(np.float64)


def stage1_samples(coco, images_dir: Path, cfg: TrainConfig):
    """Positive and negative 64-D normed-gradient features (float32, /255) with size indices."""
    rng = np.random.default_rng(cfg.seed)
    pos, pos_r, neg = [], [], []
    for img, gt in _image_data(coco, images_dir, cfg.max_images, cfg.max_side):
        ih, iw = img.shape[:2]
        if len(gt):
            gw = np.log2(np.maximum(gt[:, 2] - gt[:, 0], 1))
            gh = np.log2(np.maximum(gt[:, 3] - gt[:, 1], 1))
        maps = list(_size_maps(img, cfg.color))
        for r, width, height, mag in maps:
            mh, mw = mag.shape[0] - W + 1, mag.shape[1] - W + 1
            if mh < 1 or mw < 1 or not len(gt):
                continue
            we, he = r % NUM_T + MIN_T, r // NUM_T + MIN_T
            # sizes the original samples for a box: exponents within [log2(s) - 0.5, log2(s) + 1.5]
            near = ((np.maximum((gw - 0.5).astype(int), MIN_T) <= we) & (we <= np.minimum((gw + 1.5).astype(int), MAX_T))
                    & (np.maximum((gh - 0.5).astype(int), MIN_T) <= he) & (he <= np.minimum((gh + 1.5).astype(int), MAX_T)))
            for g in gt[near]:
                x = int(np.clip(round(g[0] / (width // W)), 0, mw - 1))
                y = int(np.clip(round(g[1] / (height // W)), 0, mh - 1))
                box = _window_box(np.array([x]), np.array([y]), width, height, iw, ih)
                if box_iou(box, g[None])[0, 0] >= 0.5:
                    f = mag[y:y + W, x:x + W].astype(np.float32)
                    pos += [f.reshape(-1), f[:, ::-1].reshape(-1)]
                    pos_r += [r, r]
        # negatives: random (size, position) windows overlapping no object by IoU >= 0.5
        for _ in range(cfg.negatives_per_image):
            r, width, height, mag = maps[int(rng.integers(len(maps)))]
            mh, mw = mag.shape[0] - W + 1, mag.shape[1] - W + 1
            if mh < 1 or mw < 1:
                continue
            x, y = int(rng.integers(mw)), int(rng.integers(mh))
            box = _window_box(np.array([x]), np.array([y]), width, height, iw, ih)
            if not len(gt) or box_iou(box, gt).max() < 0.5:
                neg.append(mag[y:y + W, x:x + W].astype(np.float32).reshape(-1))
    if not pos or not neg:
        raise ValueError(f"no training windows ({len(pos)} positives, {len(neg)} negatives): too few images or boxes")
    return (np.stack(pos) / 255.0, np.array(pos_r, np.int32), np.stack(neg) / 255.0)


def train_stage1(pos: np.ndarray, neg: np.ndarray, c: float, seed: int = 0) -> np.ndarray:
    """The 8x8 filter: liblinear L1-regularised squared-hinge SVM (the original's L1R_L2LOSS_SVC)."""
    from sklearn.svm import LinearSVC
    x = np.concatenate([pos, neg]).astype(np.float64)
    y = np.concatenate([np.ones(len(pos)), -np.ones(len(neg))])
    svm = LinearSVC(penalty="l1", loss="squared_hinge", dual=False, C=c, max_iter=5000, random_state=seed)
    svm.fit(x, y)
    return svm.coef_.reshape(W, W).astype(np.float32)


def train_stage2(coco, images_dir: Path, stage1: BingModel, cfg: TrainConfig) -> np.ndarray:
    """Per-size calibration (S, 2): a 1-D linear SVM on each size's stage-I window scores."""
    from sklearn.svm import LinearSVC
    det = Bing(stage1, per_size=cfg.stage2_per_size)
    n_sizes = len(stage1.size_idx)
    scores = [[] for _ in range(n_sizes)]
    labels = [[] for _ in range(n_sizes)]
    for img, gt in _image_data(coco, images_dir, cfg.max_images, cfg.max_side):
        boxes, s1, rows = det.raw(img)
        lab = (box_iou(boxes, gt).max(axis=1) >= 0.5) if len(gt) and len(boxes) else np.zeros(len(boxes), bool)
        for r in range(n_sizes):
            m = rows == r
            scores[r].append(s1[m])
            labels[r].append(lab[m])
    calib = np.zeros((n_sizes, 2), np.float32)
    fitted = []
    for r in range(n_sizes):
        s = np.concatenate(scores[r]) if scores[r] else np.zeros(0)
        y = np.concatenate(labels[r]) if labels[r] else np.zeros(0, bool)
        if y.sum() < 2 or (~y).sum() < 2:
            continue
        svm = LinearSVC(C=cfg.c_stage2, loss="squared_hinge", dual=False, max_iter=5000, random_state=cfg.seed)
        svm.fit(s.reshape(-1, 1).astype(np.float64), np.where(y, 1, -1))
        calib[r] = (svm.coef_[0, 0], svm.intercept_[0])
        fitted.append(r)
    if not fitted:
        raise ValueError("stage II found no size with both objects and background: too little data")
    # sizes without enough data: the median slope and the lowest offset (they rank last)
    rest = [r for r in range(n_sizes) if r not in fitted]
    if rest:
        calib[rest] = (np.median(calib[fitted, 0]), calib[fitted, 1].min() - 1.0)
    return calib


def train_bing(annotations: str | os.PathLike, images_dir: str | os.PathLike | None, out_dir: str | os.PathLike,
               cfg: TrainConfig = TrainConfig(), log=print) -> BingModel:
    """Train a BING model on a COCO-format dataset and write it to ``out_dir``.

    Args:
        annotations: COCO JSON (ground-truth boxes; crowd boxes are left out).
        images_dir: its images (default ``<json dir>/images``).
        out_dir: where the three ``.yml.gz`` files and ``training.json`` (provenance) go.
        cfg: parameters.

    Returns:
        The trained :class:`BingModel`.
    """
    t0 = time.perf_counter()
    coco = load_coco(annotations)
    images_dir = Path(images_dir) if images_dir else Path(annotations).parent / "images"
    pos, pos_r, neg = stage1_samples(coco, images_dir, cfg)
    log(f"stage I: {len(pos)} positive and {len(neg)} negative windows ({time.perf_counter() - t0:.1f} s)")
    w = train_stage1(pos, neg, cfg.c_stage1, cfg.seed)
    counts = np.bincount(pos_r, minlength=NUM_T * NUM_T)
    active = np.flatnonzero(counts >= cfg.min_size_count).astype(np.int32)
    if len(active) < 2:
        raise ValueError(f"only {len(active)} sizes have >= {cfg.min_size_count} positives; use more images "
                         f"or lower min_size_count (counts: {counts.tolist()})")
    stage1 = BingModel(cfg.color, w, active, np.tile(np.array([[1.0, 0.0]], np.float32), (len(active), 1)))
    log(f"stage I: {len(active)} active sizes {[size_of(int(r)) for r in active]} ({time.perf_counter() - t0:.1f} s)")
    calib = train_stage2(coco, images_dir, stage1, cfg)
    model = BingModel(cfg.color, w, active, calib)
    model.save(out_dir)
    n_images = len(coco.images[:cfg.max_images] if cfg.max_images else coco.images)
    info = {"config": asdict(cfg), "annotations": Path(annotations).name, "images": n_images,
            "positives": int(len(pos)), "negatives": int(len(neg)), "active_sizes": active.tolist(),
            "seconds": round(time.perf_counter() - t0, 1)}
    (Path(out_dir) / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"wrote {out_dir} ({time.perf_counter() - t0:.1f} s)")
    return model
