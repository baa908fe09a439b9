"""Our BING: the same model files and the same boxes as ``cv2.saliency.ObjectnessBING``,
vectorised with NumPy/OpenCV, with the real (stage-II calibrated) scores.

One module of ~600 lines on purpose: the algorithm (gradients, the two stages, NMS) and the model files'
format belong together; the trainer of new models is train_bing.py.

BING (Cheng et al., "BING: Binarized Normed Gradients for Objectness Estimation at 300fps",
CVPR 2014) scores every window of a set of quantised sizes (w, h) in {16, 32, ..., 512}^2:

1. for each active size, resize the image so that a w x h window becomes 8 x 8
   (``INTER_LINEAR_EXACT``, as OpenCV);
2. normed gradient: per pixel ``min(|dx| + |dy|, 255)`` with central differences (one-sided,
   doubled, on the border); for ``MAXBGR`` a difference is the max over the colour channels;
3. stage I: correlate with the learned 8x8 filter.  OpenCV approximates the filter by two
   binary components ``w ~ c0 * b0 + c1 * b1`` (b in {-1, 1}) and the gradient by its top
   four bits, so its score is exactly ``c0 * S0 + c1 * S1`` with integer
   ``Si = sum(bi * (mag >> 4))``: we compute S0 and S1
   (one exact float32 ``filter2D`` with the kernel ``b0 + 2048 * b1``) and combine them
   in float32 the way OpenCV does, so the scores are bit-identical;
4. per size, greedy non-maximum suppression on the score map (5 x 5 neighbourhoods, best
   250 kept): done as parallel rounds of 5 x 5 max filters over the top candidates (a point
   is kept once it is the best undecided point of its neighbourhood), stopping as soon as
   the best 250 are settled;
5. stage II: per-size linear calibration ``s * a + b``; all sizes sorted together
   (ties as OpenCV: later insertion first).

The result is OpenCV's list (same boxes, same order) with real scores; see
tests/spec/test_proposals_bing.py for the measured agreement.

A box store keeps only the top k (10) after NMS across sizes, which needs only the head of
that list: :meth:`Bing.top` computes it lazily and exactly (each size's greedy NMS on its 64
best points, extended only where a calibration bound says the rest could still matter), so
step 4 shrinks from whole score maps to a few thousand points per image.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .common import check_bgr_u8

BASE, W, NSS = 2, 8, 2
MIN_T = math.ceil(math.log(10.0) / math.log(BASE))   # 4: windows from 16 px
MAX_T = math.ceil(math.log(500.0) / math.log(BASE))  # 9: windows up to 512 px
NUM_T = MAX_T - MIN_T + 1
COLORS = ("MAXBGR", "HSV", "I")
_K5 = np.ones((2 * NSS + 1, 2 * NSS + 1), np.uint8)


def size_of(r: int) -> tuple[int, int]:
    """(width, height) in pixels of quantised size index ``r``."""
    return int(round(BASE ** (r % NUM_T + MIN_T))), int(round(BASE ** (r // NUM_T + MIN_T)))


def size_index(w_exp: int, h_exp: int) -> int:
    """Size index of a (2**w_exp, 2**h_exp) window."""
    return (h_exp - MIN_T) * NUM_T + (w_exp - MIN_T)


def _read_mat(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"BING model file {path} does not exist")
    name = path.name.split(".")[0]
    try:  # a damaged file raises a cv2.error that names nothing ("isMap() in function operator[]")
        fs = cv2.FileStorage(str(path), cv2.FILE_STORAGE_READ)
        if not fs.isOpened():
            raise FileNotFoundError(f"cannot open BING model file {path}")
        m = fs.getNode(name).mat()
        fs.release()
    except cv2.error as e:
        raise ValueError(f"BING model file {path} is damaged or not an OpenCV .yml.gz file: "
                         f"{str(e).strip().splitlines()[-1]}") from None
    if m is None:
        raise ValueError(f"{path} has no matrix named {name!r}")
    return m


def _write_mat(path: Path, m: np.ndarray) -> None:
    tmp = path.with_name(path.name.replace(".yml.gz", ".tmp.yml.gz"))
    fs = cv2.FileStorage(str(tmp), cv2.FILE_STORAGE_WRITE)
    fs.write(path.name.split(".")[0], m)
    fs.release()
    os.replace(tmp, path)


def binarize_filter(w: np.ndarray, n_comp: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's binary approximation of the 8x8 filter (FilterTIG::update), float32 exact.

    Returns:
        ``(coeffs (n_comp,) float32, signs (n_comp, 8, 8) float32 in {-1, 1})``.
    """
    res = np.asarray(w, np.float32).reshape(-1).copy()
    coeffs, signs = [], []
    for _ in range(n_comp):
        b = np.where(res >= 0, np.float32(1), np.float32(-1)).astype(np.float32)
        avg = np.float32(0)
        for v in res * b:  # sequential float32 sum, as the C loop
            avg = np.float32(avg + v)
        avg = np.float32(avg / np.float32(res.size))
        res = (res - avg * b).astype(np.float32)
        coeffs.append(avg)
        signs.append(b.reshape(W, W))
    return np.array(coeffs, np.float32), np.stack(signs)


