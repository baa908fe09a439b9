"""Image index: which files make up a dataset, their keys and sizes.

A dataset is either a folder of images (scanned recursively, sorted) or a
COCO-format JSON plus its image folder.  Keys are paths relative to the image
root; they tie images to box-store rows.  ``scan_image`` reads only headers
(PIL is lazy) plus the last bytes of JPEGs, so truncated, empty and non-image
files are found before the decoder meets them.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# scan_image statuses
OK, EMPTY, UNREADABLE, TRUNCATED, MISSING = "ok", "empty", "unreadable", "truncated", "missing"


def fingerprint(keys: Sequence[str]) -> str:
    """sha256 of the ordered image-key list (one key per line)."""
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class Coco:
    """The parts of a COCO-format JSON that dali_objcrop uses."""

    images: list[dict]
    anns_by_image: dict[int, list[dict]]
    categories: list[dict]
    path: Path


def load_coco(path: str | os.PathLike) -> Coco:
    """Read a COCO-format annotation JSON (``images``, ``annotations``, ``categories``)."""
    path = Path(path)
    with open(path) as f:
        d = json.load(f)
    for k in ("images", "annotations"):
        if k not in d:
            raise ValueError(f"{path} is not a COCO annotation file: no {k!r} list")
    by_image: dict[int, list[dict]] = {}
    for a in d["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    return Coco(images=d["images"], anns_by_image=by_image, categories=d.get("categories", []), path=path)


def scan_image(path: str | os.PathLike) -> tuple[str, tuple[int, int] | None, str]:
    """Check one image file cheaply: ``(status, (width, height) or None, format)``.

    Status is one of ``ok``, ``missing``, ``empty``, ``unreadable`` (no known
    image header) or ``truncated`` (a JPEG without its end-of-image marker).
    """
    from PIL import Image
    try:
        size = os.path.getsize(path)
    except OSError:
        return MISSING, None, ""
    if size == 0:
        return EMPTY, None, ""
    try:
        with Image.open(path) as im:
            wh, fmt = im.size, im.format or ""
    except Exception:
        return UNREADABLE, None, ""
    if fmt == "JPEG":
        with open(path, "rb") as f:
            f.seek(max(0, size - 64))
            if b"\xff\xd9" not in f.read():
                return TRUNCATED, wh, fmt
    return OK, (int(wh[0]), int(wh[1])), fmt


@dataclass
class ImageIndex:
    """An ordered list of images with their keys, paths and sizes.

    Attributes:
        root: the image folder.
        keys: paths relative to ``root`` (box-store keys).
        sizes: (N, 2) int32 (width, height).
        bad: key -> status for files left out by the scan (reported, never silent).
    """

    root: Path
    keys: list[str]
    sizes: np.ndarray
    bad: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def paths(self) -> list[str]:
        return [str(self.root / k) for k in self.keys]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.keys)

    @classmethod
    def from_folder(cls, root: str | os.PathLike, check: bool = True) -> "ImageIndex":
        """Every image file under ``root`` (sorted), with sizes read from headers."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        return cls._scanned(root, files, None, check=check)

    @classmethod
    def from_coco(cls, annotations: str | os.PathLike, images_dir: str | os.PathLike | None = None,
                  check: bool = True) -> "ImageIndex":
        """The images of a COCO JSON, in its order; sizes from the JSON (checked against headers)."""
        coco = load_coco(annotations)
        root = Path(images_dir) if images_dir is not None else Path(annotations).parent / "images"
        keys = [im["file_name"] for im in coco.images]
        sizes = [(int(im["width"]), int(im["height"])) for im in coco.images]
        return cls._scanned(root, keys, sizes, check=check)

    @classmethod
    def _scanned(cls, root: Path, keys: Sequence[str], sizes: Sequence[tuple[int, int]] | None,
                 check: bool) -> "ImageIndex":
        good, good_sizes, bad = [], [], {}
        for i, k in enumerate(keys):
            if check or sizes is None:
                status, wh, _ = scan_image(root / k)
                if status == OK and sizes is not None and tuple(wh) != tuple(sizes[i]):
                    status = f"size {wh[0]}x{wh[1]} differs from annotation {sizes[i][0]}x{sizes[i][1]}"
            else:
                status, wh = OK, sizes[i]
            if status != OK:
                bad[k] = status
                continue
            good.append(k)
            good_sizes.append(wh if sizes is None else sizes[i])
        return cls(root=root, keys=good, sizes=np.array(good_sizes, dtype=np.int32).reshape(-1, 2), bad=bad)
