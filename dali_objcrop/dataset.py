"""Image index: which files make up a dataset, their keys and sizes.

A dataset is either a folder of images (scanned recursively, sorted) or a
COCO-format JSON plus its image folder.  Keys are paths relative to the image
root; they tie images to box-store rows.  ``scan_image`` reads only headers
(PIL is lazy) plus the last bytes of JPEGs, so truncated, empty and non-image
files are found before the decoder meets them.

Rules every entry point shares (see ``docs/reliability.md``):

* Orientation: images are used in their stored pixel grid; an EXIF orientation
  tag is ignored everywhere (header sizes, proposals, the DALI loader, ``show``).
* Where a COCO JSON's images are: :func:`coco_images_dir`.
* Image keys stay inside the image folder (no absolute paths, no ``..`` out of
  it) unless the caller passes ``allow_outside_root=True``: :func:`check_keys`.
* A COCO JSON is validated when read (:func:`load_coco`): unique image ids and
  file names, integer sizes, well-formed boxes, annotations of known images.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence as SequenceABC
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


class CocoFormatError(ValueError):
    """A COCO JSON that cannot be used as it is; the message names the file, image ids and entries."""


def _some(items, n: int = 5) -> str:
    items = list(items)
    return ", ".join(str(x) for x in items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_coco(d: dict, path: str | os.PathLike = "<json>") -> None:
    """Check the parts of a COCO dict that dali_objcrop relies on; raise :class:`CocoFormatError` naming
    every offending image id / annotation id (a few of each) and the file.

    Checked: ``images`` and ``annotations`` are lists; every image has an ``id``, a string
    ``file_name`` and integer ``width`` and ``height`` >= 1; image ids and file names are unique
    (a duplicate id would hand one image's boxes to another); every annotation has the
    ``image_id`` of a listed image and a ``bbox`` of four finite numbers with non-negative
    width and height.
    """
    for k in ("images", "annotations"):
        if not isinstance(d.get(k), list):
            raise CocoFormatError(f"{path} is not a COCO annotation file: no {k!r} list")
    bad_images = []
    for i, im in enumerate(d["images"]):
        if not isinstance(im, dict):
            bad_images.append(f"images[{i}] is not an object")
            continue
        name = f"image id {im.get('id')!r} ({im.get('file_name')!r})"
        if "id" not in im:
            bad_images.append(f"images[{i}] ({im.get('file_name')!r}) has no 'id'")
        if not isinstance(im.get("file_name"), str) or not im.get("file_name"):
            bad_images.append(f"{name} has no 'file_name'")
        for k in ("width", "height"):
            v = im.get(k)
            if not ((_is_int(v) or (isinstance(v, float) and v.is_integer())) and v >= 1):
                bad_images.append(f"{name} has {k}={v!r} (need an integer >= 1)" if k in im else f"{name} has no {k!r}")
    if bad_images:
        raise CocoFormatError(f"{path}: {len(bad_images)} malformed image entries: {_some(bad_images)}")
    ids: dict = {}
    for im in d["images"]:
        ids.setdefault(im["id"], []).append(im["file_name"])
    dup_ids = {i: f for i, f in ids.items() if len(f) > 1}
    if dup_ids:
        raise CocoFormatError(f"{path}: {len(dup_ids)} image ids are used more than once (their boxes would be "
                              f"mixed up): "
                              + _some(f"id {i!r}: {', '.join(map(repr, f))}" for i, f in dup_ids.items()))
    names: dict = {}
    for im in d["images"]:
        names.setdefault(im["file_name"], []).append(im["id"])
    dup_names = {n: i for n, i in names.items() if len(i) > 1}
    if dup_names:
        raise CocoFormatError(f"{path}: {len(dup_names)} file names are listed more than once: "
                              + _some(f"{n!r} (ids {', '.join(map(repr, i))})" for n, i in dup_names.items()))
    bad_anns, unknown = [], {}
    for j, a in enumerate(d["annotations"]):
        if not isinstance(a, dict):
            bad_anns.append(f"annotations[{j}] is not an object")
            continue
        name = f"annotation id {a.get('id', f'#{j}')!r}"
        if a.get("image_id") not in ids:
            unknown.setdefault(a.get("image_id"), []).append(a.get("id", f"#{j}"))
            continue
        b = a.get("bbox")
        if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(_is_num(v) for v in b)
                and all(math.isfinite(v) for v in b) and b[2] >= 0 and b[3] >= 0):
            bad_anns.append(f"{name} (image id {a['image_id']!r}) has bbox {b!r} "
                            f"(need [x, y, width, height], finite, width and height >= 0)")
    if unknown:
        raise CocoFormatError(f"{path}: annotations refer to {len(unknown)} image ids that are not in 'images': "
                              + _some(f"image id {i!r} (annotation ids {_some(a, 3)})" for i, a in unknown.items()))
    cats = d.get("categories") or []
    if cats:  # categories are optional; when listed, they must be unique and cover the annotations
        cat_ids = [c.get("id") if isinstance(c, dict) else None for c in cats]
        dup = sorted({c for c in cat_ids if cat_ids.count(c) > 1}, key=repr)
        if dup:
            raise CocoFormatError(f"{path}: category ids used more than once: {_some(dup)}")
        known = set(cat_ids)
        odd = [(a.get("id", f"#{j}"), a["category_id"]) for j, a in enumerate(d["annotations"])
               if isinstance(a, dict) and "category_id" in a and a["category_id"] not in known]
        if odd:
            raise CocoFormatError(f"{path}: {len(odd)} annotations have a category_id not in 'categories': "
                                  + _some(f"annotation id {i!r} (category {c!r})" for i, c in odd))
    if bad_anns:
        raise CocoFormatError(f"{path}: {len(bad_anns)} malformed annotations: {_some(bad_anns)}")


def load_coco(path: str | os.PathLike) -> Coco:
    """Read and validate (:func:`validate_coco`) a COCO-format annotation JSON.

    Raises:
        CocoFormatError: duplicate image ids or file names, images without sizes, malformed boxes,
            annotations of unknown images (the message names them and the file).
    """
    path = Path(path)
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise CocoFormatError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise CocoFormatError(f"{path} is not a COCO annotation file: the top level is not an object")
    validate_coco(d, path)
    for im in d["images"]:  # 640.0 -> 640: sizes are integers from here on
        im["width"], im["height"] = int(im["width"]), int(im["height"])
    by_image: dict[int, list[dict]] = {}
    for a in d["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    return Coco(images=d["images"], anns_by_image=by_image, categories=d.get("categories", []), path=path)


def coco_images_dir(annotations: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> Path:
    """The image folder of a COCO JSON: the one rule of every entry point (loader, proposals, tools,
    ``train-bing``).

    ``images_dir`` when given; otherwise ``images/`` beside the JSON (``root/annotations.json``)
    or beside its folder (``root/annotations/instances.json`` with ``root/images/``), the first
    that exists.

    Raises:
        FileNotFoundError: neither exists (both are named), or ``images_dir`` does not exist.
    """
    if images_dir is not None:
        d = Path(images_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"image folder {d} (for {annotations}) does not exist")
        return d
    p = Path(annotations)
    candidates = (p.parent / "images", p.parent.parent / "images")
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(f"no image folder for {p}: neither {candidates[0]} nor {candidates[1]} exists; "
                            f"name it explicitly (--images / images_dir)")


def check_keys(keys: Sequence[str], root: str | os.PathLike, allow_outside_root: bool = False) -> None:
    """Refuse image keys that leave the image folder: absolute paths and ``..`` that climb out of it.

    A dataset file is data, and data should not choose which files of the machine are read; a
    user who really keeps images elsewhere opts in with ``allow_outside_root=True``.

    Raises:
        ValueError: naming the entries (a few) and how many there are.
    """
    if allow_outside_root:
        return
    bad = []
    for k in keys:
        if not isinstance(k, str) or not k:
            bad.append(repr(k))
            continue
        norm = os.path.normpath(k)
        if os.path.isabs(k) or norm == ".." or norm.startswith(".." + os.sep) or k.startswith(("/", "\\")):
            bad.append(repr(k))
    if bad:
        raise ValueError(f"{len(bad)} image entries point outside the image folder {root}: {_some(bad)}; "
                         f"pass allow_outside_root=True (--allow-outside-root) to read them anyway")


def check_found(index: "ImageIndex", source: str | os.PathLike, max_missing: float = 0.5) -> None:
    """Refuse an index whose files are (almost) all missing: the image folder is wrong, and a store
    or an epoch of nothing would otherwise follow with exit status 0.

    Raises:
        FileNotFoundError: no usable image, or more than ``max_missing`` of the listed files are absent.
    """
    total = len(index) + len(index.bad)
    missing = [k for k, v in index.bad.items() if v == MISSING]
    if total and (len(index) == 0 or len(missing) > max_missing * total):
        raise FileNotFoundError(
            f"{len(missing)} of the {total} images listed by {source} are not in {index.root} "
            f"({len(index)} usable; e.g. {_some(missing, 3)}): is the image folder right?")


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
                  check: bool = True, allow_outside_root: bool = False) -> "ImageIndex":
        """The images of a COCO JSON, in its order; sizes from the JSON (checked against headers).

        Args:
            annotations: the JSON (validated by :func:`load_coco`).
            images_dir: its image folder (default: :func:`coco_images_dir`).
            check: scan every file's header (sizes, truncation); without it only the existence of
                a sample of files is checked.
            allow_outside_root: accept absolute ``file_name`` entries and ones that climb out of
                the image folder (refused by default, :func:`check_keys`).

        Raises:
            CocoFormatError, ValueError, FileNotFoundError: see :func:`load_coco`, :func:`check_keys`,
                :func:`check_found` (the image folder holds (almost) none of the listed files).
        """
        coco = load_coco(annotations)
        root = coco_images_dir(annotations, images_dir)
        keys = [im["file_name"] for im in coco.images]
        check_keys(keys, root, allow_outside_root)
        sizes = [(int(im["width"]), int(im["height"])) for im in coco.images]
        if not check and keys:  # the cheap part of the scan: do (evenly spaced) files exist at all?
            probe = sorted(set(np.linspace(0, len(keys) - 1, min(len(keys), 64)).astype(int).tolist()))
            absent = [keys[i] for i in probe if not (root / keys[i]).is_file()]
            if len(absent) > len(probe) // 2:
                raise FileNotFoundError(f"{len(absent)} of {len(probe)} sampled images listed by {annotations} "
                                        f"are not in {root} (e.g. {_some(absent, 3)}): is the image folder right?")
        index = cls._scanned(root, keys, sizes, check=check)
        check_found(index, annotations)
        return index

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


class PackedKeys(SequenceABC):
    """Image keys decoded on demand from one utf-8 blob and its (N + 1,) offsets (memory-mapped or not): the
    key list of a box store or an image index without a million Python strings."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray) -> None:
        self._blob, self._offsets = blob, offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def raw(self, i: int) -> bytes:
        """Key ``i`` as its utf-8 bytes."""
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return bytes(self._blob[self._offsets[i]:self._offsets[i + 1]])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.raw(i).decode("utf-8")

    def __iter__(self):
        data, off = bytes(self._blob), self._offsets.tolist()
        for i in range(len(off) - 1):
            yield data[off[i]:off[i + 1]].decode("utf-8")

