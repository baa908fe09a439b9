"""fn.objcrop.crop's GPU path: the DALI-free kernel check, the launch limits, the blur cap, the first-use
self-test with its fallback, and the CUDA build's targets and cache key.

On the CPU the kernel check's cases run with the kernels emulated (csrc/check/run.sh --emulate); on a GPU
(marker ``gpu``) the same cases run on the real kernels with the operator's launch code, under
compute-sanitizer's memcheck and racecheck where it is installed.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "csrc" / "check" / "run.sh"


def _gpu_present() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _run_check(tmp_path: Path, *args: str, timeout: int = 600) -> dict:
    res = subprocess.run(["bash", str(RUN), "--out", str(tmp_path), *args], capture_output=True, text=True,
                         timeout=timeout)
    print(res.stdout[-4000:], res.stderr[-2000:])
    assert (tmp_path / "crop_check.json").is_file(), res.stderr[-2000:]
    data = json.loads((tmp_path / "crop_check.json").read_text())
    assert res.returncode == 0, (res.returncode, [c for c in data["cases"] if not c["ok"]], res.stdout[-2000:])
    return data


# ---- the kernel check -------------------------------------------------------------------------------
@pytest.mark.slow
def test_kernel_check_emulated_every_case(tmp_path):
    """Every case of the kernel check (odd shapes, 1x1 / whole / enlarging windows, every dtype, sizes 1 to
    4096, blur windows wider than the view, a batch at the grid limit, a 4000x3000 photo, a batch of 256 at
    224; local views: 2x224 + 6x96, odd sides, a local side above the global one, 16 local views, blur on
    local views only, 1-px local views) with the kernels emulated on the operator's launch plan: bit-identical
    to the CPU operator; the over-limit batches refused by name."""
    data = _run_check(tmp_path, "--emulate")
    names = {c["case"] for c in data["cases"]}
    assert {"odd_shapes", "special_windows", "dtype_float16", "dtype_bfloat16", "size_1", "size_4096_largest",
            "blur_wider_than_output", "batch_grid_limit", "photo_4000x3000_to_224", "batch_256_at_224",
            "refuse_size_over_limit", "refuse_batch_over_limit", "local_2x224_6x96", "local_odd_sizes",
            "local_larger_than_global", "local_16_views", "local_only_local_blur", "local_size_1",
            "local_batch_64_at_224_96", "refuse_local_size_over_limit"} <= names
    local = [c for c in data["cases"] if c["case"].startswith("local_")]
    assert {(c["local_views"], c["local_size"]) for c in local} >= {(6, 96), (16, 32), (4, 57)}
    for c in data["cases"]:
        if c["case"].startswith("refuse_"):
            assert "refused as it must be" in c["note"], c
        else:
            assert c["exact_fraction"] == 1.0 and c["max_diff_levels"] == 0, c


def test_kernel_check_fails_on_a_planted_launch_bug(tmp_path):
    """The check can fail: a plan whose blur grid is one block short leaves values unwritten."""
    src = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", src)
    plan = src / "dali" / "objcrop_crop_plan.h"
    text = plan.read_text()
    needle = "OcLaunch{{static_cast<unsigned>(blocks), 1u, 1u}"
    assert needle in text
    plan.write_text(text.replace(needle, "OcLaunch{{static_cast<unsigned>(blocks > 0 ? blocks - 1 : 0), 1u, 1u}"))
    res = subprocess.run(["bash", str(src / "check" / "run.sh"), "--emulate", "--cases", "blur_wider_than_output",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout
    assert "FAIL" in res.stdout


# a local view's own side ignored by the launch (the global side used instead): the rows past the global
# side, or the column-blur blocks past the global side's count, are never computed
LOCAL_SIZE_BUGS = {
    "rows_grid": ("static_cast<unsigned>(p.max_size), static_cast<unsigned>(p.views)",
                  "static_cast<unsigned>(p.size), static_cast<unsigned>(p.views)"),
    "blur_blocks": ("blocks += oc_blur_chunks(q.size);", "blocks += oc_blur_chunks(p.size);"),
}


@pytest.mark.parametrize("bug", sorted(LOCAL_SIZE_BUGS))
def test_kernel_check_fails_when_a_local_views_size_is_ignored(tmp_path, bug):
    """The local cases can fail: a plan that launches local views (larger than the global ones) at the global
    side leaves their pixels unwritten or unblurred; the two-view cases do not notice."""
    src = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", src)
    plan = src / "dali" / "objcrop_crop_plan.h"
    text = plan.read_text()
    needle, planted = LOCAL_SIZE_BUGS[bug]
    assert text.count(needle) == 1
    plan.write_text(text.replace(needle, planted))
    res = subprocess.run(["bash", str(src / "check" / "run.sh"), "--emulate", "--cases",
                          "local_larger_than_global,size_7", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout
    cases = {c["case"]: c for c in json.loads((tmp_path / "out" / "crop_check.json").read_text())["cases"]}
    assert not cases["local_larger_than_global"]["ok"] and cases["size_7"]["ok"], res.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernel_check_gpu_driver_compiles_with_nvcc(tmp_path):
    """The GPU driver (the operator's kernels + launch code, no DALI) compiles with nvcc for sm_75 and sm_90."""
    exe = tmp_path / "crop_check"
    for arch in ("sm_75", "sm_90"):
        res = subprocess.run(["nvcc", "-std=c++17", "-O2", "-fmad=false", f"-arch={arch}",
                              f"-I{REPO / 'csrc' / 'dali'}", f"-I{REPO / 'csrc' / 'check'}",
                              str(REPO / "csrc" / "check" / "crop_check.cpp"),
                              str(REPO / "csrc" / "check" / "crop_check_gpu.cu"), "-o", str(exe)],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_present(), reason="no CUDA GPU")
def test_kernel_check_on_the_gpu(tmp_path):
    """On a GPU: every case on the real kernels with the operator's launch plan and launch code equals the
    CPU operator (<= 1 level; bit-identical expected with -fmad=false); memcheck and racecheck find
    nothing on the small cases where compute-sanitizer is installed."""
    args = ["--sanitize"] if shutil.which("compute-sanitizer") else []
    data = _run_check(tmp_path, *args)
    assert data["backend"].startswith("gpu: ") and data["failed"] == 0
    for c in data["cases"]:
        if not c["case"].startswith("refuse_"):
            assert c["max_diff_levels"] <= 1.0, c


# ---- the blur cap and the closed-form reflection ----------------------------------------------------
def _cpu_crop(ims, win, flip, aug, size):
    """Both views from the CPU operator, unnormalised (mean 0, std 1)."""
    from crop_op_build import load_crop_op, run_cpu_crop
    load_crop_op()
    return run_cpu_crop(ims, win, flip, aug, size, num_threads=1)


def test_blur_window_far_wider_than_the_view_equals_numpy():
    """A 1023-tap blur (the cap) on a 9-px view: the closed-form reflect-101 folds many times, as NumPy's."""
    pytest.importorskip("nvidia.dali")
    from dali_objcrop.kernels import reference
    rng = np.random.default_rng(5)
    ims = [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)]
    win = np.array([[[3, 4, 30, 25], [0, 0, 40, 30]]], np.int32)
    flip = np.zeros((1, 2), np.uint8)
    aug = np.zeros((1, 2, 9), np.float32)
    aug[0, 0] = (0, 1, 1, 1, 0, 1, 170.0, 1023, 0)
    aug[0, 1] = (0, 1, 1, 1, 0, 1, 4.0, 25, 0)
    got = _cpu_crop(ims, win, flip, aug, 9)
    ref = reference.crop_augment_reference(ims, win, flip, aug, 9, (0, 0, 0), (1, 1, 1))
    for v in (0, 1):
        np.testing.assert_allclose(got[v], ref[v], atol=1e-3)


