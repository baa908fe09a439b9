"""The stage profile, exercised on the CPU (it cannot run its GPU part here): ``gpu_profile.py`` runs every
stage with tiny settings and writes its JSON and ratios.  The GPU run's plan is tests/system/test_gpu_run_plan.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dali_objcrop.plugin import build

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(build.cxx() is None or build.cuda_include_dir() is None,
                    reason="no C++ compiler or CUDA headers to build the operators")
def test_gpu_profile_runs_every_stage_on_cpu(synth_set, tmp_path):
    out = tmp_path / "profile.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_profile.py"), "--coco", str(synth_set),
                          "--device", "cpu", "--batch", "4", "--size", "32", "--threads", "1", "--seconds", "0.2",
                          "--warmup", "1", "--local-crops", "2", "--local-size", "16", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    d = json.loads(out.read_text())
    stages = [r["stage"] for r in d["results"]]
    assert stages == ["read", "decode", "decode-roi", "crop", "colour", "blur", "normalise", "fused-crop",
                      "loader-plugin", "loader-dali-ops", "loader-local"]
    # each stage counted images (images > 0) over at least its --seconds 0.2: its rate cannot exceed images / 0.2
    # (a rate over the wrong time, or of more images than were counted, fails here)
    assert all(r["images"] > 0 and 0 < r["images_per_s"] <= r["images"] / 0.2 + 0.01 for r in d["results"]), \
        d["results"]
    assert {"loader-plugin / decode", "decode-roi / decode", "loader-plugin / loader-dali-ops",
            "loader-local / loader-plugin"} <= set(d["ratios"])
    assert d["results"][-1]["local_crops"] == 2 and d["results"][-1]["pipeline"] == "plugin:crop-op"


@pytest.mark.skipif(build.cxx() is None or build.cuda_include_dir() is None,
                    reason="no C++ compiler or CUDA headers to build the operators")
def test_multicrop_cost_benchmark_runs(synth_set, tmp_path):
    """benchmarks/multicrop_cost.py with tiny settings: each mode's two-view loader and its local-view loaders,
    ratios against the right baseline, JSON and chart."""
    out = tmp_path / "mc.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "multicrop_cost.py"), "--coco", str(synth_set),
           "--images", str(Path(synth_set).parent / "images"), "--batch-size", "4", "--seconds", "0.3",
           "--reps", "1", "--warmup", "1", "--local-crops", "2", "--local-size", "16",
           "--pairs", "obj-obj-dilate:box,scene-scene:scene", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    d = json.loads(out.read_text())
    rows = {r["loader"]: r for r in d["results"]}
    assert list(rows) == ["obj-obj-dilate: 2 global", "obj-obj-dilate: 2 global + 2 local (box)",
                          "scene-scene: 2 global", "scene-scene: 2 global + 2 local (scene)"]
    for base, local in ((0, 1), (2, 3)):
        b, r = d["results"][base], d["results"][local]
        assert b["ratio_to_two_views"] == 1.0
        assert r["ratio_to_two_views"] == pytest.approx(r["cpu_ms_per_image"] / b["cpu_ms_per_image"], rel=0.01)
    assert d["pixel_ratio"] == pytest.approx((2 * 224 ** 2 + 2 * 16 ** 2) / (2 * 224 ** 2), abs=1e-3)
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.skipif(build.cxx() is None or build.cuda_include_dir() is None,
                    reason="no C++ compiler or CUDA headers to build the operators")
def test_user_pipeline_benchmark_runs(synth_set, tmp_path):
    """benchmarks/user_pipeline.py with tiny settings: a user's two pipelines and the loader, ratios, JSON."""
    out = tmp_path / "user.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "user_pipeline.py"), "--coco", str(synth_set),
           "--images", str(Path(synth_set).parent / "images"), "--batch-size", "4", "--seconds", "0.3",
           "--reps", "1", "--warmup", "1", "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert json.loads(res.stdout) == rec
    assert [r["pipeline"] for r in rec["results"]] == ["ObjCropLoader", "user:readers.coco", "user:readers.file"]
    assert all(r["cpu_ms_per_image"] > 0 for r in rec["results"]) and len(rec["ratios"]) == 2
    assert rec["settings"]["loader_pipeline"] == "plugin:crop-op"
