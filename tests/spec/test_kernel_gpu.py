"""The fused crop kernel on a GPU (CuPy): windows == windows.py, crops == NumPy reference within 1/255.

Skipped without CuPy and a CUDA device (``pytest -m gpu`` selects these).
"""
from __future__ import annotations

import glob

import numpy as np
import pytest

from dali_objcrop.constants import IMAGENET_MEAN_PX, IMAGENET_STD_PX
from dali_objcrop.kernels import reference
from dali_objcrop.kernels.cupy_backend import gpu_available
from dali_objcrop.windows import MODES, CropConfig, sample_windows
from conftest import COCO_IMAGES
from kernel_data import boxes_for

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")]


def random_batch(n: int, seed: int):
    rng = np.random.default_rng(seed)
    sizes = np.stack([rng.integers(1, 1300, n), rng.integers(1, 1300, n)], 1)
    sizes[: n // 50] = rng.integers(1, 8, (n // 50, 2))
    count = rng.integers(0, 14, n)
    offsets = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
    c = rng.uniform(0, 1, (offsets[-1], 2))
    wh = rng.uniform(0.0005, 1.2, (offsets[-1], 2))
    boxes = np.clip(np.concatenate([c - wh / 2, c + wh / 2], 1), 0, 1).astype(np.float32)
    return sizes, boxes, offsets, rng.integers(0, 2**40, n)


def host_images(n_real: int = 6):
    rng = np.random.default_rng(0)
    ims = []
    files = sorted(glob.glob(str(COCO_IMAGES / "*.jpg")))[:n_real]
    if files:
        from PIL import Image
        ims += [np.asarray(Image.open(f).convert("RGB")) for f in files]
    ims += [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), rng.integers(0, 256, (45, 31, 3), dtype=np.uint8),
            rng.integers(0, 256, (1, 1, 3), dtype=np.uint8), rng.integers(0, 256, (7, 900, 3), dtype=np.uint8)]
    return ims


@pytest.mark.parametrize("mode", MODES)
def test_gpu_windows_equal_numpy(mode):
    """The windows-only kernel equals windows.sample_windows on every field (50k samples)."""
    from dali_objcrop.kernels.cupy_backend import windows_gpu
    sizes, boxes, offsets, index = random_batch(50000, MODES.index(mode))
    cfg = CropConfig(mode=mode, box_scale=(0.45, 1.0))
    cw = sample_windows(sizes, boxes, offsets, index, 11, 3, cfg)
    got = {k: v.get() for k, v in windows_gpu(sizes, boxes, offsets, index, 11, 3, cfg).items()}
    np.testing.assert_array_equal(got["windows"], cw.windows)
    np.testing.assert_array_equal(got["regions"], cw.regions)
    np.testing.assert_array_equal(got["flip"].astype(bool), cw.flip)
    np.testing.assert_array_equal(got["box_index"], cw.box_index)
    np.testing.assert_array_equal(got["fallback"].astype(bool), cw.fallback)
    if mode == "obj-obj-shift":
        np.testing.assert_array_equal(got["shift"], cw.extras["shift"])


@pytest.mark.parametrize("mode,size", [("obj-obj-dilate", 224), ("scene-scene", 224), ("obj-obj-shift", 96),
                                       ("obj-scene", 37)])
def test_gpu_crop_matches_reference(mode, size):
    """Fused kernel (float32) == NumPy reference within 1/255 per pixel; its windows == windows.py."""
    import cupy
    from dali_objcrop.kernels.cupy_backend import crop_views
    ims = host_images()
    boxes, offsets = boxes_for(len(ims))
    index = np.arange(len(ims)) * 7
    cfg = CropConfig(mode=mode, box_scale=(0.3, 1.0), min_box_size=48)
    r0, r1, cw = reference.crop_views_reference(ims, boxes, offsets, index, 2, 5, cfg, size)
    dev = [cupy.asarray(im) for im in ims]
    v0, v1, win, flip = crop_views(dev, None, boxes, offsets, index, 2, 5, cfg, size, mean=0.0, std=1.0,
                                   return_windows=True)
    np.testing.assert_array_equal(win.get(), cw.windows)
    np.testing.assert_array_equal(flip.get().astype(bool), cw.flip)
    for g, r in ((v0.get(), r0), (v1.get(), r1)):
        d = np.abs(g.astype(np.float64) - r)
        assert d.max() <= 1.0, d.max()
        assert d.mean() < 1e-2, d.mean()


