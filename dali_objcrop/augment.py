"""Augmentation recipes and their per-sample parameter draws.

A recipe says, for each of the two views, how often and how strongly to apply
colour jitter, grayscale, Gaussian blur and solarisation.  The *draws* are a
pure function of the per-sample keys of :mod:`dali_objcrop.rng` (slots
``rng.aug_slot(view, k)``), vectorised over a batch: the DALI graph receives
them as per-sample arguments and only applies them, so every sample's pixels
can be recomputed alone and the same seed gives the same pixels on the CPU.

Recipes (the horizontal flip lives in :class:`dali_objcrop.windows.CropConfig`,
because the crop backends apply it as part of the crop):

* ``mocov2`` (Chen et al., "Improved Baselines with Momentum Contrastive
  Learning", 2020): colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale p 0.2,
  Gaussian blur sigma U(0.1, 2) with p 0.5, on both views.
* ``byol`` (Grill et al., "Bootstrap Your Own Latent", 2020, table 6): colour
  jitter 0.4/0.4/0.2/0.1 with p 0.8, grayscale p 0.2, blur p 1.0 / 0.1 and
  solarisation p 0 / 0.2 on views 1 / 2.  Its local (multi-crop) views are
  DINO's (Caron et al., 2021): the same jitter, blur p 0.5, no solarisation --
  DINO's global views are BYOL's.

Local views (``CropConfig.local_crops``) all use the recipe's ``local`` augmentation;
view ``2 + j`` draws from its own slots (``rng.aug_slot``).

Slot layout (each slot gives two uniforms, ``hi`` and ``lo``; append only):

====  =====================  ======================
k     hi                     lo
====  =====================  ======================
0     jitter applied?        grayscale applied?
1     brightness factor      contrast factor
2     saturation factor      hue shift
3     blur applied?          blur sigma
4     solarise applied?      (unused)
====  =====================  ======================

Differences from torchvision's PIL transforms (documented, not hidden): the
four jitter factors are applied as one colour matrix (DALI ``color_twist``) in
a fixed order instead of a random permutation, contrast pivots around mid-grey
instead of the image mean, and the blur kernel is ``2 * ceil(3 sigma) + 1`` taps
(the smallest that holds 99.7% of the mass; torchvision's MoCo-v2 uses 23).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import rng

K_APPLY, K_BC, K_SH, K_BLUR, K_SOLAR = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class ViewAug:
    """Augmentation of one view.

    Args:
        jitter_p: probability of colour jitter.
        brightness, contrast, saturation: jitter strength ``s``; the factor is
            uniform in ``[max(0, 1 - s), 1 + s]``.
        hue: hue shift uniform in ``[-hue, hue]`` (fraction of the colour circle, <= 0.5).
        gray_p: probability of converting to grayscale (after the jitter).
        blur_p: probability of a Gaussian blur.
        blur_sigma: sigma range in output pixels.
        solarize_p: probability of solarisation (``x >= 128 -> 255 - x``).
    """

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        for name in ("jitter_p", "gray_p", "blur_p", "solarize_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue!r}")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma!r}")


@dataclass(frozen=True)
class Recipe:
    """A named pair of global view augmentations and the augmentation of every local view.

    Args:
        name: the recipe's name.
        views: the two global views' augmentations.
        local: the local (multi-crop) views' augmentation (``CropConfig.local_crops``).
    """

    name: str
    views: tuple[ViewAug, ViewAug]
    local: ViewAug = ViewAug()

    def view_aug(self, view: int) -> ViewAug:
        """The augmentation of view ``view``: 0 and 1 global, ``2 + j`` local view ``j``."""
        return self.views[view] if view in (0, 1) else self.local


RECIPES: dict[str, Recipe] = {
    "mocov2": Recipe("mocov2", (ViewAug(), ViewAug()), ViewAug()),
    "byol": Recipe("byol", (ViewAug(saturation=0.2, blur_p=1.0, solarize_p=0.0),
                            ViewAug(saturation=0.2, blur_p=0.1, solarize_p=0.2)),
                   ViewAug(saturation=0.2, blur_p=0.5, solarize_p=0.0)),
}


def get_recipe(recipe: str | Recipe) -> Recipe:
    """A :class:`Recipe` from its name (``mocov2``, ``byol``) or itself."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {tuple(RECIPES)} or a Recipe, got {recipe!r}")
    return RECIPES[recipe]


