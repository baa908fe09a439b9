"""Proposal quality against COCO ground truth: recall at n proposals and IoU thresholds.

Recall@n at IoU t is the fraction of ground-truth boxes (crowd boxes excluded) covered by
at least one of their image's first n proposals with IoU >= t.  Also reported: the mean
proposal area as a fraction of its image (the paper's s_min rule uses it) and proposals
per image.  Images of the annotation file that the store lacks count as having no
proposals (and are counted in ``images_missing``).
"""
from __future__ import annotations

import os

import numpy as np

from ..boxstore import BoxStore
from ..dataset import load_coco
from .common import box_iou

DEFAULT_NS = (1, 5, 10)
DEFAULT_IOUS = (0.5, 0.7)


def gt_boxes_normalised(coco, include_crowd: bool = False) -> dict[str, np.ndarray]:
    """file_name -> (g, 4) float64 normalised ``[x1, y1, x2, y2]`` ground-truth boxes."""
    out = {}
    for img in coco.images:
        anns = [a for a in coco.anns_by_image.get(img["id"], []) if include_crowd or not a.get("iscrowd", 0)]
        b = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        b[:, 2:] += b[:, :2]
        out[img["file_name"]] = b / np.array([img["width"], img["height"]] * 2, dtype=np.float64)
    return out


def recall_table(proposals: dict[str, np.ndarray], gt: dict[str, np.ndarray], ns=DEFAULT_NS,
                 ious=DEFAULT_IOUS) -> dict[str, float]:
    """Recall for every (n, IoU) pair.

    Args:
        proposals: key -> (k, 4) normalised boxes, best-first (missing keys: no proposals).
        gt: key -> (g, 4) normalised ground-truth boxes.

    Returns:
        ``{"recall@{n}_iou{t}": value}`` plus ``num_gt``.
    """
    ns, ious = tuple(ns), tuple(ious)
    if not ns or min(ns) < 1:
        raise ValueError(f"ns must be positive integers, got {ns}")
    # best IoU of each gt box among the first n proposals, for every n
    best = {n: [] for n in ns}
    for key, g in gt.items():
        if len(g) == 0:
            continue
        p = proposals.get(key)
        p = np.zeros((0, 4)) if p is None else np.asarray(p, np.float64).reshape(-1, 4)
        iou = box_iou(g, p[:max(ns)]) if len(p) else np.zeros((len(g), 0))
        for n in ns:
            best[n].append(iou[:, :n].max(axis=1) if iou.shape[1] else np.zeros(len(g)))
    num_gt = sum(len(v) for v in best[ns[0]])
    out: dict[str, float] = {}
    for n in ns:
        b = np.concatenate(best[n]) if best[n] else np.zeros(0)
        for t in ious:
            out[f"recall@{n}_iou{t:g}"] = float((b >= t).mean()) if len(b) else 0.0
    out["num_gt"] = int(num_gt)
    return out


def evaluate_store(store: BoxStore | str | os.PathLike, annotations: str | os.PathLike, top_k: int | None = None,
                   ns=DEFAULT_NS, ious=DEFAULT_IOUS, only_store_images: bool = False) -> dict:
    """Recall table, mean area fraction and proposals per image of a box store.

    Args:
        store: a :class:`BoxStore` or its path.
        annotations: COCO JSON whose ``file_name`` values are the store's keys.
        top_k: only the first ``top_k`` proposals of each image count.
        only_store_images: evaluate on the store's images only (default: every annotated
            image; those missing from the store count as having no proposals).
    """
    if not isinstance(store, BoxStore):
        store = BoxStore.load(store)
    coco = load_coco(annotations)
    gt = gt_boxes_normalised(coco)
    props = {}
    for row, key in enumerate(store.keys):
        b = np.asarray(store.boxes_of(row))
        props[key] = b[:top_k] if top_k else b
    if only_store_images:
        gt = {k: v for k, v in gt.items() if k in props}
    res = recall_table(props, gt, ns, ious)
    allb = [b for b in props.values() if len(b)]
    flat = np.concatenate(allb).astype(np.float64) if allb else np.zeros((0, 4))
    res["mean_area_fraction"] = float(((flat[:, 2] - flat[:, 0]) * (flat[:, 3] - flat[:, 1])).mean()) if len(flat) else 0.0
    res["proposals_per_image"] = float(len(flat) / max(1, len(props)))
    res["images"] = len(gt)
    res["images_missing"] = int(sum(1 for k in gt if k not in props))
    res["method"] = store.meta.get("method")
    return res


def random_boxes_recall(annotations: str | os.PathLike, k: int = 10, seed: int = 0, ns=DEFAULT_NS,
                        ious=DEFAULT_IOUS) -> dict:
    """The same table for ``k`` uniformly random boxes per image (a floor any method must beat)."""
    coco = load_coco(annotations)
    gt = gt_boxes_normalised(coco)
    rng = np.random.default_rng(seed)
    props = {}
    for key in gt:
        xy = np.sort(rng.uniform(0, 1, size=(k, 2, 2)), axis=1)  # sorted corners per axis
        props[key] = np.stack([xy[:, 0, 0], xy[:, 0, 1], xy[:, 1, 0], xy[:, 1, 1]], 1)
    return recall_table(props, gt, ns, ious)
