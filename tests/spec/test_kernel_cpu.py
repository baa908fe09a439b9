"""The fused crop kernel's arithmetic, checked on the CPU.

``csrc/objcrop_core.h`` is compiled with g++ (tests/helpers/kernel_host.py) and
compared with windows.py (exact) and the NumPy reference (within 1/255); the
CUDA source itself is compiled with nvcc (PTX / cubin) and NVRTC where present.
"""
from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dali_objcrop import constants
from dali_objcrop.kernels import common, reference
from dali_objcrop.windows import MODES, CropConfig, sample_windows
from conftest import COCO_IMAGES
from kernel_data import boxes_for
from kernel_host import (compiler, emulate_apply, emulate_crop_views, emulate_windows, host_apply_u8, host_crop_views,
                         host_to_bf16_bits, host_to_f16_bits, host_windows, load_emulator, load_host_library)


pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler")
IMAGENET_MEAN_PX, IMAGENET_STD_PX = np.array(constants.IMAGENET_MEAN_PX), np.array(constants.IMAGENET_STD_PX)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return load_host_library(tmp_path_factory.mktemp("oc_host"))


def random_batch(n: int, seed: int, max_side: int = 1300):
    """Random sizes (tiny ones included), 0..13 random boxes per image (some tiny, some whole)."""
    rng = np.random.default_rng(seed)
    sizes = np.stack([rng.integers(1, max_side, n), rng.integers(1, max_side, n)], 1)
    sizes[: n // 50] = rng.integers(1, 8, (n // 50, 2))           # degenerate images
    count = rng.integers(0, 14, n)
    offsets = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
    m = int(offsets[-1])
    c = rng.uniform(0, 1, (m, 2))
    wh = rng.uniform(0.0005, 1.2, (m, 2))
    boxes = np.clip(np.concatenate([c - wh / 2, c + wh / 2], 1), 0, 1).astype(np.float32)
    index = rng.integers(0, 2**40, n)
    return sizes, boxes, offsets, index


CONFIGS = [CropConfig(mode=m, box_scale=(0.45, 1.0)) for m in MODES] + [
    CropConfig(mode="obj-obj-dilate", box_scale=None, dilate=0.2, top_k=3, num_tries=1, flip_p=0.3),
    CropConfig(mode="obj-obj-shift", box_scale=(1.0, 1.0), shift_range=(0.0, 400.0), min_box_size=64,
               ratio=(0.5, 2.0)),
    CropConfig(mode="obj-scene", box_scale=(0.05, 0.5), scale=(0.08, 1.0), min_box_size=1, top_k=1),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.mode}-k{c.top_k}-t{c.num_tries}-m{c.min_box_size}")
def test_windows_equal_numpy(lib, config):
    """The kernel's window maths (g++ build) equals windows.sample_windows exactly, every field."""
    sizes, boxes, offsets, index = random_batch(20000, seed=MODES.index(config.mode))
    for seed, epoch in ((0, 0), (12345, 7)):
        cw = sample_windows(sizes, boxes, offsets, index, seed, epoch, config)
        got = host_windows(lib, sizes, boxes, offsets, index, seed, epoch, config)
        np.testing.assert_array_equal(got["windows"], cw.windows)
        np.testing.assert_array_equal(got["regions"], cw.regions)
        np.testing.assert_array_equal(got["flip"], cw.flip)
        np.testing.assert_array_equal(got["box_index"], cw.box_index)
        np.testing.assert_array_equal(got["fallback"], cw.fallback)
        if config.view_kinds[1] == "shifted":
            np.testing.assert_array_equal(got["shift"], cw.extras["shift"])
    if config.uses_boxes:  # the batch exercises both branches (images with and without boxes)
        assert cw.fallback.any() and (~cw.fallback).any()


def test_windows_centre_fallback_and_ties(lib):
    """Extreme aspect ratios force torchvision's centre fallback; num_tries=1 makes it frequent."""
    n = 3000
    rng = np.random.default_rng(3)
    sizes = np.stack([rng.integers(1, 40, n), rng.integers(200, 2000, n)], 1)
    sizes[::2] = sizes[::2, ::-1]
    offsets = np.zeros(n + 1, np.int64)
    cfg = CropConfig(mode="scene-scene", num_tries=1, scale=(0.9, 1.0))
    cw = sample_windows(sizes, np.zeros((0, 4), np.float32), offsets, np.arange(n), 1, 2, cfg)
    got = host_windows(lib, sizes, np.zeros((0, 4), np.float32), offsets, np.arange(n), 1, 2, cfg)
    np.testing.assert_array_equal(got["windows"], cw.windows)
    full = (cw.windows[:, 0, 2] - cw.windows[:, 0, 0] == sizes[:, 0])
    assert full.any() and (~full).any()


def test_windows_one_sample_alone(lib):
    """Counter-based: sample i's windows do not depend on its batch."""
    sizes, boxes, offsets, index = random_batch(64, seed=5)
    cfg = CropConfig(mode="obj-obj-shift", box_scale=(0.3, 1.0))
    full = host_windows(lib, sizes, boxes, offsets, index, 9, 1, cfg)["windows"]
    i = 17
    b = boxes[offsets[i]:offsets[i + 1]]
    one = host_windows(lib, sizes[i:i + 1], b, np.array([0, len(b)]), index[i:i + 1], 9, 1, cfg)["windows"]
    np.testing.assert_array_equal(one[0], full[i])


def _images(n_real: int = 4):
    """A few real COCO photos (when ../shared is there) plus synthetic odd sizes (upsampling, 1x1)."""
    rng = np.random.default_rng(0)
    ims = []
    files = sorted(glob.glob(str(COCO_IMAGES / "*.jpg")))[:n_real]
    if files:
        import cv2
        ims += [cv2.cvtColor(cv2.imread(f), cv2.COLOR_BGR2RGB) for f in files]
    else:
        yy, xx = np.mgrid[0:300, 0:420]
        ims += [np.stack([(xx * 0.6) % 256, (yy * 0.8) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)]
        ims += [rng.integers(0, 256, (333, 501, 3), dtype=np.uint8)]
    ims += [rng.integers(0, 256, (45, 31, 3), dtype=np.uint8), rng.integers(0, 256, (1, 1, 3), dtype=np.uint8),
            rng.integers(0, 256, (7, 900, 3), dtype=np.uint8)]
    return ims


@pytest.mark.parametrize("mode,size", [("scene-scene", 224), ("obj-scene", 40), ("obj-obj", 96),
                                       ("obj-obj-dilate", 224), ("obj-obj-shift", 64)])
def test_crop_matches_reference(lib, mode, size):
    """Fused kernel (g++ build) == NumPy reference within 1/255 per pixel; windows equal; normalisation."""
    ims = _images()
    boxes, offsets = boxes_for(len(ims))
    cfg = CropConfig(mode=mode, box_scale=(0.3, 1.0), min_box_size=32)
    index = np.arange(100, 100 + len(ims))
    r0, r1, cw = reference.crop_views_reference(ims, boxes, offsets, index, 4, 2, cfg, size)
    got = host_crop_views(lib, ims, boxes, offsets, index, 4, 2, cfg, size)
    np.testing.assert_array_equal(got["windows"], cw.windows)
    np.testing.assert_array_equal(got["flip"], cw.flip)
    for g, r in ((got["view0"], r0), (got["view1"], r1)):
        d = np.abs(g.astype(np.float64) - r)
        assert d.max() <= 1.0, d.max()          # the contract: 1/255 of the pixel range
        assert d.mean() < 1e-3, d.mean()        # in fact float32 rounding only
    # normalised output: same within (1/255) / std
    m0, m1, _ = reference.crop_views_reference(ims, boxes, offsets, index, 4, 2, cfg, size,
                                               IMAGENET_MEAN_PX, IMAGENET_STD_PX)
    got = host_crop_views(lib, ims, boxes, offsets, index, 4, 2, cfg, size, IMAGENET_MEAN_PX, IMAGENET_STD_PX)
    tol = (1.0 / IMAGENET_STD_PX)[None, :, None, None]
    assert (np.abs(got["view0"] - m0) <= tol).all() and (np.abs(got["view1"] - m1) <= tol).all()


def test_apply_u8_matches_reference(lib):
    """Given-windows uint8 kernel (the DALI stage) == reference rounded: at most half a level apart."""
    ims = _images(2)
    boxes, offsets = boxes_for(len(ims), 1)
    cfg = CropConfig(mode="obj-obj-dilate", box_scale=(0.3, 1.0))
    r0, r1, cw = reference.crop_views_reference(ims, boxes, offsets, np.arange(len(ims)), 0, 0, cfg, 80)
    u0, u1 = host_apply_u8(lib, ims, cw.windows, cw.flip, 80)
    for u, r in ((u0, r0), (u1, r1)):
        assert np.abs(u.transpose(0, 3, 1, 2).astype(np.float64) - r).max() <= 0.5 + 1e-3


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return load_emulator(tmp_path_factory.mktemp("oc_emu"))


@pytest.mark.parametrize("size,dtype", [(224, "float32"), (37, "float32"), (1, "float32"), (64, "float16"),
                                        (50, "bfloat16")])
def test_cuda_kernels_emulated_match_reference(lib, emu, size, dtype):
    """The CUDA kernels of objcrop_kernel.cu themselves (serial CPU emulation of the grid cupy_backend
    launches): windows == windows.py, pixels == reference within 1/255, half outputs == the core's rounding."""
    ims = _images(3)
    boxes, offsets = boxes_for(len(ims), 7)
    index = np.arange(len(ims)) + 40
    mean, std = IMAGENET_MEAN_PX, IMAGENET_STD_PX
    for mode in ("obj-obj-dilate", "obj-obj-shift", "scene-scene"):
        cfg = CropConfig(mode=mode, box_scale=(0.3, 1.0), min_box_size=40)
        r0, r1, cw = reference.crop_views_reference(ims, boxes, offsets, index, 6, 1, cfg, size, mean, std)
        got = emulate_crop_views(emu, ims, boxes, offsets, index, 6, 1, cfg, size, mean, std, dtype)
        np.testing.assert_array_equal(got["windows"], cw.windows)
        np.testing.assert_array_equal(got["flip"], cw.flip)
        if dtype == "float32":
            tol = (1.0 / std)[None, :, None, None]
            assert (np.abs(got["view0"] - r0) <= tol).all() and (np.abs(got["view1"] - r1) <= tol).all()
        else:
            f32 = emulate_crop_views(emu, ims, boxes, offsets, index, 6, 1, cfg, size, mean, std, "float32")
            conv = host_to_f16_bits if dtype == "float16" else host_to_bf16_bits
            for v in ("view0", "view1"):
                np.testing.assert_array_equal(got[v].view(np.uint16), conv(lib, f32[v]))
    u0, u1 = emulate_apply(emu, ims, cw.windows, cw.flip, size, "uint8")
    h0, h1 = host_apply_u8(lib, ims, cw.windows, cw.flip, size)
    np.testing.assert_array_equal(u0, h0)
    np.testing.assert_array_equal(u1, h1)
    f0, f1 = emulate_apply(emu, ims, cw.windows, cw.flip, size, "float32")   # the loader's stage
    p0, p1, _ = reference.crop_views_reference(ims, boxes, offsets, index, 6, 1, cfg, size)
    assert np.abs(f0.transpose(0, 3, 1, 2) - p0).max() <= 1e-2
    assert np.abs(f1.transpose(0, 3, 1, 2) - p1).max() <= 1e-2


def test_cuda_windows_kernel_emulated(emu):
    """The objcrop_windows kernel (emulated grid of 128-thread blocks) == windows.py on 5,000 samples."""
    sizes, boxes, offsets, index = random_batch(5000, seed=11)
    cfg = CropConfig(mode="obj-obj-shift", box_scale=(0.4, 1.0))
    cw = sample_windows(sizes, boxes, offsets, index, 2, 9, cfg)
    got = emulate_windows(emu, sizes, boxes, offsets, index, 2, 9, cfg)
    for k, ref in (("windows", cw.windows), ("regions", cw.regions), ("flip", cw.flip), ("box_index", cw.box_index),
                   ("fallback", cw.fallback), ("shift", cw.extras["shift"])):
        np.testing.assert_array_equal(got[k], ref, err_msg=k)


def test_reference_is_crop_then_pil_bilinear():
    """Semantics: the reference equals PIL's antialiased BILINEAR resize of the cropped window (torchvision's
    RandomResizedCrop on PIL images) within one level, shrinking and enlarging."""
    from PIL import Image
    im = _images(1)[0]
    h, w = im.shape[:2]
    for win, size, flip in (((0, 0, w, h), 64, False), ((10, 20, min(w, 410), min(h, 380)), 224, True),
                            ((5, 7, 45, 37), 224, False), ((3, 3, 200, 160), 150, False)):
        ours = reference.resample_window(im, win, flip, size).transpose(1, 2, 0)
        crop = Image.fromarray(im[win[1]:win[3], win[0]:win[2]])
        pil = np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.float64)
        if flip:
            pil = pil[:, ::-1]
        assert np.abs(ours - pil).max() <= 1.01, (win, size, np.abs(ours - pil).max())


def test_reference_flip_and_weights():
    """Weights rows sum to 1; a flip mirrors the output columns exactly; identity when window == size."""
    wx = reference.axis_weights(10, 330, 224)
    np.testing.assert_allclose(wx.sum(1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(reference.axis_weights(10, 330, 224, flip=True), wx[::-1])
    im = _images(1)[0]
    a = reference.resample_window(im, (4, 6, 68, 70), False, 64)
    np.testing.assert_allclose(a, im[6:70, 4:68].transpose(2, 0, 1), atol=1e-9)
    b = reference.resample_window(im, (4, 6, 68, 70), True, 64)
    np.testing.assert_allclose(b, a[:, :, ::-1], atol=1e-9)
    with pytest.raises(ValueError, match="not inside"):
        reference.resample_window(im, (0, 0, 10**5, 10), False, 8)


def test_fp16_bf16_conversions(lib):
    """The kernel's float32 -> fp16 / bf16 conversions round to nearest even like NumPy and torch."""
    import torch
    rng = np.random.default_rng(2)
    x = np.concatenate([
        rng.normal(0, 3, 20000), rng.normal(0, 1e-5, 5000), rng.uniform(-70000, 70000, 5000),
        [0.0, -0.0, 65504, 65519.99, 65520, 1e9, -1e9, np.inf, -np.inf, 2**-24, 2**-25, 1.5 * 2**-25, 2**-26,
         6.1e-5, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8],
    ]).astype(np.float32)
    # random bit patterns cover every exponent (NaN excluded: payloads may differ)
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([x, bits[~np.isnan(bits)]])
    with np.errstate(over="ignore"):
        ref_f16 = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(host_to_f16_bits(lib, x), ref_f16)
    ref_bf16 = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(host_to_bf16_bits(lib, x), ref_bf16)
    nan = np.array([np.nan], np.float32)
    assert np.isnan(np.uint16(host_to_f16_bits(lib, nan)[0]).view(np.float16))
    assert host_to_bf16_bits(lib, nan)[0] & 0x7F80 == 0x7F80 and host_to_bf16_bits(lib, nan)[0] & 0x7F


def test_params_layout_matches_header():
    """kernel_params' order equals the OC_P_* macros of objcrop_core.h; kinds equal OC_KIND_*."""
    text = (common.csrc_dir() / common.CORE_FILE).read_text()
    for i, name in enumerate(common.PARAM_NAMES):
        assert f"#define OC_P_{name.upper()} {i}\n" in text, name
    assert f"#define OC_NUM_PARAMS {len(common.PARAM_NAMES)}\n" in text
    for kind, code in common.KIND_CODES.items():
        assert f"#define OC_KIND_{kind.upper()} {code}\n" in text
    from dali_objcrop.kernels import cupy_backend
    cu = (common.csrc_dir() / common.KERNEL_FILE).read_text()
    assert f"#define OC_PIX_PER_THREAD {cupy_backend._PIX_PER_THREAD}\n" in cu   # grid size = kernel's stride
    assert f"__launch_bounds__({cupy_backend._BLOCK})" in cu
    p = common.kernel_params(CropConfig(mode="obj-obj", dilate=0.3))
    assert p[common.PARAM_NAMES.index("dilate")] == 0.0      # obj-obj is dilate 0
    assert p[common.PARAM_NAMES.index("box_lo")] == 1.0      # box_scale None -> (1, 1), as windows.py


def test_input_validation():
    with pytest.raises(ValueError, match="sizes must be"):
        common.check_batch_arrays(np.ones((3, 2)), np.zeros((0, 4)), np.zeros(3), np.arange(3))
    with pytest.raises(ValueError, match="offsets must rise"):
        common.check_batch_arrays(np.ones((2, 2)), np.zeros((1, 4)), [0, 2, 1], np.arange(2))
    with pytest.raises(ValueError, match="non-negative"):
        common.check_batch_arrays(np.ones((1, 2)), np.zeros((0, 4)), [0, 0], [-1])
    with pytest.raises(ValueError, match="std must be positive"):
        common.norm_params(0.0, [1, 0, 1])


def test_kernel_source_is_self_contained():
    """The NVRTC source has the header inlined (no local include left, so no include path needed)."""
    src = common.kernel_source()
    assert '#include "' not in src and "oc_sample_windows" in src and "objcrop_crop_bf16" in src


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch,kind", [("sm_80", "ptx"), ("sm_90", "cubin")])
def test_nvcc_compiles(tmp_path, arch, kind):
    """nvcc compiles csrc/*.cu for the GPUs we target (catches kernel compile errors without a GPU)."""
    for cu in sorted(common.csrc_dir().glob("*.cu")):
        out = tmp_path / f"{cu.stem}.{kind}"
        res = subprocess.run(["nvcc", f"-arch={arch}", f"-{kind}", "-Werror", "all-warnings", str(cu), "-o", str(out)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert out.stat().st_size > 1000
        if kind == "ptx":
            text = out.read_text()
            for name in ("objcrop_windows", "objcrop_crop_f32", "objcrop_crop_f16", "objcrop_crop_bf16",
                         "objcrop_apply_u8", "objcrop_apply_f32"):
                assert f".entry {name}(" in text


def _find_nvrtc() -> str | None:
    cands = [Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
             / "nvidia" / sub / "lib" for sub in ("cu13", "cuda_nvrtc", "cu12")]
    cands += [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "lib64"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(Path(os.path.realpath(nvcc)).parents[1] / "lib64")
    for d in cands:
        for f in sorted(d.glob("libnvrtc.so*")) if d.is_dir() else []:
            if "alt" not in f.name and "builtins" not in f.name:
                return str(f)
    return None


@pytest.mark.skipif(_find_nvrtc() is None, reason="libnvrtc not found")
def test_nvrtc_compiles_cupy_source():
    """The exact string cupy.RawModule compiles (header inlined, no standard headers) passes NVRTC."""
    path = Path(_find_nvrtc())
    for builtins in sorted(path.parent.glob("libnvrtc-builtins.so*")):  # NVRTC dlopens it by name
        if "alt" not in builtins.name:
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            break
    nvrtc = ctypes.CDLL(str(path))
    prog = ctypes.c_void_p()
    src = common.kernel_source().encode()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, b"objcrop_kernel.cu", 0, None, None) == 0
    opts = [b"--gpu-architecture=compute_80", b"--std=c++17"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode(errors="replace")
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


def test_cupy_backend_without_gpu_is_clear():
    """Without CuPy or a GPU, the cupy backend fails early with a message saying what is missing."""
    from dali_objcrop.kernels import cupy_backend
    if cupy_backend.gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CuPy|GPU"):
        cupy_backend.crop_views([], None, np.zeros((0, 4)), [0], [], 0, 0, CropConfig())


def test_kernel_bench_smoke(tmp_path):
    """benchmarks/kernel_bench.py runs end to end (tiny batch): CPU rows measured, GPU rows skipped or run,
    the DALI-ops graphs exercised on the CPU; gpu_run.sh parses."""
    import json

    import benchmark_module
    repo = Path(__file__).resolve().parents[2]
    kb = benchmark_module.load("kernel_bench")
    out = tmp_path / "kb.json"
    assert kb.main(["--batch", "6", "--size", "32", "--seconds", "0.1", "--warmup", "1", "--threads", "1",
                    "--dali-cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    by = {(r["backend"], r["decode_included"], r.get("dtype")): r for r in rows}
    assert by[("numpy-windows", False, None)]["status"] == "ok"
    assert all(r["status"] in ("ok", "skipped") for r in rows), [r for r in rows if r["status"] == "error"]
    try:
        import nvidia.dali  # noqa: F401
        assert by[("dali-ops", True, "float32")]["status"] == "ok"
    except ImportError:
        pass
    assert subprocess.run(["bash", "-n", str(repo / "benchmarks" / "gpu_run.sh")]).returncode == 0


def test_installed_package_ships_csrc(tmp_path):
    """setup.py's build_py copies csrc/ into dali_objcrop/kernels/csrc, and an installed copy finds it there."""
    repo = Path(__file__).resolve().parents[2]
    lib = tmp_path / "lib"
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=repo,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    shipped = lib / "dali_objcrop" / "kernels" / "csrc"
    for name in (common.KERNEL_FILE, common.CORE_FILE):
        assert (shipped / name).read_bytes() == (repo / "csrc" / name).read_bytes()
    for name in ("objcrop_host.cpp", "objcrop_emulate.cpp"):   # the CPU test harness stays in tests/helpers/csrc
        assert not list(lib.rglob(name))
    code = "from dali_objcrop.kernels import common; print(common.csrc_dir()); print(len(common.kernel_source()))"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(lib)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == str(shipped)
