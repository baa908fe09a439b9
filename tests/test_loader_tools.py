"""Smoke tests of the loader's tools: ``dali-objcrop demo`` and ``benchmarks/throughput.py``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

import benchmark_module

REPO = Path(__file__).resolve().parents[1]


def test_demo_builds_set_boxes_rates_and_grid(tmp_path, monkeypatch, capsys):
    from dali_objcrop.cli import main
    monkeypatch.setenv("DALI_OBJCROP_HOME", str(tmp_path / "home"))
    out = tmp_path / "grid.png"
    rc = main(["demo", "--set-size", "24", "--images", "12", "--batch-size", "4", "--device", "cpu",
               "--modes", "scene-scene,obj-obj-dilate", "--rows", "1", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "scene-scene" in text and "obj-obj-dilate" in text and "images/s" in text
    assert list((tmp_path / "home").rglob("gt.boxes")), "the demo saves the GT box store beside the set"
    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] > 150 and img.shape[1] > 300


def test_throughput_writes_rows_and_chart(tmp_path, synth_set):
    js, png = tmp_path / "t.json", tmp_path / "t.png"
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--coco", str(synth_set),
           "--modes", "scene-scene,obj-obj-dilate", "--devices", "cpu", "--backends", "dali",
           "--batch-size", "4", "--threads", "1", "--seconds", "0.3", "--reps", "2", "--warmup", "1",
           "--max-images", "16", "--json", str(js), "--png", str(png)]
    subprocess.run(cmd, check=True, cwd=REPO, timeout=300, capture_output=True)
    out = json.loads(js.read_text())
    rows = out["results"]
    assert [(r["loader"], r["mode"]) for r in rows] == [("dali", "scene-scene"), ("dali", "obj-obj-dilate"),
                                                      ("torchvision", "scene-scene")]
    for r in rows:
        assert set(r) >= {"loader", "mode", "backend", "device", "batch_size", "threads", "images_per_s"}
        assert r["device"] == "cpu" and r["batch_size"] == 4 and r["threads"] == 1
        assert r["images_per_s"] > 0 and len(r["rounds"]) == 2
        assert r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]
        assert r["cpu_ms_per_image"] > 0 and len(r["cpu_ms_per_image_rounds"]) == 2
    assert "cpu/dali/obj-obj-dilate / scene-scene" in out["ratios"]
    assert "cpu: cpu/dali/obj-obj-dilate / torchvision" in out["ratios"]
    assert "cpu/dali/obj-obj-dilate / torchvision" in out["ratios_paired"]
    assert out["machine"]["cpu_count"] >= 1
    assert cv2.imread(str(png)) is not None


def test_throughput_rejects_unknown_mode():
    throughput = benchmark_module.load("throughput")
    with pytest.raises(SystemExit):
        throughput.parse_args(["--modes", "obj-everything"])
