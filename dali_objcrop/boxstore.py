"""The box store: one file of per-image object proposals.

Layout of a ``.boxes`` file (little-endian)::

    b"OBJCROPBOX\\x00\\x01"   magic + format version (12 bytes)
    uint64                    length of the JSON header
    JSON header               metadata (method, params, fingerprint, counts) and,
                              per array, its dtype, shape and byte offset
    arrays, 64-byte aligned   sizes (N, 2) int32 as (width, height)
                              offsets (N + 1,) int64 into boxes
                              boxes (M, 4) float32 normalised [x1, y1, x2, y2], best-first
                              scores (M,) float32 (optional)
                              key_bytes (K,) uint8, key_offsets (N + 1,) int64: utf-8 image keys

Saving writes a temporary file beside the target and renames it (atomic on
POSIX); loading memory-maps the arrays, so opening a store of millions of
images costs only its header, and ``boxes_of(i)`` is O(1).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .dataset import fingerprint, load_coco

MAGIC = b"OBJCROPBOX\x00\x01"
_ALIGN = 64


class BoxStoreMismatchError(ValueError):
    """The box store does not describe the dataset it is used with."""


@dataclass
class ValidationReport:
    """Counts from :func:`validate_boxes`."""

    total: int = 0
    kept: int = 0
    clipped: int = 0
    dropped_nonfinite: int = 0
    dropped_degenerate: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def __add__(self, other: "ValidationReport") -> "ValidationReport":
        return ValidationReport(**{k: getattr(self, k) + getattr(other, k) for k in self.__dict__})


def validate_boxes(boxes: np.ndarray, sizes: np.ndarray | None = None, min_pixels: float = 1.0
                   ) -> tuple[np.ndarray, np.ndarray, ValidationReport]:
    """Clip normalised boxes to [0, 1] and drop non-finite or degenerate ones.

    Args:
        boxes: (M, 4) normalised ``[x1, y1, x2, y2]``.
        sizes: optional (M, 2) image (width, height) per box; with it a box
            narrower or shorter than ``min_pixels`` pixels is degenerate,
            without it one of zero width or height is.
        min_pixels: see ``sizes``.

    Returns:
        ``(keep, clipped, report)``: a boolean mask (M,), the clipped float32
        boxes (M, 4) (use ``clipped[keep]``) and the counts.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    rep = ValidationReport(total=len(b))
    finite = np.isfinite(b).all(axis=1)
    rep.dropped_nonfinite = int((~finite).sum())
    bf = np.where(finite[:, None], b, 0.0)
    c = np.clip(bf, 0.0, 1.0)
    rep.clipped = int((finite & (c != bf).any(axis=1)).sum())
    wh = c[:, 2:] - c[:, :2]
    if sizes is not None:
        wh = wh * np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
        good = (wh >= min_pixels).all(axis=1)
    else:
        good = (wh > 0).all(axis=1)
    keep = finite & good
    rep.dropped_degenerate = int((finite & ~good).sum())
    rep.kept = int(keep.sum())
    return keep, c.astype(np.float32), rep


