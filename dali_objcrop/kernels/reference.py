"""NumPy reference of the fused crop kernel's resampling (``csrc/objcrop_core.h``).

The kernel cuts each view's window ``[x1, y1, x2, y2)`` out of an HWC uint8
image and resizes it to ``size`` x ``size`` with a separable triangle filter:
for output coordinate ``o`` the source centre is
``c = lo + (o + 0.5) * scale - 0.5`` with ``scale = (hi - lo) / size``, the
filter radius is ``support = max(scale, 1)`` (plain bilinear when enlarging,
antialiasing over the whole footprint when shrinking, like PIL's BILINEAR),
taps are the window's pixels ``t`` with weight ``max(0, 1 - |t - c| / support)``
(crop-then-resize: nothing outside the window leaks in) and the weights are
normalised.  A horizontal flip mirrors the output columns.  Normalisation is
``(value - mean) / std`` in pixel units (0..255), as DALI's
``crop_mirror_normalize``.

Here the same float32 weights are built as (size, window) matrices and applied
with two float64 matrix products per image (vectorised over pixels), so the
kernel (float32 accumulation) must match within far less than 1/255.
"""
from __future__ import annotations

import numpy as np

from ..augment import AUG_COLUMNS
from ..windows import CropConfig, sample_windows
from .common import norm_params


def axis_weights(lo: int, hi: int, size: int, flip: bool = False) -> np.ndarray:
    """(size, hi - lo) float32 filter matrix of one axis (rows sum to 1).

    Args:
        lo, hi: the window ``[lo, hi)`` on this axis, in pixels.
        size: output length.
        flip: mirror the output (row ``o`` uses the centre of ``size - 1 - o``).
    """
    if not (hi > lo and size > 0):
        raise ValueError(f"need hi > lo and size > 0, got lo={lo}, hi={hi}, size={size}")
    f32 = np.float32
    scale = f32(hi - lo) / f32(size)
    support = max(scale, f32(1.0))
    inv = f32(1.0) / support
    o = np.arange(size, dtype=f32)
    if flip:
        o = o[::-1]
    c = f32(lo) + (o + f32(0.5)) * scale - f32(0.5)                 # (size,) float32, as the kernel
    t = np.arange(lo, hi, dtype=f32)
    w = np.maximum(f32(1.0) - np.abs(t[None, :] - c[:, None]) * inv, f32(0.0))
    s = w.sum(axis=1, keepdims=True, dtype=np.float64)
    return (w / np.where(s > 0, s, 1.0)).astype(np.float32)


def resample_window(image: np.ndarray, window, flip: bool, size: int) -> np.ndarray:
    """One view: (3, size, size) float64 in pixel units (0..255) of ``image[window]``.

    Args:
        image: (H, W, 3) uint8.
        window: ``[x1, y1, x2, y2)`` ints inside the image.
        flip: horizontal flip.
        size: output side.
    """
    x1, y1, x2, y2 = (int(v) for v in window)
    h, w = image.shape[:2]
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise ValueError(f"window {window!r} is not inside a {w}x{h} image")
    wy = axis_weights(y1, y2, size).astype(np.float64)              # (S, wh)
    wx = axis_weights(x1, x2, size, flip).astype(np.float64)        # (S, ww)
    crop = image[y1:y2, x1:x2].astype(np.float64)                   # (wh, ww, 3)
    return np.einsum("yh,hwc,xw->cyx", wy, crop, wx, optimize=True)


def apply_windows(images: list[np.ndarray], windows: np.ndarray, flip: np.ndarray, size: int,
                  mean=0.0, std=1.0) -> tuple[np.ndarray, np.ndarray]:
    """Both views of a batch from given windows: two (N, 3, size, size) float32, normalised."""
    norm = norm_params(mean, std).astype(np.float64)
    mean_c, inv_c = norm[:3, None, None], norm[3:, None, None]
    views = []
    for v in (0, 1):
        out = np.zeros((len(images), 3, size, size), np.float32)
        for i, im in enumerate(images):
            out[i] = (resample_window(im, windows[i, v], bool(flip[i, v]), size) - mean_c) * inv_c
        views.append(out)
    return views[0], views[1]