def test_blur_window_over_the_cap_is_refused_by_name():
    """A user-supplied aug row with a huge window is refused naming the column and the limit (it used to be
    accepted up to 10^6 taps: hours of work, int overflow in the reflection loop)."""
    pytest.importorskip("nvidia.dali")
    ims = [np.zeros((8, 8, 3), np.uint8)]
    win = np.array([[[0, 0, 8, 8], [0, 0, 8, 8]]], np.int32)
    aug = np.zeros((1, 2, 9), np.float32)
    aug[0, 0] = (0, 1, 1, 1, 0, 1, 1000.0, 6001, 0)
    with pytest.raises(RuntimeError, match=r"sample 0 view 0: invalid aug column 7 .*\[1, 1023\]"):
        _cpu_crop(ims, win, np.zeros((1, 2), np.uint8), aug, 4)


# ---- the first-use self-test ------------------------------------------------------------------------
@pytest.fixture
def fresh_selftest(monkeypatch, tmp_path):
    from dali_objcrop.plugin import selftest
    monkeypatch.setattr(selftest, "_verdicts", {})
    monkeypatch.setattr(selftest, "_warned", set())
    monkeypatch.setattr(selftest, "_gpu_name", lambda device_id: "Fake GPU 80GB")
    lib = tmp_path / "libdali_objcrop_ops.so"
    lib.write_bytes(b"")
    return selftest, lib


