"""A COCO json read in one streaming pass into arrays, never holding every annotation as an object.

``json.load`` of a COCO file turns every image and annotation into a dict: at 1M images with ~9.5
boxes each that is ~10M dicts, 6 GB and (with the garbage collector walking them) ~40 s on the 2-core
reference machine.  Here the file is read in blocks; the ``images`` and ``annotations`` arrays are
cut at element boundaries and each block is decoded by the standard library's C decoder
(``json.loads`` of ``"[" + block + "]"``), reduced to NumPy arrays (image id, file name, size; per
annotation image id, box, crowd flag, category) and dropped, with the garbage collector paused (the
parsed objects hold no cycles).  Peak memory is one block's objects plus the arrays.

Why the standard library: on this machine a ``json.loads`` of a block costs the same per byte as one
``json.load`` of the file without its garbage-collector passes, a regex extraction of the same fields
was no faster (2.5 s vs 2.3 s per 100k images), and orjson / ijson are not installed (orjson would still
build every dict; ijson's per-event Python callbacks are slower than the C decoder).  The arrays
pass the same checks as :func:`~dali_objcrop.dataset.validate_coco`; whenever a check fails, or the
file is not plain JSON this reader can cut (invalid JSON, string image ids, ``true`` inside a box),
:func:`read_coco_arrays` falls back to :func:`~dali_objcrop.dataset.load_coco`, so every error
message is the one ``load_coco`` gives, and an unusual but valid file is still read (with its memory).
"""
from __future__ import annotations

import gc
import itertools
import json
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .dataset import Coco, load_coco

_BLOCK = 1 << 23                  # characters read per block (8 Mi: ~70k annotations)
_WS = re.compile(r"[ \t\n\r]*")
_BOUNDARY = re.compile(r"\}[ \t\n\r]*,[ \t\n\r]*\{")
_DEC = json.JSONDecoder()


class _Unusual(Exception):
    """The fast reader cannot vouch for this file: hand it to ``load_coco`` (exact errors, or a valid read)."""


@dataclass
class CocoArrays:
    """What dali_objcrop uses of a COCO json, as arrays.

    Attributes:
        path: the json.
        image_ids: (N,) int64, in file order.
        file_names: N strings.
        sizes: (N, 2) int32 (width, height).
        ann_row: (M,) int64 image row (position in ``image_ids``) of each annotation, file order.
        ann_bbox: (M, 4) float64 ``[x, y, w, h]`` pixels.
        ann_crowd: (M,) bool.
        categories: the ``categories`` list (small).
        fast: False when the file was read by ``load_coco`` instead (see the module docstring).
    """

    path: Path
    image_ids: np.ndarray
    file_names: list[str]
    sizes: np.ndarray
    ann_row: np.ndarray
    ann_bbox: np.ndarray
    ann_crowd: np.ndarray
    categories: list
    fast: bool = True


