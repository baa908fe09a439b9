"""The fused crop kernel on the GPU, through ``cupy.RawModule`` (no build step).

Three entry points, all taking a ragged batch of decoded HWC uint8 RGB images in
GPU memory (CuPy arrays or torch CUDA tensors, zero-copy through DLPack or raw
pointers):

* :func:`crop_views`: one launch derives both views' windows from the boxes
  (the same maths and counter-based randomness as ``windows.sample_windows``),
  resamples (antialiased bilinear), flips, normalises and writes two
  (N, 3, S, S) float32 / float16 / bfloat16 batches.
* :func:`windows_gpu`: the window maths alone, one thread per sample (to
  compare with ``windows.py`` bit for bit).
* :func:`apply_windows`: given windows and flips (the DALI graph samples
  them in NumPy), two (N, S, S, 3) float32 (or uint8) batches; :func:`dali_crop_stage` wraps
  it as ``fn.python_function(device="gpu", batch_processing=True)`` for the
  loader's ``crop_backend="cupy"``.

Example::

    from dali_objcrop.kernels.cupy_backend import crop_views
    v0, v1 = crop_views(images, None, boxes, offsets, index, seed=0, epoch=3,
                        config=CropConfig(mode="obj-obj-dilate", box_scale=(0.5, 1)),
                        size=224, dtype="bfloat16")
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from ..constants import IMAGENET_MEAN_PX, IMAGENET_STD_PX
from ..windows import CropConfig
from .common import check_batch_arrays, kernel_params, kernel_source, norm_params

_DTYPES = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "half": "f16",
           "bfloat16": "bf16", "bf16": "bf16"}
_BLOCK = 256
_PIX_PER_THREAD = 4  # = OC_PIX_PER_THREAD in csrc/objcrop_kernel.cu


def cupy_or_raise():
    """Import CuPy and check for a CUDA device; a clear error otherwise."""
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError("the 'cupy' crop backend needs CuPy (pip install cupy-cuda12x or cupy-cuda13x "
                           "matching your CUDA) and a GPU") from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError without a driver
        raise RuntimeError(f"the 'cupy' crop backend needs a CUDA GPU; CuPy reports: {e}") from e
    if count < 1:
        raise RuntimeError("the 'cupy' crop backend needs a CUDA GPU; none is visible")
    return cupy


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        cupy_or_raise()
        return True
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def _module(device_id: int):
    cupy = cupy_or_raise()
    with cupy.cuda.Device(device_id):
        mod = cupy.RawModule(code=kernel_source(), options=("--std=c++17",))
        mod.compile()
    return mod


def kernel(name: str):
    """A kernel of ``csrc/objcrop_kernel.cu`` compiled for the current device (cached per device)."""
    cupy = cupy_or_raise()
    return _module(cupy.cuda.Device().id).get_function(name)


# ---- array plumbing ---------------------------------------------------------------------------
def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _wrap_pointer(ptr: int, shape: tuple, dtype, owner, device_id: int):
    """A CuPy view of device memory owned by another framework (kept alive through ``owner``)."""
    import cupy
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    mem = cupy.cuda.UnownedMemory(ptr, nbytes, owner, device_id)
    return cupy.ndarray(shape, dtype=dtype, memptr=cupy.cuda.MemoryPointer(mem, 0))


def _host(x):
    """A host (NumPy-convertible) copy of a CuPy array or torch tensor; other inputs as they are."""
    if _is_torch(x):
        return x.detach().cpu().numpy()
    if type(x).__module__.startswith("cupy"):
        return x.get()
    return x


def _image_list(images) -> list:
    """N HWC uint8 device arrays from a list or a dense (N, H, W, 3) array."""
    if hasattr(images, "shape") and len(images.shape) == 4:
        return [images[i] for i in range(images.shape[0])]
    return list(images)


def _image_table(images: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Base pointers (N,) uint64 and sizes (N, 2) int32 (width, height); checks layout and dtype."""
    ptrs, sizes = [], []
    for i, im in enumerate(images):
        if _is_torch(im):
            import torch
            if not im.is_cuda or im.dtype != torch.uint8 or im.dim() != 3 or im.shape[2] != 3 \
                    or not im.is_contiguous():
                raise ValueError(f"image {i}: need a contiguous CUDA uint8 (H, W, 3) tensor, got "
                                 f"{tuple(im.shape)} {im.dtype} on {im.device}")
            ptrs.append(im.data_ptr())
        else:
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3 or not im.flags.c_contiguous \
                    or not hasattr(im, "data") or not hasattr(im.data, "ptr"):
                raise ValueError(f"image {i}: need a C-contiguous CuPy uint8 (H, W, 3) array, got "
                                 f"{type(im).__name__} {getattr(im, 'shape', '?')} {getattr(im, 'dtype', '?')}")
            ptrs.append(im.data.ptr)
        sizes.append((im.shape[1], im.shape[0]))
    return np.array(ptrs, dtype=np.uint64), np.array(sizes, dtype=np.int32).reshape(-1, 2)


