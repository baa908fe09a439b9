"""What both iterators (:class:`~dali_objcrop.ObjCropLoader` and the shard loader) share: finding
this process's rank, handing a DALI batch over to torch, the scene-fallback warning, and saying
why DALI could not decode an image."""
from __future__ import annotations

import os

import numpy as np

from .windows import CropConfig


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the arguments, else torch.distributed, else torchrun's env, else (0, 1)."""
    if rank is None or world_size is None:
        r, w = 0, 1
        try:
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                r, w = dist.get_rank(), dist.get_world_size()
            elif "WORLD_SIZE" in os.environ:
                r, w = int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"])
        except ImportError:  # torch is optional for the pure sampler
            pass
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


def resolve_device_dtype(device: str, dtype) -> tuple[str, object]:
    """``(device, dtype)`` as an iterator uses them: ``auto`` becomes ``gpu`` where torch sees CUDA, else
    ``cpu``; a None dtype is float32.  Raises ``ValueError`` naming a bad value."""
    import torch
    if device not in ("cpu", "gpu", "auto"):
        raise ValueError(f"device must be 'cpu', 'gpu' or 'auto', got {device!r}")
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise ValueError("device='gpu' but torch sees no CUDA device")
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype!r}")
    return device, dtype


def views_to_torch(outs, device: str, device_id: int | None, out_dtype: str, dtype) -> dict:
    """``{"view1", "view2", "index"[, "local"]}`` torch tensors from a pipeline's ``(view1, view2, index[, local])``
    outputs.

    Args:
        outs: the DALI TensorLists (views NCHW; GPU on ``device="gpu"``); a fourth, the local
            (multi-crop) views of ``CropConfig.local_crops = M > 0``, is (M, 3, s, s) per sample.
        device, device_id: where the views are (``cpu`` / ``gpu`` and its CUDA device).
        out_dtype: what DALI wrote (``float32`` or ``float16``).
        dtype: the torch dtype the caller asked for (converted by torch if it differs, e.g. bfloat16).

    Returns:
        fresh tensors (never reused buffers, so a batch stays valid however long the caller keeps it):
        ``view1``, ``view2`` (B, 3, size, size), ``index`` (B,) int64 and, with a fourth output,
        ``local`` (B, M, 3, local_size, local_size) on the views' device, in their dtype.
    """
    import torch
    from nvidia.dali.plugin.pytorch import feed_ndarray
    if len(outs) not in (3, 4):
        raise ValueError(f"expected the outputs (view1, view2, index[, local]), got {len(outs)} outputs")
    v1, v2, index = outs[:3]
    idx = torch.from_numpy(np.array(index.as_tensor()).reshape(-1).astype(np.int64))
    views = []
    for tl in (v1, v2, *outs[3:]):
        if device == "gpu":
            t = tl.as_tensor()
            dt = torch.float16 if out_dtype == "float16" else torch.float32
            out = torch.empty(t.shape(), dtype=dt, device=f"cuda:{device_id}")
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device_id))
        else:
            out = torch.from_numpy(np.array(tl.as_tensor()))
        views.append(out if out.dtype == dtype else out.to(dtype))
    batch = {"view1": views[0], "view2": views[1], "index": idx.to(views[0].device)}
    if len(views) == 3:
        if views[2].dim() != 5 or views[2].shape[0] != views[0].shape[0]:
            raise ValueError(f"the local views must be (B, M, 3, s, s) with B = {views[0].shape[0]}, "
                             f"got {tuple(views[2].shape)}")
        batch["local"] = views[2]
    return batch


class FallbackWarning(UserWarning):
    """Some images fall back to scene crops (no boxes); issued once per loader, with the counts."""


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


