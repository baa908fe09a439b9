"""The drop-in PyTorch iterator over the loader's DALI pipelines: :class:`ObjCropLoader`.

The loader's jobs live beside it: the epoch sampler (:mod:`.sampling`), the per-batch feed (:mod:`.feed`),
the two DALI pipelines and the crop-backend registry (:mod:`.pipelines`, with the DALI-ops stages in
:mod:`.ops_graph`), what both iterators share (:mod:`.iteration`: rank, device, the hand-over to torch,
decode diagnostics).  The names below are re-exported from here for existing imports.
The iterator itself (ObjCropLoader: data and boxes resolution, the background input preparation, the
epoch loop with its bad-file recovery) is ~500 lines.
"""
from __future__ import annotations

import itertools
import os
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from . import augment as _augment
from .boxstore import BoxStore
from . import plugin
from .dataset import ImageIndex
from .index import gt_store, index_of
from .iteration import FallbackWarning, LoaderCore
from .iteration import _file_decodes, _readable_decode_error  # noqa: F401 (their home was here)
from .windows import CropConfig, CropWindows, box_scale_from_mean_area
from .feed import (AUG_FIELDS, BASE_FIELDS, CROP_FIELDS, INPUT_FIELDS, PLUGIN_FIELDS, ROI_DECODE_FIELDS,  # noqa: F401
                   _AUG_FIELDS, _Count, _Source, plugin_fields, read_encoded, window_rois)
from .pipelines import (CROP_BACKENDS, CropBackend, build_pipeline, build_plugin_pipeline,  # noqa: F401
                        input_fields, register_crop_backend)
from .sampling import shard_batches  # noqa: F401



# ---------------------------------------------------------------------------------------------
# the iterator
# ---------------------------------------------------------------------------------------------
def resolve_data(data, images_dir=None, max_images: int | None = None, allow_outside_root: bool = False
                 ) -> tuple[ImageIndex, str | None]:
    """An ImageIndex from a COCO json / folder / ImageIndex (its first ``max_images``), and the json path if
    any (:func:`dali_objcrop.index.index_of`, the one function every entry point uses)."""
    return index_of(data, images_dir, allow_outside_root, max_images=max_images)