class _Reader:
    """A text file read in blocks, with ``raw_decode`` of one value at a time and bulk element blocks."""

    def __init__(self, f, block: int = _BLOCK, on_bytes: Callable[[int], None] | None = None) -> None:
        self.f, self.block, self.on_bytes = f, block, on_bytes
        self.buf, self.pos, self.eof = "", 0, False
        self.literals = True    # whether the last yielded block's text holds 'true' or 'false'

    def fill(self) -> bool:
        if self.pos:
            self.buf, self.pos = self.buf[self.pos:], 0
        chunk = self.f.read(self.block)
        if not chunk:
            self.eof = True
            return False
        if self.on_bytes is not None:
            self.on_bytes(len(chunk))
        self.buf += chunk
        return True

    def peek(self) -> str:
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.fill():
                return self.buf[self.pos:self.pos + 1]

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            raise _Unusual(f"expected {ch!r}")
        self.pos += 1

    def value(self):
        self.peek()
        while True:
            try:
                v, end = _DEC.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if self.eof or not self.fill():
                    raise _Unusual("invalid JSON") from None
                continue
            if end >= len(self.buf) and not self.eof and self.fill():   # a number cut by the block end
                continue
            self.pos = end
            return v

    def elements(self):
        """Yield lists of the elements of the array starting at the cursor (after its ``[``)."""
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        single_until = -1  # after a failed bulk cut, elements are read one by one up to it
        while True:
            while len(self.buf) - self.pos < self.block and not self.eof:
                self.fill()
            items = None
            if self.pos >= single_until:
                k = self.buf.rfind("}", self.pos, len(self.buf) - 1)
                m = _BOUNDARY.match(self.buf, k) if k > self.pos else None
                for _ in range(64):       # the last '}' may be a nested one or cut before its ', {'
                    if m is not None or k <= self.pos:
                        break
                    k = self.buf.rfind("}", self.pos, k)
                    m = _BOUNDARY.match(self.buf, k) if k > self.pos else None
                if m is not None:
                    text = "[" + self.buf[self.pos:k + 1] + "]"
                    try:
                        items = json.loads(text)
                        self.pos = m.end() - 1
                        self.literals = "true" in text or "false" in text
                    except json.JSONDecodeError as e:
                        if e.msg == "Extra data":     # the array ended inside the block: text[:e.pos] is all of it
                            try:
                                rest = json.loads(text[:e.pos])
                            except json.JSONDecodeError:
                                rest = None
                            if isinstance(rest, list):
                                self.pos += e.pos - 1
                                self.literals = True
                                yield rest
                                return
                        single_until, items = k, None   # go one by one up to k (an error is found there)
            if items is not None:
                yield items
                continue
            self.literals = True
            yield [self.value()]
            c = self.peek()
            self.pos += 1
            if c == "]":
                return
            if c != ",":
                raise _Unusual("expected ',' or ']'")


def read_coco_arrays(path: str | os.PathLike, on_images: Callable[[CocoArrays], None] | None = None,
                     on_bytes: Callable[[int], None] | None = None) -> CocoArrays:
    """Read and validate a COCO json into :class:`CocoArrays` in one streaming pass.

    Args:
        path: the json.
        on_images: called once the ``images`` array is read, before the annotations are (the
            index starts its header scan there); the annotation fields are empty at that point.
        on_bytes: progress callback, characters read per block.

    Raises:
        CocoFormatError: exactly as :func:`~dali_objcrop.dataset.load_coco` (it produces the message).
    """
    path = Path(path)
    gc_was = gc.isenabled()
    gc.disable()   # the parsed blocks hold no cycles; collections would only walk them (and torch's objects)
    try:
        try:
            return _read_fast(path, on_images, on_bytes)
        except _Unusual:
            pass
    finally:
        if gc_was:
            gc.enable()
    return _from_coco(load_coco(path), on_images)


def _from_coco(coco: Coco, on_images) -> CocoArrays:
    """The slow path's result in the fast path's form (image ids mapped to their rows)."""
    ims = coco.images
    ids = np.arange(len(ims), dtype=np.int64)            # image ids may be any JSON value here: use rows
    row = {im["id"]: i for i, im in enumerate(ims)}
    a_img, a_box, a_crowd = [], [], []
    for im in ims:
        for a in coco.anns_by_image.get(im["id"], []):
            a_img.append(row[im["id"]])
            a_box.append(a["bbox"])
            a_crowd.append(bool(a.get("iscrowd", 0)))
    out = CocoArrays(path=coco.path, image_ids=ids, file_names=[im["file_name"] for im in ims],
                     sizes=np.array([[im["width"], im["height"]] for im in ims], np.int32).reshape(-1, 2),
                     ann_row=np.array(a_img, np.int64), ann_bbox=np.array(a_box, np.float64).reshape(-1, 4),
                     ann_crowd=np.array(a_crowd, bool), categories=coco.categories, fast=False)
    if on_images is not None:
        on_images(out)
    return out


