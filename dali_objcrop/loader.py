"""The DALI pipeline and the drop-in PyTorch iterator (:class:`ObjCropLoader`).

Two pipelines.  Where dali_objcrop's C++ operators build (:mod:`dali_objcrop.plugin`,
docs/plugin.md), the loader hands DALI only file names, positions, box-store rows and the
epoch per batch (:meth:`_Source.handover`); DALI reads the files, ``fn.objcrop.windows``
draws windows, flips and augmentations (equal to ``sample_windows`` / ``sample_aug_params``),
the ROI is decoded and ``fn.objcrop.crop`` makes both views (:func:`build_plugin_pipeline`,
:func:`dali_objcrop.plugin.object_views`).  Otherwise -- and with ``use_plugin=False`` -- the
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
  ~0.06 ms (DESIGN.md), in float32 rather than float64.  The alternative
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
  the drawn samples only (DESIGN.md: colour + blur on every view cut
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

import itertools
import os
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import augment as _augment
from .boxstore import BoxStore
from . import plugin
from .dataset import ImageIndex, coco_images_dir
from .index import gt_store, open_index
from .iteration import resolve_device_dtype, resolve_rank, views_to_torch
from .ops_graph import aug_stages, dali_crop, finish_views
from .windows import MODES, CropConfig, CropWindows, box_scale_from_mean_area, sample_windows


class FallbackWarning(UserWarning):
    """Some images fall back to scene crops (no boxes); issued once per loader, with the counts."""


# Inputs the batch callback can emit (the external source emits the base fields, the crop
# backend's own fields and the per-view augmentation draws, in this order).
_AUG_FIELDS = ("colour", "brightness", "contrast", "saturation", "hue", "blur", "blur_h", "blur_v", "solarize")
BASE_FIELDS = ("jpegs", "index")
ROI_DECODE_FIELDS = ("anchor", "shape")
CROP_FIELDS = ("roi_start0", "roi_end0", "roi_start1", "roi_end1", "window", "flip")
AUG_FIELDS = tuple(f"{f}{v}" for v in (0, 1) for f in _AUG_FIELDS)
INPUT_FIELDS = BASE_FIELDS + ROI_DECODE_FIELDS + CROP_FIELDS + AUG_FIELDS


def _aug_fields(recipe: _augment.Recipe) -> tuple[str, ...]:
    out = []
    for v in (0, 1):
        st = aug_stages(recipe.views[v])
        for stage, params in (("colour", ("brightness", "contrast", "saturation", "hue")),
                              ("blur", ("blur_h", "blur_v")), ("solarize", ())):
            if st[stage] == "drawn":
                out.append(f"{stage}{v}")
            if st[stage] != "off":
                out += [f"{p}{v}" for p in params]
    return tuple(out)


def input_fields(crop_backend: str, roi_decode: bool = True, recipe="mocov2") -> tuple[str, ...]:
    """The fields the external source emits (DALI warns about unused outputs, and each costs a copy)."""
    return (BASE_FIELDS + (ROI_DECODE_FIELDS if roi_decode else ()) + CROP_BACKENDS[crop_backend].inputs
            + _aug_fields(_augment.get_recipe(recipe)))


# ---------------------------------------------------------------------------------------------
# sampler
# ---------------------------------------------------------------------------------------------
def shard_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                  shuffle: bool = True, drop_last: bool = True) -> list[np.ndarray]:
    """This rank's batches of dataset positions for one epoch.

    A global permutation from ``(seed, epoch)`` (the same on every rank) is dealt
    round-robin to the ranks, so shards are disjoint and every rank gets the same
    number of batches.

    Args:
        n: dataset size.
        batch_size: samples per batch (per rank).
        seed, epoch: the shuffle key.
        rank, world_size: this rank and the number of ranks.
        shuffle: False keeps dataset order (still dealt round-robin).
        drop_last: True: only full batches; the ``n mod (world_size *
            batch_size)`` samples left over (different ones each epoch) are
            dropped.  False: every sample is delivered; the permutation is padded
            by wrapping around to a multiple of ``world_size`` (at most
            ``world_size - 1`` repeats, as ``DistributedSampler``), and each
            rank's last batch may be partial.

    Returns:
        list of int64 arrays (the batches, in order).
    """
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    rank, world_size = resolve_rank(rank, world_size)
    if shuffle:
        order = np.random.Generator(np.random.PCG64([seed, epoch, 0x5EED])).permutation(n)
    else:
        order = np.arange(n)
    if drop_last:
        per_rank = (n // (world_size * batch_size)) * batch_size
        order = order[: per_rank * world_size]
    else:
        total = -(-n // world_size) * world_size
        order = np.concatenate([order, order[: total - n]]) if total > n else order
        per_rank = total // world_size
    mine = order[rank::world_size][:per_rank].astype(np.int64)
    return [mine[i:i + batch_size] for i in range(0, per_rank, batch_size)]


# ---------------------------------------------------------------------------------------------
# per-batch inputs (NumPy, vectorised)
# ---------------------------------------------------------------------------------------------
def window_rois(windows: np.ndarray, flip: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-view ``(roi_start, roi_end)`` for ``fn.resize`` on HWC images, (y, x) order, float32.

    A flipped view swaps its x coordinates (DALI mirrors an axis whose start > end).

    Args:
        windows: (N, 2, 4) ``[x1, y1, x2, y2)``.
        flip: (N, 2) bool.

    Returns:
        ``(start0, end0, start1, end1)``, each (N, 2) float32.
    """
    out = []
    for v in (0, 1):
        x1, y1, x2, y2 = (windows[:, v, i].astype(np.float32) for i in range(4))
        f = flip[:, v]
        out.append(np.stack([y1, np.where(f, x2, x1)], axis=1))
        out.append(np.stack([y2, np.where(f, x1, x2)], axis=1))
    return tuple(out)


