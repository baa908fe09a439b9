"""cupy_backend's Python side on the CPU: a stand-in ``cupy`` module whose RawModule launches the CUDA
kernels through their serial CPU emulation (tests/helpers/csrc/objcrop_emulate.cpp).

This checks what the GPU tests would otherwise be the first to see: the argument order of every
kernel launch, the grid, dtype handling, dense and ragged batches, the returned windows, and the DALI
stage's batch function, all against windows.py and the NumPy reference.  Nothing here claims GPU
behaviour (streams, memory pools, NVRTC): tests/spec/test_kernel_gpu.py does that on a GPU.
"""
from __future__ import annotations

import ctypes
import sys
import types

import numpy as np
import pytest

from dali_objcrop.kernels import reference
from dali_objcrop.windows import CropConfig, sample_windows
from kernel_host import compiler, load_emulator

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler")


class FakeArray(np.ndarray):
    """A host array that looks like a CuPy array to cupy_backend (``.data.ptr``, ``.get()``)."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def get(self):
        return np.array(self)


def _fake(x) -> FakeArray:
    return np.ascontiguousarray(x).view(FakeArray)


def make_fake_cupy(emu) -> types.ModuleType:
    cp = types.ModuleType("cupy")
    cp.__version__ = "fake"
    for name in ("int32", "uint8", "uint16", "float16", "float32", "float64", "int64", "uint64"):
        setattr(cp, name, getattr(np, name))
    cp.asarray = lambda x, dtype=None: _fake(np.asarray(x, dtype=dtype))
    cp.ascontiguousarray = lambda x: _fake(x)
    cp.zeros = lambda shape, dtype=float: _fake(np.zeros(shape, dtype))
    cp.empty = lambda shape, dtype=float: _fake(np.full(shape, 123, dtype))   # garbage the kernel must overwrite
    cp.empty_like = lambda a: _fake(np.full(a.shape, 123, a.dtype))
    cp.concatenate = lambda arrs, axis=0: _fake(np.concatenate([np.asarray(a) for a in arrs], axis))
    launches = []

    def arg(a):
        if isinstance(a, np.ndarray):
            return ctypes.c_void_p(a.ctypes.data)
        if isinstance(a, (np.uint64,)):
            return ctypes.c_uint64(int(a))
        if isinstance(a, (np.int32, int)):
            return ctypes.c_int(int(a))
        raise TypeError(f"unexpected kernel argument {type(a)}")

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __call__(self, grid, block, args):
            launches.append((self.name, tuple(grid), tuple(block)))
            a = [arg(x) for x in args]
            g = tuple(grid) + (1,) * (3 - len(grid))
            if self.name == "objcrop_windows":
                emu.oc_emu_windows.argtypes = None
                emu.oc_emu_windows(ctypes.c_int(g[0]), ctypes.c_int(block[0]), *a)
            elif self.name.startswith("objcrop_crop_"):
                kind = {"f32": 0, "f16": 1, "bf16": 2}[self.name.rsplit("_", 1)[1]]
                emu.oc_emu_crop.argtypes = None
                emu.oc_emu_crop(ctypes.c_int(kind), *(ctypes.c_int(v) for v in g), ctypes.c_int(block[0]), *a)
            elif self.name in ("objcrop_apply_u8", "objcrop_apply_f32"):
                emu.oc_emu_apply.argtypes = None
                emu.oc_emu_apply(ctypes.c_int(self.name.endswith("f32")), *(ctypes.c_int(v) for v in g),
                                 ctypes.c_int(block[0]), *a)
            else:
                raise AssertionError(self.name)

    class RawModule:
        def __init__(self, code=None, options=()):
            assert "objcrop_crop_f32" in code and '#include "' not in code
            self.options = options

        def compile(self):
            pass

        def get_function(self, name):
            return Kernel(name)

    class Device:
        def __init__(self, i=0):
            self.id = i

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    cp.RawModule = RawModule
    cp.cuda = types.SimpleNamespace(Device=Device, runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
    cp.launches = launches
    return cp


@pytest.fixture
def fake_cupy(monkeypatch, tmp_path_factory):
    from dali_objcrop.kernels import cupy_backend
    emu = load_emulator(tmp_path_factory.mktemp("oc_emu_fake"))
    cp = make_fake_cupy(emu)
    monkeypatch.setitem(sys.modules, "cupy", cp)
    cupy_backend._module.cache_clear()
    yield cp
    cupy_backend._module.cache_clear()


def _batch(n_img=4, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(300, 420), (45, 31), (1, 1), (480, 640)][:n_img]
    ims = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    count = rng.integers(0, 4, n_img)
    offsets = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
    c = rng.uniform(0.2, 0.8, (offsets[-1], 2))
    wh = rng.uniform(0.05, 0.6, (offsets[-1], 2))
    boxes = np.clip(np.concatenate([c - wh / 2, c + wh / 2], 1), 0, 1).astype(np.float32)
    return ims, boxes, offsets


def test_crop_views_wrapper(fake_cupy):
    from dali_objcrop.kernels.cupy_backend import crop_views
    ims, boxes, offsets = _batch()
    cfg = CropConfig(mode="obj-obj-dilate", box_scale=(0.3, 1.0), min_box_size=40)
    index = np.arange(len(ims)) * 3
    r0, r1, cw = reference.crop_views_reference(ims, boxes, offsets, index, 5, 2, cfg, 40, 0.0, 1.0)
    v0, v1, win, flip = crop_views([_fake(im) for im in ims], None, boxes, offsets, index, 5, 2, cfg, 40,
                                   mean=0.0, std=1.0, return_windows=True)
    assert v0.shape == v1.shape == (len(ims), 3, 40, 40) and v0.dtype == np.float32
    np.testing.assert_array_equal(win.get(), cw.windows)
    np.testing.assert_array_equal(flip.get().astype(bool), cw.flip)
    assert np.abs(v0.get() - r0).max() <= 1.0 and np.abs(v1.get() - r1).max() <= 1.0
    assert fake_cupy.launches[-1] == ("objcrop_crop_f32", (2, 2, len(ims)), (256,))  # 1600 px / 1024 per block
    # half outputs and ImageNet defaults
    h0, _ = crop_views([_fake(im) for im in ims], None, boxes, offsets, index, 5, 2, cfg, 40, dtype="float16")
    f0, _ = crop_views([_fake(im) for im in ims], None, boxes, offsets, index, 5, 2, cfg, 40)
    assert h0.dtype == np.float16
    np.testing.assert_array_equal(h0.get(), f0.get().astype(np.float16))
    b0, _ = crop_views([_fake(im) for im in ims], None, boxes, offsets, index, 5, 2, cfg, 40, dtype="bfloat16")
    assert b0.dtype == np.uint16
    back = (b0.get().astype(np.uint32) << 16).view(np.float32)
    assert np.abs(back - f0.get()).max() <= np.abs(f0.get()).max() * 2**-8


def test_crop_views_dense_batch_and_errors(fake_cupy):
    from dali_objcrop.kernels.cupy_backend import crop_views
    rng = np.random.default_rng(1)
    dense = rng.integers(0, 256, (3, 120, 160, 3), dtype=np.uint8)
    boxes = np.array([[0.1, 0.1, 0.6, 0.7]], np.float32)
    offsets = np.array([0, 1, 1, 1])
    cfg = CropConfig(mode="obj-scene", box_scale=(0.5, 1.0), min_box_size=16)
    a = crop_views(_fake(dense), [[160, 120]] * 3, boxes, offsets, [7, 8, 9], 0, 0, cfg, 24)
    b = crop_views([_fake(x) for x in dense], None, boxes, offsets, [7, 8, 9], 0, 0, cfg, 24)
    np.testing.assert_array_equal(a[0].get(), b[0].get())
    np.testing.assert_array_equal(a[1].get(), b[1].get())
    with pytest.raises(ValueError, match="sizes do not match"):
        crop_views(_fake(dense), [[120, 160]] * 3, boxes, offsets, [7, 8, 9], 0, 0, cfg, 24)
    with pytest.raises(ValueError, match="uint8"):
        crop_views([_fake(dense[0].astype(np.float32))], None, boxes, [0, 1], [0], 0, 0, cfg, 24)
    with pytest.raises(ValueError, match="dtype"):
        crop_views(_fake(dense), None, boxes, offsets, [7, 8, 9], 0, 0, cfg, 24, dtype="int8")
    with pytest.raises(ValueError, match="3 images but 2 indices"):
        crop_views(_fake(dense), None, boxes, [0, 1, 1], [7, 8], 0, 0, cfg, 24)


def test_windows_gpu_wrapper(fake_cupy):
    from dali_objcrop.kernels.cupy_backend import windows_gpu
    rng = np.random.default_rng(2)
    n = 700
    sizes = np.stack([rng.integers(1, 900, n), rng.integers(1, 700, n)], 1)
    count = rng.integers(0, 5, n)
    offsets = np.concatenate([[0], np.cumsum(count)])
    c = rng.uniform(0, 1, (offsets[-1], 2))
    boxes = np.clip(np.concatenate([c - 0.1, c + 0.1], 1), 0, 1).astype(np.float32)
    cfg = CropConfig(mode="obj-obj-shift", box_scale=(0.5, 1.0))
    cw = sample_windows(sizes, boxes, offsets, np.arange(n), 4, 4, cfg)
    got = windows_gpu(sizes, boxes, offsets, np.arange(n), 4, 4, cfg)
    np.testing.assert_array_equal(got["windows"].get(), cw.windows)
    np.testing.assert_array_equal(got["shift"].get(), cw.extras["shift"])
    np.testing.assert_array_equal(got["box_index"].get(), cw.box_index)
    assert fake_cupy.launches[-1] == ("objcrop_windows", (6,), (128,))


def test_dali_stage_function(fake_cupy):
    """The batch function python_function runs: lists of per-sample arrays in, per-sample HWC float32 out."""
    pytest.importorskip("nvidia.dali")
    from dali_objcrop.kernels.cupy_backend import _make_dali_fn
    ims, boxes, offsets = _batch(3, seed=4)
    cfg = CropConfig(mode="obj-obj-dilate", box_scale=(0.3, 1.0))
    r0, r1, cw = reference.crop_views_reference(ims, boxes, offsets, np.arange(3), 0, 0, cfg, 33)
    fn = _make_dali_fn(33)
    out0, out1 = fn([_fake(im) for im in ims], [_fake(w) for w in cw.windows],
                    [_fake(f) for f in cw.flip.astype(np.uint8)])
    assert len(out0) == len(out1) == 3 and out0[0].shape == (33, 33, 3) and out0[0].dtype == np.float32
    for outs, r in ((out0, r0), (out1, r1)):
        got = np.stack([np.asarray(o) for o in outs]).transpose(0, 3, 1, 2).astype(np.float64)
        assert np.abs(got - r).max() <= 1e-2


def test_apply_windows_wrapper(fake_cupy):
    from dali_objcrop.kernels.cupy_backend import apply_windows, apply_windows_u8
    ims, boxes, offsets = _batch(4, seed=5)
    cfg = CropConfig(mode="obj-obj-shift", box_scale=(0.3, 1.0))
    r0, r1, cw = reference.crop_views_reference(ims, boxes, offsets, np.arange(4), 1, 1, cfg, 29)
    f0, f1 = apply_windows([_fake(im) for im in ims], cw.windows, cw.flip, 29)
    u0, u1 = apply_windows_u8([_fake(im) for im in ims], cw.windows, cw.flip, 29)
    assert f0.dtype == np.float32 and u0.dtype == np.uint8 and fake_cupy.launches[-1][0] == "objcrop_apply_u8"
    assert np.abs(f1.get().transpose(0, 3, 1, 2) - r1).max() <= 1e-2
    assert np.abs(u0.get().transpose(0, 3, 1, 2) - r0).max() <= 0.5 + 1e-3
    bad = cw.windows.copy()
    bad[0, 0, 2] = 10**6
    with pytest.raises(ValueError, match="windows must satisfy"):
        apply_windows([_fake(im) for im in ims], bad, cw.flip, 29)


def test_loader_cupy_backend_registered_and_guarded():
    """crop_backend='cupy' is registered in the loader; on the CPU it is refused, and building the GPU
    graph without CuPy / a GPU fails with a message naming what is missing."""
    pytest.importorskip("nvidia.dali")
    from dali_objcrop import loader
    from dali_objcrop.kernels.cupy_backend import gpu_available
    assert loader.CROP_BACKENDS["cupy"].inputs == ("window", "flip")
    with pytest.raises(ValueError, match="needs device='gpu'"):
        loader.ObjCropLoader("/nonexistent.json", crop_backend="cupy", device="cpu")
    if gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CuPy|GPU"):
        loader.build_pipeline(lambda: None, batch_size=2, num_threads=1, device="gpu", crop_backend="cupy",
                              device_id=0)