@dataclass
class BingModel:
    """A BING model: the stage-I filter, the active sizes and their stage-II calibration.

    Attributes:
        color: ``MAXBGR``, ``HSV`` or ``I``.
        filter: (8, 8) float32 stage-I weights.
        size_idx: (S,) int32 active size indices (see :func:`size_of`).
        calib: (S, 2) float32 per-size ``(scale, offset)``.
    """

    color: str
    filter: np.ndarray
    size_idx: np.ndarray
    calib: np.ndarray

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"color must be one of {COLORS}, got {self.color!r}")
        self.filter = np.asarray(self.filter, np.float32).reshape(W, W)
        self.size_idx = np.asarray(self.size_idx, np.int32).reshape(-1)
        self.calib = np.asarray(self.calib, np.float32).reshape(-1, 2)
        if len(self.size_idx) < 2 or len(self.calib) != len(self.size_idx):
            raise ValueError(f"need >= 2 sizes and one calibration row per size, got {len(self.size_idx)} "
                             f"sizes and {len(self.calib)} rows")
        if self.size_idx.min() < 0 or self.size_idx.max() >= NUM_T * NUM_T:
            raise ValueError(f"size indices must be in [0, {NUM_T * NUM_T}), got {self.size_idx.tolist()}")

    @property
    def name(self) -> str:
        return f"ObjNessB{BASE}W{W}{self.color}"

    @classmethod
    def load(cls, model_dir: str | os.PathLike, color: str = "MAXBGR") -> "BingModel":
        """Read ``ObjNessB2W8<color>.{wS1,idx,wS2}.yml.gz`` (OpenCV's format)."""
        d = Path(model_dir)
        name = f"ObjNessB{BASE}W{W}{color}"
        return cls(color, _read_mat(d / f"{name}.wS1.yml.gz"), _read_mat(d / f"{name}.idx.yml.gz"),
                   _read_mat(d / f"{name}.wS2.yml.gz"))

    def save(self, model_dir: str | os.PathLike) -> list[Path]:
        """Write the three files that ``cv2.saliency.ObjectnessBING`` loads."""
        d = Path(model_dir)
        d.mkdir(parents=True, exist_ok=True)
        out = []
        for part, m in (("wS1", self.filter), ("idx", self.size_idx.reshape(-1, 1)), ("wS2", self.calib)):
            p = d / f"{self.name}.{part}.yml.gz"
            _write_mat(p, np.ascontiguousarray(m))
            out.append(p)
        return out


def _dist_max3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = cv2.absdiff(a, b)
    return np.maximum(np.maximum(d[..., 0], d[..., 1]), d[..., 2])


def _dist_sum3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = cv2.absdiff(a, b).astype(np.int32)
    return d.sum(axis=-1)


_K13 = np.ones((1, 3), np.uint8)
_Q4 = (np.arange(256) >> 4).astype(np.float32).reshape(1, 256)


def _chan_max(d: np.ndarray) -> np.ndarray:
    """Max over the 3 channels of a (h, w, 3) uint8 array: a 1 x 3 dilation of the
    interleaved rows, read at every third column (each pixel's middle channel)."""
    h = d.shape[0]
    return cv2.dilate(np.ascontiguousarray(d).reshape(h, -1), _K13)[:, 1::3]


