"""Values shared across the package, the trainer, the benchmarks and the tests (one definition each).

Crop-window defaults are not here: :class:`~dali_objcrop.windows.CropConfig` is their home
(the specification), and front ends take their defaults from its fields.
"""
from __future__ import annotations

from .fileio import HOME_ENV, cache_home as home_dir  # noqa: F401 -- the cache folder (its home: fileio)

# ImageNet statistics every SSL recipe normalises with, RGB, on 0..1 pixel values ...
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# ... and on 0..255 pixel values (DALI's crop_mirror_normalize, the CUDA kernel, the crop grid)
IMAGENET_MEAN_PX: tuple[float, float, float] = tuple(m * 255 for m in IMAGENET_MEAN)
IMAGENET_STD_PX: tuple[float, float, float] = tuple(s * 255 for s in IMAGENET_STD)