def blur_window(sigma: np.ndarray) -> np.ndarray:
    """Smallest odd Gaussian kernel size holding +-3 sigma: ``2 * ceil(3 sigma) + 1`` (int32)."""
    return (2 * np.ceil(3.0 * np.asarray(sigma, dtype=np.float64)) + 1).astype(np.int32)


def gaussian_kernels(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised 1-D Gaussian kernels, one per sigma, vectorised.

    Args:
        sigma: (N,) standard deviations in pixels (> 0).

    Returns:
        ``(kernels, sizes)``: (N, K) float32 rows (row i is centred and zero
        beyond ``sizes[i]``; K = max size) and (N,) int32 odd sizes
        ``2 * ceil(3 sigma) + 1``.  The blur is separable: apply row ``i[:sizes[i]]``
        along x, then along y (cv2.GaussianBlur with BORDER_REFLECT_101 agrees).
    """
    sigma = np.asarray(sigma, dtype=np.float64).reshape(-1)
    sizes = blur_window(sigma)
    kmax = int(sizes.max()) if sizes.size else 1
    x = np.arange(kmax)[None, :] - (sizes[:, None] // 2)                 # offsets from each centre
    g = np.where(np.arange(kmax)[None, :] < sizes[:, None], np.exp(-0.5 * (x / sigma[:, None]) ** 2), 0.0)
    return (g / g.sum(axis=1, keepdims=True)).astype(np.float32), sizes


def _factor(u: np.ndarray, s: float) -> np.ndarray:
    return max(0.0, 1.0 - s) + u * ((1.0 + s) - max(0.0, 1.0 - s))


#: Columns of the per-view draws as the crop operator reads them (``aug``, (2, 9) float32 per sample; the
#: windows operator's ``aug`` output; csrc/dali/objcrop_augment.h ``OC_AUG_*``, checked by a test).
AUG_COLUMNS = ("colour", "brightness", "contrast", "saturation", "hue", "blur", "sigma", "blur_window", "solarize")


def sample_aug_params(keys: np.ndarray, view: int, aug: ViewAug) -> dict[str, np.ndarray]:
    """Per-sample augmentation parameters of one view, vectorised over a batch.

    Args:
        keys: (N,) uint64 sample keys (``CropWindows.keys``).
        view: 0 or 1 (global), ``2 + j`` (local view ``j``).
        aug: the view's :class:`ViewAug` (``Recipe.view_aug(view)``).

    Returns:
        Dict of (N,) arrays: ``jitter``, ``gray``, ``colour`` (jitter or gray),
        ``blur``, ``solarize`` (bool); ``brightness``, ``contrast``,
        ``saturation`` (float32 factors, identity where not jittered,
        saturation 0 where grayscale), ``hue`` (float32 degrees), ``sigma``
        (float32) and ``blur_window`` (int32 odd kernel size).
    """
    if not 0 <= view < 2 + rng.MAX_LOCAL_VIEWS:
        raise ValueError(f"view must be 0, 1 (global) or 2..{1 + rng.MAX_LOCAL_VIEWS} (local), got {view!r}")
    keys = np.asarray(keys, dtype=np.uint64)
    u_jit, u_gray = rng.uniforms(keys, rng.aug_slot(view, K_APPLY))
    u_b, u_c = rng.uniforms(keys, rng.aug_slot(view, K_BC))
    u_s, u_h = rng.uniforms(keys, rng.aug_slot(view, K_SH))
    u_blur, u_sigma = rng.uniforms(keys, rng.aug_slot(view, K_BLUR))
    u_sol, _ = rng.uniforms(keys, rng.aug_slot(view, K_SOLAR))
    jitter = u_jit < aug.jitter_p
    gray = u_gray < aug.gray_p
    brightness = np.where(jitter, _factor(u_b, aug.brightness), 1.0)
    contrast = np.where(jitter, _factor(u_c, aug.contrast), 1.0)
    saturation = np.where(jitter, _factor(u_s, aug.saturation), 1.0) * np.where(gray, 0.0, 1.0)
    hue = np.where(jitter, (2.0 * u_h - 1.0) * aug.hue * 360.0, 0.0)
    lo, hi = aug.blur_sigma
    sigma = lo + u_sigma * (hi - lo)
    return {
        "jitter": jitter, "gray": gray, "colour": jitter | gray,
        "brightness": brightness.astype(np.float32), "contrast": contrast.astype(np.float32),
        "saturation": saturation.astype(np.float32), "hue": hue.astype(np.float32),
        "blur": u_blur < aug.blur_p, "sigma": sigma.astype(np.float32), "blur_window": blur_window(sigma),
        "solarize": u_sol < aug.solarize_p,
    }