def _gradient_maxbgr(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    if h < 2 or w < 2:
        return normed_gradient(img, "MAXBGR", reference=True)
    # a replicated border makes the central difference at the edge the one-sided one ...
    p = cv2.copyMakeBorder(img, 1, 1, 1, 1, cv2.BORDER_REPLICATE)
    gx = _chan_max(cv2.absdiff(p[1:-1, 2:], p[1:-1, :-2]))
    gy = _chan_max(cv2.absdiff(p[2:, 1:-1], p[:-2, 1:-1]))
    # ... which OpenCV doubles (saturated: min(2d + g, 255) == sat(sat(2d) + g))
    gx[:, ::w - 1] = np.minimum(gx[:, ::w - 1].astype(np.uint16) * 2, 255)
    gy[::h - 1] = np.minimum(gy[::h - 1].astype(np.uint16) * 2, 255)
    return cv2.add(np.ascontiguousarray(gx), np.ascontiguousarray(gy))


def normed_gradient(img: np.ndarray, color: str = "MAXBGR", reference: bool = False) -> np.ndarray:
    """BING's normed gradient ``min(|gx| + |gy|, 255)`` as uint8 (h, w) (OpenCV's gradientMag).

    Interior pixels use central differences ``|p[x+1] - p[x-1]|``; border pixels twice the
    one-sided difference (HSV: the central difference halved, the border one not doubled).
    ``reference`` selects the plain NumPy version for MAXBGR (the default is a faster
    equivalent built from OpenCV calls; tests check they agree).
    """
    h, w = img.shape[:2]
    if color == "MAXBGR" and not reference:
        return _gradient_maxbgr(img)
    if color == "MAXBGR":
        src, dist, half, dbl = img, _dist_max3, False, 2
    elif color == "I":
        src = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        dist, half, dbl = (lambda a, b: cv2.absdiff(a, b)), False, 2
    elif color == "HSV":
        src, dist, half, dbl = cv2.cvtColor(img, cv2.COLOR_BGR2HSV), _dist_sum3, True, 1
    else:
        raise ValueError(f"color must be one of {COLORS}, got {color!r}")
    gx = np.empty((h, w), np.int32)
    gy = np.empty((h, w), np.int32)
    gx[:, 1:-1] = dist(src[:, 2:], src[:, :-2])
    gy[1:-1, :] = dist(src[2:, :], src[:-2, :])
    if half:
        gx[:, 1:-1] //= 2
        gy[1:-1, :] //= 2
    # int32 before doubling: a uint8 product would wrap around at 128
    gx[:, 0] = dist(src[:, 1], src[:, 0]).astype(np.int32) * dbl
    gx[:, -1] = dist(src[:, -1], src[:, -2]).astype(np.int32) * dbl
    gy[0, :] = dist(src[1, :], src[0, :]).astype(np.int32) * dbl
    gy[-1, :] = dist(src[-1, :], src[-2, :]).astype(np.int32) * dbl
    return np.minimum(gx + gy, 255).astype(np.uint8)


def nms_rounds(score: np.ndarray, max_points: int, first_k: int = 2048, max_rounds: int | None = None
               ) -> np.ndarray:
    """OpenCV's greedy score-map NMS (descending score, ties: larger flat index first;
    each kept point suppresses its 5 x 5 neighbourhood), best ``max_points`` kept.

    Computed as parallel rounds over the top candidates: an undecided candidate that holds
    the best rank of its undecided 5 x 5 neighbourhood is kept, then its neighbourhood is
    suppressed.  Candidates are all points scoring at least the ``first_k``-th best, so
    they are closed upwards; if they settle fewer than ``max_points`` keeps, ``first_k``
    grows.  ``max_rounds`` (None: exact) stops after that many rounds and returns the
    points kept so far (always the best of their neighbourhoods: a close, faster variant).

    Returns:
        int64 flat indices of the kept points, in greedy order.
    """
    h, w = score.shape
    n = h * w
    flat = score.reshape(-1)
    k = min(n, first_k)
    while True:
        if k >= n:
            cand = np.arange(n)
        else:
            thr = np.partition(flat, n - k)[n - k]
            cand = np.flatnonzero(flat >= thr)
        vals = flat[cand]
        order = np.lexsort((-cand, -vals))          # best first; ties: larger index first
        m = len(cand)
        rank = np.zeros(n, np.float32)
        rank[cand[order]] = np.arange(m, 0, -1, dtype=np.float32)  # unique, best = m
        und = rank.reshape(h, w)                    # undecided ranks (0: decided / not a candidate)
        kept_ranks = []
        n_kept = 0
        rounds = 0
        while max_rounds is None or rounds < max_rounds:
            rounds += 1
            local = cv2.dilate(und, _K5)
            new = (und == local) & (und > 0)
            if not new.any():
                break
            r_new = und[new]
            kept_ranks.append(r_new)
            n_kept += len(r_new)
            und[cv2.dilate(new.view(np.uint8), _K5).view(bool)] = 0
            if n_kept >= max_points:
                top = und.max()
                allr = np.concatenate(kept_ranks)
                if (allr > top).sum() >= max_points:
                    break
        if n_kept >= max_points or k >= n or max_rounds is not None:
            break
        k = min(n, k * 4)
    if not kept_ranks:
        return np.zeros(0, np.int64)
    allr = np.sort(np.concatenate(kept_ranks))[::-1][:max_points]
    return cand[order[(m - allr).astype(np.int64)]]


_OFFS = [(dy, dx) for dy in range(-NSS, NSS + 1) for dx in range(-NSS, NSS + 1) if dy or dx]


class _MapNMS:
    """One score map's NMS state: the candidates' unique ranks (best = m), the map of
    undecided ranks (0: decided or not a candidate) and the ranks kept so far."""

    def __init__(self, score: np.ndarray, max_points: int, first_k: int) -> None:
        self.score, self.max_points = score, max_points
        h, w = score.shape
        self.n = n = h * w
        flat = score.reshape(-1)
        self.k = k = min(n, first_k)
        if k >= n:
            cand = np.arange(n)
        else:
            cand = np.flatnonzero(flat >= np.partition(flat, n - k)[n - k])  # closed upwards
        # unique ranks ordered as OpenCV's sort (score, then larger flat index): one int64 key
        v = (flat[cand] + np.float32(0)).view(np.int32).astype(np.int64)   # + 0: -0.0 -> 0.0
        order = np.argsort((np.where(v >= 0, v, v ^ 0x7FFFFFFF) << 20) | cand)  # worst first
        self.order = order[::-1]                                         # best first
        self.cand, self.m = cand, len(cand)
        rank = np.zeros(n, np.float32)
        rank[cand[order]] = np.arange(1, self.m + 1, dtype=np.float32)
        self.und = rank.reshape(h, w)
        self.kept: list[np.ndarray] = []
        self.n_kept = 0
        self.settled = False

    def full_rounds(self, rounds: int | None) -> None:
        """Parallel rounds on the whole map (stops early once the best ``max_points`` are settled)."""
        r = 0
        while not self.settled and (rounds is None or r < rounds):
            r += 1
            und = self.und
            new = (und == cv2.dilate(und, _K5)) & (und > 0)
            if not new.any():
                self.settled = True
                break
            r_new = und[new]
            self.kept.append(r_new)
            self.n_kept += len(r_new)
            und[cv2.dilate(new.view(np.uint8), _K5).view(bool)] = 0
            if self.n_kept >= self.max_points:
                allr = np.concatenate(self.kept)
                self.settled = bool((allr > und.max()).sum() >= self.max_points)

    def result(self, exact: bool) -> np.ndarray:
        """Flat indices of the best ``max_points`` kept points, in greedy order."""
        if exact and self.n_kept < self.max_points and self.k < self.n:
            return nms_rounds(self.score, self.max_points, first_k=4 * self.k)  # too few candidates (rare)
        if not self.kept:
            return np.zeros(0, np.int64)
        allr = np.sort(np.concatenate(self.kept))[::-1][:self.max_points]
        return self.cand[self.order[(self.m - allr).astype(np.int64)]]


def _finish_compact(states: list[_MapNMS]) -> None:
    """Finish the parallel rounds of every unsettled map at once, on the list of its
    undecided points (few after two full rounds) instead of whole maps: the maps go into
    one canvas, two zero rows/columns apart, so each point's 24 neighbours are fixed flat
    offsets and never belong to another map."""
    todo = [st for st in states if not st.settled]
    if not todo:
        return
    cw = max(st.und.shape[1] for st in todo) + 2 * NSS
    tops = np.cumsum([NSS] + [st.und.shape[0] + NSS for st in todo])
    canvas = np.zeros((int(tops[-1]) + NSS, cw), np.float32)
    for st, t in zip(todo, tops):
        h, w = st.und.shape
        canvas[t:t + h, NSS:NSS + w] = st.und
    flat = canvas.reshape(-1)
    u = np.flatnonzero(flat > 0)
    nu = len(u)
    r = np.append(flat[u], np.float32(0))           # sentinel nu: rank 0, never alive
    ids = np.full(flat.size, nu, np.int32)
    ids[u] = np.arange(nu, dtype=np.int32)
    nb = ids[u[:, None] + np.array([dy * cw + dx for dy, dx in _OFFS])[None, :]]  # (nu, 24)
    alive = np.ones(nu + 1, bool)
    alive[nu] = False
    kept = np.zeros(nu, bool)
    active = np.arange(nu)
    while active.size:
        nba = nb[active]
        best_nb = np.where(alive[nba], r[nba], 0).max(axis=1)
        new = active[r[active] > best_nb]           # ranks are unique within a map
        kept[new] = True
        alive[new] = False
        alive[nb[new].reshape(-1)] = False
        alive[nu] = False
        active = active[alive[active]]
    owner = np.searchsorted(tops, u // cw, side="right") - 1
    for i, st in enumerate(todo):
        r_new = r[:nu][kept & (owner == i)]
        st.kept.append(r_new)
        st.n_kept += len(r_new)
        st.settled = True


def _candidates(score: np.ndarray, c: int) -> np.ndarray:
    """Flat indices of the points scoring at least the ``c``-th best score (closed upwards,
    ties included), best-first in OpenCV's order (score, then the larger flat index)."""
    flat = score.reshape(-1)
    n = flat.size
    cand = np.arange(n) if c >= n else np.flatnonzero(flat >= np.partition(flat, n - c)[n - c])
    v = (flat[cand] + np.float32(0)).view(np.int32).astype(np.int64)  # + 0: -0.0 -> 0.0
    key = (np.where(v >= 0, v, v ^ 0x7FFFFFFF) << 20) | cand           # order-preserving, unique
    return cand[np.argsort(key)[::-1]]


def _greedy_prefixes(cands: list[np.ndarray], widths: list[int]) -> np.ndarray:
    """OpenCV's greedy NMS restricted to each map's best-first candidates, for many maps at
    once: (S, L, L) conflict tensors (two points conflict when both offsets are <= 2) and
    parallel rounds (a point is kept once no earlier conflicting point is still undecided).
    Because candidates are closed upwards, the result is an exact prefix of the full greedy.

    Returns:
        (S, L) bool, kept candidates (row s: ``cands[s]`` padded to L).
    """
    n_maps, length = len(cands), max(len(c) for c in cands)
    yy = np.zeros((n_maps, length), np.int32)
    xx = np.zeros((n_maps, length), np.int32)
    valid = np.zeros((n_maps, length), bool)
    for i, (c, w) in enumerate(zip(cands, widths)):
        yy[i, :len(c)], xx[i, :len(c)] = np.divmod(c, w)
        valid[i, :len(c)] = True
    # |d| <= 2  <=>  (d + 2) as unsigned <= 4
    conf = (((yy[:, :, None] - yy[:, None, :]) + NSS).view(np.uint32) <= 2 * NSS)
    conf &= (((xx[:, :, None] - xx[:, None, :]) + NSS).view(np.uint32) <= 2 * NSS)
    conf &= valid[:, :, None] & valid[:, None, :]
    conf_f = conf.astype(np.float32)
    better_f = conf_f * np.tri(length, length, -1, dtype=np.float32)  # [i, j]: j earlier than i, conflicting
    alive, kept = valid.copy(), np.zeros_like(valid)
    while alive.any():
        a = alive.astype(np.float32)[:, :, None]
        new = alive & ((better_f @ a)[:, :, 0] == 0)   # batched matrix products: counts of blockers
        kept |= new
        alive &= ~new & ((conf_f @ new.astype(np.float32)[:, :, None])[:, :, 0] == 0)
    return kept


class Bing:
    """BING proposals for uint8 BGR images (one instance can be shared: it holds no state).

    Args:
        model: a :class:`BingModel`.
        per_size: windows kept per size after NMS (OpenCV: 250).
        nms_rounds: None (default) for OpenCV's exact greedy per-size NMS; a small number
            (e.g. 2) stops the parallel NMS rounds early: faster, nearly the same boxes.
    """

    FULL_ROUNDS = 4  # whole-map NMS rounds before the compact finish (a speed trade-off only)

    def __init__(self, model: BingModel, per_size: int = 250, nms_rounds: int | None = None) -> None:
        if nms_rounds is not None and nms_rounds < 1:
            raise ValueError(f"nms_rounds must be None or >= 1, got {nms_rounds}")
        self.nms_rounds = nms_rounds
        if per_size < 1:
            raise ValueError(f"per_size must be >= 1, got {per_size}")
        self.model = model
        self.per_size = per_size
        coeffs, signs = binarize_filter(model.filter)
        self._coeffs = coeffs
        # S0 + 2048 * S1 in one float32 correlation: every partial sum is an integer below 2^24, so exact
        self._kernel = (signs[0] + np.float32(2048) * signs[1]).astype(np.float32)

    @classmethod
    def load(cls, model_dir: str | os.PathLike, color: str = "MAXBGR", per_size: int = 250,
             nms_rounds: int | None = None) -> "Bing":
        return cls(BingModel.load(model_dir, color), per_size, nms_rounds)

    def stage1(self, mag: np.ndarray) -> np.ndarray:
        """Stage-I score map (h - 7, w - 7) float32 of a normed-gradient map, as OpenCV's
        binarised filter computes it (bit-identical)."""
        # float32 input (mag >> 4 by a lookup table): for uint8 input with a 64-tap kernel
        # OpenCV switches to a DFT (inexact)
        q = cv2.LUT(mag, _Q4)
        hh, ww = mag.shape[0] - W + 1, mag.shape[1] - W + 1
        k = cv2.filter2D(q, cv2.CV_32F, self._kernel, anchor=(0, 0), borderType=cv2.BORDER_CONSTANT)[:hh, :ww]
        c0, c1 = self._coeffs
        s1 = np.multiply(k, np.float32(1 / 2048))
        np.rint(s1, out=s1)                        # k = S0 + 2048 * S1 with |S0| <= 960: exact split
        s0 = np.multiply(s1, np.float32(-2048))
        s0 += k                                    # S0, exact
        s0 *= c0
        s1 *= c1
        s0 += s1                                   # float32 products and sum, as the C code
        return s0

    def score_maps(self, img: np.ndarray):
        """Yield ``(size row, window width, window height, stage-I score map)`` for every
        size OpenCV scores on this image, in OpenCV's order (last active size first)."""
        ih, iw = img.shape[:2]
        for ir in range(len(self.model.size_idx) - 1, -1, -1):
            width, height = size_of(int(self.model.size_idx[ir]))
            if height > ih * BASE or width > iw * BASE:
                continue
            height, width = min(height, ih), min(width, iw)
            size = (int(round(W * iw / width)), int(round(W * ih / height)))
            im = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR_EXACT)
            yield ir, width, height, self.stage1(normed_gradient(im, self.model.color))

    def raw(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every window kept by the per-size NMS, before sorting.

        Returns:
            ``(boxes (N, 4) int32 [x1, y1, x2, y2), stage-I scores (N,) float32, size row (N,))``
            in OpenCV's insertion order (sizes from the last active one down).
        """
        img = check_bgr_u8(img)
        ih, iw = img.shape[:2]
        maps, geo = [], []
        for ir, width, height, score in self.score_maps(img):
            st = _MapNMS(score, self.per_size, 2048)
            # exact: a few rounds on the whole map, the rest on the few undecided points of all maps
            st.full_rounds(self.nms_rounds if self.nms_rounds is not None else self.FULL_ROUNDS)
            maps.append(st)
            geo.append((ir, width, height))
        if self.nms_rounds is None:
            _finish_compact(maps)
        boxes, scores, rows = [], [], []
        for st, (ir, width, height) in zip(maps, geo):
            keep = st.result(exact=self.nms_rounds is None)
            y, x = np.divmod(keep, st.score.shape[1])
            x0, y0 = x * (width // W), y * (height // W)
            b = np.stack([x0, y0, np.minimum(x0 + width, iw), np.minimum(y0 + height, ih)], 1)
            boxes.append(b.astype(np.int32))
            scores.append(st.score.reshape(-1)[keep])
            rows.append(np.full(len(keep), ir, np.int32))
        if not boxes:
            return np.zeros((0, 4), np.int32), np.zeros(0, np.float32), np.zeros(0, np.int32)
        return np.concatenate(boxes), np.concatenate(scores), np.concatenate(rows)

    def top(self, img: np.ndarray, top_k: int = 10, nms_iou: float = 0.5, first_c: int = 64
            ) -> tuple[np.ndarray, np.ndarray]:
        """The first ``top_k`` boxes that greedy NMS (IoU > ``nms_iou`` suppressed) keeps from
        the full best-first list, computed lazily: exactly ``nms_top_k(*self(img))`` without
        running the per-size NMS to its end.

        Each size starts from its ``first_c`` best points, whose greedy NMS is an exact prefix
        of the size's list; every box whose calibrated score beats what any size's unexplored
        rest could reach (a bound from the calibration and the candidate threshold) is final.
        When those final boxes do not yet give ``top_k`` after NMS, the sizes that hold the
        bound get four times more candidates, and so on.

        Returns:
            ``(boxes (k, 4) int32 pixel [x1, y1, x2, y2), scores (k,) float32)``, best-first.
        """
        from .common import nms_top_k
        img = check_bgr_u8(img)
        ih, iw = img.shape[:2]
        maps = list(self.score_maps(img))
        if not maps:
            return np.zeros((0, 4), np.int32), np.zeros(0, np.float32)
        n_maps = len(maps)
        cal = self.model.calib[[m[0] for m in maps]]
        c = [first_c] * n_maps
        pref: list[np.ndarray] = [np.zeros(0, np.int64)] * n_maps
        thr = [np.float32(0)] * n_maps
        complete = [False] * n_maps
        todo = list(range(n_maps))
        while True:
            batch, cands = [], []
            for i in todo:
                score = maps[i][3]
                if c[i] > 1024:  # deep: the map-based exact NMS, complete list
                    pref[i], complete[i] = nms_rounds(score, self.per_size, first_k=c[i]), True
                    continue
                cand = _candidates(score, c[i])
                if len(cand) > 4 * c[i]:  # massive ties: same fallback
                    pref[i], complete[i] = nms_rounds(score, self.per_size, first_k=len(cand)), True
                    continue
                batch.append(i)
                cands.append(cand)
                thr[i] = score.reshape(-1)[cand[-1]]
                complete[i] = len(cand) >= score.size
            if batch:
                kept = _greedy_prefixes(cands, [maps[i][3].shape[1] for i in batch])
                for row, (i, cand) in enumerate(zip(batch, cands)):
                    pref[i] = cand[kept[row, :len(cand)]]
                    if len(pref[i]) >= self.per_size:
                        pref[i], complete[i] = pref[i][:self.per_size], True
            # what the unexplored rest of each incomplete size could score at best
            bound = np.full(n_maps, -np.inf, np.float32)
            for i in range(n_maps):
                if not complete[i]:
                    a, b = cal[i]
                    s_rest = thr[i] if a >= 0 else maps[i][3].min()
                    bound[i] = np.float32(np.float32(s_rest) * a + b)
            ub = bound.max()
            s1 = [maps[i][3].reshape(-1)[pref[i]] for i in range(n_maps)]
            s2 = np.concatenate([(s1[i] * cal[i, 0] + cal[i, 1]).astype(np.float32) for i in range(n_maps)])
            size_pos = np.concatenate([np.full(len(pref[i]), i) for i in range(n_maps)])
            pos = np.concatenate([np.arange(len(pref[i])) for i in range(n_maps)])
            order = np.lexsort((-pos, -size_pos, -s2))  # score, then the later insertion first
            order = order[s2[order] > ub]               # final: nothing unexplored can come before
            boxes = []
            for i in range(n_maps):
                ir, width, height, score = maps[i]
                y, x = np.divmod(pref[i], score.shape[1])
                x0, y0 = x * (width // W), y * (height // W)
                boxes.append(np.stack([x0, y0, np.minimum(x0 + width, iw), np.minimum(y0 + height, ih)], 1))
            boxes = np.concatenate(boxes).astype(np.int32)[order]
            keep = nms_top_k(boxes, nms_iou, top_k) if len(boxes) else np.zeros(0, np.int64)
            if len(keep) >= top_k or ub == -np.inf:
                return boxes[keep], s2[order][keep]
            todo = [i for i in range(n_maps) if not complete[i] and bound[i] >= ub]
            for i in todo:
                c[i] *= 4

    def __call__(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All windows, best-first, with their stage-II scores.

        Returns:
            ``(boxes (N, 4) int32 pixel [x1, y1, x2, y2), 0-based, exclusive; scores (N,) float32)``.
        """
        boxes, s1, rows = self.raw(img)
        cal = self.model.calib[rows]
        s2 = (s1 * cal[:, 0] + cal[:, 1]).astype(np.float32)
        order = np.lexsort((-np.arange(len(s2)), -s2))  # descending (score, insertion index)
        return boxes[order], s2[order]