@dataclass
class BoxStore:
    """Per-image proposals, ragged, with the image index they belong to.

    Attributes:
        keys: image keys (paths relative to the image root), in dataset order.
        sizes: (N, 2) int32 (width, height).
        offsets: (N + 1,) int64; image i owns ``boxes[offsets[i]:offsets[i+1]]``.
        boxes: (M, 4) float32 normalised, best-first within an image.
        scores: (M,) float32 or None.
        meta: method, params, validation counts, fingerprint.
    """

    keys: list[str] | "_LazyKeys"
    sizes: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    _key_to_row: dict | None = field(default=None, repr=False)

    # ---- construction --------------------------------------------------------
    @classmethod
    def from_arrays(cls, keys: Sequence[str], sizes: np.ndarray, boxes: Sequence[np.ndarray],
                    scores: Sequence[np.ndarray] | None = None, method: str = "arrays",
                    params: dict | None = None, normalized: bool = True, top_k: int | None = None
                    ) -> "BoxStore":
        """Build a store from per-image box arrays (validated, counts kept in ``meta``).

        Args:
            keys: N image keys.
            sizes: (N, 2) (width, height).
            boxes: N arrays (k_i, 4) of ``[x1, y1, x2, y2]``, best-first.
            scores: optional N arrays (k_i,).
            normalized: False if boxes are in pixels (they are divided by the size).
            top_k: keep at most this many valid boxes per image.
        """
        keys = list(keys)
        sizes = np.asarray(sizes, dtype=np.int32).reshape(-1, 2)
        if len(keys) != len(sizes) or len(keys) != len(boxes):
            raise ValueError(f"keys ({len(keys)}), sizes ({len(sizes)}) and boxes ({len(boxes)}) differ in length")
        if scores is not None and len(scores) != len(keys):
            raise ValueError(f"scores ({len(scores)}) and keys ({len(keys)}) differ in length")
        if len(set(keys)) != len(keys):
            raise ValueError("image keys must be unique")
        counts = np.array([len(np.asarray(b).reshape(-1, 4)) for b in boxes], dtype=np.int64)
        flat = (np.concatenate([np.asarray(b, np.float64).reshape(-1, 4) for b in boxes])
                if len(boxes) else np.zeros((0, 4)))
        owner = np.repeat(np.arange(len(keys)), counts)
        if not normalized:
            wh = sizes[owner].astype(np.float64)
            flat = flat / np.concatenate([wh, wh], axis=1)
        flat_scores = (np.concatenate([np.asarray(s, np.float32).reshape(-1) for s in scores])
                       if scores is not None and len(scores) else None)
        keep, clipped, report = validate_boxes(flat, sizes[owner])
        if top_k is not None:  # rank of each kept box within its image
            rank = np.cumsum(keep) - 1
            starts = np.concatenate([[0], np.cumsum(np.bincount(owner[keep], minlength=len(keys)))])[:-1]
            kept_rank = rank - starts[owner]
            keep &= kept_rank < top_k
        new_counts = np.bincount(owner[keep], minlength=len(keys)).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(new_counts)]).astype(np.int64)
        meta = {
            "method": method,
            "params": params or {},
            "validation": report.as_dict(),
            "fingerprint": fingerprint(keys),
            "num_images": len(keys),
            "num_boxes": int(offsets[-1]),
            "images_without_boxes": int((new_counts == 0).sum()),
        }
        return cls(keys=keys, sizes=sizes, offsets=offsets, boxes=clipped[keep],
                   scores=flat_scores[keep] if flat_scores is not None else None, meta=meta)

    @classmethod
    def from_coco(cls, annotations: str | os.PathLike, top_k: int | None = None,
                  include_crowd: bool = True) -> "BoxStore":
        """Ground-truth boxes of a COCO-format JSON as proposals (largest first)."""
        coco = load_coco(annotations)
        boxes = []
        for img in coco.images:
            anns = [a for a in coco.anns_by_image.get(img["id"], []) if include_crowd or not a.get("iscrowd", 0)]
            b = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
            b[:, 2:] += b[:, :2]                       # xywh -> xyxy
            area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            boxes.append(b[np.argsort(-area, kind="stable")])
        keys = [img["file_name"] for img in coco.images]
        sizes = np.array([[img["width"], img["height"]] for img in coco.images], dtype=np.int32).reshape(-1, 2)
        return cls.from_arrays(keys, sizes, boxes, method="gt", normalized=False, top_k=top_k,
                               params={"annotations": str(annotations), "top_k": top_k})

    # ---- access --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_boxes(self) -> int:
        return int(self.offsets[-1])

    @property
    def fingerprint(self) -> str:
        return self.meta.get("fingerprint") or fingerprint(list(self.keys))

    def boxes_of(self, row: int) -> np.ndarray:
        """(k, 4) normalised boxes of image ``row`` (a view into the store)."""
        return self.boxes[self.offsets[row]:self.offsets[row + 1]]

    def row_of(self, key: str) -> int:
        """Row of an image key (O(1) after a one-off dictionary build)."""
        if self._key_to_row is None:
            self._key_to_row = {k: i for i, k in enumerate(self.keys)}
        try:
            return self._key_to_row[key]
        except KeyError:
            raise KeyError(f"image {key!r} is not in the box store") from None

    def gather(self, rows: np.ndarray, top_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Ragged boxes of ``rows`` as ``(boxes (M, 4), offsets (len(rows) + 1,))``, vectorised."""
        rows = np.asarray(rows, dtype=np.int64)
        start = self.offsets[rows]
        count = self.offsets[rows + 1] - start
        if top_k is not None:
            count = np.minimum(count, top_k)
        offsets = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
        flat = np.repeat(start - offsets[:-1], count) + np.arange(offsets[-1])
        return np.asarray(self.boxes[flat]), offsets

    def mean_area_fraction(self, top_k: int | None = None) -> float:
        """Mean proposal area as a fraction of its image (over each image's top-k)."""
        if top_k is None:
            b = np.asarray(self.boxes, dtype=np.float64)
        else:
            b, _ = self.gather(np.arange(len(self)), top_k)
            b = b.astype(np.float64)
        if len(b) == 0:
            raise ValueError("the box store holds no boxes")
        return float(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).mean())

    def rows_for(self, keys: Sequence[str], sizes: np.ndarray | None = None, strict: bool = False
                 ) -> np.ndarray:
        """Store rows of a dataset's images, checking that the store matches it.

        Raises:
            BoxStoreMismatchError: images missing from the store, image sizes that
                differ, or (``strict``) a different image list; the message names them.
        """
        keys = list(keys)
        if strict and fingerprint(keys) != self.fingerprint:
            raise BoxStoreMismatchError(
                f"box store was built for another image list (store: {len(self)} images, fingerprint "
                f"{self.fingerprint[:12]}; dataset: {len(keys)} images, fingerprint {fingerprint(keys)[:12]})")
        if self._key_to_row is None:
            self._key_to_row = {k: i for i, k in enumerate(self.keys)}
        rows = np.array([self._key_to_row.get(k, -1) for k in keys], dtype=np.int64)
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            names = ", ".join(keys[i] for i in missing[:5])
            raise BoxStoreMismatchError(
                f"{missing.size} of {len(keys)} dataset images are not in the box store "
                f"(method {self.meta.get('method')!r}, {len(self)} images), e.g. {names}")
        if sizes is not None:
            sizes = np.asarray(sizes).reshape(-1, 2)
            bad = np.flatnonzero((self.sizes[rows] != sizes).any(axis=1))
            if bad.size:
                i = bad[0]
                raise BoxStoreMismatchError(
                    f"{bad.size} images have another size in the box store than in the dataset, e.g. "
                    f"{keys[i]}: store {tuple(self.sizes[rows[i]].tolist())}, dataset {tuple(sizes[i].tolist())}")
        return rows

    # ---- persistence ---------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file in the same folder, fsync, rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        key_blobs = [k.encode("utf-8") for k in self.keys]
        key_offsets = np.concatenate([[0], np.cumsum([len(b) for b in key_blobs])]).astype(np.int64)
        arrays = {
            "sizes": np.ascontiguousarray(self.sizes, dtype=np.int32),
            "offsets": np.ascontiguousarray(self.offsets, dtype=np.int64),
            "boxes": np.ascontiguousarray(self.boxes, dtype=np.float32).reshape(-1, 4),
            "key_bytes": np.frombuffer(b"".join(key_blobs), dtype=np.uint8),
            "key_offsets": key_offsets,
        }
        if self.scores is not None:
            arrays["scores"] = np.ascontiguousarray(self.scores, dtype=np.float32)
        meta = dict(self.meta)
        meta["fingerprint"] = fingerprint(list(self.keys))
        layout, pos = {}, 0
        for name, a in arrays.items():
            layout[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": pos}
            pos += -(-a.nbytes // _ALIGN) * _ALIGN
        header = json.dumps({"meta": meta, "arrays": layout}).encode("utf-8")
        data_start = -(-(len(MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC)
                f.write(np.uint64(len(header)).tobytes())
                f.write(header)
                for name, a in arrays.items():
                    f.seek(data_start + layout[name]["offset"])
                    f.write(a.tobytes())
                f.truncate(data_start + pos)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BoxStore":
        """Open a store, memory-mapping its arrays."""
        path = Path(path)
        with open(path, "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                raise ValueError(f"{path} is not a dali_objcrop box store (bad magic {magic[:12]!r})")
            n = int(np.frombuffer(f.read(8), dtype=np.uint64)[0])
            header = json.loads(f.read(n).decode("utf-8"))
        data_start = -(-(len(MAGIC) + 8 + n) // _ALIGN) * _ALIGN
        arrays = {}
        for name, spec in header["arrays"].items():
            shape = tuple(spec["shape"])
            if int(np.prod(shape)) == 0:
                arrays[name] = np.zeros(shape, dtype=np.dtype(spec["dtype"]))
            else:
                arrays[name] = np.memmap(path, dtype=np.dtype(spec["dtype"]), mode="r",
                                         offset=data_start + spec["offset"], shape=shape)
        keys = _LazyKeys(arrays["key_bytes"], arrays["key_offsets"])
        return cls(keys=keys, sizes=arrays["sizes"], offsets=arrays["offsets"], boxes=arrays["boxes"],
                   scores=arrays.get("scores"), meta=header["meta"])

    def summary(self) -> str:
        v = self.meta.get("validation", {})
        return (f"{len(self)} images, {self.num_boxes} boxes ({self.meta.get('method')}), "
                f"{self.meta.get('images_without_boxes', 0)} without boxes; validation: "
                f"{v.get('clipped', 0)} clipped, {v.get('dropped_nonfinite', 0)} non-finite and "
                f"{v.get('dropped_degenerate', 0)} degenerate dropped")


class _LazyKeys(Sequence):
    """Image keys decoded on demand from the memory-mapped utf-8 blob."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray) -> None:
        self._blob, self._offsets = blob, offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return bytes(self._blob[self._offsets[i]:self._offsets[i + 1]]).decode("utf-8")

    def __iter__(self) -> Iterable[str]:
        data = bytes(self._blob)
        off = self._offsets
        for i in range(len(self)):
            yield data[off[i]:off[i + 1]].decode("utf-8")
