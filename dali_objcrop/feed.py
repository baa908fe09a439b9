"""The per-batch feed of the loader's pipelines: what the Python side hands DALI for one batch.

Two feeds, one per pipeline (:mod:`dali_objcrop.pipelines`): the operators' pipeline gets file paths,
positions, box-store rows and the epoch (:meth:`_Source.handover`, :data:`PLUGIN_FIELDS`), everything else
happening in DALI; the DALI-ops graph gets the encoded bytes, both views' windows and every augmentation
draw, computed here in NumPy, vectorised over the batch (:meth:`_Source.inputs`, :data:`INPUT_FIELDS`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import augment as _augment
from .boxstore import BoxStore
from .ops_graph import aug_stages
from .windows import CropConfig, CropWindows, sample_windows

# Inputs the batch callback can emit (the external source emits the base fields, the crop
# backend's own fields and the per-view augmentation draws, in this order).
_AUG_FIELDS = ("colour", "brightness", "contrast", "saturation", "hue", "blur", "blur_h", "blur_v", "solarize")
BASE_FIELDS = ("jpegs", "index")
ROI_DECODE_FIELDS = ("anchor", "shape")
CROP_FIELDS = ("roi_start0", "roi_end0", "roi_start1", "roi_end1", "window", "flip")
AUG_FIELDS = tuple(f"{f}{v}" for v in (0, 1) for f in _AUG_FIELDS)
INPUT_FIELDS = BASE_FIELDS + ROI_DECODE_FIELDS + CROP_FIELDS + AUG_FIELDS


def _aug_fields(recipe: _augment.Recipe) -> tuple[str, ...]:
    out = []
    for v in (0, 1):
        st = aug_stages(recipe.views[v])
        for stage, params in (("colour", ("brightness", "contrast", "saturation", "hue")),
                              ("blur", ("blur_h", "blur_v")), ("solarize", ())):
            if st[stage] == "drawn":
                out.append(f"{stage}{v}")
            if st[stage] != "off":
                out += [f"{p}{v}" for p in params]
    return tuple(out)


def window_rois(windows: np.ndarray, flip: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-view ``(roi_start, roi_end)`` for ``fn.resize`` on HWC images, (y, x) order, float32.

    A flipped view swaps its x coordinates (DALI mirrors an axis whose start > end).

    Args:
        windows: (N, 2, 4) ``[x1, y1, x2, y2)``.
        flip: (N, 2) bool.

    Returns:
        ``(start0, end0, start1, end1)``, each (N, 2) float32.
    """
    out = []
    for v in (0, 1):
        x1, y1, x2, y2 = (windows[:, v, i].astype(np.float32) for i in range(4))
        f = flip[:, v]
        out.append(np.stack([y1, np.where(f, x2, x1)], axis=1))
        out.append(np.stack([y2, np.where(f, x1, x2)], axis=1))
    return tuple(out)


def read_encoded(paths: list[str]) -> list[np.ndarray]:
    """The raw bytes of each file as a uint8 array."""
    return [np.fromfile(p, dtype=np.uint8) for p in paths]