def read_encoded(paths: list[str]) -> list[np.ndarray]:
    """The raw bytes of each file as a uint8 array."""
    return [np.fromfile(p, dtype=np.uint8) for p in paths]


@dataclass
class _Source:
    """What a batch needs from the dataset: paths, sizes, box rows, sampler config."""

    paths: list[str]
    sizes: np.ndarray                 # (N, 2) int32
    store: BoxStore | None
    rows: np.ndarray | None           # dataset position -> store row
    config: CropConfig
    recipe: _augment.Recipe
    seed: int

    def windows(self, index: np.ndarray, epoch: int) -> CropWindows:
        index = np.asarray(index, dtype=np.int64)
        if self.store is None:
            boxes, offsets = np.zeros((0, 4), np.float32), np.zeros(len(index) + 1, np.int64)
        else:
            boxes, offsets = self.store.gather(self.rows[index], self.config.top_k)
        return sample_windows(self.sizes[index], boxes, offsets, index, self.seed, epoch, self.config)

    def inputs(self, index: np.ndarray, epoch: int, roi_decode: bool = True,
               fields: tuple[str, ...] | None = None) -> tuple[dict[str, object], CropWindows]:
        """Everything the pipeline's external source emits for one batch (see :data:`INPUT_FIELDS`).

        With ``roi_decode`` only the union of the two windows is decoded (``anchor``
        (x, y) and ``shape`` (w, h), float32 pixels) and the crop fields are in the
        coordinates of that region.  ``fields`` (default: all) spares the blur kernels
        of views whose recipe never blurs.
        """
        cw = self.windows(index, epoch)
        win = cw.windows
        d: dict[str, object] = {
            "jpegs": read_encoded([self.paths[i] for i in index]),
            "index": np.asarray(index, dtype=np.int64),
        }
        if roi_decode:
            lo = win[:, :, :2].min(axis=1)                         # (N, 2) union top-left (x, y)
            hi = win[:, :, 2:].max(axis=1)                         # (N, 2) union bottom-right
            d["anchor"], d["shape"] = lo.astype(np.float32), (hi - lo).astype(np.float32)
            win = win - np.concatenate([lo, lo], axis=1)[:, None, :].astype(win.dtype)
        s0, e0, s1, e1 = window_rois(win, cw.flip)
        d.update({"roi_start0": s0, "roi_end0": e0, "roi_start1": s1, "roi_end1": e1,
                  "window": np.ascontiguousarray(win, dtype=np.int32), "flip": cw.flip.astype(np.uint8)})
        one = np.ones((1, 1), np.float32)
        for v in (0, 1):
            p = _augment.sample_aug_params(cw.keys, v, self.recipe.views[v])
            if fields is None or f"blur_h{v}" in fields:
                kern, ksize = _augment.gaussian_kernels(p["sigma"])
                # per-sample separable kernels for fn.filter: (1, k) along x, (k, 1) along y; 1x1 if not blurred
                p["blur_h"] = [kern[i, None, :ksize[i]] if p["blur"][i] else one for i in range(len(kern))]
                p["blur_v"] = [kern[i, :ksize[i], None] if p["blur"][i] else one for i in range(len(kern))]
            for f in _AUG_FIELDS:
                if f in p:
                    d[f"{f}{v}"] = p[f]
        return d, cw


    # ---- the operators' path (dali_objcrop.plugin): only positions and file names are handed over ----
    def path_bytes(self) -> list[np.ndarray]:
        """Every file path as utf-8 bytes (``fn.io.file.read``'s input), built once."""
        if getattr(self, "_path_bytes", None) is None:   # a mapped index makes them per access (utf8())
            self._path_bytes = (self.paths.utf8() if hasattr(self.paths, "utf8") else
                                [np.frombuffer(p.encode("utf-8"), dtype=np.uint8) for p in self.paths])
        return self._path_bytes

    def handover(self, index: np.ndarray, epoch: int, roi_decode: bool = True,
                 fields: tuple[str, ...] | None = None) -> tuple[dict[str, object], "_Count"]:
        """The per-batch hand-over of the operators' pipeline (see :data:`PLUGIN_FIELDS`): file paths
        (DALI's C++ threads read the files), positions (the random key), box-store rows, the epoch.
        No window, draw or file byte is computed here."""
        index = np.asarray(index, dtype=np.int64)
        pb = self.path_bytes()
        rows = self.rows[index] if self.rows is not None else index
        without = 0
        if self.store is not None and self.config.uses_boxes:
            without = int((self.store.offsets[rows + 1] == self.store.offsets[rows]).sum())
        d = {"paths": [pb[i] for i in index], "index": index, "rows": np.asarray(rows, dtype=np.int64),
             "epoch": np.full(len(index), epoch, dtype=np.int64)}
        return d, _Count(without)


