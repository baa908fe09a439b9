"""The loader's two DALI pipelines: on dali_objcrop's operators, and the DALI-ops graph (the fallback).

Two pipelines.  Where dali_objcrop's C++ operators build (:mod:`dali_objcrop.plugin`,
docs/plugin.md), the loader hands DALI only file names, positions, box-store rows and the
epoch per batch (:meth:`_Source.handover`); DALI reads the files, ``fn.objcrop.windows``
draws windows, flips and augmentations (equal to ``sample_windows`` / ``sample_aug_params``),
the ROI is decoded and ``fn.objcrop.crop`` makes both views (:func:`build_plugin_pipeline`,
:func:`dali_objcrop.plugin.object_views`).  Which one runs is decided by :class:`~dali_objcrop.ObjCropLoader`
(``use_plugin``, ``stats["pipeline"]``); both are supported, the operators are the default.  Otherwise -- and with ``use_plugin=False`` -- the
DALI-ops graph below runs, fed by the NumPy callback; its description follows.

Architecture (sample in NumPy per batch, apply in DALI)::

    our sampler (seed, epoch, rank) --> batch of dataset positions
      --> _Source.inputs(): encoded bytes (np.fromfile), both views' windows
          (windows.sample_windows), every augmentation draw
          (augment.sample_aug_params), all vectorised  [one Python call per batch]
      --> fn.external_source(batch=True)
      --> fn.decoders.image_slice of the union of the two windows
          ("mixed" on a GPU, "cpu" otherwise; adjust_orientation off)
      --> crop backend "dali": fn.resize per view with per-sample roi_start /
          roi_end to float (roi_start > roi_end on x mirrors: the flip is free)
      --> per view, only on the samples drawn for it (DALI conditionals):
          color_twist + clamp (jitter; grayscale = saturation 0), Gaussian
          blur as two fn.filter passes with per-sample 1-D kernels, solarise
      --> crop_mirror_normalize to NCHW float32 (float16 on the GPU) --> torch

Decisions and the measurements behind them (2-core CPU machine shared with
other engineers, COCO photos ~640x480, batch 64, 2 DALI threads; CPU
milliseconds per image over all threads, which other load distorts less than
images/s):

* Windows in NumPy, not in the DALI graph (the alternative: a DALI reader
  plus in-graph window maths): ``sample_windows`` is the single source of
  truth (the CUDA kernel and this graph are tested against it); a batch's
  inputs (file reads, windows, augmentation draws) cost 7-12 ms per 64 images
  in the main thread, 0.1-0.2 ms per image, while ``readers.file`` alone
  costs 0.1 ms per image and the window maths as ~100 DALI arithmetic ops
  ~0.06 ms (measured), in float32 rather than float64.  The alternative
  could save at most ~1% of the 8-12 ms an image costs, and would lose exact
  windows and ``set_epoch``.  No per-sample Python anywhere.
* Our own sampler instead of a DALI reader: a global reshuffle from
  ``(seed, epoch)``, sharded by rank, equal batch counts on every rank, and
  the epoch known before any batch of it is prefetched, so ``set_epoch``
  always takes effect.  The loader drives ``Pipeline.run`` itself until the
  source's ``StopIteration`` (no ``DALIGenericIterator``), so nothing is
  prefetched across epochs; an epoch abandoned mid-way is drained first.
* ROI decoding: decoding the union of the two windows instead of the whole
  image cuts decode cost with the region (full 640x480: 3.0 ms; half the
  width and height: 2.0 ms; 0.3: 1.25 ms), which is why the object modes,
  whose windows are smaller, cost less than scene-scene.
* A float augmentation chain: DALI's CPU ``color_twist`` costs 1.9 ms per
  224 px view on uint8 but 0.57 ms (+0.38 clamp) on float; ``gaussian_blur``
  (7 taps) 2.6 ms on uint8, 1.7 ms on float, while two separable
  ``fn.filter`` passes with per-sample kernels give the same pixels (to
  1e-4) for 0.22 ms.  Hence the chain runs on float (the views leave the
  resize as uint8, as torchvision's PIL crops, and are cast: ~5% cheaper
  end to end than resizing to float).
* Probabilities shape the graph: a stage with p = 0 is not in it, one with
  p = 1 runs without a batch split, others run under a DALI conditional on
  the drawn samples only (measured: colour + blur on every view cut
  throughput ~4x).
* Remaining cost (scene-scene, mocov2, ~9 ms per image): decode ~3,
  two ROI resizes ~3, augmentations ~1.5-2, normalise ~0.3, the copy into
  fresh torch tensors ~0.8 (buffers are never reused, so a batch stays valid
  however long the caller keeps it).
* The crop is one small function chosen by ``crop_backend`` in
  :data:`CROP_BACKENDS`; another backend (the fused CUDA kernel through CuPy)
  registers itself with :func:`register_crop_backend`.

End-to-end figures (``benchmarks/throughput.py``) are in README.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import augment as _augment
from . import plugin
from .feed import BASE_FIELDS, CROP_FIELDS, ROI_DECODE_FIELDS, _aug_fields, plugin_fields
from .ops_graph import dali_crop, finish_views
from .windows import CropConfig


@dataclass(frozen=True)
class CropBackend:
    """A crop stage: ``fn(images, inputs, size) -> (view0, view1)``, the input fields it reads, and
    whether its views are float32 (else uint8; either way HWC RGB in [0, 255])."""

    fn: Callable
    inputs: tuple[str, ...]
    float_output: bool = True
    pipeline_kwargs: tuple[tuple[str, object], ...] = ()   # e.g. (("exec_async", False),) for python_function


CROP_BACKENDS: dict[str, CropBackend] = {
    "dali": CropBackend(dali_crop, ("roi_start0", "roi_end0", "roi_start1", "roi_end1"), float_output=False),
}


def register_crop_backend(name: str, fn: Callable, inputs: tuple[str, ...] = ("window", "flip"),
                          float_output: bool = False, pipeline_kwargs: dict | None = None) -> None:
    """Add a crop backend: ``fn(images, inputs, size) -> (view0, view1)`` HWC RGB DALI nodes in [0, 255].

    Args:
        name: the ``crop_backend`` value that selects it.
        fn: builds the crop stage from the decoded images (CPU or GPU node, HWC uint8; with ROI
            decoding only the union of the two windows), a dict of external-source nodes and the
            output side.
        inputs: which of :data:`CROP_FIELDS` it needs: ``window`` ((2, 4) int32
            ``[x1, y1, x2, y2)`` per view, in the decoded region's coordinates), ``flip``
            ((2,) uint8), ``roi_start{v}``/``roi_end{v}`` ((2,) float32, y then x, x swapped when
            flipped).
        float_output: True if the views are float32, False if uint8 (cast to float for the
            augmentations).
        pipeline_kwargs: extra ``Pipeline`` arguments the backend needs (for example
            ``{"exec_async": False, "exec_pipelined": False}`` for ``fn.python_function``).
    """
    bad = [f for f in inputs if f not in CROP_FIELDS]
    if bad:
        raise ValueError(f"unknown crop input fields {bad}; choose from {CROP_FIELDS}")
    CROP_BACKENDS[name] = CropBackend(fn, tuple(inputs), float_output, tuple((pipeline_kwargs or {}).items()))


def _cupy_crop(images, inp: dict, size: int):
    """Crop backend ``cupy``: the fused CUDA kernel of ``csrc/`` through CuPy (GPU only; imported lazily)."""
    from .kernels.cupy_backend import dali_crop_stage
    return dali_crop_stage(images, inp, size)


register_crop_backend("cupy", _cupy_crop, ("window", "flip"), float_output=True)


def _objcrop_graph(source: Callable, size: int, decode_device: str, crop_backend: str, out_dtype,
                   decoder_kwargs: dict, roi_decode: bool, recipe: _augment.Recipe):
    from nvidia.dali import fn, types
    fields = input_fields(crop_backend, roi_decode, recipe)
    nodes = fn.external_source(source=source, num_outputs=len(fields), batch=True)
    inp = dict(zip(fields, nodes))
    # adjust_orientation off: window coordinates are in the stored (header) pixel grid
    if roi_decode:  # decode only the union of the two windows (libjpeg-turbo / nvJPEG ROI decoding)
        images = fn.decoders.image_slice(inp["jpegs"], inp["anchor"], inp["shape"], axis_names="WH",
                                         normalized_anchor=False, normalized_shape=False,
                                         device=decode_device, output_type=types.RGB,
                                         adjust_orientation=False, **decoder_kwargs)
    else:
        images = fn.decoders.image(inp["jpegs"], device=decode_device, output_type=types.RGB,
                                   adjust_orientation=False, **decoder_kwargs)
    backend = CROP_BACKENDS[crop_backend]
    views = backend.fn(images, inp, size)
    return (*finish_views(views, backend.float_output, inp, recipe, decode_device, out_dtype), inp["index"])


def _plugin_graph(source: Callable, size: int, device: str, out_dtype: str, decoder_kwargs: dict,
                  recipe: _augment.Recipe, config: CropConfig, key_seed: int, boxes_store: str | None,
                  fields: tuple[str, ...], crop_op: bool):
    """The operators' pipeline: file names in, DALI reads the files, then
    :func:`dali_objcrop.plugin.object_views` (windows operator, ROI decode, crop)."""
    from nvidia.dali import fn
    inp = dict(zip(fields, fn.external_source(source=source, num_outputs=len(fields), batch=True)))
    jpegs = fn.io.file.read(inp["paths"])
    views = plugin.object_views(jpegs, inp["index"], epoch=inp["epoch"], config=config, recipe=recipe,
                                seed=key_seed, size=size, device=device, dtype=out_dtype, boxes_store=boxes_store,
                                store_row=inp.get("rows"), decoder_kwargs=decoder_kwargs, crop_op=crop_op)
    return plugin_outputs(views, inp["index"], config)


def plugin_outputs(views, index, config: CropConfig) -> tuple:
    """A pipeline's outputs from :func:`dali_objcrop.plugin.object_views`' result: ``(view1, view2, index)``,
    and with ``config.local_crops > 0`` the local views (object_views' third output) after them,
    ``(view1, view2, index, local)`` -- the order :func:`dali_objcrop.iteration.views_to_torch` reads."""
    views = tuple(views)
    want = 3 if config.local_crops else 2
    if len(views) != want:
        raise RuntimeError(f"plugin.object_views returned {len(views)} outputs for local_crops="
                           f"{config.local_crops}; expected {want} (view1, view2" + (", local)" if want == 3 else ")"))
    return (views[0], views[1], index, *views[2:])


def local_views_supported() -> tuple[bool, str]:
    """Whether the loaded operators make local (multi-crop) views: ``(ok, why not)``.

    ``fn.objcrop.windows`` must take a ``local_crops`` argument (operators built before local views
    existed do not); checked on the operator's schema, without building a pipeline."""
    if not plugin.load():
        return False, f"dali_objcrop's operators are unavailable ({(plugin.error() or 'unknown').splitlines()[0]})"
    from nvidia.dali import backend
    try:
        schema = backend.GetSchema("objcrop__Windows")
    except (KeyError, RuntimeError) as e:   # DALI: KeyError "Schema for operator ... not registered"
        return False, f"fn.objcrop.windows is not registered ({str(e).splitlines()[0]})"
    if not schema.HasArgument("local_crops"):
        return False, ("the loaded fn.objcrop.windows has no local_crops argument (operators built without local "
                       "views): rebuild them from a source tree whose windows operator makes local views")
    return True, ""


def build_plugin_pipeline(source: Callable, batch_size: int, num_threads: int, device: str, config: CropConfig,
                          boxes_store: str | None = None, size: int = 224, out_dtype: str = "float32",
                          device_id: int | None = None, seed: int = 0, prefetch_queue_depth: int = 2,
                          decoder_kwargs: dict | None = None, recipe="mocov2", crop_op: bool | None = None):
    """The operators' pipeline (built), fed per batch with :func:`plugin_fields` by ``source``.

    Args:
        config: the crop windows' parameters.
        boxes_store: the ``.boxes`` file the windows operator reads rows of (None: no boxes).
        seed: the random key's seed (the windows operator's; DALI's own seed too).
        crop_op: make the views with ``fn.objcrop.crop``; None: where it is registered for ``device``;
            False: the DALI-ops crop stage on the windows operator's outputs.
        others: as :func:`build_pipeline`.

    Returns:
        a built ``nvidia.dali.Pipeline`` with outputs ``(view1, view2, index)``, and with
        ``config.local_crops = M > 0`` ``(view1, view2, index, local)``: ``local`` (M, 3, local_size,
        local_size) per sample (:func:`plugin_outputs`).
    """
    from nvidia.dali import pipeline_def
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if out_dtype not in ("float32", "float16"):
        raise ValueError(f"out_dtype must be 'float32' or 'float16', got {out_dtype!r}")
    kwargs = dict(decoder_kwargs or {}) if device == "gpu" else {}
    if crop_op is None:
        crop_op = plugin.crop_op_usable(device, device_id if device == "gpu" else None)[0]
    elif crop_op and not plugin.crop_op_registered(device):
        raise RuntimeError(f"fn.objcrop.crop has no {device} backend in the loaded operators")
    pipe = pipeline_def(_plugin_graph, enable_conditionals=not crop_op)(
        source, size, device, out_dtype, kwargs, _augment.get_recipe(recipe), config, seed, boxes_store,
        plugin_fields(boxes_store is not None), crop_op, batch_size=batch_size, num_threads=num_threads,
        device_id=device_id if device == "gpu" else None, seed=seed, prefetch_queue_depth=prefetch_queue_depth)
    pipe.build()
    return pipe


def build_pipeline(source: Callable, batch_size: int, num_threads: int, device: str, size: int = 224,
                   crop_backend: str = "dali", out_dtype: str = "float32", device_id: int | None = None,
                   seed: int = 0, prefetch_queue_depth: int = 2, decoder_kwargs: dict | None = None,
                   roi_decode: bool = True, recipe="mocov2"):
    """The object-crop DALI pipeline (built, not yet run): the NumPy-fed DALI-ops graph.

    It makes the two global views only.  Local (multi-crop) views (``CropConfig.local_crops > 0``) are
    made by the operators' pipeline (:func:`build_plugin_pipeline`); :class:`~dali_objcrop.ObjCropLoader`
    refuses ``local_crops > 0`` with ``use_plugin=False`` (a ValueError naming the argument).

    Args:
        source: per-batch callable returning the inputs of ``input_fields(crop_backend)``
            (raise ``StopIteration`` to end an epoch).
        batch_size: maximum batch size.
        num_threads: DALI CPU threads.
        device: ``cpu`` or ``gpu`` (decode with ``mixed``: nvJPEG / hardware decoder).
        size: output side.
        crop_backend: key of :data:`CROP_BACKENDS`.
        out_dtype: ``float32`` or ``float16``.
        device_id: CUDA device (GPU only).
        seed: DALI's own seed (no DALI op here draws random numbers; kept for completeness).
        prefetch_queue_depth: batches DALI keeps in flight.
        decoder_kwargs: extra ``fn.decoders.image`` arguments, e.g. ``hw_decoder_load``,
            ``preallocate_width_hint``, ``preallocate_height_hint``,
            ``device_memory_padding``, ``host_memory_padding`` (GPU).
        roi_decode: decode only the union of the two windows (``anchor``/``shape`` inputs).
        recipe: the augmentation recipe (name or :class:`~dali_objcrop.augment.Recipe`); its
            probabilities decide which stages are in the graph (see :func:`aug_stages`).

    Returns:
        a built ``nvidia.dali.Pipeline`` with outputs ``(view1, view2, index)``.
    """
    from nvidia.dali import pipeline_def, types
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if crop_backend not in CROP_BACKENDS:
        raise ValueError(f"crop_backend must be one of {tuple(CROP_BACKENDS)}, got {crop_backend!r}")
    dt = {"float32": types.FLOAT, "float16": types.FLOAT16}.get(out_dtype)
    if dt is None:
        raise ValueError(f"out_dtype must be 'float32' or 'float16', got {out_dtype!r}")
    kwargs = dict(decoder_kwargs or {})
    if device == "cpu" and kwargs:
        kwargs = {}  # the hints only concern nvJPEG
    pipe_fn = pipeline_def(_objcrop_graph, enable_conditionals=True)
    pipe = pipe_fn(source, size, "mixed" if device == "gpu" else "cpu", crop_backend, dt, kwargs, roi_decode,
                   _augment.get_recipe(recipe),
                   batch_size=batch_size, num_threads=num_threads,
                   device_id=device_id if device == "gpu" else None, seed=seed,
                   prefetch_queue_depth=prefetch_queue_depth, **dict(CROP_BACKENDS[crop_backend].pipeline_kwargs))
    pipe.build()
    return pipe


def input_fields(crop_backend: str, roi_decode: bool = True, recipe="mocov2") -> tuple[str, ...]:
    """The fields the external source emits (DALI warns about unused outputs, and each costs a copy)."""
    return (BASE_FIELDS + (ROI_DECODE_FIELDS if roi_decode else ()) + CROP_BACKENDS[crop_backend].inputs
            + _aug_fields(_augment.get_recipe(recipe)))