def test_gpu_half_outputs_and_normalisation():
    """float16 / bfloat16 outputs are the float32 result rounded (within one unit in the last place of the
    output type: the half kernels are separate compilations, whose FMA contractions can differ in the last bit
    of float32, as seen on an H200); ImageNet normalisation."""
    import cupy
    from dali_objcrop.kernels.cupy_backend import crop_views
    ims = host_images(3)
    boxes, offsets = boxes_for(len(ims), 2)
    cfg = CropConfig(mode="obj-obj-dilate", box_scale=(0.3, 1.0))
    dev = [cupy.asarray(im) for im in ims]
    mean, std = np.array(IMAGENET_MEAN_PX), np.array(IMAGENET_STD_PX)
    f32 = [v.get() for v in crop_views(dev, None, boxes, offsets, np.arange(len(ims)), 0, 0, cfg, 64, mean, std)]
    r0, r1, _ = reference.crop_views_reference(ims, boxes, offsets, np.arange(len(ims)), 0, 0, cfg, 64, mean, std)
    tol = (1.0 / std)[None, :, None, None]
    assert (np.abs(f32[0] - r0) <= tol).all() and (np.abs(f32[1] - r1) <= tol).all()
    f16 = [v.get() for v in crop_views(dev, None, boxes, offsets, np.arange(len(ims)), 0, 0, cfg, 64, mean, std,
                                       dtype="float16")]
    for a, b in zip(f16, f32):
        # near 0 (a pixel at the channel mean) a float16 ulp is ~6e-8, below the float32 arithmetic's
        # absolute differences between two compilations (~1e-7): allow 1e-5 (6e-4 grey levels) on top
        ulp = np.spacing(np.abs(b).astype(np.float16)).astype(np.float32)
        d = np.abs(a.astype(np.float32) - b)
        assert a.dtype == np.float16 and (d <= ulp + 1e-5).all() and (d <= tol).all(), d.max()
        assert (a == b.astype(np.float16)).mean() > 0.99
    bf = [v.get() for v in crop_views(dev, None, boxes, offsets, np.arange(len(ims)), 0, 0, cfg, 64, mean, std,
                                      dtype="bfloat16")]
    for a, b in zip(bf, f32):
        assert a.dtype == np.uint16
        back = (a.astype(np.uint32) << 16).view(np.float32)
        assert np.abs(back - b).max() <= np.abs(b).max() * 2**-8