def crop_views_reference(images: list[np.ndarray], boxes, offsets, index, seed: int, epoch: int,
                         config: CropConfig, size: int = 224, mean=0.0, std=1.0):
    """What the fused kernel computes, in NumPy: windows from ``windows.sample_windows``, then resampling.

    Args:
        images: N HWC uint8 RGB arrays (their shapes give the sizes).
        boxes, offsets, index, seed, epoch, config: as :func:`~dali_objcrop.sample_windows`.
        size: output side.
        mean, std: per-channel normalisation in pixel units (scalars broadcast).

    Returns:
        ``(view0, view1, crop_windows)``: two (N, 3, size, size) float32 and the
        :class:`~dali_objcrop.CropWindows`.
    """
    sizes = np.array([[im.shape[1], im.shape[0]] for im in images], dtype=np.int64).reshape(-1, 2)
    cw = sample_windows(sizes, boxes, offsets, index, seed, epoch, config)
    v0, v1 = apply_windows(images, cw.windows, cw.flip, size, mean, std)
    return v0, v1, cw


# ---- the fused crop-and-augment operator (csrc/dali/objcrop_crop.*, fn.objcrop.crop) ----------------
#: Columns of the per-view draws the crop operator reads: :data:`dali_objcrop.augment.AUG_COLUMNS`.

_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])


def aug_table(keys: np.ndarray, recipe, local_crops: int = 0) -> np.ndarray:
    """(N, 2 + M, 9) float32 ``aug`` input of the crop operator: every view's draws in :data:`AUG_COLUMNS` order.

    Args:
        keys: (N,) uint64 sample keys (``CropWindows.keys``).
        recipe: an augmentation recipe name or :class:`~dali_objcrop.augment.Recipe`.
        local_crops: M local views after the two global ones (``CropConfig.local_crops``): view ``2 + j``
            draws local view ``j``'s slots with the recipe's ``local`` augmentation (``Recipe.view_aug``).
            0 (default): (N, 2, 9), the two global views.
    """
    from .. import augment
    rec = augment.get_recipe(recipe)
    views = 2 + int(local_crops)
    out = np.zeros((len(keys), views, len(AUG_COLUMNS)), np.float32)
    for v in range(views):
        p = augment.sample_aug_params(keys, v, rec.view_aug(v))
        for j, name in enumerate(AUG_COLUMNS):
            out[:, v, j] = p[name]
    return out


def colour_matrix(brightness: float, contrast: float, saturation: float, hue_deg: float,
                  center: float = 128.0) -> tuple[np.ndarray, np.ndarray]:
    """``(M, offset)`` of DALI's ``fn.color_twist``: ``rgb -> M @ rgb + offset``.

    ``M = b c Yiq2Rgb Hue(h) Sat(s) Rgb2Yiq`` (hue a rotation of the I, Q plane, saturation a scaling of
    it) and ``offset = (p - p c) b`` on every channel, where the contrast pivot ``p`` is DALI's "half
    range": 128 for integer images, 0.5 for float ones.
    """
    h = np.deg2rad(hue_deg)
    hs = np.array([[1.0, 0.0, 0.0],
                   [0.0, np.cos(h) * saturation, np.sin(h) * saturation],
                   [0.0, -np.sin(h) * saturation, np.cos(h) * saturation]])
    m = brightness * contrast * (np.linalg.inv(_RGB2YIQ) @ hs @ _RGB2YIQ)
    return m, np.full(3, (center - center * contrast) * brightness)


def gaussian_taps(sigma: float, size: int) -> np.ndarray:
    """The ``size``-tap normalised Gaussian of :func:`dali_objcrop.augment.gaussian_kernels` (float32)."""
    x = np.arange(size) - size // 2
    g = np.exp(-0.5 * (x / float(sigma)) ** 2)
    return (g / g.sum()).astype(np.float32)