@dataclass
class _Count:
    """What ``_pull`` reads from a hand-over: how many samples fell back to scene crops."""

    num_fallback: int


PLUGIN_FIELDS = ("paths", "index", "rows", "epoch")   # "rows" only where boxes come from a store


def plugin_fields(with_store: bool) -> tuple[str, ...]:
    """The hand-over fields the operators' pipeline reads (DALI warns about unused ones)."""
    return PLUGIN_FIELDS if with_store else tuple(f for f in PLUGIN_FIELDS if f != "rows")


# ---------------------------------------------------------------------------------------------
# the DALI graph
# ---------------------------------------------------------------------------------------------
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
    v1, v2 = plugin.object_views(jpegs, inp["index"], epoch=inp["epoch"], config=config, recipe=recipe, seed=key_seed,
                                 size=size, device=device, dtype=out_dtype, boxes_store=boxes_store,
                                 store_row=inp.get("rows"), decoder_kwargs=decoder_kwargs, crop_op=crop_op)
    return v1, v2, inp["index"]


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
        a built ``nvidia.dali.Pipeline`` with outputs ``(view1, view2, index)``.
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
    """The object-crop DALI pipeline (built, not yet run).

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


# ---------------------------------------------------------------------------------------------
# the iterator
# ---------------------------------------------------------------------------------------------
def resolve_data(data, images_dir=None, max_images: int | None = None, allow_outside_root: bool = False
                 ) -> tuple[ImageIndex, str | None]:
    """An ImageIndex from a COCO json / folder / ImageIndex (its first ``max_images``), and the json path if any."""
    index, coco = _index_of(data, images_dir, allow_outside_root)
    if max_images:
        index = ImageIndex(root=index.root, keys=list(index.keys[:max_images]), sizes=index.sizes[:max_images],
                           bad=index.bad)
    return index, coco


def _index_of(data, images_dir, allow_outside_root: bool = False) -> tuple[ImageIndex, str | None]:
    if isinstance(data, ImageIndex):
        return data, None
    p = Path(data)
    if p.is_dir():
        return open_index(p), None
    if p.suffix.lower() == ".json" and p.is_file():
        # built once, then memory-mapped (dali_objcrop.index); images/ beside the JSON or beside its folder
        return open_index(p, coco_images_dir(p, images_dir), allow_outside_root=allow_outside_root), str(p)
    raise ValueError(f"data must be a COCO json, an image folder or an ImageIndex, got {str(data)[:200]!r}")


# nvImageCodec status codes (nvimgcodec.h) that DALI reports as "nvImageCodec failure: '#N'"
_NVIMGCODEC_STATUS = {1: "decoder not initialised", 2: "invalid parameter", 3: "corrupt or truncated image data",
                      4: "unsupported image format or content", 5: "memory allocation failed",
                      6: "decoding failed", 7: "unsupported GPU architecture", 8: "internal decoder error",
                      9: "no decoder implementation for this image", 10: "a decoder dependency is missing"}


def _readable_decode_error(msg: str) -> str:
    """Turn "nvImageCodec failure: '#3'" into a reason a user can act on (the code is kept)."""
    import re
    m = re.search(r"nvImageCodec failure: '?#(\d+)'?", msg)
    if m and int(m.group(1)) in _NVIMGCODEC_STATUS:
        return f"{_NVIMGCODEC_STATUS[int(m.group(1))]} (nvImageCodec status {m.group(1)})"
    return msg


def _file_decodes(path: str) -> str | None:
    """None if DALI's CPU decoder accepts the file, else its error (first line, made readable)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def one():
        enc = fn.external_source(source=lambda: [np.fromfile(path, dtype=np.uint8)], batch=True)
        return fn.decoders.image(enc, device="cpu", output_type=types.RGB, adjust_orientation=False)

    try:
        p = one()
        p.build()
        p.run()
        return None
    except StopIteration:
        return None
    except Exception as e:  # DALI raises RuntimeError; keep the line after "encountered:"
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        after = [ln for a, ln in zip(lines, lines[1:]) if a.startswith("encountered")]
        return _readable_decode_error((after or lines or [type(e).__name__])[0])