def _torch_stream_ctx(images):
    """Launch on the images' device and torch's current stream when they are torch tensors."""
    import contextlib
    stack = contextlib.ExitStack()
    if images and _is_torch(images[0]):
        import cupy
        import torch
        dev = images[0].device
        stack.enter_context(cupy.cuda.Device(dev.index))
        stack.enter_context(cupy.cuda.ExternalStream(torch.cuda.current_stream(dev).cuda_stream, dev.index))
    return stack


def _grid(size: int, n: int) -> tuple[int, int, int]:
    if n > 65535:  # gridDim.z limit
        raise ValueError(f"at most 65535 images per launch, got {n}")
    return (-(-size * size // (_BLOCK * _PIX_PER_THREAD)), 2, n)


# ---- public API -------------------------------------------------------------------------------
def windows_gpu(sizes, boxes, offsets, index, seed: int, epoch: int, config: CropConfig) -> dict:
    """Both views' windows for a batch, on the GPU (the windows-only kernel).

    Args:
        sizes, boxes, offsets, index, seed, epoch, config: as :func:`~dali_objcrop.sample_windows`
            (host arrays).

    Returns:
        dict of CuPy arrays: ``windows`` (N, 2, 4) int32, ``regions`` (N, 2, 4) int32, ``flip``
        (N, 2) uint8, ``box_index`` (N,) int32, ``fallback`` (N,) uint8, ``shift`` (N, 2) int32.
    """
    cupy = cupy_or_raise()
    sizes, boxes, offsets, index = check_batch_arrays(*(_host(a) for a in (sizes, boxes, offsets, index)))
    n = len(index)
    out = {"windows": cupy.zeros((n, 2, 4), cupy.int32), "regions": cupy.zeros((n, 2, 4), cupy.int32),
           "flip": cupy.zeros((n, 2), cupy.uint8), "box_index": cupy.zeros(n, cupy.int32),
           "fallback": cupy.zeros(n, cupy.uint8), "shift": cupy.zeros((n, 2), cupy.int32)}
    if n == 0:
        return out
    args = [cupy.asarray(a) for a in (sizes, boxes if len(boxes) else np.zeros((1, 4), np.float32),
                                      offsets, index)]
    kernel("objcrop_windows")((-(-n // 128),), (128,),
                              (*args, np.int32(n), np.uint64(seed), np.uint64(epoch),
                               cupy.asarray(kernel_params(config)),
                               *(out[k] for k in ("windows", "regions", "flip", "box_index", "fallback", "shift"))))
    return out


def crop_views(images, sizes, boxes, offsets, index, seed: int, epoch: int, config: CropConfig, size: int = 224,
               mean=IMAGENET_MEAN_PX, std=IMAGENET_STD_PX, dtype: str = "float32", return_windows: bool = False):
    """Both views of a batch in one kernel launch: windows from boxes, resample, flip, normalise.

    Args:
        images: N decoded HWC uint8 RGB images on the GPU: a list of CuPy arrays or torch CUDA
            tensors (any sizes), or one dense (N, H, W, 3) array / tensor.
        sizes: None, or (N, 2) (width, height) checked against the images' shapes.
        boxes: (M, 4) float32 normalised proposals, best-first per image (host or device array;
            the batch description is small and is validated on the host).
        offsets: (N + 1,) int64, image i owns ``boxes[offsets[i]:offsets[i+1]]``.
        index: (N,) sample indices (the random key with ``seed`` and ``epoch``).
        config: the crop sampler (set ``box_scale`` as the loader does).
        size: output side S.
        mean, std: per-channel normalisation in pixel units (0..255), as DALI's
            ``crop_mirror_normalize``; default ImageNet.
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        return_windows: also return ``(windows (N, 2, 4) int32, flip (N, 2) uint8)``.

    Returns:
        ``(view0, view1)`` (N, 3, S, S): torch tensors if the images are torch tensors
        (bfloat16 included), else CuPy arrays (bfloat16 as uint16 bit patterns, since CuPy
        has no bfloat16); with ``return_windows``, ``(view0, view1, windows, flip)`` (CuPy).
    """
    cupy = cupy_or_raise()
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size!r}")
    ims = _image_list(images)
    ptrs, shapes = _image_table(ims)
    if sizes is not None and not np.array_equal(np.asarray(sizes).reshape(-1, 2), shapes):
        raise ValueError("sizes do not match the images' shapes (width, height): "
                         f"first given {np.asarray(sizes).reshape(-1, 2)[:1].tolist()}, actual {shapes[:1].tolist()}")
    index = np.asarray(_host(index)).reshape(-1)
    if len(index) != len(ims):
        raise ValueError(f"{len(ims)} images but {len(index)} indices")
    shapes, boxes, offsets, index = check_batch_arrays(shapes, _host(boxes), _host(offsets), index)
    n = len(index)
    kind = _DTYPES[dtype]
    torch_out = bool(ims) and _is_torch(ims[0])
    shape = (n, 3, size, size)
    with _torch_stream_ctx(ims):
        if torch_out:
            import torch
            tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[kind]
            outs_t = [torch.empty(shape, dtype=tdt, device=ims[0].device) for _ in (0, 1)]
            cdt = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[kind]
            outs = [_wrap_pointer(t.data_ptr(), shape, cdt, t, t.device.index) for t in outs_t]
        else:
            cdt = {"f32": cupy.float32, "f16": cupy.float16, "bf16": cupy.uint16}[kind]
            outs = [cupy.empty(shape, dtype=cdt) for _ in (0, 1)]
        win = cupy.zeros((n, 2, 4), cupy.int32)
        flip = cupy.zeros((n, 2), cupy.uint8)
        if n:
            args = [cupy.asarray(a) for a in (ptrs, shapes, boxes if len(boxes) else np.zeros((1, 4), np.float32),
                                              offsets, index)]
            kernel(f"objcrop_crop_{kind}")(
                _grid(size, n), (_BLOCK,),
                (*args, np.uint64(seed), np.uint64(epoch), cupy.asarray(kernel_params(config)),
                 cupy.asarray(norm_params(mean, std)), np.int32(size), outs[0], outs[1], win, flip))
    views = tuple(outs_t) if torch_out else tuple(outs)
    return views + (win, flip) if return_windows else views


def apply_windows(images, windows, flip, size: int, dtype: str = "float32"):
    """Both views from given windows, HWC in pixel units (the DALI stage's kernel).

    Args:
        images: N HWC uint8 RGB device images (list of CuPy arrays / torch tensors; with torch, the
            launch goes on torch's current stream).
        windows: (N, 2, 4) int32 ``[x1, y1, x2, y2)`` per view (host or device), inside the images.
        flip: (N, 2) horizontal flips (host or device).
        size: output side S.
        dtype: ``float32`` (values as resampled, in [0, 255]) or ``uint8`` (rounded, clamped).

    Returns:
        ``(view0, view1)``: CuPy (N, S, S, 3) of ``dtype``.
    """
    cupy = cupy_or_raise()
    if dtype not in ("float32", "uint8"):
        raise ValueError(f"dtype must be 'float32' or 'uint8', got {dtype!r}")
    ims = _image_list(images)
    ptrs, shapes = _image_table(ims)
    n = len(ims)
    if isinstance(windows, np.ndarray):  # cheap host check; device windows are trusted
        w = windows.reshape(n, 2, 4)
        wh = np.repeat(shapes[:, None, :], 2, axis=1)
        if (w[..., :2] < 0).any() or (w[..., 2:] > wh).any() or (w[..., 2:] <= w[..., :2]).any():
            raise ValueError("windows must satisfy 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height")
    with _torch_stream_ctx(ims):
        win = cupy.ascontiguousarray(cupy.asarray(windows, dtype=cupy.int32).reshape(n, 2, 4))
        fl = cupy.ascontiguousarray(cupy.asarray(flip).astype(cupy.uint8).reshape(n, 2))
        out0 = cupy.empty((n, size, size, 3), cupy.float32 if dtype == "float32" else cupy.uint8)
        out1 = cupy.empty_like(out0)
        if n:
            name = "objcrop_apply_f32" if dtype == "float32" else "objcrop_apply_u8"
            kernel(name)(_grid(size, n), (_BLOCK,),
                         (cupy.asarray(ptrs), cupy.asarray(shapes), win, fl, np.int32(size), out0, out1))
    return out0, out1


def apply_windows_u8(images, windows, flip, size: int):
    """:func:`apply_windows` with uint8 output."""
    return apply_windows(images, windows, flip, size, dtype="uint8")


# ---- DALI --------------------------------------------------------------------------------------
def _make_dali_fn(size: int):
    from nvidia.dali.pipeline import do_not_convert

    @do_not_convert
    def crop(images, windows, flips):
        # images: list of CuPy (H, W, 3) uint8; windows: list of (2, 4) int32; flips: list of (2,) uint8
        import cupy
        win = cupy.concatenate([w.reshape(1, 8) for w in windows]).astype(cupy.int32, copy=False)
        fl = cupy.concatenate([f.reshape(1, 2) for f in flips])
        v0, v1 = apply_windows(images, win, fl, size, "float32")
        return [v0[i] for i in range(len(images))], [v1[i] for i in range(len(images))]

    return crop


def dali_crop_stage(images, inp: dict, size: int):
    """Crop backend ``cupy`` for the loader: ``(view0, view1)`` HWC float32 GPU DALI nodes in [0, 255].

    The windows come from the loader's NumPy sampler (``inp["window"]``, ``inp["flip"]``), the
    same ``windows.sample_windows`` the fused kernel ports: the loader needs them on the host
    anyway (augmentation draws share the sample keys, stats count fallbacks), so the stage only
    resamples, in one launch for both views, inside the pipeline through
    ``fn.python_function(device="gpu", batch_processing=True)`` on DALI's stream.

    Raises:
        RuntimeError: CuPy or a GPU is missing.
    """
    cupy_or_raise()
    from nvidia.dali import fn
    if getattr(images, "device", "gpu") != "gpu":
        raise ValueError("crop_backend='cupy' needs GPU-decoded images (device='gpu')")
    return tuple(fn.python_function(images, inp["window"].gpu(), inp["flip"].gpu(), function=_make_dali_fn(size),
                                    num_outputs=2, device="gpu", batch_processing=True,
                                    output_layouts=["HWC", "HWC"]))