def augment_view_reference(view: np.ndarray, aug_row, contrast_center: float = 128.0) -> np.ndarray:
    """Colour twist (+ clamp to [0, 255]), Gaussian blur, solarise of one (3, S, S) view in pixel units.

    Args:
        view: (3, S, S) float pixel values (a resampled view).
        aug_row: the view's 9 draws (:data:`AUG_COLUMNS`).
        contrast_center: colour-twist contrast pivot (128: ``fn.color_twist`` on uint8 images).

    Returns:
        (3, S, S) float64.  The blur is separable (x, then y) with ``fn.filter``'s default border
        ``reflect_101`` (NumPy's ``reflect``); solarise maps ``x >= 128`` to ``255 - x``.
    """
    a = dict(zip(AUG_COLUMNS, (float(v) for v in aug_row)))
    x = np.asarray(view, dtype=np.float64)
    if a["colour"]:
        m, off = colour_matrix(a["brightness"], a["contrast"], a["saturation"], a["hue"], contrast_center)
        x = np.clip(np.einsum("ck,kyx->cyx", m, x) + off[:, None, None], 0.0, 255.0)
    if a["blur"]:
        k = int(a["blur_window"])
        taps = gaussian_taps(a["sigma"], k).astype(np.float64)
        r = k // 2
        s = x.shape[-1]
        pad = np.pad(x, ((0, 0), (0, 0), (r, r)), mode="reflect") if s > 1 else np.repeat(x, k, axis=2)
        x = sum(taps[t] * pad[:, :, t:t + s] for t in range(k))
        pad = np.pad(x, ((0, 0), (r, r), (0, 0)), mode="reflect") if s > 1 else np.repeat(x, k, axis=1)
        x = sum(taps[t] * pad[:, t:t + s, :] for t in range(k))
    if a["solarize"]:
        x = np.where(x >= 128.0, 255.0 - x, x)
    return x


def crop_augment_views(images: list[np.ndarray], windows, flip, aug, sizes, mean=0.0, std=1.0,
                       contrast_center: float = 128.0) -> list[np.ndarray]:
    """Every view of a batch as ``fn.objcrop.crop`` computes it, each view at its own side.

    Args:
        images: N HWC uint8 RGB images.
        windows: (N, V, 4) ``[x1, y1, x2, y2)`` per view, inside the images.
        flip: (N, V) horizontal flips.
        aug: (N, V, 9) draws (:func:`aug_table`).
        sizes: V output sides, one per view.
        mean, std, contrast_center: see :func:`crop_augment_reference`.

    Returns:
        V float64 batches, view ``v`` (N, 3, sizes[v], sizes[v]), normalised.
    """
    norm = norm_params(mean, std).astype(np.float64)
    mean_c, inv_c = norm[:3, None, None], norm[3:, None, None]
    views = []
    for v, size in enumerate(sizes):
        out = np.zeros((len(images), 3, size, size))
        for i, im in enumerate(images):
            px = resample_window(im, windows[i][v], bool(flip[i][v]), size)
            out[i] = (augment_view_reference(px, aug[i][v], contrast_center) - mean_c) * inv_c
        views.append(out)
    return views


def crop_augment_reference(images: list[np.ndarray], windows: np.ndarray, flip: np.ndarray, aug: np.ndarray,
                           size: int, mean=0.0, std=1.0, contrast_center: float = 128.0, local_size: int = 0
                           ) -> tuple[np.ndarray, ...]:
    """What ``fn.objcrop.crop`` computes: resample, flip, colour, blur, solarise, normalise.

    Args:
        images: N HWC uint8 RGB images.
        windows: (N, V, 4) ``[x1, y1, x2, y2)`` per view, inside the images: the two global views, then
            M = V - 2 local views (``CropWindows.all_windows``).
        flip: (N, V) horizontal flips.
        aug: (N, V, 9) draws (:func:`aug_table`).
        size: the global views' output side.
        mean, std: normalisation in pixel units (scalars broadcast).
        contrast_center: see :func:`augment_view_reference`.
        local_size: the local views' output side, as the operator's ``local_size``: 0 (default) -- V must be 2.

    Returns:
        two (N, 3, size, size) float64 batches, normalised; with ``local_size`` > 0 a third, the local views
        (N, M, 3, local_size, local_size) (M >= 1).

    Raises:
        ValueError: V is not 2 with ``local_size`` 0, or V is 2 (no local view) with ``local_size`` > 0.
    """
    v = len(windows[0]) if len(windows) else 2
    if local_size == 0 and v != 2:
        raise ValueError(f"windows hold {v} views (2 global + {v - 2} local) but local_size is 0: pass "
                         f"local_size (the local views' side) for local views")
    if local_size > 0 and v <= 2:
        raise ValueError(f"local_size is {local_size} but the windows hold 2 views, no local view")
    views = crop_augment_views(images, windows, flip, aug, [size, size] + [local_size] * (v - 2), mean, std,
                               contrast_center)
    if local_size == 0:
        return views[0], views[1]
    return views[0], views[1], np.stack(views[2:], axis=1)
