"""dali_objcrop's DALI operators: build, load, and the Python building blocks.

The operators (``csrc/dali/``) are compiled on first use against the installed
DALI (:mod:`.build`, cached by DALI version and source hash) and registered
with ``nvidia.dali.plugin_manager.load_library``:

* ``fn.objcrop.windows`` (schema ``objcrop__Windows``, CPU): per sample, both
  views' windows, flips and augmentation draws, equal to
  :func:`dali_objcrop.windows.sample_windows` and
  :func:`dali_objcrop.augment.sample_aug_params` for the same key.
* ``fn.objcrop.crop`` (schema ``objcrop__Crop``): the fused crop-and-augment
  operator (where built).

Where they cannot be built (no compiler, no CUDA headers, a compile error) or
``DALI_OBJCROP_PLUGIN=0`` is set, :func:`load` warns once and returns False,
and the loader keeps today's DALI-ops graph.

Use inside your own pipeline (docs/plugin.md has complete, tested examples)::

    from dali_objcrop import plugin
    epoch = plugin.reader_epoch("Reader")        # advances with the reader (pad_last_batch=True)
    q, k = plugin.object_views(jpegs, index, boxes, epoch=epoch, config=CropConfig(mode="obj-obj-dilate"),
                               seed=0, size=224, device="cpu")
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass

from .build import PluginBuildError, library_path

__all__ = ["PluginBuildError", "library_path", "load", "available", "has_op", "windows", "windows_arguments",
           "WindowsOutputs", "AUG_COLUMNS", "object_views", "reader_epoch", "ReaderEpoch", "error",
           "crop_op_registered", "crop_op_usable"]

from ..augment import AUG_COLUMNS  # noqa: E402 -- column order of the windows operator's ``aug`` output
# Per-view order of the operator's ``aug`` argument (augment.ViewAug fields).
_VIEW_AUG_FIELDS = ("jitter_p", "brightness", "contrast", "saturation", "hue", "gray_p", "blur_p")

_lock = threading.Lock()
_state: dict = {"loaded": None, "error": None, "path": None}


def load(cuda: bool | None = None) -> bool:
    """Build (if needed) and load the operators into DALI, once per process.

    Args:
        cuda: build the CUDA operators too; None: where nvcc and ``*.cu`` sources exist (a CUDA
            build that fails falls back to the CPU operators).

    Returns:
        True when the operators are registered; False (after one warning naming the reason)
        when they cannot be, or ``DALI_OBJCROP_PLUGIN=0``.
    """
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        if os.environ.get("DALI_OBJCROP_PLUGIN", "1") == "0":
            _fail("disabled by DALI_OBJCROP_PLUGIN=0")
            return False
        cuda_failed = None
        try:
            try:
                path = library_path(cuda=cuda)
            except PluginBuildError as e:
                if cuda is not None or not _cuda_attempted():
                    raise
                cuda_failed = _first_line(e)
                try:
                    path = library_path(cuda=False)
                except PluginBuildError as e2:   # one warning for both failures
                    raise PluginBuildError(f"{_first_line(e2)}; the CUDA build failed first: {cuda_failed}\n"
                                           f"{e2}") from e2
            import nvidia.dali.plugin_manager as pm
            pm.load_library(str(path))
            from nvidia.dali import backend
            if "objcrop__Windows" not in backend.RegisteredCPUOps():
                from .build import discard_cached_library
                discard_cached_library(path)   # the next process builds it again
                raise PluginBuildError(f"{path} loads but registers no objcrop operators (objcrop__Windows "
                                       f"missing; removed from the cache, the next run rebuilds it)")
        except Exception as e:  # noqa: BLE001 -- any failure means: fall back, and say why once
            _fail(_first_line(e), detail=str(e))
            return False
        if cuda_failed is not None:
            warnings.warn(f"dali_objcrop: CUDA operators not built ({cuda_failed}); using the CPU operators only",
                          RuntimeWarning, stacklevel=2)
        _state.update(loaded=True, path=path)
        return True


def _cuda_attempted() -> bool:
    from .build import nvcc, sources_dir
    try:
        return nvcc() is not None and any(sources_dir().glob("*.cu"))
    except PluginBuildError:
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _fail(reason: str, detail: str | None = None) -> None:
    _state.update(loaded=False, error=detail or reason)
    warnings.warn(f"dali_objcrop: C++ operators unavailable ({reason}); using the DALI-ops graph",
                  RuntimeWarning, stacklevel=3)


def available() -> bool:
    """Whether the operators are loaded (loads them on first call; never raises)."""
    return load()


def error() -> str | None:
    """Why :func:`load` failed (the full compiler message), None if it did not."""
    return _state["error"]


def has_op(name: str) -> bool:
    """Whether ``fn.objcrop.<name>`` exists (after :func:`load`)."""
    if not load():
        return False
    from nvidia.dali import fn
    return hasattr(getattr(fn, "objcrop", None), name)


def _text(*values: float) -> str:
    # repr() of a Python float is read back by strtod as the very same double
    return ", ".join(repr(float(v)) for v in values)


def windows_arguments(config=None, recipe="mocov2", seed: int = 0) -> dict:
    """The ``fn.objcrop.windows`` arguments of a :class:`~dali_objcrop.windows.CropConfig`, a recipe and a seed.

    Real numbers go as text (DALI has no float64 arguments; float32 would change the windows).
    ``config.box_scale=None`` leaves ``box_scale`` unset: the operator derives it from ``boxes_store``
    as the loader does (with a boxes input it uses (1, 1); :func:`windows` warns).
    The local views (``config.local_crops`` = M > 0) go as ``local_crops``, ``local_scale``, ``local_from``
    and a 30-number ``aug`` (the two global views, then ``recipe.local``); M = 0 sends the 20 of the
    global views (the operator's two-view outputs).
    """
    from ..augment import get_recipe
    from ..windows import CropConfig
    config = config or CropConfig()
    rec = get_recipe(recipe)
    aug = []
    for v in rec.views + ((rec.local,) if config.local_crops else ()):
        aug += [getattr(v, f) for f in _VIEW_AUG_FIELDS] + [v.blur_sigma[0], v.blur_sigma[1], v.solarize_p]
    box_scale = "" if config.box_scale is None else _text(*config.box_scale)
    return dict(mode=config.mode, scale=_text(*config.scale), ratio=_text(*config.ratio), box_scale=box_scale,
                dilate=_text(config.dilate), shift_range=_text(*config.shift_range), min_box_size=int(config.min_box_size),
                top_k=int(config.top_k), num_tries=int(config.num_tries), flip_p=_text(config.flip_p), seed=int(seed),
                aug=_text(*aug), local_crops=int(config.local_crops), local_scale=_text(*config.local_scale),
                local_from=config.local_from)


@dataclass
class WindowsOutputs:
    """The windows operator's outputs (DALI nodes), per sample, with V = 2 + M view rows (M =
    ``CropConfig.local_crops``: the two global views, then the M local views in order; M = 0: two):

    roi (4,) int32 ``[x, y, w, h]`` -- the union of all V windows, what to decode;
    windows (V, 4) int32 ``[x1, y1, x2, y2)`` relative to the roi; flip (V,) uint8;
    aug (V, 9) float32 in :data:`AUG_COLUMNS` order (local views: the recipe's ``local``); where asked
    for: details (12 + 5M,) int32 (regions 2x4, box_index, fallback, shift dx, dy, then per local view
    its region x1, y1, x2, y2 and box index), resize_rois (V, 4) float32 per view
    ``[y1, x_start, y2, x_end]`` (``fn.resize``'s roi_start/roi_end, x swapped when flipped),
    blur_kernels (V, W) float32 (each view's Gaussian kernel centred in W taps, W the largest size);
    image_windows (V, 4) int32 ``[x1, y1, x2, y2)`` in the whole image's pixels (``roi[:2]`` + windows:
    for a full decode).
    """

    roi: object
    windows: object
    flip: object
    aug: object
    details: object = None
    resize_rois: object = None
    blur_kernels: object = None
    image_windows: object = None

    def __iter__(self):
        return iter((self.roi, self.windows, self.flip, self.aug))


def _outside_autograph(f, *args, **kwargs):
    """``f(*args, **kwargs)`` not rewritten by AutoGraph when called from an ``enable_conditionals``
    pipeline (:func:`load`'s file and path helpers have no Python source to convert: warnings otherwise)."""
    from nvidia.dali.pipeline import do_not_convert
    return do_not_convert(f)(*args, **kwargs)


def _check_boxes_given(config, boxes, boxes_store, stacklevel: int = 3) -> None:
    from ..windows import CropConfig
    config = config or CropConfig()
    if config.uses_boxes and boxes is None and boxes_store is None:
        raise ValueError(f"mode {config.mode!r} needs boxes: pass boxes= (a node of (K, 4) normalised ltrb boxes) "
                         f"or boxes_store= (a .boxes file); without them every image would get scene crops "
                         f"(CropConfig(mode='scene-scene') says so)")
    if config.uses_boxes and boxes is not None and config.box_scale is None:
        warnings.warn("CropConfig.box_scale is None with a boxes input: crops inside a box use scale (1, 1), the "
                      "whole region; the loader derives (min(0.2 / mean box area, 1), 1) from its store: pass "
                      "box_scale=dali_objcrop.box_scale_from_mean_area(store.mean_area_fraction(top_k)) "
                      "(or boxes_store=, which derives it)", UserWarning, stacklevel=stacklevel)


def windows(shape, index, boxes=None, *, epoch=0, config=None, recipe="mocov2", seed: int = 0,
            boxes_store: str | os.PathLike | None = None, store_row=None, details: bool = False,
            resize_rois: bool = False, blur_kernels: bool = False, image_windows: bool = False,
            box_check: str = "error") -> WindowsOutputs:
    """``fn.objcrop.windows`` inside a ``@pipeline_def``, configured from a CropConfig and a recipe.

    Args:
        shape: node of the encoded images' shapes (H, W[, C]), e.g. ``fn.peek_image_shape(jpegs)``.
        index: node with one non-negative integer per sample: the random key (dataset position or id).
        boxes: node of (K, 4) float32 normalised ltrb boxes, best-first (e.g. ``readers.coco(ltrb=True,
            ratio=True)``'s); None with ``boxes_store`` or for scene crops.  Boxes that are not finite,
            inverted or outside [0, 1] (pixel boxes) are refused per batch, naming the sample.
        epoch: int or a node (argument input) -- the key's epoch; :func:`reader_epoch` gives a node that
            advances with a reader.
        config: :class:`~dali_objcrop.windows.CropConfig` (mode, scales, dilation, top-k, flip ...).
            ``box_scale=None`` with ``boxes_store``: derived from the store as the loader does; with
            ``boxes``: (1, 1), warned.  ``local_crops`` = M > 0 adds M local views after the two global
            ones (every output then has 2 + M view rows; :class:`WindowsOutputs`).
        recipe: augmentation recipe name or :class:`~dali_objcrop.augment.Recipe` (its ``local``
            augments the local views).
        seed: the key's seed (>= 0).
        boxes_store: a ``.boxes`` file; each sample's boxes are its row ``store_row`` (default: ``index``).
        store_row: int node, the store row when it differs from ``index``.
        details: also return regions, box_index, fallback and shift.
        resize_rois, blur_kernels: also return what DALI's ``fn.resize`` / ``fn.filter`` take
            (the loader's DALI-ops crop stage on the operator's windows).
        image_windows: also return the windows in the whole image's pixels (for a full decode).
        box_check: ``error`` (refuse boxes outside [0, 1]) or ``clip`` (accept boxes reaching outside
            the image, clipped to it).

    Raises:
        ValueError: an object mode without ``boxes`` or ``boxes_store``.
        RuntimeError: the operators are not available (see :func:`load`, :func:`error`).
    """
    _check_boxes_given(config, boxes, boxes_store)
    return _windows(shape, index, boxes, epoch=epoch, config=config, recipe=recipe, seed=seed,
                    boxes_store=boxes_store, store_row=store_row, details=details, resize_rois=resize_rois,
                    blur_kernels=blur_kernels, image_windows=image_windows, box_check=box_check)


def _windows(shape, index, boxes=None, *, epoch, config, recipe, seed, boxes_store, store_row, details,
             resize_rois, blur_kernels, image_windows, box_check) -> WindowsOutputs:
    if not _outside_autograph(load):
        raise RuntimeError(f"fn.objcrop.windows is not available: {error()}")
    from nvidia.dali import fn
    kw = windows_arguments(config, recipe, seed)
    if boxes is not None and not kw["box_scale"]:
        kw["box_scale"] = _text(1.0, 1.0)   # warned in Python already (_check_boxes_given)
    if boxes_store is not None:
        if boxes is not None:
            raise ValueError("give boxes or boxes_store, not both")
        kw["boxes_store"] = os.fspath(boxes_store)
        if store_row is not None:
            kw["store_row"] = store_row
    inputs = (shape, index) if boxes is None else (boxes, shape, index)
    if box_check not in ("error", "clip"):
        raise ValueError(f"box_check must be 'error' or 'clip', got {box_check!r}")
    out = list(fn.objcrop.windows(*inputs, epoch=epoch, details=details, resize_rois=resize_rois,
                                  blur_kernels=blur_kernels, image_windows=image_windows, box_check=box_check,
                                  **kw))
    extra = {name: out.pop(4) if flag else None
             for name, flag in (("details", details), ("resize_rois", resize_rois), ("blur_kernels", blur_kernels),
                                ("image_windows", image_windows))}
    return WindowsOutputs(*out, **extra)


def crop_op_registered(device: str) -> bool:
    """Whether ``fn.objcrop.crop`` has a backend for decoded images on ``device`` (``cpu`` / ``gpu``)."""
    from nvidia.dali import backend
    ops = backend.RegisteredGPUOps() if device == "gpu" else backend.RegisteredCPUOps()
    return "objcrop__Crop" in ops


def crop_op_usable(device: str, device_id: int | None = None) -> tuple[bool, str]:
    """Whether the default pipelines should use ``fn.objcrop.crop`` on ``device``: ``(ok, why not)``.

    On the GPU the backend must also pass its first-use self-test on ``device_id`` (GPU vs CPU operator on
    a tiny batch, cached per library build and GPU model: :mod:`.selftest`); a failure warns once and the
    callers use the DALI-ops crop stage.
    """
    if not crop_op_registered(device):
        return False, f"fn.objcrop.crop has no {device} backend in the loaded operators"
    if device != "gpu":
        return True, ""
    from .selftest import gpu_crop_verified
    ok, why = gpu_crop_verified(device_id, library=_state.get("path"))
    return ok, ("" if ok else f"GPU self-test failed: {why}")



def _check_device(device: str) -> None:
    """Fail before DALI does, naming the argument: ``device="gpu"`` without a GPU or without ``device_id``,
    and a pipeline given a ``device_id`` on a machine without a GPU."""
    from nvidia.dali import backend
    from nvidia.dali.pipeline import Pipeline
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    gpus = backend.GetCUDADeviceCount()
    pipe = Pipeline.current()
    device_id = getattr(pipe, "device_id", None) if pipe is not None else None
    if device == "gpu" and gpus == 0:
        raise ValueError("device='gpu' but no CUDA GPU is visible to DALI: use device='cpu' and "
                         "@pipeline_def(device_id=None)")
    if device == "gpu" and pipe is not None and device_id is None:
        raise ValueError("device='gpu' needs a pipeline with a GPU: @pipeline_def(device_id=0), not device_id=None")
    if device == "cpu" and gpus == 0 and device_id is not None:
        raise ValueError(f"the pipeline has device_id={device_id} but no CUDA GPU is visible to DALI: a CPU "
                         f"pipeline takes @pipeline_def(device_id=None)")


def object_views(jpegs, index, boxes=None, *, epoch=0, config=None, recipe="mocov2", seed: int = 0,
                 size: int = 224, device: str = "cpu", dtype: str = "float32", mean=None, std=None,
                 boxes_store: str | os.PathLike | None = None, store_row=None, decoder_kwargs: dict | None = None,
                 crop_op: bool | None = None, decoded: bool = False, box_check: str = "error"):
    """Two object-aware, augmented, normalised views per image (and local views), inside your ``@pipeline_def``.

    The building block of :class:`~dali_objcrop.ObjCropLoader`'s pipeline, for a pipeline of your
    own (your reader, your other outputs): ``fn.peek_image_shape`` -> ``fn.objcrop.windows`` ->
    ``fn.decoders.image_slice`` of the union of both windows (``mixed`` on a GPU) ->
    ``fn.objcrop.crop`` (or, where it is not built for ``device`` or ``crop_op=False``, DALI's
    resize / color_twist / filter / crop_mirror_normalize fed by the windows operator: then the
    pipeline needs ``enable_conditionals=True``).  With ``decoded=True`` the images are already
    decoded (your own decoder call): the windows come from their own shape and the union of both
    windows is sliced out of them, so no coordinate shift is left to the caller.

    With ``config.local_crops = M > 0`` (multi-crop) the windows operator also draws M local views per
    image (``config.local_scale``, ``config.local_from``; augmented with the recipe's ``local``
    augmentation), the decoded roi covers them too, and a third output holds them at
    ``config.local_size`` x ``config.local_size`` (``fn.objcrop.crop(local_size=...)``, or on the DALI-ops
    stage one resize / augmentation chain per local view, stacked).

    Args:
        jpegs: node of encoded images (any reader's, or ``fn.io.file.read``'s); with ``decoded=True``
            decoded HWC uint8 RGB images on the CPU.
        index: node with one non-negative integer per sample, the random key (a dataset position, or
            ``readers.coco(image_ids=True)``'s ids, or a ``readers.file`` label holding the store row).
        boxes: node of (K, 4) float32 normalised ltrb boxes, best-first (``readers.coco(ltrb=True,
            ratio=True)``); None with ``boxes_store`` or for ``scene-scene``.  Boxes outside [0, 1]
            (pixels), inverted or not finite are refused naming the sample (``box_check="clip"``
            accepts boxes reaching a little outside the image).
        epoch: int or node (argument input): the key's epoch.  An int repeats the same crops every
            epoch; :func:`reader_epoch` gives a node that advances with the reader.
        config, recipe, seed: as :func:`windows` (``config.box_scale=None`` with ``boxes_store``:
            derived from the store, as the loader does; ``config.local_crops`` / ``local_size``: the local
            views).
        size: output side in pixels of the two global views.
        device: ``cpu`` or ``gpu`` (decode ``mixed``; the views are GPU nodes).  ``gpu`` without a GPU,
            or in a pipeline without ``device_id``, raises here.
        dtype: ``float32``, ``float16`` (or ``bfloat16`` as uint16 bits, fused crop only).
        mean, std: per channel in [0, 1] units (default ImageNet's); ``fn.objcrop.crop`` itself takes
            pixel units (0-255).
        boxes_store, store_row: see :func:`windows`.
        decoder_kwargs: extra decoder arguments (``hw_decoder_load``, preallocation hints; GPU).
        crop_op: use ``fn.objcrop.crop``; None: where it is built for ``device`` (and, on a GPU, has
            passed its first-use self-test: :func:`crop_op_usable`).
        decoded: ``jpegs`` are decoded images (CPU, HWC uint8 RGB), not encoded files.
        box_check: ``error`` or ``clip`` (see :func:`windows`).

    Returns:
        ``(view1, view2)`` nodes, (3, size, size) per sample (CHW); with ``config.local_crops = M > 0``
        ``(view1, view2, local)``, ``local`` (M, 3, local_size, local_size) per sample (FCHW, local view
        ``j`` at ``local[j]``), ``local_size = config.local_size``.
    """
    from nvidia.dali import fn, types
    from ..constants import IMAGENET_MEAN, IMAGENET_STD
    from ..ops_graph import crop_views
    from ..windows import CropConfig
    _check_device(device)
    _check_boxes_given(config, boxes, boxes_store)
    if decoded and device == "gpu":
        raise ValueError("decoded=True takes images decoded on the CPU; on a GPU pass the encoded images "
                         "(object_views decodes only the windows' union with nvJPEG)")
    if not _outside_autograph(load):
        raise RuntimeError(f"dali_objcrop's operators are not available: {error()}")
    if crop_op is None:   # on a GPU only once the backend has passed its self-test on this device
        from nvidia.dali.pipeline import Pipeline
        current = Pipeline.current()
        crop_op = crop_op_usable(device, current.device_id if current is not None else None)[0]
    elif crop_op and not crop_op_registered(device):
        raise RuntimeError(f"fn.objcrop.crop has no {device} backend in the loaded operators")
    mean = [m * 255 for m in (IMAGENET_MEAN if mean is None else mean)]
    std = [s * 255 for s in (IMAGENET_STD if std is None else std)]
    if decoded:
        shape = jpegs.shape(dtype=types.INT64)                        # the decoded pixel grid
    else:
        shape = fn.peek_image_shape(jpegs, adjust_orientation=False)   # the header's pixel grid, as the window maths
    w = _windows(shape, index, boxes, epoch=epoch, config=config, recipe=recipe, seed=seed, boxes_store=boxes_store,
                 store_row=store_row, details=False, resize_rois=not crop_op, blur_kernels=not crop_op,
                 image_windows=False, box_check=box_check)
    decode_device = "mixed" if device == "gpu" else "cpu"
    if decoded:   # the windows are relative to the roi: cut it out of the whole image
        images = fn.slice(jpegs, w.roi[0:2], w.roi[2:4], axis_names="WH", normalized_anchor=False,
                          normalized_shape=False, out_of_bounds_policy="error")
        decode_device = "cpu"
    else:
        images = fn.decoders.image_slice(jpegs, w.roi[0:2], w.roi[2:4], axis_names="WH", normalized_anchor=False,
                                         normalized_shape=False, device=decode_device, output_type=types.RGB,
                                         adjust_orientation=False, **(decoder_kwargs or {}))
    local_crops = (config or CropConfig()).local_crops
    local_size = (config or CropConfig()).local_size if local_crops else 0
    if crop_op:
        # the op's contrast pivot is mid-grey (128), as the DALI-ops stage's colour twist
        return tuple(fn.objcrop.crop(images, w.windows, w.flip, w.aug, size=size, local_size=local_size, mean=mean,
                                     std=std, dtype=dtype))
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype {dtype!r} needs fn.objcrop.crop; the DALI-ops stage gives float32 / float16")
    inp: dict = {}
    for v in range(2 + local_crops):   # rows 2 .. 1 + M of the windows operator's outputs: the local views
        inp[f"roi_start{v}"], inp[f"roi_end{v}"] = w.resize_rois[v, 0:2], w.resize_rois[v, 2:4]
        for c, name in enumerate(AUG_COLUMNS):
            inp[f"{name}{v}"] = (fn.cast(w.aug[v, c], dtype=types.BOOL) if name in ("colour", "blur", "solarize")
                                 else w.aug[v, c])
        inp[f"blur_h{v}"] = fn.expand_dims(w.blur_kernels[v], axes=[0])    # (1, W): along x
        inp[f"blur_v{v}"] = fn.expand_dims(w.blur_kernels[v], axes=[1])    # (W, 1): along y
    from ..augment import get_recipe
    out_dtype = types.FLOAT16 if dtype == "float16" else types.FLOAT
    return crop_views(images, inp, size, get_recipe(recipe), decode_device, out_dtype, mean, std,
                      local_crops=local_crops, local_size=local_size)


class ReaderEpoch:
    """``fn.external_source`` callback: each sample's epoch, counted from the batches a reader delivers.

    A pipeline run takes one batch from the reader and one from this source, in order (prefetching
    runs them ahead together), so batch ``c`` belongs to epoch ``first_epoch + c // batches_per_epoch``
    whatever the iterator prefetches or resets.  With ``pad_last_batch=True`` every epoch of the
    reader is ``ceil(shard size / batch size)`` runs on every shard (the last one padded), so the count
    is exact under ``DALIGenericIterator`` with ``auto_reset`` and any ``last_batch_policy``.

    Args:
        pipe: the pipeline (its reader's metadata is read on the first call, after the build).
        reader_name: the reader's ``name=``.
        first_epoch: the epoch of the first batch (a resumed run).
    """

    def __init__(self, pipe, reader_name: str, first_epoch: int = 0) -> None:
        if first_epoch < 0:
            raise ValueError(f"first_epoch must be >= 0, got {first_epoch!r}")
        self.pipe, self.reader_name, self.first_epoch = pipe, reader_name, int(first_epoch)
        self.calls = 0
        self.batches_per_epoch: int | None = None

    def _per_epoch(self) -> int:
        meta = self.pipe.reader_meta(self.reader_name)
        if not meta.get("pad_last_batch"):
            raise ValueError(f"reader_epoch({self.reader_name!r}) needs the reader built with pad_last_batch=True "
                             f"(then every epoch is a whole number of batches on every shard; without it a batch "
                             f"spans two epochs)")
        shard = meta["epoch_size_padded"] // meta["number_of_shards"]   # padded shards are equal
        return -(-shard // self.pipe.max_batch_size)      # the last batch of a shard is filled by repeats

    def __call__(self):
        import numpy as np
        if self.batches_per_epoch is None:
            self.batches_per_epoch = self._per_epoch()
        epoch = self.first_epoch + self.calls // self.batches_per_epoch
        self.calls += 1
        return np.full(self.pipe.max_batch_size, epoch, dtype=np.int64)


def reader_epoch(reader_name: str, first_epoch: int = 0):
    """A node with each sample's epoch, advancing with the reader ``reader_name`` (inside a ``@pipeline_def``).

    Pass it as ``epoch=`` to :func:`object_views` / :func:`windows`: the crops then differ every epoch
    and are the same for the same (seed, epoch, key) when rerun, under ``DALIGenericIterator``'s
    prefetching and ``auto_reset`` (an int epoch repeats the same crops every epoch; a value set from the
    training loop lags by the prefetched batches).  The reader needs ``name=reader_name`` and
    ``pad_last_batch=True``.  See :class:`ReaderEpoch`.
    """
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline
    pipe = Pipeline.current()
    if pipe is None:
        raise RuntimeError("reader_epoch() is called inside a @pipeline_def function")
    src = _outside_autograph(ReaderEpoch, pipe, reader_name, first_epoch)
    return fn.external_source(source=src, batch=True, dtype=types.INT64)

