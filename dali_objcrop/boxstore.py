"""The box store: one file of per-image object proposals.

Layout of a ``.boxes`` file (little-endian)::

    b"OBJCROPBOX\\x00\\x02"   magic + format version (12 bytes)
    uint64                    length of the JSON header
    JSON header               metadata (method, params, fingerprint, counts),
                              per array its dtype, shape and byte offset, and
                              ``data_bytes`` / ``data_sha256`` of the array region
    32 bytes                  sha256 of everything before it (magic, length, header)
    arrays, 64-byte aligned   sizes (N, 2) int32 as (width, height)
                              offsets (N + 1,) int64 into boxes
                              boxes (M, 4) float32 normalised [x1, y1, x2, y2], best-first
                              scores (M,) float32 (optional)
                              key_bytes (K,) uint8, key_offsets (N + 1,) int64: utf-8 image keys

Saving writes a temporary file beside the target and renames it (atomic on
POSIX; the file gets the usual ``0666 & ~umask`` mode).  Loading memory-maps the
arrays, so ``boxes_of(i)`` is O(1); it also checks both checksums and the
structure and values of the arrays (1.4 s for 1M images x 10 boxes, 240 MB), so a
truncated, damaged or foreign store fails with an error naming the file instead
of training on shifted or invalid boxes.  Version-1 stores (no checksums) still
load, with the same structural checks.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .coco_stream import CocoArrays, _concat, read_coco_arrays
from .dataset import PackedKeys, fingerprint
from .fileio import array_bytes as _raw, atomic_write_sections, section_layout

MAGIC = b"OBJCROPBOX\x00\x02"
MAGIC_V1 = b"OBJCROPBOX\x00\x01"
_ALIGN = 64
_DIGEST = 32
_EXACT_MEAN_MAX = 1 << 22   # mean_area_fraction: above this many boxes, summed in blocks of _MEAN_ROWS images
_MEAN_ROWS = 1 << 18


class BoxStoreMismatchError(ValueError):
    """The box store does not describe the dataset it is used with."""


class BoxStoreError(ValueError):
    """A box store file that cannot be trusted (truncated, damaged, invalid values); names the file."""


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    m = os.umask(0o022)  # fallback: read by setting (not thread-safe, hence the /proc path first)
    os.umask(m)
    return m


def _sha256_of_file(path: Path, start: int, length: int, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            chunk = f.read(min(block, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


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

    keys: list[str] | PackedKeys
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
        # repeated keys are refused by from_flat (one check, one message)
        counts = np.array([len(np.asarray(b).reshape(-1, 4)) for b in boxes], dtype=np.int64)
        flat = (np.concatenate([np.asarray(b, np.float64).reshape(-1, 4) for b in boxes])
                if len(boxes) else np.zeros((0, 4)))
        flat_scores = (np.concatenate([np.asarray(s, np.float32).reshape(-1) for s in scores])
                       if scores is not None and len(scores) else None)
        return cls.from_flat(keys, sizes, flat, counts, flat_scores, method=method, params=params,
                             normalized=normalized, top_k=top_k)

    @classmethod
    def from_flat(cls, keys: Sequence[str], sizes: np.ndarray, boxes, counts: np.ndarray,
                  scores: np.ndarray | None = None, method: str = "arrays", params: dict | None = None,
                  normalized: bool = True, top_k: int | None = None, block: int = 1 << 20) -> "BoxStore":
        """:meth:`from_arrays` for boxes already in one (M, 4) array, image by image (``counts[i]`` of
        image i), validated in blocks of whole images of about ``block`` boxes (a dataset of 10M boxes
        needs no full-size float64 temporaries).  ``boxes`` may also be a callable taking an index array
        of flat positions (e.g. a reordering that is never materialised)."""
        keys = list(keys)
        sizes = np.asarray(sizes, dtype=np.int32).reshape(-1, 2)
        counts = np.asarray(counts, dtype=np.int64)
        if len(keys) != len(sizes) or len(keys) != len(counts):
            raise ValueError(f"keys ({len(keys)}), sizes ({len(sizes)}) and counts ({len(counts)}) differ in length")
        if len(set(keys)) != len(keys):
            seen, dup = set(), []
            for k in keys:
                if k in seen and k not in dup:
                    dup.append(k)
                seen.add(k)
            raise ValueError(f"image keys must be unique; {len(dup)} repeated: "
                             + ", ".join(repr(k) for k in dup[:5]) + (" ..." if len(dup) > 5 else ""))
        take = boxes if callable(boxes) else (lambda idx, b=boxes: np.asarray(b)[idx])
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        report, out_boxes, out_scores = ValidationReport(), [], []
        new_counts = np.zeros(len(keys), np.int64)
        r0 = 0
        while r0 < len(keys):   # blocks of whole images
            r1 = max(r0 + 1, int(np.searchsorted(starts, starts[r0] + block, side="right")) - 1)
            r1 = min(r1, len(keys))
            lo, hi = int(starts[r0]), int(starts[r1])
            owner = np.repeat(np.arange(r0, r1), counts[r0:r1])
            flat = np.asarray(take(np.arange(lo, hi)), np.float64).reshape(-1, 4)
            if not normalized:
                wh = sizes[owner].astype(np.float64)
                flat = flat / np.concatenate([wh, wh], axis=1)
            keep, clipped, rep = validate_boxes(flat, sizes[owner])
            report = report + rep
            if top_k is not None:  # rank of each kept box within its image
                rank = np.cumsum(keep) - 1
                first = np.concatenate([[0], np.cumsum(np.bincount(owner[keep] - r0, minlength=r1 - r0))])[:-1]
                keep &= (rank - first[owner - r0]) < top_k
            new_counts[r0:r1] = np.bincount(owner[keep] - r0, minlength=r1 - r0)
            out_boxes.append(clipped[keep])
            if scores is not None:
                out_scores.append(np.asarray(scores[lo:hi], np.float32)[keep])
            r0 = r1
        offsets = np.concatenate([[0], np.cumsum(new_counts)]).astype(np.int64)
        emptied = np.flatnonzero((counts > 0) & (new_counts == 0))
        meta = {
            "method": method,
            "params": params or {},
            "validation": report.as_dict(),
            "fingerprint": fingerprint(keys),
            "num_images": len(keys),
            "num_boxes": int(offsets[-1]),
            "images_without_boxes": int((new_counts == 0).sum()),
            # images that had boxes, all of them dropped by validation (they fall back to scene crops)
            "images_emptied_by_validation": int(len(emptied)),
        }
        if len(emptied):
            meta["images_emptied_examples"] = [keys[i] for i in emptied[:5]]
        return cls(keys=keys, sizes=sizes, offsets=offsets, boxes=_concat(out_boxes, np.float32, (4,)),
                   scores=_concat(out_scores, np.float32, ()) if scores is not None else None, meta=meta)

    @classmethod
    def from_coco(cls, annotations: str | os.PathLike, top_k: int | None = None,
                  include_crowd: bool = True) -> "BoxStore":
        """Ground-truth boxes of a COCO-format JSON as proposals (largest first)."""
        return cls.from_coco_arrays(read_coco_arrays(annotations), top_k, include_crowd,   # one streaming pass
                                    params={"annotations": str(annotations), "top_k": top_k})

    @classmethod
    def from_coco_arrays(cls, arr: CocoArrays, top_k: int | None = None, include_crowd: bool = True,
                         params: dict | None = None) -> "BoxStore":
        """The ground-truth store of a COCO json read by :func:`~dali_objcrop.coco_stream.read_coco_arrays`:
        per image its boxes largest first (ties in file order), validated in blocks of images, so 10M
        boxes need no full-size float64 temporaries and no per-image Python objects."""
        rows, b = arr.ann_row, arr.ann_bbox
        order = np.lexsort((-(b[:, 2] * b[:, 3]), rows))      # stable: equal areas keep the file order
        if not include_crowd:
            order = order[~arr.ann_crowd[order]]
        counts = np.bincount(rows[order] if not include_crowd else rows, minlength=len(arr.file_names))

        def xyxy(idx: np.ndarray) -> np.ndarray:
            x = b[order[idx]]                                   # a copy (fancy indexing)
            x[:, 2:] += x[:, :2]
            return x

        return cls.from_flat(arr.file_names, arr.sizes, xyxy, counts, method="gt", normalized=False, top_k=top_k,
                             params=params if params is not None else {"annotations": str(arr.path), "top_k": top_k})

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
        """Mean proposal area as a fraction of its image (over each image's top-k).

        A store of more than 2**22 boxes is summed in blocks of images (no gather of every box: at 1M
        images x 10 boxes that would be ~0.5 GB of temporaries); smaller ones exactly as always."""
        if self.num_boxes > _EXACT_MEAN_MAX:
            total, count, step = 0.0, 0, _MEAN_ROWS
            for r0 in range(0, len(self), step):
                b, _ = self.gather(np.arange(r0, min(r0 + step, len(self))), top_k)
                b = b.astype(np.float64)
                total += float(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum())
                count += len(b)
            return total / count
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
        if getattr(keys, "fingerprint", None) == self.fingerprint and len(keys) == len(self):
            # the same key list in the same order (an image index's KeyTable carries its fingerprint):
            # the rows are the positions, no key dictionary is built (1M keys: ~1 s and ~150 MB saved)
            rows = np.arange(len(self), dtype=np.int64)
        else:
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
        layout, pos, data_sha256 = section_layout(arrays, _ALIGN)
        header = json.dumps({"meta": meta, "arrays": layout, "data_bytes": pos,
                             "data_sha256": data_sha256}).encode("utf-8")
        head = MAGIC + np.uint64(len(header)).tobytes() + header
        data_start = -(-(len(head) + _DIGEST) // _ALIGN) * _ALIGN
        return atomic_write_sections(path, head, [(data_start + layout[name]["offset"], _raw(a))
                                                  for name, a in arrays.items()],
                                     data_start + pos, "box store", 0o666 & ~_umask(), zero_fill=True)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "BoxStore":
        """Open a store, memory-mapping its arrays.

        Args:
            path: the ``.boxes`` file.
            verify: check the array-region checksum (reads the whole file once).  The header
                checksum, the file length and the array structure and values are always checked.

        Raises:
            BoxStoreError (a ValueError): not a box store, truncated, a checksum mismatch, or
                arrays that break the format (offsets, key table) or hold invalid boxes (NaN,
                inverted, outside [0, 1]); the message names the file and, for boxes, an image.
        """
        path = Path(path)
        try:
            file_size = path.stat().st_size
            with open(path, "rb") as f:
                magic = f.read(len(MAGIC))
                if magic not in (MAGIC, MAGIC_V1):
                    raise BoxStoreError(f"{path} is not a dali_objcrop box store (bad magic {magic[:12]!r})")
                raw_n = f.read(8)
                if len(raw_n) < 8:
                    raise BoxStoreError(f"{path} is truncated ({file_size} bytes, no header)")
                n = int(np.frombuffer(raw_n, dtype=np.uint64)[0])
                if n > file_size:
                    raise BoxStoreError(f"{path}: damaged header (header length {n} > file size {file_size})")
                header_bytes = f.read(n)
                digest = f.read(_DIGEST) if magic == MAGIC else b""
        except OSError as e:
            raise BoxStoreError(f"cannot read box store {path}: {e}") from e
        if magic == MAGIC:
            if len(digest) < _DIGEST or hashlib.sha256(magic + raw_n + header_bytes).digest() != digest:
                raise BoxStoreError(f"{path}: header checksum mismatch (damaged or truncated file); rebuild the store")
            data_start = -(-(len(MAGIC) + 8 + n + _DIGEST) // _ALIGN) * _ALIGN
        else:
            data_start = -(-(len(MAGIC) + 8 + n) // _ALIGN) * _ALIGN
        try:
            header = json.loads(header_bytes.decode("utf-8"))
            layout = header["arrays"]
            specs = {name: (np.dtype(sp["dtype"]), tuple(int(x) for x in sp["shape"]), int(sp["offset"]))
                     for name, sp in layout.items()}
            meta = header["meta"]
        except Exception as e:
            raise BoxStoreError(f"{path}: damaged header ({type(e).__name__}: {e}); rebuild the store") from None
        need = {"sizes", "offsets", "boxes", "key_bytes", "key_offsets"}
        if not need <= set(specs):
            raise BoxStoreError(f"{path}: header lacks arrays {sorted(need - set(specs))}")
        end = max((off + dt.itemsize * int(np.prod(sh)) for dt, sh, off in specs.values()), default=0)
        data_bytes = int(header.get("data_bytes", end))
        if file_size < data_start + max(end, data_bytes if magic == MAGIC else 0):
            raise BoxStoreError(f"{path} is truncated: {file_size} bytes, the header describes "
                                f"{data_start + max(end, data_bytes)}; rebuild the store")
        if magic == MAGIC and verify and _sha256_of_file(path, data_start, data_bytes) != header.get("data_sha256"):
            raise BoxStoreError(f"{path}: data checksum mismatch (the arrays were changed or damaged); "
                                f"rebuild the store")
        arrays = {}
        for name, (dt, shape, off) in specs.items():
            if int(np.prod(shape)) == 0:
                arrays[name] = np.zeros(shape, dtype=dt)
            else:
                arrays[name] = np.memmap(path, dtype=dt, mode="r", offset=data_start + off, shape=shape)
        _check_arrays(path, arrays)
        keys = PackedKeys(arrays["key_bytes"], arrays["key_offsets"])
        if magic == MAGIC_V1:
            meta = dict(meta, format_version=1)
        return cls(keys=keys, sizes=arrays["sizes"], offsets=arrays["offsets"], boxes=arrays["boxes"],
                   scores=arrays.get("scores"), meta=meta)

    def summary(self) -> str:
        v = self.meta.get("validation", {})
        return (f"{len(self)} images, {self.num_boxes} boxes ({self.meta.get('method')}), "
                f"{self.meta.get('images_without_boxes', 0)} without boxes; validation: "
                f"{v.get('clipped', 0)} clipped, {v.get('dropped_nonfinite', 0)} non-finite and "
                f"{v.get('dropped_degenerate', 0)} degenerate dropped"
                + (f", {self.meta['images_emptied_by_validation']} images lost all their boxes"
                   if self.meta.get("images_emptied_by_validation") else ""))


def _check_arrays(path: Path, a: dict) -> None:
    """Structure and values of a loaded store's arrays (a store written elsewhere is not trusted)."""
    def bad(msg: str) -> BoxStoreError:
        return BoxStoreError(f"{path}: {msg}; rebuild the store")
    sizes, offsets, boxes = a["sizes"], a["offsets"], a["boxes"]
    key_bytes, key_offsets = a["key_bytes"], a["key_offsets"]
    if sizes.ndim != 2 or sizes.shape[1] != 2 or boxes.ndim != 2 or boxes.shape[1] != 4:
        raise bad(f"arrays of the wrong shape (sizes {sizes.shape}, boxes {boxes.shape})")
    n = len(sizes)
    if offsets.shape != (n + 1,) or key_offsets.shape != (n + 1,):
        raise bad(f"offsets {offsets.shape} / key_offsets {key_offsets.shape} do not fit {n} images")
    o = np.asarray(offsets)
    if o[0] != 0 or o[-1] != len(boxes) or (np.diff(o) < 0).any():
        raise bad(f"box offsets are not a non-decreasing 0..{len(boxes)} sequence")
    ko = np.asarray(key_offsets)
    if ko[0] != 0 or ko[-1] != len(key_bytes) or (np.diff(ko) < 0).any():
        raise bad("image-key offsets are inconsistent")
    scores = a.get("scores")
    if scores is not None and scores.shape != (len(boxes),):
        raise bad(f"{len(scores)} scores for {len(boxes)} boxes")
    if n and int(np.asarray(sizes).min()) < 1:
        i = int(np.flatnonzero((np.asarray(sizes) < 1).any(axis=1))[0])
        raise bad(f"image {_key_at(key_bytes, ko, i)!r} has size {tuple(np.asarray(sizes[i]).tolist())}")
    # boxes: 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 (NaN fails every comparison, +-inf the range),
    # in blocks so that a store of millions of images needs no full-size temporaries
    n_bad, first = 0, -1
    for s in range(0, len(boxes), 1 << 20):
        b = np.asarray(boxes[s:s + (1 << 20)])
        x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
        with np.errstate(invalid="ignore"):
            ok = (x1 >= 0) & (y1 >= 0) & (x2 <= 1) & (y2 <= 1) & (x2 > x1) & (y2 > y1)
        if not ok.all():
            n_bad += int((~ok).sum())
            first = s + int(np.flatnonzero(~ok)[0]) if first < 0 else first
    if n_bad:
        i = int(np.searchsorted(o, first, side="right") - 1)
        raise bad(f"{n_bad} of {len(boxes)} boxes are invalid (non-finite, inverted, empty or outside [0, 1]), "
                  f"e.g. image {_key_at(key_bytes, ko, i)!r}: {np.asarray(boxes[first]).tolist()}")


def _key_at(blob: np.ndarray, offsets: np.ndarray, i: int) -> str:
    return bytes(blob[offsets[i]:offsets[i + 1]]).decode("utf-8", "replace")