class ObjCropLoader:
    """Two object-aware views per image from a DALI pipeline, as torch tensors.

    Example::

        loader = ObjCropLoader("coco/annotations/instances.json", boxes="gt", mode="obj-obj-dilate")
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for batch in loader:
                q, k = batch["view1"], batch["view2"]     # (N, 3, 224, 224)

    Args:
        data: COCO json path, image folder, or :class:`~dali_objcrop.ImageIndex`; a shard set
            (a folder with ``shards.json``, see :mod:`dali_objcrop.shards`) gives a
            :class:`~dali_objcrop.shard_loader.ShardLoader` instead (same iteration API).
        boxes: :class:`~dali_objcrop.BoxStore`, path of a ``.boxes`` store,
            ``"gt"`` (the ground-truth boxes of the COCO json) or None (only
            ``scene-scene``).
        mode: crop mode, one of :data:`~dali_objcrop.MODES`.
        batch_size: per-rank batch size.
        size: output side in pixels.
        recipe: ``mocov2``, ``byol`` or an :class:`~dali_objcrop.augment.Recipe`.
        seed: the random key of everything (with the epoch and the sample index).
        num_threads: DALI CPU threads.
        device: ``cpu``, ``gpu`` or ``auto`` (GPU when torch sees CUDA).
        dtype: torch.float32, torch.float16 or torch.bfloat16.
        crop_backend: key of :data:`CROP_BACKENDS` (``dali``; ``cupy`` on GPU).
        rank, world_size: default from torch.distributed, else torchrun's env, else 0/1.
        shuffle: global reshuffle per epoch.
        drop_last: see :func:`shard_batches`.
        on_bad_image: ``skip`` (leave unreadable files out, listed in
            ``stats["bad_images"]``) or ``raise`` (ValueError naming them).
        dilate, shift_range, box_scale, top_k, min_box_size: crop-window
            parameters (:class:`~dali_objcrop.CropConfig`); ``box_scale=None``
            derives it from the store's mean proposal area.
        images_dir: image folder of a COCO json (default: ``images`` beside it or beside its folder).
        device_id: CUDA device (default: ``torch.cuda.current_device()``).
        prefetch_queue_depth: DALI batches in flight.
        prepare_ahead: batches whose inputs (file bytes, windows, augmentation draws) a background
            thread prepares before DALI asks for them (0: in DALI's calling thread, i.e. the training
            loop's).  On an H200 the main-thread preparation of a 128-image batch was ~18% of a
            ResNet-50 step (``benchmarks/pretrain_speed.py``); the thread overlaps it with the step.
        decoder_kwargs: extra nvJPEG arguments (``hw_decoder_load``, preallocation hints).
        max_images: use only the first N images of ``data`` (quick runs, demos).
        roi_decode: decode only the union of the two crop windows of each image
            (saves decode time; pixels just outside a window then come from edge
            clamping instead of the image, a sub-pixel difference at the border).
        use_plugin: build the pipeline on dali_objcrop's DALI operators (:mod:`dali_objcrop.plugin`:
            DALI reads the files, ``fn.objcrop.windows`` decides windows and draws in C++; per batch
            only positions and file names are handed over).  None (default): where the operators
            build and the configuration allows it (``crop_backend="dali"``, ``roi_decode``), else
            the DALI-ops graph fed by the NumPy callback (``plugin.load`` says once why);
            True: require them; False: the DALI-ops graph.  ``uses_plugin`` tells which runs.
        plugin_crop: on the operators' path, make the views with the fused ``fn.objcrop.crop``
            (None: where it is built for the device; False: DALI's resize / color_twist / filter /
            crop_mirror_normalize fed by ``fn.objcrop.windows``).  ``stats["pipeline"]`` says which.
        allow_outside_root: accept COCO ``file_name`` entries that are absolute or climb out of
            the image folder (refused by default: data should not choose which files are read).

    Raises:
        ValueError: among others, an empty epoch (``drop_last`` with fewer images than
            ``world_size * batch_size``: every rank would see no batch at all).

    Images without boxes in a box mode fall back to scene crops; the constructor says so once
    (a :class:`FallbackWarning` with the counts) and ``stats`` keeps them.
    """

    def __new__(cls, data=None, *args, **kwargs):
        # a shard set (a folder with shards.json) is read by fn.readers.webdataset: see shard_loader
        if cls is ObjCropLoader and data is not None:
            from .shard_loader import ShardLoader, is_shard_set
            if is_shard_set(data):
                return ShardLoader(data, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, data, boxes="gt", mode: str = "obj-obj-dilate", batch_size: int = 64, size: int = 224,
                 recipe="mocov2", seed: int = 0, num_threads: int = 2, device: str = "auto", dtype=None,
                 crop_backend: str = "dali", rank: int | None = None, world_size: int | None = None,
                 shuffle: bool = True, drop_last: bool = True, on_bad_image: str = "skip",
                 dilate: float = 0.1, shift_range: tuple[float, float] = (80, 120),
                 box_scale: tuple[float, float] | None = None, top_k: int = 10, min_box_size: int = 224,
                 images_dir: str | os.PathLike | None = None, device_id: int | None = None,
                 prefetch_queue_depth: int = 2, decoder_kwargs: dict | None = None,
                 max_images: int | None = None, roi_decode: bool = True, prepare_ahead: int = 1,
                 use_plugin: bool | None = None, plugin_crop: bool | None = None,
                 allow_outside_root: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size!r}")
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed!r}")
        if prepare_ahead < 0:
            raise ValueError(f"prepare_ahead must be >= 0, got {prepare_ahead!r}")
        if on_bad_image not in ("skip", "raise"):
            raise ValueError(f"on_bad_image must be 'skip' or 'raise', got {on_bad_image!r}")
        device, dtype = resolve_device_dtype(device, dtype)
        if crop_backend not in CROP_BACKENDS:
            raise ValueError(f"crop_backend must be one of {tuple(CROP_BACKENDS)}, got {crop_backend!r}")
        if crop_backend == "cupy" and device != "gpu":
            raise ValueError("crop_backend='cupy' needs device='gpu'")
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.mode, self.batch_size, self.size, self.device = mode, batch_size, size, device
        self.dtype, self.crop_backend, self.num_threads = dtype, crop_backend, num_threads
        self.shuffle, self.drop_last, self.on_bad_image, self.seed = shuffle, drop_last, on_bad_image, seed
        self.recipe = _augment.get_recipe(recipe)

        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be >= 1 or None, got {max_images!r}")
        index, coco_json = resolve_data(data, images_dir, max_images, allow_outside_root)
        if index.bad and on_bad_image == "raise":
            names = ", ".join(f"{k} ({v})" for k, v in list(index.bad.items())[:10])
            raise ValueError(f"{len(index.bad)} unusable image files under {index.root}: {names}")
        if len(index) == 0:
            raise ValueError(f"no usable images in {str(data)[:200]!r} ({len(index.bad)} unusable files)")
        self.index = index

        store, rows = self._resolve_boxes(boxes, coco_json, index, mode)
        if box_scale is None and store is not None and store.num_boxes:
            box_scale = box_scale_from_mean_area(store.mean_area_fraction(top_k))
        self.config = CropConfig(mode=mode, box_scale=box_scale, dilate=dilate,
                                 shift_range=tuple(float(s) for s in shift_range), top_k=top_k,
                                 min_box_size=min_box_size)
        self.store, self.store_rows = store, rows   # the box store and each dataset image's row in it
        self._src = _Source(paths=index.paths, sizes=np.asarray(index.sizes, dtype=np.int64), store=store,
                            rows=rows, config=self.config, recipe=self.recipe, seed=seed)
        without = 0 if rows is None else int((store.offsets[rows + 1] == store.offsets[rows]).sum())
        if drop_last and len(index) < self.world_size * batch_size:
            raise ValueError(f"every epoch would be empty: {len(index)} images < {self.world_size} ranks x batch "
                             f"size {batch_size} with drop_last=True; lower batch_size or pass drop_last=False")
        if without and mode != "scene-scene":
            emptied = int(store.meta.get("images_emptied_by_validation", 0))
            why = (f"; {emptied} of them had boxes that the store's validation dropped (non-finite or "
                   f"degenerate), e.g. {', '.join(store.meta.get('images_emptied_examples', [])[:3])}"
                   if emptied else "")
            warnings.warn(f"{without} of {len(index)} images have no boxes in the box store "
                          f"({store.meta.get('method')!r}): they get scene crops instead of {mode!r} crops{why} "
                          f"(counted in stats['fallback'])", FallbackWarning, stacklevel=2)
        self.stats: dict = {"images": len(index), "images_without_boxes": without,
                            "bad_images": dict(index.bad), "skipped": len(index.bad),
                            "decode_failures": {}, "samples": 0, "fallback": 0, "epochs": 0}
        self._next_epoch = 0
        self._feed: Iterator[np.ndarray] = iter(())
        self._inflight: deque = deque()
        # batches taken from _feed whose inputs are being prepared: (positions, Future of inputs)
        self._ahead: deque[tuple[np.ndarray, Future]] = deque()
        self._prepare_ahead = prepare_ahead
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._active = False
        self._pipe = None
        self._device_id = device_id
        self._prefetch = prefetch_queue_depth
        self._decoder_kwargs = decoder_kwargs
        self._fields = input_fields(crop_backend, roi_decode, self.recipe)
        self.roi_decode = roi_decode
        self._excluded: set[int] = set()
        self._prepare = self._src.inputs
        self.uses_plugin = self._want_plugin(use_plugin, crop_backend, roi_decode)
        if self.uses_plugin:
            self._boxes_store = self._plugin_boxes_store(boxes)
            self._prepare, self._fields = self._src.handover, plugin_fields(self._boxes_store is not None)
        self._plugin_crop = None
        why_not = ""
        if self.uses_plugin:
            if plugin_crop is None:   # on a GPU: only after its first-use self-test passed on this device
                self._plugin_crop, why_not = plugin.crop_op_usable(device, device_id)
            else:
                self._plugin_crop = bool(plugin_crop)
            if self._plugin_crop and not plugin.crop_op_registered(device):
                raise RuntimeError(f"plugin_crop=True but fn.objcrop.crop has no {device} backend")
        self.stats["pipeline"] = (("plugin:crop-op" if self._plugin_crop else "plugin:dali-ops-crop")
                                  if self.uses_plugin else "dali-ops")
        if why_not and plugin.crop_op_registered(device):    # built, but refused by the self-test: say so
            self.stats["pipeline"] += f" ({why_not})"

    # ---- setup helpers -------------------------------------------------------------------
    @staticmethod
    def _want_plugin(use_plugin: bool | None, crop_backend: str, roi_decode: bool) -> bool:
        if use_plugin is False:
            return False
        why = None
        if crop_backend != "dali":
            why = f"crop_backend={crop_backend!r} (the operators' path uses the 'dali' crop stage)"
        elif not roi_decode:
            why = "roi_decode=False (the operators' path always decodes the windows' union)"
        if why is not None:
            if use_plugin:
                raise ValueError(f"use_plugin=True does not combine with {why}")
            return False
        if plugin.load():
            return True
        if use_plugin:
            raise RuntimeError(f"use_plugin=True but the C++ operators are unavailable: {plugin.error()}")
        return False

    def _plugin_boxes_store(self, boxes) -> str | None:
        """The ``.boxes`` file the windows operator reads rows of (an in-memory store, e.g.
        ``boxes="gt"``, is written once to a temporary file owned by this loader); None without boxes."""
        if self.store is None or not self.config.uses_boxes:
            return None
        if isinstance(boxes, (str, os.PathLike)) and not (isinstance(boxes, str) and boxes == "gt"):
            return os.fspath(Path(boxes).resolve())
        import shutil
        import tempfile
        import weakref
        tmp = tempfile.mkdtemp(prefix="dali_objcrop_store_")
        weakref.finalize(self, shutil.rmtree, tmp, True)
        return str(self.store.save(Path(tmp) / "boxes.boxes"))

    @staticmethod
    def _resolve_boxes(boxes, coco_json, index: ImageIndex, mode: str):
        if boxes is None:
            if mode != "scene-scene":
                raise ValueError(f"mode {mode!r} needs boxes (a BoxStore, a .boxes path or 'gt'), got None")
            return None, None
        if isinstance(boxes, str) and boxes == "gt":
            if coco_json is None:
                raise ValueError("boxes='gt' needs data to be a COCO json path")
            store = gt_store(coco_json, index)   # mapped from the pass that built the index
        elif isinstance(boxes, BoxStore):
            store = boxes
        elif isinstance(boxes, (str, os.PathLike)):
            store = BoxStore.load(boxes)
        else:
            raise ValueError(f"boxes must be a BoxStore, a path, 'gt' or None, got {boxes!r}")
        return store, store.rows_for(index.keys, index.sizes)

    def _build(self):
        """The pipeline, built on first use (and again after a DALI failure)."""
        import torch
        if self._pipe is None:
            device_id = self._device_id
            if self.device == "gpu" and device_id is None:
                device_id = torch.cuda.current_device()
            self._device_id = device_id
            # DALI writes float16 itself only on the GPU (its CPU half conversion is slow); bfloat16,
            # which DALI lacks, is converted from float32 by torch on the loader's device
            out = "float16" if (self.device == "gpu" and self.dtype == torch.float16) else "float32"
            self._out_dtype = out
            if self.uses_plugin:
                self._pipe = build_plugin_pipeline(self._pull, self.batch_size, self.num_threads, self.device,
                                                   self.config, self._boxes_store, self.size, out, device_id,
                                                   self.seed, self._prefetch, self._decoder_kwargs, self.recipe,
                                                   self._plugin_crop)
            else:
                self._pipe = build_pipeline(self._pull, self.batch_size, self.num_threads, self.device, self.size,
                                            self.crop_backend, out, device_id, self.seed, self._prefetch,
                                            self._decoder_kwargs, self.roi_decode, self.recipe)
        return self._pipe

    # ---- public API -----------------------------------------------------------------------
    def __len__(self) -> int:
        n = len(self.index)
        if self.drop_last:
            return n // (self.world_size * self.batch_size)
        return -(-(-(-n // self.world_size)) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (without a call, each iteration uses the previous + 1)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch!r}")
        self._next_epoch = int(epoch)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will use."""
        return self._next_epoch

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of dataset positions for ``epoch``."""
        return shard_batches(len(self.index), self.batch_size, self.seed, epoch, self.rank, self.world_size,
                             self.shuffle, self.drop_last)

    def windows_for(self, index, epoch: int) -> CropWindows:
        """The :class:`~dali_objcrop.CropWindows` the loader uses for dataset positions ``index`` at ``epoch``."""
        return self._src.windows(np.atleast_1d(np.asarray(index, dtype=np.int64)), epoch)

    def inputs_for(self, index, epoch: int) -> dict:
        """The per-batch inputs (windows, ROIs, augmentation draws) fed to DALI (for tests and tools)."""
        return self._src.inputs(np.atleast_1d(np.asarray(index, dtype=np.int64)), epoch, self.roi_decode)[0]

    def key_of(self, position: int) -> str:
        """The image key (path relative to the image root) of a dataset position."""
        return self.index.keys[int(position)]

    def __iter__(self) -> Iterator[dict]:
        epoch = self._next_epoch
        self._next_epoch = epoch + 1
        self._drain()
        pipe = self._build()
        self._feed = iter(self.batches(epoch))
        self._epoch = epoch
        self._inflight.clear()
        self._ahead.clear()
        self._active = True
        try:
            while True:
                try:
                    outs = pipe.run()
                except StopIteration:
                    break
                except Exception as e:  # a DALI failure: name the files, never hang
                    pipe = self._recover(e)
                    continue
                batch = self._to_torch(outs)
                self._inflight.popleft()
                self.stats["samples"] += len(batch["index"])
                yield batch
            self.stats["epochs"] += 1
        finally:
            self._active = not self._finished()

    # ---- internals --------------------------------------------------------------------------
    def _pull(self):
        """External-source callback: the next batch of this epoch (``StopIteration`` at its end)."""
        if self._prepare_ahead == 0:
            idx = self._substitute(next(self._feed))
            self._inflight.append(idx)  # before reading, so a missing file is found by _recover
            d, cw = self._prepare(idx, self._epoch, self.roi_decode, self._fields)
        else:
            self._top_up()
            if not self._ahead:
                raise StopIteration
            idx, fut = self._ahead.popleft()
            self._inflight.append(idx)
            self._top_up()  # the next batch is prepared while DALI and the training step run
            d, cw = fut.result()  # re-raises a read error here, with idx in flight for _recover
        self.stats["fallback"] += cw.num_fallback
        return tuple(d[f] for f in self._fields)

    def _top_up(self) -> None:
        """Keep ``prepare_ahead`` batches of this epoch in preparation on the background thread.

        The inputs are a pure function of (positions, epoch), so the thread changes no result."""
        if self._pool is None or self._pool_pid != os.getpid():  # a forked child has no worker thread
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="objcrop-inputs")
            self._pool_pid = os.getpid()
        while len(self._ahead) < self._prepare_ahead:
            try:
                idx = self._substitute(next(self._feed))
            except StopIteration:
                return
            self._ahead.append((idx, self._pool.submit(self._prepare, idx, self._epoch, self.roi_decode,
                                                       self._fields)))

    def _unprepare(self) -> list[np.ndarray]:
        """Drop the batches in preparation; returns their positions (to be fed again, or not at all)."""
        pending = [idx for idx, _ in self._ahead]
        for _, fut in self._ahead:
            fut.cancel()
        self._ahead.clear()
        return pending

    def _substitute(self, idx: np.ndarray) -> np.ndarray:
        """Replace positions found undecodable (``skip``) by the next usable position, keeping batch sizes."""
        if not self._excluded:
            return idx
        out = idx.copy()
        n = len(self.index)
        for j, i in enumerate(idx):
            k = int(i)
            for _ in range(n):
                if k not in self._excluded:
                    break
                k = (k + 1) % n
            else:
                raise RuntimeError(f"no decodable image left in {self.index.root}")
            out[j] = k
        return out

    def _finished(self) -> bool:
        return self._pipe is None or self._pipe.empty()

    def _drain(self) -> None:
        """Finish an epoch abandoned mid-way: stop feeding, consume what is in flight, reset."""
        if self._pipe is None:
            return
        if self._active:
            self._feed = iter(())
            self._unprepare()
            try:
                while True:
                    self._pipe.run()
            except StopIteration:
                pass
            except Exception:  # a failing abandoned batch: start afresh
                self._pipe = None
                self._active = False
                return
        self._pipe.reset()
        self._active = False

    def _recover(self, err: Exception):
        """After a DALI failure: find the undecodable files of the batches in flight; raise naming them
        (``raise``), or leave them out from now on and resume the epoch on a new pipeline (``skip``)."""
        self._pipe = None  # DALI: "Current pipeline object is no longer valid"
        pending = [self._substitute(idx) for idx in self._inflight]
        self._inflight.clear()
        ahead = self._unprepare()  # not yet fed to DALI: fed again after the batches in flight
        culprits = {}
        for idx in pending:
            for i in np.unique(idx):
                msg = _file_decodes(self._src.paths[i])
                if msg is not None:
                    culprits[int(i)] = msg
        named = {self.index.keys[i]: m for i, m in culprits.items()}
        self.stats["decode_failures"].update(named)
        if not culprits:
            self._active = False
            raise RuntimeError(f"DALI failed on a batch and every file of the batches in flight decodes alone "
                               f"({', '.join(self.index.keys[i] for idx in pending for i in idx[:3])}, ...): "
                               f"{err}") from err
        names = "; ".join(f"{k}: {v}" for k, v in list(named.items())[:10])
        if self.on_bad_image == "raise":
            self._active = False
            raise RuntimeError(f"DALI cannot decode {len(named)} file(s) under {self.index.root}: {names}") from err
        self._excluded.update(culprits)
        self.stats["skipped"] += len(culprits)
        self._feed = itertools.chain(pending, ahead, self._feed)
        return self._build()

    def _to_torch(self, outs) -> dict:
        return views_to_torch(outs, self.device, self._device_id, self._out_dtype, self.dtype)