class LoaderCore:
    """The contract every loader of this package keeps, written once: the arguments both sources take
    (checked with the same words), device and dtype, rank and world size, the crop configuration (its
    defaults are :class:`~dali_objcrop.CropConfig`'s), the epoch counter (:meth:`set_epoch`,
    :attr:`epoch`), the ``stats`` schema, the pipeline's name, and the hand-over to torch.

    The sources: :class:`~dali_objcrop.ObjCropLoader` (image files: a COCO json, a folder, an index) and
    :class:`~dali_objcrop.shard_loader.ShardLoader` (WebDataset shards); :func:`dali_objcrop.open_loader`
    picks one from ``data``.
    """

    def _init_core(self, *, mode: str, batch_size: int, size: int, recipe, seed: int, num_threads: int,
                   device: str, dtype, rank: int | None, world_size: int | None, shuffle: bool, drop_last: bool,
                   device_id: int | None, prefetch_queue_depth: int, decoder_kwargs: dict | None) -> None:
        from . import augment
        from .windows import MODES
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, value in (("batch_size", batch_size), ("size", size), ("num_threads", num_threads),
                            ("prefetch_queue_depth", prefetch_queue_depth)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed!r}")
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.mode, self.batch_size, self.size, self.seed = mode, batch_size, size, seed
        self.num_threads, self.shuffle, self.drop_last = num_threads, shuffle, drop_last
        self.recipe = augment.get_recipe(recipe)
        self._device_id, self._prefetch, self._decoder_kwargs = device_id, prefetch_queue_depth, decoder_kwargs
        self._next_epoch = 0
        self.stats: dict = {"samples": 0, "fallback": 0, "epochs": 0}

    @staticmethod
    def _crop_config(mode: str, box_scale, dilate: float, shift_range, top_k: int, min_box_size: int,
                     local_crops: int = CropConfig.local_crops, local_size: int = CropConfig.local_size,
                     local_scale=CropConfig.local_scale, local_from: str = CropConfig.local_from):
        """The :class:`~dali_objcrop.CropConfig` of the loader's arguments (its checks name a bad one);
        ``local_*`` are the local (multi-crop) views' (``local_crops = 0``: none)."""
        return CropConfig(mode=mode, box_scale=box_scale, dilate=dilate,
                          shift_range=tuple(float(s) for s in shift_range), top_k=top_k, min_box_size=min_box_size,
                          local_crops=int(local_crops), local_size=int(local_size),
                          local_scale=tuple(float(s) for s in local_scale), local_from=local_from)

    def _check_local_views(self, operators: bool, why: str) -> None:
        """Refuse local views (``local_crops > 0``) where this loader cannot make them: on the DALI-ops graph
        (``operators`` False; ``why`` says why it runs), or with operators built without local views."""
        m = self.config.local_crops
        if not m:
            return
        if not operators:
            raise ValueError(f"local_crops={m} needs the operators' pipeline (fn.objcrop.windows and "
                             f"plugin.object_views make the local views), but this loader would run the "
                             f"NumPy-fed DALI-ops graph ({why}), which makes only the two global views: "
                             f"leave use_plugin at None or True with crop_backend='dali' and roi_decode=True, "
                             f"or pass local_crops=0")
        from .pipelines import local_views_supported
        ok, missing = local_views_supported()
        if not ok:
            raise RuntimeError(f"local_crops={m}: {missing}")

    def _name_pipeline(self, base: str, plugin_crop: bool | None, why_not: str, device: str) -> None:
        """``stats["pipeline"]``: ``<base>crop-op`` or ``<base>dali-ops-crop``, with the reason where a built
        GPU crop operator was refused by its self-test."""
        from . import plugin
        name = base + ("crop-op" if plugin_crop else "dali-ops-crop")
        if why_not and plugin.crop_op_registered(device):
            name += f" ({why_not})"
        self.stats["pipeline"] = name

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (without a call, each iteration uses the previous + 1)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch!r}")
        self._next_epoch = int(epoch)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will use."""
        return self._next_epoch

    def _to_torch(self, outs) -> dict:
        return views_to_torch(outs, self.device, self._device_id, self._out_dtype, self.dtype)
