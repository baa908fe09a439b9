"""Crop-window maths: the single source of truth for object-aware cropping.

Given a batch of image sizes, their object proposals and sample indices, decide
both views' crop windows for every crop mode (``sample_windows``).  Pure NumPy,
vectorised over the batch (the only Python loops run over the 10 tries, not
over samples), and keyed by ``(seed, epoch, sample_index)`` through
:mod:`dali_objcrop.rng`, so any sample's windows can be recomputed alone.  The
DALI graph and the CUDA kernel in ``csrc/`` only *apply* these windows and are
tested against this module.

Semantics (Mishra et al., "Object-aware Cropping for Self-Supervised Learning",
TMLR 2022; docs/method.md):

* scene view: torchvision ``RandomResizedCrop.get_params`` on the whole image,
  scale (0.2, 1), ratio (3/4, 4/3), 10 tries, then the centre fallback.
* object view: the same sampler inside a region derived from one proposal ``b``
  drawn uniformly from the image's top-k, with scale ``(s_min, 1)`` where
  ``s_min = 0.2 / mean proposal area fraction`` capped to 1.
* ``obj-obj-dilate``: view 2's region is ``b`` grown by ``delta * (W, H)`` on
  each side and clipped to the image (``obj-obj`` is ``delta = 0``).
* ``obj-obj-shift``: view 2's region is ``b`` moved by ``r`` pixels (``r``
  uniform in ``shift_range``) in a uniform random direction, then translated
  back inside the image where it would leave it.
* every region narrower or shorter than ``min_box_size`` (224) is widened to
  ``min(min_box_size, image side)`` around its centre and kept in the image.
* images without proposals get scene crops in every view (counted).
* local (multi-crop) views, ``local_crops = M`` of them (default 0: none, and every
  other output is unchanged): the same sampler with scale ``local_scale`` (a fraction of
  the region) inside a region set by ``local_from``: ``box`` -- the union of the regions
  of the global object views (the proposal for ``obj-scene`` / ``obj-obj``, the dilated
  region for ``obj-obj-dilate``, proposal and shifted region for ``obj-obj-shift``);
  ``boxes`` -- local view ``j`` inside proposal ``(b + j) mod k`` (``b`` the global views'
  proposal, ``k`` the image's top-k count; widened as above), so one sample covers several
  objects; ``scene`` -- the whole image.  Images without proposals: the whole image.

All windows are integer pixel rectangles ``[x1, y1, x2, y2)`` (x2, y2 exclusive).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import rng

MODES = ("scene-scene", "obj-scene", "obj-obj", "obj-obj-dilate", "obj-obj-shift")
LOCAL_SOURCES = ("box", "boxes", "scene")
LOCAL_SCALE = (0.05, 0.4)
SCENE_SCALE = (0.2, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def box_scale_from_mean_area(mean_area_fraction: float, scene_min_scale: float = SCENE_SCALE[0]
                             ) -> tuple[float, float]:
    """Scale range of a crop inside a box: ``(min(scene_min / mean_area, 1), 1)``.

    A box crop then covers about as much of the image as the smallest scene crop
    (paper, section 3: COCO BING proposals cover ~39% of the image).
    """
    if not (mean_area_fraction > 0 and math.isfinite(mean_area_fraction)):
        raise ValueError(f"mean_area_fraction must be a positive number, got {mean_area_fraction!r}")
    return (min(scene_min_scale / mean_area_fraction, 1.0), 1.0)


@dataclass(frozen=True)
class CropConfig:
    """Parameters of the two-view crop sampler.

    Args:
        mode: one of :data:`MODES`.
        scale: scene-crop area range (fraction of the image).
        ratio: aspect-ratio range (width / height), sampled log-uniformly.
        box_scale: area range of a crop inside a box region; ``None`` means
            ``(1.0, 1.0)`` until set from a box store with
            :func:`box_scale_from_mean_area` (the loader does this).
        dilate: ``delta`` of ``obj-obj-dilate`` (0.1 COCO, 0.2 OpenImages).
        shift_range: ``(r_min, r_max)`` pixels of ``obj-obj-shift``.
        min_box_size: regions smaller than this (pixels, per side) are widened.
        top_k: proposals considered per image (the store keeps them best-first).
        num_tries: RandomResizedCrop tries before the centre fallback (at most 10).
        flip_p: probability of a horizontal flip, per view.
        local_crops: number M of local (multi-crop) views (0..16; 0: none, today's two views only).
        local_scale: local-crop area range, a fraction of its region (DINO: (0.05, 0.4)).
        local_size: output side of the local views in pixels (the crop backends read it).
        local_from: where local views are drawn: ``box``, ``boxes`` or ``scene`` (:data:`LOCAL_SOURCES`).
    """

    mode: str = "obj-obj-dilate"
    scale: tuple[float, float] = SCENE_SCALE
    ratio: tuple[float, float] = RATIO
    box_scale: tuple[float, float] | None = None
    dilate: float = 0.1
    shift_range: tuple[float, float] = (80.0, 120.0)
    min_box_size: int = 224
    top_k: int = 10
    num_tries: int = 10
    flip_p: float = 0.5
    local_crops: int = 0
    local_scale: tuple[float, float] = LOCAL_SCALE
    local_size: int = 96
    local_from: str = "box"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("scale", "ratio", "local_scale") + (("box_scale",) if self.box_scale is not None else ()):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi) or (name != "ratio" and hi > 1):
                raise ValueError(f"{name} must satisfy 0 < lo <= hi{' <= 1' if name != 'ratio' else ''}, "
                                 f"got {getattr(self, name)!r}")
        if not 0 <= self.dilate <= 1:
            raise ValueError(f"dilate must be in [0, 1], got {self.dilate!r}")
        if not 0 <= self.shift_range[0] <= self.shift_range[1]:
            raise ValueError(f"shift_range must satisfy 0 <= lo <= hi, got {self.shift_range!r}")
        if self.min_box_size < 1:
            raise ValueError(f"min_box_size must be >= 1, got {self.min_box_size!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k!r}")
        if not 1 <= self.num_tries <= rng.MAX_TRIES:
            raise ValueError(f"num_tries must be in [1, {rng.MAX_TRIES}], got {self.num_tries!r}")
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p!r}")
        if not 0 <= self.local_crops <= rng.MAX_LOCAL_VIEWS:
            raise ValueError(f"local_crops must be in [0, {rng.MAX_LOCAL_VIEWS}], got {self.local_crops!r}")
        if self.local_size < 1:
            raise ValueError(f"local_size must be >= 1, got {self.local_size!r}")
        if self.local_from not in LOCAL_SOURCES:
            raise ValueError(f"local_from must be one of {LOCAL_SOURCES}, got {self.local_from!r}")
        if self.local_crops and self.local_from != "scene" and not self.uses_boxes:
            raise ValueError(f"local_from={self.local_from!r} draws local views inside proposals, and mode "
                             f"'scene-scene' uses none: use local_from='scene' (or an object mode)")

    @property
    def view_kinds(self) -> tuple[str, str]:
        """What each view is cut from: ``scene``, ``box``, ``dilated`` or ``shifted``."""
        return {
            "scene-scene": ("scene", "scene"),
            "obj-scene": ("box", "scene"),
            "obj-obj": ("box", "box"),
            "obj-obj-dilate": ("box", "dilated"),
            "obj-obj-shift": ("box", "shifted"),
        }[self.mode]

    @property
    def effective_dilate(self) -> float:
        return 0.0 if self.mode == "obj-obj" else self.dilate

    @property
    def uses_boxes(self) -> bool:
        return self.mode != "scene-scene"

    @property
    def num_views(self) -> int:
        """All views of a sample: the two global views and ``local_crops`` local views."""
        return 2 + self.local_crops


@dataclass
class CropWindows:
    """Windows of a batch of N samples (all arrays are indexed by batch row).

    Attributes:
        windows: (N, 2, 4) int32, each view's crop ``[x1, y1, x2, y2)`` in pixels.
        flip: (N, 2) bool, horizontal flip per view.
        regions: (N, 2, 4) int32, the region each view was sampled in
            (the whole image for scene views).
        box: (N, 4) float64, the chosen proposal in pixels (NaN without one).
        box_index: (N,) int64, index of the chosen proposal within its image (-1 without).
        fallback: (N,) bool, the mode wanted a box but the image had none.
        keys: (N,) uint64 per-sample random keys (for augmentation draws).
        local_windows: (N, M, 4) int32, the local views' crops (M = ``CropConfig.local_crops``; M = 0: empty).
        local_flip: (N, M) bool.
        local_regions: (N, M, 4) int32, the region each local view was sampled in.
        local_box_index: (N, M) int64, the proposal a local view was drawn in (-1: none, or ``scene``).
    """

    windows: np.ndarray
    flip: np.ndarray
    regions: np.ndarray
    box: np.ndarray
    box_index: np.ndarray
    fallback: np.ndarray
    keys: np.ndarray
    extras: dict = field(default_factory=dict)
    local_windows: np.ndarray | None = None
    local_flip: np.ndarray | None = None
    local_regions: np.ndarray | None = None
    local_box_index: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.windows)
        if self.local_windows is None:
            self.local_windows = np.zeros((n, 0, 4), np.int32)
            self.local_regions = np.zeros((n, 0, 4), np.int32)
            self.local_flip = np.zeros((n, 0), bool)
            self.local_box_index = np.zeros((n, 0), np.int64)

    @property
    def num_fallback(self) -> int:
        return int(self.fallback.sum())

    @property
    def num_local(self) -> int:
        return int(self.local_windows.shape[1])

    @property
    def all_windows(self) -> np.ndarray:
        """(N, 2 + M, 4) int32: global views, then local views (the operators' order)."""
        return np.concatenate([self.windows, self.local_windows], axis=1)

    @property
    def all_flip(self) -> np.ndarray:
        """(N, 2 + M) bool: global views, then local views."""
        return np.concatenate([self.flip, self.local_flip], axis=1)

    def normalized(self, sizes: np.ndarray) -> np.ndarray:
        """Windows as float32 fractions of the image size, (N, 2, 4)."""
        wh = np.asarray(sizes, dtype=np.float64)[:, None, :]
        return (self.windows / np.concatenate([wh, wh], axis=-1)).astype(np.float32)


Cols = tuple  # (x1, y1, x2, y2): four (N,) float64 arrays holding exact integers (pixel rectangles)


def _to_pixels(box: np.ndarray, w: np.ndarray, h: np.ndarray) -> Cols:
    """Normalised float boxes (N, 4) -> integer pixel rectangles covering them, >= 1 px."""
    x1 = np.clip(np.floor(box[:, 0] * w), 0, w - 1)
    y1 = np.clip(np.floor(box[:, 1] * h), 0, h - 1)
    x2 = np.clip(np.ceil(box[:, 2] * w), x1 + 1, w)
    y2 = np.clip(np.ceil(box[:, 3] * h), y1 + 1, h)
    return x1, y1, x2, y2


def _gather_boxes(boxes: np.ndarray, offsets: np.ndarray, pick: np.ndarray, has_box: np.ndarray) -> np.ndarray:
    """Each row's proposal ``pick`` (>= 0) as normalised (N, 4) float64; the whole image ``[0, 0, 1, 1]`` where
    the row has none (every rule then maps it back to the whole image: the scene fallback, without row subsets)."""
    b = boxes[np.minimum(offsets[:-1] + pick, max(len(boxes) - 1, 0))] if len(boxes) else np.zeros((len(pick), 4))
    return np.where(has_box[:, None], b, np.array([0.0, 0.0, 1.0, 1.0]))


def _widen(lo: np.ndarray, hi: np.ndarray, size: np.ndarray, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Widen ``[lo, hi)`` to at least ``min(min_size, size)`` around its centre, inside ``[0, size)``."""
    target = np.minimum(np.maximum(hi - lo, min_size), size)
    new_lo = np.clip(np.floor((lo + hi - target) / 2), 0, size - target)  # exact: integers below 2**52
    return new_lo, new_lo + target


def _min_size_region(r: Cols, w: np.ndarray, h: np.ndarray, min_size: int) -> Cols:
    x1, x2 = _widen(r[0], r[2], w, min_size)
    y1, y2 = _widen(r[1], r[3], h, min_size)
    return x1, y1, x2, y2


def random_resized_crop(keys: np.ndarray, view: int, region: np.ndarray,
                        scale_lo: np.ndarray, scale_hi: np.ndarray,
                        ratio: tuple[float, float], num_tries: int = 10) -> np.ndarray:
    """torchvision ``RandomResizedCrop.get_params`` inside ``region``, vectorised.

    Args:
        keys: (N,) uint64 sample keys.
        view: 0 or 1 (selects the random slots).
        region: (N, 4) int64 ``[x1, y1, x2, y2)`` to crop from.
        scale_lo, scale_hi: (N,) float64 area range as a fraction of the region.
        ratio: aspect-ratio range (w / h), sampled log-uniformly.
        num_tries: tries before the centre fallback.

    Returns:
        (N, 4) int64 windows ``[x1, y1, x2, y2)``.
    """
    region = np.asarray(region, dtype=np.float64).reshape(-1, 4)
    out = np.empty((len(keys), 4), dtype=np.int64)
    _random_resized_crop_cols(keys, view, tuple(region.T), scale_lo, scale_hi, ratio, num_tries, out)
    return out


def _random_resized_crop_cols(keys: np.ndarray, view: int, region: Cols, scale_lo, scale_hi,
                              ratio: tuple[float, float], num_tries: int, out: np.ndarray) -> None:
    """:func:`random_resized_crop` on a region given as columns, writing the (N, 4) windows into ``out``."""
    n = len(keys)
    rx, ry = region[0], region[1]
    rw = region[2] - rx
    rh = region[3] - ry
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    cw = np.zeros(n)
    ch = np.zeros(n)
    # Shrinking working set: try t only touches the rows no earlier try accepted.
    todo = np.arange(n)
    lo, span = np.asarray(scale_lo, np.float64), np.asarray(scale_hi, np.float64) - scale_lo
    uniform_scale = n > 0 and lo.min() == lo.max() and span.min() == span.max()
    if uniform_scale:  # one scale range for the whole batch: scalars, fewer arrays to shrink
        lo, span = float(lo[0]), float(span[0])
    k, w_, h_ = keys, rw, rh
    for t in range(num_tries):
        if todo.size == 0:
            break
        u_s, u_r = rng.uniforms(k, rng.view_slot(view, rng.VIEW_TRY + t))
        target = (w_ * h_) * (lo + u_s * span)
        ar = np.exp(log_r0 + u_r * (log_r1 - log_r0))
        tw = np.rint(np.sqrt(target * ar))
        th = np.rint(np.sqrt(target / ar))
        ok = (tw > 0) & (th > 0) & (tw <= w_) & (th <= h_)
        if t == 0:
            cw, ch = np.where(ok, tw, 0.0), np.where(ok, th, 0.0)
        else:
            cw[todo[ok]], ch[todo[ok]] = tw[ok], th[ok]
        rest = ~ok
        todo, k, w_, h_ = todo[rest], k[rest], w_[rest], h_[rest]
        if not uniform_scale:
            lo, span = lo[rest], span[rest]
    u_i, u_j = rng.uniforms(keys, rng.view_slot(view, rng.VIEW_POS))
    top = np.floor(u_i * (rh - ch + 1))
    left = np.floor(u_j * (rw - cw + 1))
    if todo.size:  # centre fallback, torchvision semantics
        frw, frh = rw[todo], rh[todo]
        in_ratio = frw / frh
        fw, fh = frw.copy(), frh.copy()
        narrow = in_ratio < ratio[0]
        wide = in_ratio > ratio[1]
        fh[narrow] = np.rint(frw[narrow] / ratio[0])
        fw[wide] = np.rint(frh[wide] * ratio[1])
        cw[todo], ch[todo] = fw, fh
        top[todo] = np.floor((frh - fh) / 2)
        left[todo] = np.floor((frw - fw) / 2)
    x1 = rx + left
    y1 = ry + top
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = x1, y1, x1 + cw, y1 + ch


def sample_windows(sizes: np.ndarray, boxes: np.ndarray, offsets: np.ndarray, index: np.ndarray,
                   seed: int, epoch: int, config: CropConfig) -> CropWindows:
    """Both views' crop windows for a batch.

    Args:
        sizes: (N, 2) image sizes as (width, height) in pixels.
        boxes: (M, 4) float32 proposals, normalised ``[x1, y1, x2, y2]``, each
            image's boxes contiguous and best-first.
        offsets: (N + 1,) int64, image ``i`` owns ``boxes[offsets[i]:offsets[i+1]]``.
        index: (N,) sample indices (dataset positions), the random key.
        seed, epoch: the rest of the random key.
        config: the sampler parameters.

    Returns:
        :class:`CropWindows`.
    """
    sizes = np.asarray(sizes)
    index = np.asarray(index)
    offsets = np.asarray(offsets, dtype=np.int64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(index)
    if sizes.shape != (n, 2) or offsets.shape != (n + 1,):
        raise ValueError(f"sizes must be ({n}, 2) and offsets ({n + 1},), got {sizes.shape} and {offsets.shape}")
    if n and (sizes.min() < 1):
        raise ValueError("image sizes must be >= 1 pixel")
    keys = rng.sample_keys(seed, epoch, index)

    count = np.minimum(np.diff(offsets), config.top_k)
    has_box = count > 0
    box_index = np.full(n, -1, dtype=np.int64)
    box_px = np.full((n, 4), np.nan)
    fallback = np.zeros(n, dtype=bool)
    kinds = config.view_kinds
    wf, hf = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)  # integer-valued
    whole = (np.zeros(n), np.zeros(n), wf, hf)
    regions = [whole, whole]  # per view: (x1, y1, x2, y2) float64 columns of exact integers

    if config.uses_boxes:
        # Every row is computed, none gathered: an image without boxes gets the whole image as its "box",
        # which every rule below maps back to the whole image (the scene fallback), so no row subsets.
        fallback = ~has_box
        u_box, _ = rng.uniforms(keys, rng.SLOT_BOX)
        pick = np.minimum(np.floor(u_box * count).astype(np.int64), np.maximum(count - 1, 0))
        box_index = np.where(has_box, pick, -1)
        b = _gather_boxes(boxes, offsets, pick, has_box)   # (N, 4) normalised
        box_px = np.where(has_box[:, None], b * np.stack([wf, hf, wf, hf], axis=1), np.nan)
        b_px = _to_pixels(b, wf, hf)
        regions[0] = _min_size_region(b_px, wf, hf, config.min_box_size)
        if kinds[1] == "box":
            regions[1] = regions[0]
        elif kinds[1] == "dilated":
            d = config.effective_dilate
            grown = np.clip(b + np.array([-d, -d, d, d]), 0.0, 1.0)
            regions[1] = _min_size_region(_to_pixels(grown, wf, hf), wf, hf, config.min_box_size)
        elif kinds[1] == "shifted":
            u_dir, u_rad = rng.uniforms(keys, rng.SLOT_SHIFT)
            r0, r1 = config.shift_range
            radius = r0 + u_rad * (r1 - r0)
            theta = 2.0 * math.pi * u_dir
            dx = np.floor(radius * np.cos(theta) + 0.5)
            dy = np.floor(radius * np.sin(theta) + 0.5)
            # translate back inside the image where the move would leave it (a whole-image box: no move)
            x1, y1, x2, y2 = b_px
            dx = np.clip(dx, -x1, wf - x2)
            dy = np.clip(dy, -y1, hf - y2)
            regions[1] = _min_size_region((x1 + dx, y1 + dy, x2 + dx, y2 + dy), wf, hf, config.min_box_size)
            shift = np.stack([dx, dy], axis=1).astype(np.int64)

    box_lo, box_hi = config.box_scale if config.box_scale is not None else (1.0, 1.0)
    windows = np.empty((n, 2, 4), dtype=np.int32)
    regions_out = np.empty((n, 2, 4), dtype=np.int32)
    for v in (0, 1):
        object_view = (kinds[v] != "scene") & has_box if config.uses_boxes else np.zeros(n, bool)
        s_lo = np.where(object_view, box_lo, config.scale[0])
        s_hi = np.where(object_view, box_hi, config.scale[1])
        for c in range(4):
            regions_out[:, v, c] = regions[v][c]
        _random_resized_crop_cols(keys, v, regions[v], s_lo, s_hi, config.ratio, config.num_tries, windows[:, v])
    flip = np.stack([rng.uniforms(keys, rng.view_slot(v, rng.VIEW_FLIP))[0] < config.flip_p for v in (0, 1)],
                    axis=1)
    out = CropWindows(windows=windows, flip=flip, regions=regions_out,
                      box=box_px, box_index=box_index, fallback=fallback, keys=keys)
    if kinds[1] == "shifted":
        out.extras["shift"] = shift
    if config.local_crops:
        _sample_local(out, config, wf, hf, whole, regions, boxes, offsets, count, has_box, pick_cols=box_index)
    return out


def _sample_local(out: CropWindows, config: CropConfig, wf: np.ndarray, hf: np.ndarray, whole: Cols,
                  regions: list, boxes: np.ndarray, offsets: np.ndarray, count: np.ndarray, has_box: np.ndarray,
                  pick_cols: np.ndarray) -> None:
    """The local views of :func:`sample_windows` (``config.local_crops`` of them), written into ``out``."""
    n, m = len(out.keys), config.local_crops
    kinds = config.view_kinds
    out.local_windows = np.empty((n, m, 4), np.int32)
    out.local_regions = np.empty((n, m, 4), np.int32)
    out.local_box_index = np.full((n, m), -1, np.int64)
    s_lo, s_hi = np.full(n, config.local_scale[0]), np.full(n, config.local_scale[1])
    if config.local_from == "box":
        # the union of the global object views' regions (each is the whole image where there is no box)
        obj = [v for v in (0, 1) if kinds[v] != "scene"]
        region = tuple(np.minimum(regions[obj[0]][c], regions[obj[-1]][c]) if c < 2 else
                       np.maximum(regions[obj[0]][c], regions[obj[-1]][c]) for c in range(4))
        out.local_box_index[:] = out.box_index[:, None]
    elif config.local_from == "scene":
        region = whole
    for j in range(m):
        if config.local_from == "boxes":
            # proposal (b + j) mod k: local view 0 on the global views' proposal, the others on the next ones
            pick = np.where(has_box, (np.maximum(pick_cols, 0) + j) % np.maximum(count, 1), -1)
            b = _gather_boxes(boxes, offsets, np.maximum(pick, 0), has_box)
            region = _min_size_region(_to_pixels(b, wf, hf), wf, hf, config.min_box_size)
            out.local_box_index[:, j] = pick
        for c in range(4):
            out.local_regions[:, j, c] = region[c]
        _random_resized_crop_cols(out.keys, 2 + j, region, s_lo, s_hi, config.ratio, config.num_tries,
                                  out.local_windows[:, j])
    out.local_flip = np.stack([rng.uniforms(out.keys, rng.view_slot(2 + j, rng.VIEW_FLIP))[0] < config.flip_p
                               for j in range(m)], axis=1)
