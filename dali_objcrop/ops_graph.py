"""The DALI-ops crop and augmentation stages: DALI's own operators, fed per-sample arguments.

What both loader paths share when the fused ``fn.objcrop.crop`` is not used: ``fn.resize`` of
each view's ROI (the flip is a reversed x range), then a float chain of ``color_twist``
(grayscale = saturation 0), a separable blur as two ``fn.filter`` passes with per-sample 1-D
kernels, solarisation, and ``crop_mirror_normalize``.  Each stage runs only on the samples drawn
for it (DALI conditionals; see :func:`aug_stages`).  The inputs are DALI nodes by name, per view
``v`` (``roi_start{v}``, ``brightness{v}``, ...): from the NumPy callback (:mod:`dali_objcrop.loader`)
or from ``fn.objcrop.windows`` (:mod:`dali_objcrop.plugin`).  Views 0 and 1 are the global views;
views ``2 + j`` the local (multi-crop) views, with their own side and the recipe's ``local``
augmentation (:func:`crop_views`).
"""
from __future__ import annotations

from . import augment as _augment
from .constants import IMAGENET_MEAN_PX, IMAGENET_STD_PX


def aug_stages(aug: _augment.ViewAug) -> dict[str, str]:
    """How the graph applies each augmentation of a view: ``off`` (p = 0: not in the graph),
    ``always`` (p = 1: no batch split) or ``drawn`` (a DALI conditional on the per-sample draw)."""
    def kind(p: float) -> str:
        return "off" if p <= 0 else ("always" if p >= 1 else "drawn")
    return {"colour": kind(1 - (1 - aug.jitter_p) * (1 - aug.gray_p)), "blur": kind(aug.blur_p),
            "solarize": kind(aug.solarize_p)}


def dali_crop(images, inp: dict, size, views=(0, 1)):
    """Crop backend ``dali``: ``fn.resize`` of each view's ROI to ``size`` x ``size`` (flip via the ROI).

    Args:
        images: decoded HWC uint8 images (CPU or GPU node).
        inp: the external-source nodes by name (:data:`INPUT_FIELDS`).
        size: output side in pixels, or one side per view of ``views``.
        views: the views to cut (their ``roi_start{v}`` / ``roi_end{v}`` inputs): (0, 1) the global views,
            ``2 + j`` local view ``j``.

    Returns:
        one HWC uint8 node per view (as torchvision's PIL crops; resizing to uint8 and then casting
        measured ~5% less CPU per image end to end than resizing to float).
    """
    from nvidia.dali import fn, types
    sizes = list(size) if hasattr(size, "__len__") else [size] * len(views)
    if len(sizes) != len(views):
        raise ValueError(f"{len(sizes)} sizes for {len(views)} views")
    return tuple(fn.resize(images, size=[int(s), int(s)], roi_start=inp[f"roi_start{v}"], roi_end=inp[f"roi_end{v}"],
                           roi_relative=False, interp_type=types.INTERP_LINEAR, antialias=True,
                           dtype=types.UINT8)
                 for v, s in zip(views, sizes))


def colour(img, inp: dict, v: int, gpu: bool = False):
    from nvidia.dali import fn
    from nvidia.dali import math as dmath
    b, c = inp[f"brightness{v}"], inp[f"contrast{v}"]
    # float in, float out: ~3x cheaper than color_twist's uint8 path on the CPU; clamp as torchvision does.
    # color_twist pivots contrast at half the type's range, 0.5 for float, i.e. near black for these 0..255
    # pixels; the offset b * 127.5 * (1 - c) moves the pivot to mid-grey (128), as on uint8 images.
    pivot = b * (127.5 * (1.0 - c))
    if gpu:
        pivot = pivot.gpu()
    twisted = fn.color_twist(img, brightness=b, contrast=c, saturation=inp[f"saturation{v}"], hue=inp[f"hue{v}"])
    return dmath.clamp(twisted + pivot, 0.0, 255.0)


