"""dali_objcrop: object-aware cropping for self-supervised learning, as a DALI data loader.

The public API is the explicit list below; everything else is private.
"""
from .boxstore import BoxStore, BoxStoreMismatchError, ValidationReport, validate_boxes
from .dataset import ImageIndex, load_coco, scan_image
from .synth import ensure_default_dataset, make_synthetic
from .augment import RECIPES, Recipe, ViewAug, get_recipe, sample_aug_params
from .loader import CROP_BACKENDS, ObjCropLoader, build_pipeline, register_crop_backend, shard_batches
from .windows import MODES, CropConfig, CropWindows, box_scale_from_mean_area, sample_windows
from .visualize import crop_grid, cut_crop
from .kernels.cupy_backend import crop_views

__version__ = "0.1.0"

__all__ = [
    "BoxStore", "BoxStoreMismatchError", "ValidationReport", "validate_boxes",
    "ImageIndex", "load_coco", "scan_image",
    "ensure_default_dataset", "make_synthetic",
    "MODES", "CropConfig", "CropWindows", "box_scale_from_mean_area", "sample_windows",
    "RECIPES", "Recipe", "ViewAug", "get_recipe", "sample_aug_params",
    "CROP_BACKENDS", "ObjCropLoader", "build_pipeline", "register_crop_backend", "shard_batches",
    "crop_grid", "cut_crop",
    "crop_views",
    "__version__",
]
