"""The loader over WebDataset shards (:mod:`dali_objcrop.shards`), on the plugin's operators.

``ObjCropLoader.from_shards("path/to/shards")`` (a folder with ``shards.json``; ``open_loader`` picks it
from the data) builds this loader::

    fn.readers.webdataset   (C++ threads read the tars; this rank's slice of the epoch's shard order,
        |                    a shuffle buffer seeded by (seed, epoch))
        |  jpg, boxes.f32 -> (K, 4), pos.i64
        v
    plugin.object_views(jpg, pos, boxes)   fn.objcrop.windows keyed by (seed, epoch, position),
                                           ROI decode, fn.objcrop.crop (or the DALI-ops stage)

Per epoch (everything keyed by ``(seed, epoch)``, the same on every rank):

* the sound shards are permuted (``shuffle``) and given to DALI's reader in that order on every
  rank; the reader's ``shard_id=rank, num_shards=world_size`` gives each rank a disjoint,
  contiguous slice of that sample sequence (so global rank decides the data), and its
  shuffle buffer (``shuffle_buffer`` samples, seeded by (seed, epoch)) mixes the slice;
* every rank delivers ``len(loader) = samples // (world_size * batch_size)`` batches (the
  ranks' slices differ by at most one sample; the rest of an epoch is dropped, as
  ``drop_last``), then the pipeline is dropped, so nothing is prefetched across epochs and
  :meth:`set_epoch` always takes effect.

A sample's windows depend only on (seed, epoch, position): the same image gives the same
windows and pixels from shards as from files, and :meth:`ShardLoader.windows_for` recomputes
them from the shard's own boxes.  Damaged shards (truncated, a component missing) are found
from the index files before the first epoch, named in ``stats["damaged_shards"]`` and left out
(``on_bad_shard="skip"``) or refused (``"raise"``).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from .iteration import FallbackWarning, LoaderCore, _file_decodes, _readable_decode_error
from .rng import SALT_SHARD_ORDER, SALT_SHARD_READER, epoch_generator
from .shards import BOXES, IMAGE_EXTS, MANIFEST, POS, ShardError, ShardSet, check_shard, read_index, sound_shards
from .windows import CropConfig, CropWindows, box_scale_from_mean_area, sample_windows


def is_shard_set(data) -> bool:
    """Whether ``data`` names a shard set (a folder holding ``shards.json``, or that file)."""
    if not isinstance(data, (str, os.PathLike)):
        return False
    p = Path(data)
    return (p.is_dir() and (p / MANIFEST).is_file()) or (p.name == MANIFEST and p.is_file())


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(epoch_generator(seed, epoch, SALT_SHARD_READER).integers(0, 2**31 - 1))


class ShardLoader(LoaderCore):
    """Two object-aware views per sample of a shard set, as torch tensors (see the module doc).

    Arguments as :class:`~dali_objcrop.ObjCropLoader` where they apply (the others -- ``prepare_ahead``,
    ``on_bad_image``, ``images_dir``, ``max_images``, ``allow_outside_root`` -- are refused); in addition:

    Args:
        shuffle_buffer: samples in DALI's shuffle buffer (``initial_fill``).
        on_bad_shard: ``skip`` (leave damaged shards out, named in ``stats``) or ``raise``.
        boxes: the shards carry their boxes; only None, ``"gt"`` or ``"shards"`` are accepted.
        check_content: before the first epoch, read every sample's small members through the index
            (tar headers against the index, positions, box values; see :func:`~dali_objcrop.shards.check_shard`);
            False checks the index files only (trusted storage, very many shards).
        local_crops, local_size, local_scale, local_from: local (multi-crop) views, as
            :class:`~dali_objcrop.ObjCropLoader`'s: ``batch["local"]`` (B, M, 3, local_size, local_size)
            when ``local_crops = M > 0`` (operators built without local views raise RuntimeError).

    ``stats["fallback"]`` counts the delivered samples that had no boxes (scene crops instead of
    ``mode``'s), announced once with a :class:`~dali_objcrop.FallbackWarning`.
    """

    def __init__(self, data, boxes="shards", mode: str = "obj-obj-dilate", batch_size: int = 64,
                 size: int = 224, recipe="mocov2", seed: int = 0, num_threads: int = 2, device: str = "auto",
                 dtype=None, rank: int | None = None, world_size: int | None = None, shuffle: bool = True,
                 drop_last: bool = True, dilate: float = CropConfig.dilate,
                 shift_range: tuple[float, float] = CropConfig.shift_range, box_scale: tuple[float, float] | None = None,
                 top_k: int = CropConfig.top_k, min_box_size: int = CropConfig.min_box_size,
                 device_id: int | None = None, prefetch_queue_depth: int = 2, decoder_kwargs: dict | None = None,
                 plugin_crop: bool | None = None, shuffle_buffer: int = 1024, on_bad_shard: str = "skip",
                 use_plugin: bool | None = None, crop_backend: str = "dali", roi_decode: bool = True,
                 check_content: bool = True, local_crops: int = CropConfig.local_crops,
                 local_size: int = CropConfig.local_size, local_scale: tuple[float, float] = CropConfig.local_scale,
                 local_from: str = CropConfig.local_from) -> None:
        import torch
        from . import plugin
        if not (boxes is None or (isinstance(boxes, str) and boxes in ("gt", "shards"))):
            raise ValueError("a shard set carries its own boxes: pass boxes=None or 'shards', not a store")
        if use_plugin is False or crop_backend != "dali" or not roi_decode:
            raise ValueError("shard sets are read with the plugin's operators (use_plugin, crop_backend='dali', "
                             "roi_decode=True)")
        if not drop_last:
            raise ValueError("a shard set loader delivers equal full batches per rank (drop_last=True)")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer!r}")
        if on_bad_shard not in ("skip", "raise"):
            raise ValueError(f"on_bad_shard must be 'skip' or 'raise', got {on_bad_shard!r}")
        self._init_core(mode=mode, batch_size=batch_size, size=size, recipe=recipe, seed=seed,
                        num_threads=num_threads, device=device, dtype=dtype, rank=rank, world_size=world_size,
                        shuffle=shuffle, drop_last=drop_last, device_id=device_id,
                        prefetch_queue_depth=prefetch_queue_depth, decoder_kwargs=decoder_kwargs)
        device = self.device
        if not plugin.load():
            raise RuntimeError(f"reading shard sets needs dali_objcrop's DALI operators: {plugin.error()}")
        self.shards = ShardSet.open(data)
        self.usable, damaged = sound_shards(self.shards, on_bad_shard, content=check_content)
        if not self.usable:
            raise ValueError(f"no usable shard in {self.shards.root}: {damaged}")
        self.num_samples = sum(s["count"] for s in self.usable)
        self._check_content = check_content
        # what was checked: (size, mtime) of each usable tar and index, so a file replaced later is seen
        self._stamps = {s["name"]: self._stamp(s) for s in self.usable}
        # boxes per position (from the indexes: what DALI's reader will hand over), for the fallback count
        self._nboxes = np.zeros(self.shards.num_samples, np.int64)
        for s in self.usable:
            for r, comps in enumerate(read_index(self.shards.tar(s).with_suffix(".idx"))):
                self._nboxes[s["first"] + r] = comps[BOXES][1] // 16
        self.shuffle_buffer = shuffle_buffer
        st = self.shards.manifest.get("store") or {}
        areas = st.get("mean_area_by_top_k") or {}
        if box_scale is None and areas:
            box_scale = box_scale_from_mean_area(areas.get(str(top_k), areas["all"]))
        if mode != "scene-scene" and not areas:
            raise ValueError(f"mode {mode!r} needs boxes, and the shards in {self.shards.root} carry none")
        self.config = self._crop_config(mode, box_scale, dilate, shift_range, top_k, min_box_size, local_crops,
                                        local_size, local_scale, local_from)
        self._check_local_views(True, "")
        if device == "gpu" and device_id is None:
            self._device_id = torch.cuda.current_device()
        why_not = ""
        if plugin_crop is None:       # on a GPU: only after its first-use self-test passed on this device
            self._plugin_crop, why_not = plugin.crop_op_usable(device, self._device_id)
        else:
            self._plugin_crop = bool(plugin_crop)
        self.uses_plugin = True
        without = int(sum((self._nboxes[s["first"]:s["first"] + s["count"]] == 0).sum() for s in self.usable))
        self._counts_fallback = mode != "scene-scene"
        if without and self._counts_fallback:
            warnings.warn(f"{without} of {self.num_samples} samples in the usable shards of {self.shards.root} have "
                          f"no boxes: they get scene crops instead of {mode!r} crops (counted in stats['fallback'])",
                          FallbackWarning, stacklevel=3)
        self.stats.update({"samples_without_boxes": without, "shards": len(self.shards.shards),
                           "damaged_shards": damaged, "samples_in_usable_shards": self.num_samples})
        self._name_pipeline("plugin:webdataset:", self._plugin_crop, why_not, device)

    # ---- public API ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_samples // (self.world_size * self.batch_size)

    def shard_order(self, epoch: int) -> list[dict]:
        """The epoch's order of the usable shards (the same on every rank)."""
        if not self.shuffle:
            return list(self.usable)
        perm = epoch_generator(self.seed, epoch, SALT_SHARD_ORDER).permutation(len(self.usable))
        return [self.usable[i] for i in perm]

    def rank_positions(self, epoch: int) -> np.ndarray:
        """The positions this rank reads in ``epoch`` (before the shuffle buffer and the batch cut), as
        DALI's reader slices the epoch's sample sequence: ``[N * r // W, N * (r + 1) // W)``."""
        seq = np.concatenate([np.arange(s["first"], s["first"] + s["count"]) for s in self.shard_order(epoch)])
        n, r, w = len(seq), self.rank, self.world_size
        return seq[n * r // w: n * (r + 1) // w]

    def windows_for(self, index, epoch: int) -> CropWindows:
        """The windows the loader uses for dataset positions ``index`` at ``epoch`` (from the shards' boxes)."""
        index = np.atleast_1d(np.asarray(index, dtype=np.int64))
        smp = [self.shards.read_sample(int(i)) for i in index]
        sizes = np.array([[s["width"], s["height"]] for s in smp], np.int64).reshape(-1, 2)
        boxes = [s["boxes"] for s in smp]
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in boxes])]).astype(np.int64)
        flat = np.concatenate(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32)
        return sample_windows(sizes, flat.reshape(-1, 4), offsets, index, self.seed, epoch, self.config)

    def key_of(self, position: int) -> str:
        return self.shards.read_sample(int(position))["key"]

    def __iter__(self) -> Iterator[dict]:
        epoch = self._next_epoch
        self._next_epoch = epoch + 1
        self._recheck_changed()
        pipe = self._build(epoch)
        try:
            for b in range(len(self)):
                try:
                    outs = pipe.run()
                except Exception as e:  # name what was being read
                    raise RuntimeError(self._explain_failure(epoch, b, e)) from e
                batch = self._to_torch(outs)
                pos = batch["index"].numpy() if batch["index"].device.type == "cpu" else batch["index"].cpu().numpy()
                if len(pos) and (pos.min() < 0 or pos.max() >= len(self._nboxes)):  # checked shards never do this
                    raise ShardError(f"a shard of {self.shards.root} changed while epoch {epoch} read it: "
                                     f"position {int(pos.max() if pos.max() >= len(self._nboxes) else pos.min())} "
                                     f"in a set of {len(self._nboxes)} samples; run dali-objcrop pack --verify")
                if self._counts_fallback:
                    self.stats["fallback"] += int((self._nboxes[pos] == 0).sum())
                self.stats["samples"] += len(batch["index"])
                yield batch
            self.stats["epochs"] += 1
        finally:
            del pipe   # an epoch's pipeline is never reused: nothing crosses epochs

    # ---- internals ------------------------------------------------------------------------------
    def _stamp(self, s: dict) -> tuple:
        tar = self.shards.tar(s)
        a, b = tar.stat(), tar.with_suffix(".idx").stat()
        return a.st_size, a.st_mtime_ns, a.st_ino, b.st_size, b.st_mtime_ns, b.st_ino

    def _recheck_changed(self) -> None:
        """Before an epoch: a usable shard whose tar or index changed since it was checked is checked
        again; one that is no longer sound (or no longer holds the same samples) is refused by name."""
        bad = {}
        for s in self.usable:
            try:
                stamp = self._stamp(s)
            except OSError as e:
                bad[s["name"]] = f"gone ({e.strerror})"
                continue
            if stamp == self._stamps[s["name"]]:
                continue
            why = check_shard(self.shards.tar(s), expect=(s["first"], s["count"]), content=self._check_content)
            if why is None:
                counts = [c[BOXES][1] // 16 for c in read_index(self.shards.tar(s).with_suffix(".idx"))]
                if not np.array_equal(counts, self._nboxes[s["first"]:s["first"] + s["count"]]):
                    why = "its boxes changed"
            if why:
                bad[s["name"]] = why
            else:
                self._stamps[s["name"]] = stamp
        if bad:
            raise ShardError(f"shard(s) of {self.shards.root} changed since this loader checked them: "
                             + "; ".join(f"{k}: {v}" for k, v in bad.items())
                             + " (repack them, or restart the job to leave them out)")

    def _explain_failure(self, epoch: int, b: int, err: Exception) -> str:
        """What DALI failed on: a shard damaged since it was checked, or the images that do not decode
        (shard, sample and a readable reason), else the epoch's first shards."""
        head = f"reading shards of {self.shards.root} failed in epoch {epoch}, batch {b} (rank {self.rank})"
        order = self.shard_order(epoch)
        damaged = {s["name"]: why for s in order
                   if (why := check_shard(self.shards.tar(s), expect=(s["first"], s["count"]), content=True))}
        if damaged:
            return head + ": damaged shard(s): " + "; ".join(f"{k}: {v}" for k, v in list(damaged.items())[:8])
        # the reader had read at most this many samples of this rank's slice
        reach = self.shuffle_buffer + (b + 2 + self._prefetch) * self.batch_size
        culprits = []
        for p in self.rank_positions(epoch)[:reach]:
            why = _image_decodes(self.shards.read_sample(int(p))["image"])
            if why is not None:
                s, r = self.shards.locate(int(p))
                culprits.append(f"{s['name']} sample {r} (position {int(p)}, "
                                f"{self.shards.read_sample(int(p))['key']}): {why}")
                if len(culprits) >= 8:
                    break
        if culprits:
            return head + ": undecodable image(s): " + "; ".join(culprits)
        names = ", ".join(s["name"] for s in order[:8])
        return f"{head}; this epoch's shard order begins {names}: {_readable_decode_error(str(err))}"

    def _build(self, epoch: int):
        from nvidia.dali import fn, pipeline_def, types
        from . import plugin
        from .pipelines import plugin_outputs
        order = [self.shards.tar(s) for s in self.shard_order(epoch)]
        import torch
        out_dtype = "float16" if (self.device == "gpu" and self.dtype == torch.float16) else "float32"
        self._out_dtype = out_dtype

        def graph():
            jpg, boxes, pos = fn.readers.webdataset(
                paths=[str(p) for p in order], index_paths=[str(p.with_suffix(".idx")) for p in order],
                ext=[";".join(IMAGE_EXTS), BOXES, POS], dtypes=[types.UINT8, types.FLOAT, types.INT64],
                missing_component_behavior="error", shard_id=self.rank, num_shards=self.world_size,
                random_shuffle=self.shuffle, initial_fill=self.shuffle_buffer, seed=_epoch_seed(self.seed, epoch),
                stick_to_shard=True, pad_last_batch=False, name="shards")
            boxes = fn.reshape(boxes, shape=[-1, 4])
            views = plugin.object_views(jpg, pos, boxes, epoch=epoch, config=self.config, recipe=self.recipe,
                                        seed=self.seed, size=self.size, device=self.device, dtype=out_dtype,
                                        decoder_kwargs=self._decoder_kwargs if self.device == "gpu" else None,
                                        crop_op=self._plugin_crop)
            return plugin_outputs(views, pos, self.config)   # (view1, view2, pos[, local])

        pipe = pipeline_def(graph, enable_conditionals=not self._plugin_crop)(
            batch_size=self.batch_size, num_threads=self.num_threads,
            device_id=self._device_id if self.device == "gpu" else None, seed=self.seed,
            prefetch_queue_depth=self._prefetch)
        pipe.build()
        return pipe


def _image_decodes(data: bytes) -> str | None:
    """None if DALI's CPU decoder accepts the encoded image, else its error, made readable."""
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".img") as f:
        f.write(data)
        f.flush()
        return _file_decodes(f.name)