def _stamp(path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def _file_changed(path: str, size) -> str | None:
    """None if the file's header still gives the indexed size, else how it changed (a file replaced
    after the index scan: the windows were drawn for the old size)."""
    from .dataset import scan_image
    status, wh, _ = scan_image(path)
    if wh is None or tuple(int(v) for v in wh) != tuple(int(v) for v in size):
        now = f"{wh[0]}x{wh[1]}" if wh is not None else status
        return f"changed since the loader indexed it (was {int(size[0])}x{int(size[1])}, now {now})"
    return None


class ObjCropLoader(LoaderCore):
    """Two object-aware views per image from a DALI pipeline, as torch tensors.

    Example::

        loader = ObjCropLoader("coco/annotations/instances.json", boxes="gt", mode="obj-obj-dilate")
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for batch in loader:
                q, k = batch["view1"], batch["view2"]     # (N, 3, 224, 224)
                # with local_crops=M: batch["local"]            # (N, M, 3, local_size, local_size)

    Args:
        data: COCO json path, image folder, or :class:`~dali_objcrop.ImageIndex`.  A shard set (a
            folder with ``shards.json``, :mod:`dali_objcrop.shards`) is read by
            :meth:`ObjCropLoader.from_shards` (or :func:`open_loader`, which picks by ``data``).
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
        local_crops, local_size, local_scale, local_from: local (multi-crop) views
            (:class:`~dali_objcrop.CropConfig`): ``local_crops = M > 0`` adds ``batch["local"]``, a
            (B, M, 3, local_size, local_size) tensor on the views' device and in their dtype; 0 (default):
            none, every other output unchanged.  Made by the operators' pipeline only: with the
            DALI-ops graph (``use_plugin=False``, ``crop_backend="cupy"``, ``roi_decode=False``, or
            operators unavailable) ``local_crops > 0`` raises ValueError; operators built without
            local views raise RuntimeError.

    Raises:
        ValueError: among others, an empty epoch (``drop_last`` with fewer images than
            ``world_size * batch_size``: every rank would see no batch at all).

    Images without boxes in a box mode fall back to scene crops; the constructor says so once
    (a :class:`FallbackWarning` with the counts) and ``stats`` keeps them.
    """

    @classmethod
    def from_shards(cls, data, **kwargs):
        """The loader of a shard set (a folder holding ``shards.json``): a
        :class:`~dali_objcrop.shard_loader.ShardLoader` (same iteration API and ``stats`` schema, read by
        ``fn.readers.webdataset``).  Arguments only files have (``prepare_ahead``, ``images_dir``, ...) raise."""
        from .shard_loader import ShardLoader
        return ShardLoader(data, **kwargs)

    def __init__(self, data, boxes="gt", mode: str = "obj-obj-dilate", batch_size: int = 64, size: int = 224,
                 recipe="mocov2", seed: int = 0, num_threads: int = 2, device: str = "auto", dtype=None,
                 crop_backend: str = "dali", rank: int | None = None, world_size: int | None = None,
                 shuffle: bool = True, drop_last: bool = True, on_bad_image: str = "skip",
                 dilate: float = CropConfig.dilate, shift_range: tuple[float, float] = CropConfig.shift_range,
                 box_scale: tuple[float, float] | None = None, top_k: int = CropConfig.top_k,
                 min_box_size: int = CropConfig.min_box_size, images_dir: str | os.PathLike | None = None,
                 device_id: int | None = None, prefetch_queue_depth: int = 2, decoder_kwargs: dict | None = None,
                 max_images: int | None = None, roi_decode: bool = True, prepare_ahead: int = 1,
                 use_plugin: bool | None = None, plugin_crop: bool | None = None,
                 allow_outside_root: bool = False, local_crops: int = CropConfig.local_crops,
                 local_size: int = CropConfig.local_size,
                 local_scale: tuple[float, float] = CropConfig.local_scale,
                 local_from: str = CropConfig.local_from) -> None:
        from .shard_loader import is_shard_set
        if is_shard_set(data):
            raise ValueError(f"{str(data)[:200]!r} is a shard set: read it with ObjCropLoader.from_shards(...) "
                             "(or dali_objcrop.open_loader(...), which picks the loader from data)")
        if prepare_ahead < 0:
            raise ValueError(f"prepare_ahead must be >= 0, got {prepare_ahead!r}")
        if on_bad_image not in ("skip", "raise"):
            raise ValueError(f"on_bad_image must be 'skip' or 'raise', got {on_bad_image!r}")
        self._init_core(mode=mode, batch_size=batch_size, size=size, recipe=recipe, seed=seed,
                        num_threads=num_threads, device=device, dtype=dtype, rank=rank, world_size=world_size,
                        shuffle=shuffle, drop_last=drop_last, device_id=device_id,
                        prefetch_queue_depth=prefetch_queue_depth, decoder_kwargs=decoder_kwargs)
        device = self.device
        if crop_backend not in CROP_BACKENDS:
            raise ValueError(f"crop_backend must be one of {tuple(CROP_BACKENDS)}, got {crop_backend!r}")
        if crop_backend == "cupy" and device != "gpu":
            raise ValueError("crop_backend='cupy' needs device='gpu'")
        self.crop_backend, self.on_bad_image = crop_backend, on_bad_image

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
        self.config = self._crop_config(mode, box_scale, dilate, shift_range, top_k, min_box_size, local_crops,
                                        local_size, local_scale, local_from)
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
        self.stats.update({"images": len(index), "images_without_boxes": without, "bad_images": dict(index.bad),
                           "skipped": len(index.bad), "decode_failures": {}})
        self._generation = 0   # which iterator owns the pipeline (a newer iter() supersedes the older)
        self._feed: Iterator[np.ndarray] = iter(())
        self._inflight: deque = deque()
        # batches taken from _feed whose inputs are being prepared: (positions, Future of inputs)
        self._ahead: deque[tuple[np.ndarray, Future]] = deque()
        self._prepare_ahead = prepare_ahead
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._active = False
        self._pipe = None
        self._fields = input_fields(crop_backend, roi_decode, self.recipe)
        self.roi_decode = roi_decode
        self._excluded: set[int] = set()
        self._prepare = self._src.inputs
        self.uses_plugin, why = self._want_plugin(use_plugin, crop_backend, roi_decode)
        self._check_local_views(self.uses_plugin, why)
        if self.uses_plugin:
            self._boxes_store = self._plugin_boxes_store(boxes)
            self._store_stamp = _stamp(self._boxes_store) if self._boxes_store else None
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
            why += ("; views by fn.objcrop.crop" if self._plugin_crop else
                    "; views by DALI's crop stage (" + ("plugin_crop=False" if plugin_crop is False else
                                                        why_not or f"fn.objcrop.crop is not built for {device}")
                    + ")")
        if self.uses_plugin:
            self._name_pipeline("plugin:", self._plugin_crop, why_not, device)
        else:
            self.stats["pipeline"] = "dali-ops"
        self.stats["pipeline_reason"] = why

    # ---- setup helpers -------------------------------------------------------------------
    @staticmethod
    def _want_plugin(use_plugin: bool | None, crop_backend: str, roi_decode: bool) -> tuple[bool, str]:
        """Whether the operators' pipeline runs, and why (``stats["pipeline_reason"]``)."""
        if use_plugin is False:
            return False, "use_plugin=False"
        why = None
        if crop_backend != "dali":
            why = f"crop_backend={crop_backend!r} (the operators' path uses the 'dali' crop stage)"
        elif not roi_decode:
            why = "roi_decode=False (the operators' path always decodes the windows' union)"
        if why is not None:
            if use_plugin:
                raise ValueError(f"use_plugin=True does not combine with {why}")
            return False, why
        if plugin.load():
            return True, "the C++ operators are loaded"
        if use_plugin:
            raise RuntimeError(f"use_plugin=True but the C++ operators are unavailable: {plugin.error()}")
        first = (plugin.error() or "").strip().splitlines()
        return False, f"the C++ operators are unavailable ({first[0] if first else 'unknown'})"

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
                self._check_store_unchanged()   # the windows operator reads the file now
                self._pipe = build_plugin_pipeline(self._pull, self.batch_size, self.num_threads, self.device,
                                                   self.config, self._boxes_store, self.size, out, device_id,
                                                   self.seed, self._prefetch, self._decoder_kwargs, self.recipe,
                                                   self._plugin_crop)
            else:
                self._pipe = build_pipeline(self._pull, self.batch_size, self.num_threads, self.device, self.size,
                                            self.crop_backend, out, device_id, self.seed, self._prefetch,
                                            self._decoder_kwargs, self.roi_decode, self.recipe)
        return self._pipe

    def _check_store_unchanged(self) -> None:
        """The box store file the operator is about to read is the one this loader checked (rows were
        matched to it); a replaced file is accepted only if it holds the same boxes."""
        path = self._boxes_store
        if path is None or _stamp(path) == self._store_stamp:
            return
        try:
            now = BoxStore.load(path)
            same = (list(now.keys) == list(self.store.keys) and np.array_equal(now.offsets, self.store.offsets)
                    and np.array_equal(now.boxes, self.store.boxes))
            why = "it holds other boxes now"
        except (OSError, ValueError) as e:
            same, why = False, str(e).splitlines()[0]
        if not same:
            raise RuntimeError(f"box store {path} changed since this loader opened it ({why}); restart the job "
                               f"(or build a new loader) to use the new store")
        self._store_stamp = _stamp(path)

    # ---- public API -----------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"ObjCropLoader({str(self.index.root)!r}, images={len(self.index)}, mode={self.mode!r}, "
                f"batch_size={self.batch_size}, size={self.size}, device={self.device!r}, "
                f"rank={self.rank}/{self.world_size}, pipeline={self.stats['pipeline']!r} "
                f"({self.stats['pipeline_reason']}))")

    def __len__(self) -> int:
        n = len(self.index)
        if self.drop_last:
            return n // (self.world_size * self.batch_size)
        return -(-(-(-n // self.world_size)) // self.batch_size)

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
        self._generation = gen = self._generation + 1
        self._drain()
        pipe = self._build()
        self._feed = iter(self.batches(epoch))
        self._epoch = epoch
        self._inflight.clear()
        self._ahead.clear()
        self._active = True
        try:
            while True:
                if self._generation != gen:  # one pipeline, one epoch in flight: never mix two iterators' batches
                    raise RuntimeError(f"this iterator of epoch {epoch} was superseded by a newer iter(loader) "
                                       f"(epoch {self._epoch}); an ObjCropLoader runs one iteration at a time: "
                                       f"finish or drop the older iterator, or use a second loader")
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
            if self._generation == gen:  # a superseded iterator's end leaves the newer one's state alone
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
                msg = _file_decodes(self._src.paths[i]) or _file_changed(self._src.paths[i], self._src.sizes[i])
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


def open_loader(data, **kwargs) -> LoaderCore:
    """The loader for ``data``: :meth:`ObjCropLoader.from_shards` for a shard set (a folder holding
    ``shards.json``), else :class:`ObjCropLoader` (a COCO json, an image folder, an ImageIndex); ``kwargs``
    are that loader's (both take the local-view arguments ``local_crops``, ``local_size``, ``local_scale``,
    ``local_from``)."""
    from .shard_loader import is_shard_set
    return ObjCropLoader.from_shards(data, **kwargs) if is_shard_set(data) else ObjCropLoader(data, **kwargs)