def blur(img, inp: dict, v: int, gpu: bool):
    from nvidia.dali import fn
    kh, kv = inp[f"blur_h{v}"], inp[f"blur_v{v}"]
    if gpu:  # filters beside GPU data (a GPU filter input is accepted in any case)
        kh, kv = kh.gpu(), kv.gpu()
    # two 1-D passes of fn.filter with per-sample kernels: same pixels as gaussian_blur, ~7x cheaper on the CPU
    return fn.filter(fn.filter(img, kh), kv)


def solarize(img):
    return img + (img >= 128.0) * (255.0 - 2.0 * img)


def augment_view(img, inp: dict, v: int, stages: dict[str, str], gpu: bool = False):
    """Colour twist / grayscale, blur and solarise on float HWC pixels in [0, 255], each only on the
    samples drawn for it (DALI conditionals split the batch; the predicates are CPU nodes).  A stage
    with probability 0 is left out of the graph and one with probability 1 runs without a split."""
    if stages["colour"] == "always":
        img = colour(img, inp, v, gpu)
    elif stages["colour"] == "drawn":
        if inp[f"colour{v}"]:
            img = colour(img, inp, v, gpu)
    if stages["blur"] == "always":
        img = blur(img, inp, v, gpu)
    elif stages["blur"] == "drawn":
        if inp[f"blur{v}"]:
            img = blur(img, inp, v, gpu)
    if stages["solarize"] == "always":
        img = solarize(img)
    elif stages["solarize"] == "drawn":
        if inp[f"solarize{v}"]:
            img = solarize(img)
    return img


def finish_views(views, float_output: bool, inp: dict, recipe: _augment.Recipe, decode_device: str, out_dtype,
                 mean=None, std=None, view_ids=None):
    """Augment every view (float chain, stages per :func:`aug_stages` of ``recipe.view_aug(v)``) and normalise
    them to NCHW (``mean``/``std`` in pixel units, default ImageNet's).

    Args:
        views: the resized views (:func:`dali_crop`).
        view_ids: each view's number ``v`` (its inputs ``colour{v}``, ...; 0, 1 global, ``2 + j`` local view
            ``j``); default ``0, 1, ...``.

    Returns:
        one node per view, in order.
    """
    from nvidia.dali import fn, types
    outs = []
    for v, img in zip(range(len(views)) if view_ids is None else view_ids, views):
        stages = aug_stages(recipe.view_aug(v))
        if not float_output and any(k != "off" for k in stages.values()):
            img = fn.cast(img, dtype=types.FLOAT)  # the augmentations run on float; normalise takes either
        img = augment_view(img, inp, v, stages, gpu=decode_device == "mixed")
        outs.append(fn.crop_mirror_normalize(img, dtype=out_dtype, output_layout="CHW",
                                             mean=mean or list(IMAGENET_MEAN_PX),
                                             std=std or list(IMAGENET_STD_PX)))
    return tuple(outs)


def crop_views(images, inp: dict, size: int, recipe: _augment.Recipe, decode_device: str, out_dtype,
               mean=None, std=None, local_crops: int = 0, local_size: int = 0):
    """The whole DALI-ops crop stage: both global views at ``size`` and ``local_crops`` local views at
    ``local_size``, as ``fn.objcrop.crop`` makes them.

    Args:
        images: decoded HWC uint8 images (CPU or GPU node).
        inp: every view's input nodes by name (``roi_start{v}``, ``roi_end{v}``, the augmentation columns,
            ``blur_h{v}`` / ``blur_v{v}``), ``v`` in ``0 .. 1 + local_crops``.
        size, local_size: the global and local views' sides.
        recipe, decode_device, out_dtype, mean, std: as :func:`finish_views` (local views: ``recipe.local``).
        local_crops: M local views (0: the two global views only).

    Returns:
        ``(view1, view2)``, each (3, size, size) per sample; with local views also ``local``, the M local
        views stacked into (M, 3, local_size, local_size) per sample (layout FCHW, as ``fn.objcrop.crop``'s).
    """
    from nvidia.dali import fn
    ids = list(range(2 + local_crops))
    outs = finish_views(dali_crop(images, inp, [size, size] + [local_size] * local_crops, ids), False, inp, recipe,
                        decode_device, out_dtype, mean, std, view_ids=ids)
    if not local_crops:
        return outs
    return outs[0], outs[1], fn.stack(*outs[2:], axis_name="F")
