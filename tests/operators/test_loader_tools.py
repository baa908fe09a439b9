"""Smoke tests of the loader's tools: ``dali-objcrop demo`` and ``benchmarks/throughput.py``."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

import benchmark_module

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_every_mode_and_draws_both_views(tmp_path, monkeypatch, capsys):
    """The demo's claims: every requested mode ran its epochs, and the grid shows, per row, the image and
    both views, framed in their colours, where its JSON record says they are."""
    import numpy as np
    from dali_objcrop.cli import main
    from dali_objcrop.visualize import WINDOW_RGB
    monkeypatch.setenv("DALI_OBJCROP_HOME", str(tmp_path / "home"))
    out = tmp_path / "grid.png"
    modes = ["scene-scene", "obj-obj-dilate", "obj-obj-shift"]
    rc = main(["demo", "--set-size", "24", "--images", "12", "--batch-size", "4", "--device", "cpu",
               "--modes", ",".join(modes), "--rows", "2", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "ms per image pair" in text and "images/s" not in text  # no noisy per-mode rates
    from dali_objcrop import plugin
    if plugin.load():   # which pipeline ran and why, said once
        assert text.count("pipeline: plugin:crop-op (the C++ operators are loaded; views by fn.objcrop.crop)") == 1
    assert list((tmp_path / "home").rglob("gt.boxes")), "the demo saves the GT box store beside the set"
    rec = json.loads(out.with_suffix(".json").read_text())
    assert [m["mode"] for m in rec["modes"]] == modes
    for m in rec["modes"]:  # a warm-up epoch and a timed epoch of all 12 images, 3 batches of 4
        assert m["images_warmup"] == 12 and m["images_timed"] == 12 and m["batches_timed"] == 3, m
        assert m["device"] == "cpu" and m["cpu_s"] > 0 and m["skipped"] == 0
        assert m["pipeline"] and m["pipeline_reason"]
    assert rec["cpu_ms_per_image_all_modes"] > 0
    img = cv2.imread(str(out))  # BGR
    assert img.shape[:2] == (rec["grid"]["height"], rec["grid"]["width"])
    rows = rec["grid"]["rows"]
    assert [r["mode"] for r in rows] == [m for m in modes for _ in range(2)]
    for r in rows:
        assert [p["name"] for p in r["panels"]] == ["image", "view1", "view2"]
        pics = {}
        for p in r["panels"]:
            pic = img[p["y"]:p["y"] + p["h"], p["x"]:p["x"] + p["w"]].astype(np.float32)
            assert pic.shape[:2] == (p["h"], p["w"]) and p["h"] == 192
            assert pic[4:-4, 4:-4].std() > 3, f"{r['key']} {p['name']}: a blank panel"
            pics[p["name"]] = pic[4:-4, 4:-4]
            if p["name"] != "image":  # each view framed (3 px) in its window colour
                bgr = np.array(WINDOW_RGB[int(p["name"][-1]) - 1][::-1], np.float32)
                frame = np.concatenate([pic[0], pic[-1], pic[:, 0], pic[:, -1]])
                assert np.abs(frame - bgr).max(axis=1).mean() < 30, f"{r['key']} {p['name']}: frame colour"
        # two views, not one view twice (independent windows and augmentation draws)
        assert np.abs(pics["view1"] - pics["view2"]).mean() > 2, f"{r['key']}: the views are identical"


@pytest.mark.slow
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
        # the row's rate is the median of its two rounds, min and max are theirs
        assert len(r["rounds"]) == 2 and min(r["rounds"]) > 0
        assert r["images_per_s"] == pytest.approx(statistics.median(r["rounds"]), abs=0.011)
        assert (r["images_per_s_min"], r["images_per_s_max"]) == (min(r["rounds"]), max(r["rounds"]))
        assert r["cpu_ms_per_image"] == pytest.approx(statistics.median(r["cpu_ms_per_image_rounds"]), abs=0.0011)
        # images/s x CPU s per image is the CPU time the loader used per wall second of the round: more than
        # the machine's cores means a clock or a count is wrong (wall and CPU time mixed up, ms taken for s)
        for ips, ms in zip(r["rounds"], r["cpu_ms_per_image_rounds"]):
            assert 0 < ips * ms / 1000 <= os.cpu_count() * 1.1, (ips, ms)
    assert "cpu/dali/obj-obj-dilate / scene-scene" in out["ratios"]
    assert "cpu: cpu/dali/obj-obj-dilate / torchvision" in out["ratios"]
    assert "cpu/dali/obj-obj-dilate / torchvision" in out["ratios_paired"]
    assert out["machine"]["cpu_count"] >= 1
    assert cv2.imread(str(png)) is not None


def test_throughput_rejects_unknown_mode():
    throughput = benchmark_module.load("throughput")
    with pytest.raises(SystemExit):
        throughput.parse_args(["--modes", "obj-everything"])



def test_demo_draws_local_windows_where_its_record_says(tmp_path, monkeypatch):
    """--local-crops: the image panel carries each local window's outline in its local colour, where the
    JSON record's windows put it (scaled to the panel); the same pixels do not without local views, and the
    rest of the row is the two-view one."""
    import numpy as np
    from dali_objcrop.cli import main
    from dali_objcrop.visualize import LOCAL_RGB
    monkeypatch.setenv("DALI_OBJCROP_HOME", str(tmp_path / "home"))
    common = ["demo", "--set-size", "24", "--images", "8", "--batch-size", "4", "--device", "cpu",
              "--modes", "obj-obj-dilate", "--rows", "2"]
    assert main(common + ["--out", str(tmp_path / "plain.png")]) == 0
    assert main(common + ["--out", str(tmp_path / "local.png"), "--local-crops", "3", "--local-from", "boxes"]) == 0
    rec = json.loads((tmp_path / "local.json").read_text())
    plain_rec = json.loads((tmp_path / "plain.json").read_text())
    info = rec["modes"][0]["local"]
    assert (info["crops"], info["from"]) == (3, "boxes") and "local" not in plain_rec["modes"][0]
    heights = {i["file_name"]: i["height"] for i in json.loads(Path(rec["set"]).read_text())["images"]}
    local = cv2.imread(str(tmp_path / "local.png"))[..., ::-1]   # RGB
    plain = cv2.imread(str(tmp_path / "plain.png"))[..., ::-1]
    for row, plain_row in zip(rec["grid"]["rows"], plain_rec["grid"]["rows"]):
        assert row["key"] == plain_row["key"] and "local_windows" not in plain_row
        assert len(row["local_windows"]) == 3
        # thumbnails only where the loader's batches carry the local views
        assert [p["name"] for p in row["panels"]] == ["image", "view1", "view2"] + (["local"] if info["thumbnails"]
                                                                                      else [])
        assert row["panels"][:3] == plain_row["panels"]
        img = row["panels"][0]
        k = img["h"] / heights[row["key"]]

        def outline(r, pad=0):
            """Panel pixels (ys, xs) on rectangle r's outline, as _rect scales it, grown by pad."""
            x1, y1 = int(round(r[0] * k)), int(round(r[1] * k))
            x2, y2 = int(round(r[2] * k)) - 1, int(round(r[3] * k)) - 1
            yy, xx = np.mgrid[y1 - pad:y2 + pad + 1, x1 - pad:x2 + pad + 1]
            edge = (np.minimum(np.abs(yy - y1), np.abs(yy - y2)) <= pad) | (np.minimum(np.abs(xx - x1),
                                                                                       np.abs(xx - x2)) <= pad)
            edge &= (yy >= 0) & (yy < img["h"]) & (xx >= 0) & (xx < img["w"])
            return yy[edge], xx[edge]

        hidden = np.zeros((img["h"], img["w"]), bool)   # under the thick global windows, drawn on top
        for w in row["windows"]:
            hidden[outline(w, 3)] = True
        for j, win in enumerate(row["local_windows"]):
            ys, xs = outline(win)
            seen = ~hidden[ys, xs]
            assert seen.sum() >= 20, (row["key"], j)
            ys, xs = ys[seen] + img["y"], xs[seen] + img["x"]
            on = (np.abs(local[ys, xs].astype(int) - LOCAL_RGB[j]) <= 30).all(-1).mean()
            off = (np.abs(plain[ys, xs].astype(int) - LOCAL_RGB[j]) <= 30).all(-1).mean()
            assert on > 0.6 and off < 0.2, (row["key"], j, on, off)