def _ints(values: list, what: str) -> np.ndarray:
    if values and set(map(type, values)) != {int}:       # map/set run in C; bools are not ints here
        raise _Unusual(f"{what} not all integers")
    return np.array(values, dtype=np.int64)


def _read_fast(path: Path, on_images, on_bytes) -> CocoArrays:
    seen: dict[str, object] = {}
    ids = names = sizes = None
    anns = _Anns()
    cats: list = []
    with open(path, encoding="utf-8") as f:
        r = _Reader(f, on_bytes=on_bytes)
        r.expect("{")
        if r.peek() == "}":
            raise _Unusual("empty object")
        while True:
            key = r.value()
            if not isinstance(key, str) or key in seen:
                raise _Unusual("odd top-level key")
            r.expect(":")
            if key == "images" and r.peek() == "[":
                # per block: numbers into arrays, names into one string; the block's objects all die, so
                # the allocator's arenas go back to the system (a kept str per dict would pin them all)
                id_b, w_b, h_b, name_b = [], [], [], []
                for items in r.elements():
                    try:
                        got = list(map(_IMAGE_FIELDS, items))
                    except (KeyError, TypeError):
                        raise _Unusual("image entry without id, file_name or size") from None
                    if not got:
                        continue
                    a, b, c, d = zip(*got)
                    id_b.append(_ints(a, "image ids"))
                    w_b.append(_ints(c, "widths"))
                    h_b.append(_ints(d, "heights"))
                    if set(map(type, b)) != {str} or "" in b:
                        raise _Unusual("file names")
                    joined = "\n".join(b)
                    if joined.count("\n") != len(b) - 1:
                        raise _Unusual("a newline in a file name")
                    name_b.append(joined)
                    del got, a, b, c, d, items
                names = "\n".join(name_b).split("\n") if name_b else []
                del name_b
                ids = _concat(id_b, np.int64, ())
                sizes = np.stack([_concat(w_b, np.int64, ()), _concat(h_b, np.int64, ())], axis=1).reshape(-1, 2)
                if len(sizes) and (sizes.min() < 1 or sizes.max() > np.iinfo(np.int32).max):
                    raise _Unusual("sizes")
                sizes = sizes.astype(np.int32)
                if len(np.unique(ids)) != len(ids) or len(set(names)) != len(names):
                    raise _Unusual("duplicate image ids or file names")
                anns.know(ids)
                seen[key] = True
                if on_images is not None and "annotations" not in seen:
                    on_images(CocoArrays(path, ids, names, sizes, np.zeros(0, np.int64), np.zeros((0, 4)),
                                         np.zeros(0, bool), [], True))
            elif key == "annotations" and r.peek() == "[":
                for items in r.elements():
                    anns.add(items, r.literals)
                seen[key] = True
            else:
                v = r.value()
                if key in ("images", "annotations"):
                    raise _Unusual(f"{key} is not a list")
                if key == "categories":
                    cats = v
                seen[key] = True
            c = r.peek()
            r.pos += 1
            if c == "}":
                break
            if c != ",":
                raise _Unusual("expected ',' or '}'")
        if r.peek() != "":
            raise _Unusual("trailing data")
    if ids is None or "annotations" not in seen:
        raise _Unusual("no images or annotations list")
    if cats:
        if not isinstance(cats, list) or not all(isinstance(c, dict) for c in cats):
            raise _Unusual("categories")
        cat_ids = [c.get("id") for c in cats]
        if len(set(cat_ids)) != len(cat_ids) or not anns.cats <= set(cat_ids):
            raise _Unusual("duplicate or unknown category ids")
    anns.know(ids)
    return CocoArrays(path, ids, names, sizes, _concat(anns.row, np.int64, ()), _concat(anns.box, np.float64, (4,)),
                      _concat(anns.crowd, bool, ()), cats if isinstance(cats, list) else [])


