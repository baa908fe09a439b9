"""dali_objcrop: object-aware cropping for self-supervised learning, as a DALI data loader.

The public API is the explicit list below; everything else is private.

``import dali_objcrop`` needs only NumPy: the crop-window maths, the augmentation
draws, the box store and the image index are imported here; the names that
need OpenCV, DALI, torch or CuPy (the loader, the synthetic set, the crop grid,
the CuPy kernel) are imported on first use (PEP 562 ``__getattr__``).
"""
from __future__ import annotations

import importlib

from .augment import RECIPES, Recipe, ViewAug, get_recipe, sample_aug_params
from .boxstore import BoxStore, BoxStoreError, BoxStoreMismatchError, ValidationReport, validate_boxes
from .dataset import CocoFormatError, ImageIndex, load_coco, scan_image
from .windows import MODES, CropConfig, CropWindows, box_scale_from_mean_area, sample_windows

__version__ = "0.1.0"

# public name -> module that defines it, imported on first access
_LAZY = {
    "ObjCropLoader": ".loader", "open_loader": ".loader", "FallbackWarning": ".iteration",
    "CROP_BACKENDS": ".pipelines", "build_pipeline": ".pipelines", "register_crop_backend": ".pipelines",
    "shard_batches": ".sampling",
    "ensure_default_dataset": ".synth", "make_synthetic": ".synth",   # OpenCV
    "crop_grid": ".visualize", "cut_crop": ".visualize",              # OpenCV
    "crop_views": ".kernels.cupy_backend",                            # CuPy at call time
}

__all__ = [
    "BoxStore", "BoxStoreError", "BoxStoreMismatchError", "ValidationReport", "validate_boxes",
    "CocoFormatError", "ImageIndex", "load_coco", "scan_image",
    "ensure_default_dataset", "make_synthetic",
    "MODES", "CropConfig", "CropWindows", "box_scale_from_mean_area", "sample_windows",
    "RECIPES", "Recipe", "ViewAug", "get_recipe", "sample_aug_params",
    "CROP_BACKENDS", "ObjCropLoader", "open_loader", "FallbackWarning", "build_pipeline", "register_crop_backend", "shard_batches",
    "crop_grid", "cut_crop",
    "crop_views",
    "__version__",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