def test_selftest_failure_warns_once_caches_and_falls_back(monkeypatch, fresh_selftest):
    """A launch error in the self-test: one warning naming the cause, the verdict cached beside the library
    per GPU model (a second process does not test again), and crop_op_usable says no, with the reason."""
    selftest, lib = fresh_selftest
    calls = []

    def broken(device_id):
        calls.append(device_id)
        return False, "RuntimeError: CUDA error: no kernel image is available for execution on the device"

    monkeypatch.setattr(selftest, "run_selftest", broken)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert selftest.gpu_crop_verified(0, library=lib)[0] is False
        assert selftest.gpu_crop_verified(0, library=lib)[0] is False
    msgs = [str(x.message) for x in w if "self-test" in str(x.message)]
    assert len(msgs) == 1 and "no kernel image" in msgs[0] and "Fake GPU 80GB" in msgs[0], msgs
    assert calls == [0]
    cache = lib.parent / "gpu-selftest-Fake_GPU_80GB.json"
    assert json.loads(cache.read_text())["ok"] is False
    # a new process: the cached verdict, no second run
    monkeypatch.setattr(selftest, "_verdicts", {})
    assert selftest.gpu_crop_verified(0, library=lib)[0] is False and calls == [0]
    # the public switch the loaders use
    from dali_objcrop import plugin
    monkeypatch.setattr(plugin, "crop_op_registered", lambda device: True)
    monkeypatch.setattr(plugin, "_state", {"loaded": True, "error": None, "path": lib})
    ok, why = plugin.crop_op_usable("gpu", 0)
    assert not ok and why.startswith("GPU self-test failed: ") and "no kernel image" in why


def test_selftest_pass_is_cached_per_gpu_model(monkeypatch, fresh_selftest):
    selftest, lib = fresh_selftest
    monkeypatch.setattr(selftest, "run_selftest", lambda device_id: (True, ""))
    assert selftest.gpu_crop_verified(0, library=lib) == (True, "")
    monkeypatch.setattr(selftest, "_verdicts", {})
    monkeypatch.setattr(selftest, "_gpu_name", lambda device_id: "Other GPU")
    monkeypatch.setattr(selftest, "run_selftest", lambda device_id: (False, "boom"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert selftest.gpu_crop_verified(0, library=lib) == (False, "boom")   # another model: tested anew


def test_selftest_without_a_gpu_is_a_verdict_not_a_crash():
    """run_selftest on a machine without a GPU returns (False, why) instead of raising."""
    pytest.importorskip("nvidia.dali")
    if _gpu_present():
        pytest.skip("a GPU is present")
    from crop_op_build import load_crop_op
    from dali_objcrop.plugin import selftest
    load_crop_op()
    ok, why = selftest.run_selftest(0)
    assert ok is False and why


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_present(), reason="no CUDA GPU")
def test_selftest_passes_on_this_gpu():
    pytest.importorskip("nvidia.dali")
    from crop_op_build import load_crop_op
    from dali_objcrop import plugin
    from dali_objcrop.plugin import selftest
    load_crop_op()
    if not plugin.crop_op_registered("gpu"):
        pytest.skip("operators built without nvcc: no GPU backend")
    assert selftest.run_selftest(0) == (True, "")
    assert plugin.crop_op_usable("gpu", 0) == (True, "")


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_present(), reason="no CUDA GPU")
def test_gpu_limits_refused_when_the_pipeline_is_built():
    """size or local_size over 4096, or max_batch_size over 65535, fail at build, naming the limit, not at the
    first batch."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def
    from crop_op_build import load_crop_op
    from dali_objcrop import plugin
    load_crop_op()
    if not plugin.crop_op_registered("gpu"):
        pytest.skip("operators built without nvcc: no GPU backend")
    for batch, size, local_size, msg in ((2, 4097, 0, r"size must be in \[1, 4096\]"),
                                         (2, 8, 4097, r"local_size must be in \[1, 4096\]"),
                                         (65536, 8, 0, "at most 65535 samples")):
        @pipeline_def(batch_size=batch, num_threads=1, device_id=0)
        def pipe():
            im = fn.external_source(name="im", layout="HWC", device="gpu")
            w = fn.external_source(name="w")
            f = fn.external_source(name="f")
            a = fn.external_source(name="a")
            return tuple(fn.objcrop.crop(im, w, f, a, size=size, local_size=local_size, device="gpu"))

        with pytest.raises(RuntimeError, match=msg):
            pipe().build()


# ---- the CUDA build: targets and cache key ------------------------------------------------------------
def test_cuda_targets_from_turing_up_plus_ptx(monkeypatch):
    from dali_objcrop.plugin import build
    monkeypatch.setenv("DALI_OBJCROP_CUDA_ARCHS", "90, 75")
    assert build.cuda_archs() == [75, 90]
    flags = build.gencode_flags([75, 90])
    assert flags == ["-gencode=arch=compute_75,code=sm_75", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]
    monkeypatch.delenv("DALI_OBJCROP_CUDA_ARCHS")
    if build.nvcc():
        archs = build.cuda_archs()
        assert archs[0] == 75 and 90 in archs and all(a >= 75 for a in archs)


def test_cache_key_includes_the_compilers_versions(monkeypatch):
    """An in-place compiler upgrade (same path, new version) builds a fresh library."""
    pytest.importorskip("nvidia.dali")
    from dali_objcrop.plugin import build
    key1, _ = build.build_key(False)
    monkeypatch.setattr(build, "_tool_version", lambda path: "g++ (Debian 99.0) 99.0.0")
    key2, _ = build.build_key(False)
    assert key1 != key2