_IMAGE_FIELDS = operator.itemgetter("id", "file_name", "width", "height")
_ANN_FIELDS = operator.itemgetter("image_id", "bbox")


def _concat(blocks: list, dtype, tail: tuple) -> np.ndarray:
    """np.concatenate that frees each block once copied (peak: the result plus one block, not twice it)."""
    out = np.empty((sum(len(b) for b in blocks),) + tail, dtype)
    at = 0
    for i in range(len(blocks)):
        out[at:at + len(blocks[i])] = blocks[i]
        at += len(blocks[i])
        blocks[i] = None
    blocks.clear()
    return out


class _Anns:
    """Annotation blocks reduced to arrays (image rows, boxes, crowd flags) and the set of category ids,
    with validate_coco's checks; any doubt raises _Unusual."""

    def __init__(self) -> None:
        self.row: list[np.ndarray] = []       # image rows once the images are known, else image ids
        self.box: list[np.ndarray] = []
        self.crowd: list[np.ndarray] = []
        self.cats: set = set()
        self._sorted = self._order = None
        self._pending = 0                     # leading blocks that hold image ids (annotations before images)

    def know(self, ids: np.ndarray) -> None:
        if self._sorted is None:
            self._order = np.argsort(ids, kind="stable")
            self._sorted = ids[self._order]
        for i in range(self._pending):
            self.row[i] = self._rows(self.row[i])
        self._pending = 0

    def _rows(self, img: np.ndarray) -> np.ndarray:
        s = self._sorted
        pos = np.searchsorted(s, img)
        if len(img) and (len(s) == 0 or not (s[np.minimum(pos, len(s) - 1)] == img).all()):
            raise _Unusual("annotations of unknown images")
        return self._order[np.minimum(pos, max(len(s) - 1, 0))].astype(np.int64)

    def add(self, items: list, literals: bool) -> None:
        try:
            got = list(map(_ANN_FIELDS, items))
        except (KeyError, TypeError):
            raise _Unusual("annotation without image_id or bbox") from None
        if not got:
            return
        img, bb = zip(*got)
        try:
            crowd = list(map(operator.itemgetter("iscrowd"), items))
        except KeyError:
            crowd = [a.get("iscrowd", 0) for a in items]
        try:
            self.cats.update(map(operator.itemgetter("category_id"), items))
        except KeyError:
            self.cats.update(a["category_id"] for a in items if "category_id" in a)
        except TypeError:
            raise _Unusual("unhashable category id") from None
        if set(map(type, bb)) != {list} or set(map(len, bb)) != {4}:
            raise _Unusual("bbox not a list of 4")
        try:
            flat = np.fromiter(itertools.chain.from_iterable(bb), np.float64, 4 * len(bb)).reshape(-1, 4)
        except (TypeError, ValueError):
            raise _Unusual("bbox values") from None
        if literals and _bool_in(bb):
            raise _Unusual("true/false in a bbox")
        if not (np.isfinite(flat).all() and (flat[:, 2:] >= 0).all()):
            raise _Unusual("bbox values")
        ids = _ints(list(img), "annotation image ids")
        if self._sorted is None:
            self.row.append(ids)
            self._pending += 1
        else:
            self.row.append(self._rows(ids))
        self.box.append(flat)
        self.crowd.append(np.array(crowd, np.int64) != 0 if set(map(type, crowd)) <= {int}
                          else np.array([bool(c) for c in crowd]))


def _bool_in(bb: list) -> bool:
    """Whether a box holds ``true``/``false`` (validate_coco refuses them; float() would take them as 1/0).
    ``True in b`` is a C-speed test that also matches 1 and 0; only those boxes are looked at in Python."""
    for b in bb:
        if True in b or False in b:
            for v in b:
                if v is True or v is False:
                    return True
    return False