@dataclass
class _Source:
    """What a batch needs from the dataset: paths, sizes, box rows, sampler config."""

    paths: list[str]
    sizes: np.ndarray                 # (N, 2) int32
    store: BoxStore | None
    rows: np.ndarray | None           # dataset position -> store row
    config: CropConfig
    recipe: _augment.Recipe
    seed: int

    def windows(self, index: np.ndarray, epoch: int) -> CropWindows:
        index = np.asarray(index, dtype=np.int64)
        if self.store is None:
            boxes, offsets = np.zeros((0, 4), np.float32), np.zeros(len(index) + 1, np.int64)
        else:
            boxes, offsets = self.store.gather(self.rows[index], self.config.top_k)
        return sample_windows(self.sizes[index], boxes, offsets, index, self.seed, epoch, self.config)

    def inputs(self, index: np.ndarray, epoch: int, roi_decode: bool = True,
               fields: tuple[str, ...] | None = None) -> tuple[dict[str, object], CropWindows]:
        """Everything the pipeline's external source emits for one batch (see :data:`INPUT_FIELDS`).

        With ``roi_decode`` only the union of the two windows is decoded (``anchor``
        (x, y) and ``shape`` (w, h), float32 pixels) and the crop fields are in the
        coordinates of that region.  ``fields`` (default: all) spares the blur kernels
        of views whose recipe never blurs.
        """
        cw = self.windows(index, epoch)
        win = cw.windows
        d: dict[str, object] = {
            "jpegs": read_encoded([self.paths[i] for i in index]),
            "index": np.asarray(index, dtype=np.int64),
        }
        if roi_decode:
            lo = win[:, :, :2].min(axis=1)                         # (N, 2) union top-left (x, y)
            hi = win[:, :, 2:].max(axis=1)                         # (N, 2) union bottom-right
            d["anchor"], d["shape"] = lo.astype(np.float32), (hi - lo).astype(np.float32)
            win = win - np.concatenate([lo, lo], axis=1)[:, None, :].astype(win.dtype)
        s0, e0, s1, e1 = window_rois(win, cw.flip)
        d.update({"roi_start0": s0, "roi_end0": e0, "roi_start1": s1, "roi_end1": e1,
                  "window": np.ascontiguousarray(win, dtype=np.int32), "flip": cw.flip.astype(np.uint8)})
        one = np.ones((1, 1), np.float32)
        for v in (0, 1):
            p = _augment.sample_aug_params(cw.keys, v, self.recipe.views[v])
            if fields is None or f"blur_h{v}" in fields:
                kern, ksize = _augment.gaussian_kernels(p["sigma"])
                # per-sample separable kernels for fn.filter: (1, k) along x, (k, 1) along y; 1x1 if not blurred
                p["blur_h"] = [kern[i, None, :ksize[i]] if p["blur"][i] else one for i in range(len(kern))]
                p["blur_v"] = [kern[i, :ksize[i], None] if p["blur"][i] else one for i in range(len(kern))]
            for f in _AUG_FIELDS:
                if f in p:
                    d[f"{f}{v}"] = p[f]
        return d, cw


    # ---- the operators' path (dali_objcrop.plugin): only positions and file names are handed over ----
    def path_bytes(self) -> list[np.ndarray]:
        """Every file path as utf-8 bytes (``fn.io.file.read``'s input), built once."""
        if getattr(self, "_path_bytes", None) is None:   # a mapped index makes them per access (utf8())
            self._path_bytes = (self.paths.utf8() if hasattr(self.paths, "utf8") else
                                [np.frombuffer(p.encode("utf-8"), dtype=np.uint8) for p in self.paths])
        return self._path_bytes

    def handover(self, index: np.ndarray, epoch: int, roi_decode: bool = True,
                 fields: tuple[str, ...] | None = None) -> tuple[dict[str, object], "_Count"]:
        """The per-batch hand-over of the operators' pipeline (see :data:`PLUGIN_FIELDS`): file paths
        (DALI's C++ threads read the files), positions (the random key), box-store rows, the epoch.
        No window, draw or file byte is computed here."""
        index = np.asarray(index, dtype=np.int64)
        pb = self.path_bytes()
        rows = self.rows[index] if self.rows is not None else index
        without = 0
        if self.store is not None and self.config.uses_boxes:
            without = int((self.store.offsets[rows + 1] == self.store.offsets[rows]).sum())
        d = {"paths": [pb[i] for i in index], "index": index, "rows": np.asarray(rows, dtype=np.int64),
             "epoch": np.full(len(index), epoch, dtype=np.int64)}
        return d, _Count(without)


@dataclass
class _Count:
    """What ``_pull`` reads from a hand-over: how many samples fell back to scene crops."""

    num_fallback: int


PLUGIN_FIELDS = ("paths", "index", "rows", "epoch")   # "rows" only where boxes come from a store


def plugin_fields(with_store: bool) -> tuple[str, ...]:
    """The hand-over fields the operators' pipeline reads (DALI warns about unused ones)."""
    return PLUGIN_FIELDS if with_store else tuple(f for f in PLUGIN_FIELDS if f != "rows")
