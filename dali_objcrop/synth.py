"""The embedded default dataset: synthetic cluttered multi-object scenes.

``make_synthetic(out, n, seed)`` writes ``out/images/*.jpg`` (real JPEG files)
and ``out/annotations.json`` (COCO format, one category per shape).  Scenes
mimic non-iconic photos: textured backgrounds, several small objects per image,
mixed image sizes (odd sizes and some under 224 px).  Image ``i`` depends only
on ``(seed, i)``, so any image can be regenerated alone and the set is the same
on every machine.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

from .constants import home_dir

CATEGORIES = ["disc", "square", "triangle", "ellipse", "ring", "cross", "star", "diamond"]
# a base colour per class (BGR), jittered per object, so classes are learnable
_CLASS_BGR = np.array([[40, 40, 220], [40, 200, 40], [220, 60, 40], [30, 200, 230],
                       [200, 40, 200], [230, 200, 40], [30, 120, 250], [160, 160, 160]], dtype=np.float64)


def _background(r: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Smooth colour noise + fine noise + sometimes stripes, uint8 BGR (h, w, 3).

    Built at half resolution in float and upsampled once as uint8: the full-size
    float resizes cost more than everything else in a scene.
    """
    hw, hh = max(2, w // 2), max(2, h // 2)
    gh, gw = int(r.integers(3, 9)), int(r.integers(3, 9))
    grid = r.uniform(30, 225, size=(gh, gw, 3)).astype(np.float32)
    img = cv2.resize(grid, (hw, hh), interpolation=cv2.INTER_CUBIC)
    img += r.normal(0, 14, size=(hh, hw, 3)).astype(np.float32)
    if r.random() < 0.4:
        period = float(r.uniform(3, 15))
        angle = float(r.uniform(0, np.pi))
        k = 2 * np.pi / period
        ax = (np.arange(hw, dtype=np.float32) * (k * np.cos(angle)))[None, :]
        by = (np.arange(hh, dtype=np.float32) * (k * np.sin(angle)))[:, None]
        # sin(ax + by) from 1-D tables: two outer products instead of a full-size trig call
        img += (20 * (np.sin(by) * np.cos(ax) + np.cos(by) * np.sin(ax)))[..., None]
    small = np.clip(img, 0, 255).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _shape_points(cls: int, cx: float, cy: float, s: float, rot: float) -> np.ndarray:
    """Polygon (K, 2) of a class's shape with radius ``s`` around (cx, cy)."""
    name = CATEGORIES[cls]
    if name in ("disc", "ring"):
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif name == "ellipse":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        pts = np.stack([np.cos(t), 0.5 * np.sin(t)], 1)
    elif name == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.8
    elif name == "triangle":
        t = np.array([0, 2, 4]) * np.pi / 3 - np.pi / 2
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif name == "cross":
        a, b = 1.0, 0.33
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b],
                        [-a, b], [-a, -b], [-b, -b]])
    elif name == "star":
        t = np.arange(10) * np.pi / 5 - np.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    else:  # diamond
        pts = np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]], dtype=np.float64)
    c, sn = np.cos(rot), np.sin(rot)
    pts = pts @ np.array([[c, sn], [-sn, c]])
    return pts * s + np.array([cx, cy])


def make_scene(seed: int, i: int) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """Image ``i`` of the set for ``seed``: (BGR uint8 image, [(class, [x, y, w, h]), ...])."""
    r = np.random.default_rng([seed, i])
    if r.random() < 0.1:  # some images smaller than a 224 crop
        w, h = int(r.integers(96, 224)), int(r.integers(96, 224))
    else:
        w, h = int(r.integers(225, 641)), int(r.integers(225, 481))
        if r.random() < 0.3:
            w, h = h, w
    img = _background(r, w, h)
    objects = []
    for _ in range(int(r.integers(3, 10))):
        cls = int(r.integers(len(CATEGORIES)))
        s = float(r.uniform(0.04, 0.22) * min(w, h))
        cx, cy = float(r.uniform(0, w)), float(r.uniform(0, h))
        pts = _shape_points(cls, cx, cy, s, float(r.uniform(0, 2 * np.pi)))
        poly = np.round(pts).astype(np.int32)
        colour = np.clip(_CLASS_BGR[cls] + r.normal(0, 20, 3), 0, 255)
        cv2.fillPoly(img, [poly], tuple(float(c) for c in colour), lineType=cv2.LINE_AA)
        if CATEGORIES[cls] == "ring":
            inner = np.round(_shape_points(cls, cx, cy, s * 0.5, 0)).astype(np.int32)
            cv2.fillPoly(img, [inner], tuple(float(255 - c) for c in colour), lineType=cv2.LINE_AA)
        x1, y1 = np.clip(pts.min(0), 0, [w, h])
        x2, y2 = np.clip(pts.max(0), 0, [w, h])
        if x2 - x1 >= 2 and y2 - y1 >= 2:
            objects.append((cls, [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]))
    return img, objects


def make_synthetic(out: str | os.PathLike, n: int = 256, seed: int = 0, quality: int = 90,
                   progress: bool = False) -> Path:
    """Write ``n`` synthetic scenes and their COCO annotations under ``out``.

    Returns:
        The path of ``annotations.json`` (written last and atomically, so its
        presence means the set is complete).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    it = range(n)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="synth", unit="img")
    for i in it:
        img, objects = make_scene(seed, i)
        name = f"{i:06d}.jpg"
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for image {i}")
        (out / "images" / name).write_bytes(buf.tobytes())
        images.append({"id": i + 1, "file_name": name, "width": img.shape[1], "height": img.shape[0]})
        for cls, bbox in objects:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cls + 1, "bbox": bbox,
                         "area": bbox[2] * bbox[3], "iscrowd": 0})
    coco = {"info": {"description": "dali_objcrop synthetic cluttered scenes", "seed": seed, "n": n},
            "images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(CATEGORIES)]}
    ann_path = out / "annotations.json"
    tmp = ann_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(coco))
    os.replace(tmp, ann_path)
    return ann_path


def default_dataset_dir() -> Path:
    """Where the embedded default set lives (``$DALI_OBJCROP_HOME`` or ``~/.cache/dali_objcrop``)."""
    return home_dir() / "synthetic"


def ensure_default_dataset(n: int = 512, seed: int = 0) -> Path:
    """Create the embedded default set if it is missing; returns its annotations path."""
    root = default_dataset_dir() / f"n{n}_seed{seed}"
    ann = root / "annotations.json"
    if not ann.exists():
        make_synthetic(root, n=n, seed=seed, progress=True)
    return ann