def test_gpu_torch_and_dense_inputs():
    """torch CUDA tensors in -> torch tensors out (bfloat16 too), equal to the CuPy path; dense batches work."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    import cupy
    from dali_objcrop.kernels.cupy_backend import crop_views
    rng = np.random.default_rng(4)
    dense = rng.integers(0, 256, (5, 300, 400, 3), dtype=np.uint8)
    boxes, offsets = boxes_for(5, 3)
    cfg = CropConfig(mode="obj-obj-shift", box_scale=(0.3, 1.0))
    ref = [v.get() for v in crop_views([cupy.asarray(x) for x in dense], None, boxes, offsets, np.arange(5), 1, 1,
                                       cfg, 56)]
    got = crop_views(cupy.asarray(dense), [[400, 300]] * 5, boxes, offsets, np.arange(5), 1, 1, cfg, 56)
    np.testing.assert_array_equal(got[0].get(), ref[0])
    t = torch.from_numpy(dense).cuda()
    tv = crop_views([t[i] for i in range(5)], None, boxes, offsets, np.arange(5), 1, 1, cfg, 56, dtype="bfloat16")
    assert tv[0].dtype == torch.bfloat16 and tv[0].is_cuda and tuple(tv[0].shape) == (5, 3, 56, 56)
    np.testing.assert_allclose(tv[1].float().cpu().numpy(), ref[1], rtol=2**-8, atol=1e-6)
    with pytest.raises(ValueError, match="sizes do not match"):
        crop_views(cupy.asarray(dense), [[300, 400]] * 5, boxes, offsets, np.arange(5), 1, 1, cfg, 56)


def test_gpu_apply_matches_reference():
    """The given-windows kernels (HWC uint8 / float32, the DALI stage's) == reference within 1/255 (uint8:
    the reference rounded, a value within float rounding of a half level may round the other way)."""
    import cupy
    from dali_objcrop.kernels.cupy_backend import apply_windows, apply_windows_u8
    ims = host_images(3)
    boxes, offsets = boxes_for(len(ims), 5)
    cfg = CropConfig(mode="obj-obj-dilate", box_scale=(0.3, 1.0))
    r0, r1, cw = reference.crop_views_reference(ims, boxes, offsets, np.arange(len(ims)), 3, 0, cfg, 100)
    dev = [cupy.asarray(im) for im in ims]
    u0, u1 = apply_windows_u8(dev, cw.windows, cw.flip, 100)
    for u, r in ((u0.get(), r0), (u1.get(), r1)):
        d = np.abs(u.transpose(0, 3, 1, 2).astype(np.float64) - r)
        assert d.max() <= 1.0 and (d > 0.5 + 1e-3).mean() < 1e-3, (d.max(), (d > 0.5 + 1e-3).mean())
    f0, f1 = apply_windows(dev, cw.windows, cw.flip, 100)      # what crop_backend="cupy" runs
    for f, r in ((f0.get(), r0), (f1.get(), r1)):
        assert np.abs(f.transpose(0, 3, 1, 2).astype(np.float64) - r).max() <= 1.0


def test_gpu_matches_host_build():
    """The GPU and the g++ build of the same source agree to float32 rounding (FMA contraction only)."""
    import cupy
    from dali_objcrop.kernels.cupy_backend import crop_views
    from kernel_host import compiler, host_crop_views, load_host_library
    if compiler() is None:
        pytest.skip("no C++ compiler")
    lib = load_host_library()
    ims = host_images(3)
    boxes, offsets = boxes_for(len(ims), 6)
    cfg = CropConfig(mode="obj-obj", box_scale=(0.3, 1.0))
    h = host_crop_views(lib, ims, boxes, offsets, np.arange(len(ims)), 8, 8, cfg, 128)
    g = crop_views([cupy.asarray(im) for im in ims], None, boxes, offsets, np.arange(len(ims)), 8, 8, cfg, 128,
                   mean=0.0, std=1.0)
    assert np.abs(g[0].get() - h["view0"]).max() < 1e-2 and np.abs(g[1].get() - h["view1"]).max() < 1e-2


def test_gpu_loader_cupy_backend_matches_dali_backend(request):
    """ObjCropLoader(crop_backend='cupy') runs in DALI and agrees with the DALI-ops backend (same windows,
    flips in the same direction) up to the resamplers' small differences."""
    pytest.importorskip("nvidia.dali")
    if not hasattr(pytest.importorskip("cv2"), "imread"):  # a stand-in cv2 without imread
        pytest.skip("OpenCV missing: the synthetic set is drawn with it")
    torch = pytest.importorskip("torch")
    synth_set = request.getfixturevalue("synth_set")  # after the skips: it needs OpenCV
    from dali_objcrop.augment import Recipe, ViewAug
    from dali_objcrop.loader import ObjCropLoader
    plain = ViewAug(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    recipe = Recipe("plain", (plain, plain))
    out = {}
    for backend in ("dali", "cupy"):
        loader = ObjCropLoader(synth_set, boxes="gt", mode="obj-obj-dilate", batch_size=8, size=96, recipe=recipe,
                               device="gpu", crop_backend=backend, shuffle=False, min_box_size=32)
        out[backend] = next(iter(loader))
    a, b = out["dali"], out["cupy"]
    assert torch.equal(a["index"].cpu(), b["index"].cpu())
    std = torch.tensor(IMAGENET_STD_PX, device=a["view1"].device).view(1, 3, 1, 1)
    for k in ("view1", "view2"):
        assert a[k].shape == b[k].shape == (8, 3, 96, 96)
        diff = ((a[k] - b[k]).abs() * std)           # pixel units
        assert diff.mean().item() < 3.0, diff.mean().item()
