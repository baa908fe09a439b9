"""What both iterators (:class:`~dali_objcrop.ObjCropLoader` and the shard loader) share: finding
this process's rank, and handing a DALI batch over to torch."""
from __future__ import annotations

import os

import numpy as np


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
    """``{"view1", "view2", "index"}`` torch tensors from a pipeline's ``(view1, view2, index)`` outputs.

    Args:
        outs: the three DALI TensorLists (views NCHW; GPU on ``device="gpu"``).
        device, device_id: where the views are (``cpu`` / ``gpu`` and its CUDA device).
        out_dtype: what DALI wrote (``float32`` or ``float16``).
        dtype: the torch dtype the caller asked for (converted by torch if it differs, e.g. bfloat16).

    Returns:
        fresh tensors (never reused buffers, so a batch stays valid however long the caller keeps it).
    """
    import torch
    from nvidia.dali.plugin.pytorch import feed_ndarray
    v1, v2, index = outs
    idx = torch.from_numpy(np.array(index.as_tensor()).reshape(-1).astype(np.int64))
    views = []
    for tl in (v1, v2):
        if device == "gpu":
            t = tl.as_tensor()
            dt = torch.float16 if out_dtype == "float16" else torch.float32
            out = torch.empty(t.shape(), dtype=dt, device=f"cuda:{device_id}")
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device_id))
        else:
            out = torch.from_numpy(np.array(tl.as_tensor()))
        views.append(out if out.dtype == dtype else out.to(dtype))
    return {"view1": views[0], "view2": views[1], "index": idx.to(views[0].device)}
