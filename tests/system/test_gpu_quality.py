"""benchmarks/gpu_quality.sh: the prepared GPU study, tested by its CPU dry run at toy scale.

The dry run is the GPU run's code with toy sizes (a few real COCO photos, one epoch, a tiny network, the CPU):
``prepare`` (downscale, json rewrite, BING via ``dali-objcrop proposals``), the data-wait phase
(``pretrain_speed.py``), the quality lanes (``pretrain_quality.py --only=... --seed=...``), random-init and
the summary, and the report (JSON, Markdown, PNG).  The GPU profile's own flag list is then checked by the
real ``pretrain_quality.py`` parser, so the GPU run cannot fail on a misspelt flag.

Needs the COCO subset in ../shared (as the other real-data tests); ``DALI_OBJCROP_TEST_COCO`` may point to
its ``instances.json`` elsewhere (e.g. from a worktree without ../shared beside it).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmark_module import load
from conftest import BING_MODELS, COCO_ANN

REPO = Path(__file__).resolve().parents[2]
gq = load("gpu_quality")


from conftest import SHARED_SKIP  # noqa: E402


def _coco() -> Path:
    env = os.environ.get("DALI_OBJCROP_TEST_COCO")
    path = Path(env) if env else COCO_ANN
    if not path.exists():
        pytest.skip(f"{SHARED_SKIP}: {path} not present (or set DALI_OBJCROP_TEST_COCO to the COCO subset's "
                    "instances.json)")
    return path


def test_profiles_differ_only_in_sizes_and_fit_the_budget():
    gpu, toy = gq.PROFILES["gpu"], gq.PROFILES["toy"]
    # the dry run passes exactly the flags the GPU run passes (values differ)
    assert set(gpu.quality) == set(toy.quality)
    assert set(gpu.speed) == set(toy.speed)
    # what the study asks of the GPU run
    assert not gpu.quality["arch"].startswith("resnet18-w") and gpu.quality["size"] >= 128
    assert gpu.device == "cuda" and gpu.loader_device == "gpu" and gpu.needs_gpu
    assert gpu.quality["head_hidden"] > 0 and len(gq.SETTINGS) == 4 and gq.SEEDS == (0, 1, 2)
    sp = gpu.speed
    assert (sp["arch"], sp["size"], sp["batch_size"]) == ("resnet50", 224, 128) and sp["prepare_ahead"] >= 1
    assert 128 * gpu.speed_reps >= (sp["steps"] + 2) * sp["batch_size"]  # one epoch covers every step
    # 15 min of device time: start (2 min) + DALI's 9 parts (3 min) + this run twice (+20 s transfer each)
    worst_run = gpu.total_s + 10.0  # killed processes get 5-10 s of grace past their deadline
    assert 120 + 180 + 2 * (worst_run + 20) <= 900
    assert gpu.speed_s + gpu.tail_s + 10 < gpu.total_s - 100  # the lanes keep >= 100 s


def test_scale_coco_scales_sizes_boxes_and_areas_per_axis():
    coco = {"categories": [{"id": 1, "name": "cat"}], "info": {},
            "images": [{"id": 7, "file_name": "a.jpg", "width": 640, "height": 427},
                       {"id": 3, "file_name": "b.jpg", "width": 100, "height": 50},
                       {"id": 9, "file_name": "c.jpg", "width": 10, "height": 10}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [64, 42.7, 320, 213.5],
                             "area": 1000.0, "iscrowd": 0, "segmentation": [[0, 0, 1, 1]]},
                            {"id": 2, "image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1}]}
    keep = [coco["images"][1], coco["images"][0]]            # order as given, image 9 left out
    out = gq.scale_coco(coco, keep, {7: (320, 214), 3: (50, 25)})
    assert [(im["id"], im["width"], im["height"]) for im in out["images"]] == [(3, 50, 25), (7, 320, 214)]
    (a,) = out["annotations"]
    sx, sy = 320 / 640, 214 / 427
    assert a["bbox"] == pytest.approx([64 * sx, 42.7 * sy, 320 * sx, 213.5 * sy], abs=1e-3)
    assert a["area"] == pytest.approx(1000 * sx * sy, abs=1e-3) and "segmentation" not in a
    assert out["categories"] == coco["categories"]
    assert coco["annotations"][0]["bbox"] == [64, 42.7, 320, 213.5]  # the source is left alone


def _alive(pid: int) -> bool:
    """``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_run_with_deadline_kills_the_whole_process_group(tmp_path):
    log = tmp_path / "log"
    rc, secs = gq.run_with_deadline(["bash", "-c", "echo hi"], 30, log)
    assert rc == 0 and "hi" in log.read_text()
    # a grandchild that would outlive its parent unless the whole group is killed: it writes its pid first
    pid_file = tmp_path / "grandchild.pid"
    cmd = ["bash", "-c", f"sleep 600 & echo $! > {pid_file}; wait"]
    rc, secs = gq.run_with_deadline(cmd, 2.0, log)
    assert rc is None and secs < 60        # neither bash nor its sleep was waited for
    assert pid_file.exists(), "bash did not start its child within the 2 s deadline"
    grandchild = int(pid_file.read_text())
    t0 = time.monotonic()                  # SIGTERM to the group: the sleep ends at once (allow 10 s)
    while time.monotonic() - t0 < 10 and _alive(grandchild):
        time.sleep(0.05)
    assert not _alive(grandchild), "the deadline killed the command but not its process group"
    assert "deadline" in log.read_text()
    assert gq.run_with_deadline(["true"], 0, log) == (None, 0.0)


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """prepare + dry-run (the GPU run's code at toy scale), outputs checked; a rerun reuses the work."""
    import cv2
    from dali_objcrop.boxstore import BoxStore
    coco_json = _coco()
    env = {**os.environ, "PYTHON": sys.executable}
    carry, work, out = tmp_path / "carry", tmp_path / "work", tmp_path / "out"
    prep = ["bash", str(REPO / "benchmarks" / "gpu_quality.sh"), "prepare", f"--coco={coco_json}", f"--out={carry}",
            f"--work={tmp_path / 'prep'}", "--max-images=36", "--speed-images=8"]
    if BING_MODELS.is_dir():
        prep.append(f"--bing-model-dir={BING_MODELS}")
    r = subprocess.run(prep, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # the carry folder: downscaled photos that match their rewritten json, BING store in the same order
    man = json.loads((carry / gq.MANIFEST).read_text())
    assert man["num_images"] == 36 and man["min_box_size"] == 112 and man["speed_images"] == 8
    src = json.loads(coco_json.read_text())
    small = json.loads((carry / "coco" / "annotations" / "instances.json").read_text())
    assert [im["file_name"] for im in small["images"]] == [im["file_name"] for im in src["images"][:36]]
    for im, orig in zip(small["images"][:5], src["images"]):
        a = cv2.imread(str(carry / "coco" / "images" / im["file_name"]))
        assert (a.shape[1], a.shape[0]) == (im["width"], im["height"]) == \
            (round(orig["width"] * 0.5), round(orig["height"] * 0.5))
    src_anns = {a["id"]: a for a in src["annotations"]}
    ids36 = {im["id"] for im in src["images"][:36]}
    assert len(small["annotations"]) == sum(a["image_id"] in ids36 for a in src["annotations"])
    for a in small["annotations"][:20]:
        assert np.allclose(a["bbox"], np.array(src_anns[a["id"]]["bbox"]) * 0.5, atol=0.6)
    store = BoxStore.load(carry / man["bing"]["store"])
    assert list(store.keys) == [im["file_name"] for im in small["images"]]
    assert store.sizes.tolist() == [[im["width"], im["height"]] for im in small["images"]]
    assert store.meta["method"].startswith("bing") and store.num_boxes > 0
    assert (carry / "speed" / "images" / src["images"][0]["file_name"]).read_bytes() == \
        (coco_json.parent.parent / "images" / src["images"][0]["file_name"]).read_bytes()  # full size, as is

    # the dry run
    dry = ["bash", str(REPO / "benchmarks" / "gpu_quality.sh"), "dry-run", f"--data={carry}", f"--work={work}",
           f"--out={out}"]
    r = subprocess.run(dry, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(gq.OUT_FILES)  # <= 8 files come back from $OUT
    res = json.loads((out / "gpu_quality.json").read_text())
    assert res["status"]["complete"] and res["status"]["random_init"] and res["status"]["speed"] == "ok"
    assert res["command"].startswith("bash benchmarks/gpu_quality.sh dry-run")
    q = res["quality"]
    cells = {(c["setting"], c["seed"]) for c in q["cells"]}
    assert cells == {(s, k) for s in list(gq.SETTINGS) + ["random-init"] for k in gq.SEEDS}
    for c in q["cells"]:
        assert all(0.0 <= c[m] <= 1.0 and math.isfinite(c[m]) for m in ("linear_map", "knn_map"))
        if c["setting"] != "random-init":
            assert c["pretrain"]["steps"] > 0 and c["mode"] == c["setting"].split("+")[0]
    assert q["budget"]["min_box_size"] == 112 and q["budget"]["arch"] == gq.PROFILES["toy"].quality["arch"]
    assert set(q["summary"]["per_setting"]) == set(gq.SETTINGS) | {"random-init"}
    for s in gq.SETTINGS[1:]:
        assert set(q["summary"]["paired_diff_to_scene-scene"][s]["linear_map"]["per_seed"]) == {"0", "1", "2"}
    assert set(q["split"]["train_keys"]).isdisjoint(q["split"]["test_keys"])
    assert q["boxes"]["bing"]["source"].startswith("BING store")  # the carried store, not a stand-in
    sp = res["speed"]["summary"]
    for feed in ("loader", "resident"):     # the summary is the mean of the feed's measured runs
        rates = [r["images_per_s"] for r in res["speed"]["runs"] if r["feed"] == feed]
        assert rates and min(rates) > 0 and sp[f"{feed}_images_per_s"] == pytest.approx(sum(rates) / len(rates))
    assert 0.0 <= sp["loader_data_wait_frac"] <= 1.0
    assert res["speed"]["config"]["prepare_ahead"] == 1
    md = (out / "gpu_quality.md").read_text()
    for s in gq.SETTINGS:
        assert f"| {s} |" in md
    assert "Paired differences to scene-scene, per seed" in md and "| seed 0 | seed 1 | seed 2 |" in md
    assert "## Data wait" in md and "| loader |" in md and res["command"] in md
    png = (out / "gpu_quality.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert "cell obj-obj-dilate+bing seed 2" in (out / "gpu_quality.log").read_text()

    # a rerun in the same work folder reuses every cell and the data-wait figure
    r = subprocess.run(dry, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    res2 = json.loads((out / "gpu_quality.json").read_text())
    assert {c["status"] for c in res2["timings"]["cells"]} == {"done before"}
    assert res2["speed"] == res["speed"]
    assert {(c["setting"], c["seed"]): c["linear_map"] for c in res2["quality"]["cells"]} == \
        {(c["setting"], c["seed"]): c["linear_map"] for c in q["cells"]}

    # the GPU profile's flags, spelled as the GPU run spells them, pass pretrain_quality.py's own parser and
    # budget checks (on the toy data; no cell runs: it stops at "no finished cell matches")
    gpu_flags = gq.quality_flags(gq.PROFILES["gpu"], carry, tmp_path / "gpuflags", man)
    r = subprocess.run([sys.executable, str(gq.PQ)] + gpu_flags + ["--summarise-only"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "no finished cell" in (r.stdout + r.stderr), r.stdout[-2000:] + r.stderr[-2000:]



def test_markdown_reports_a_cut_run_and_missing_parts():
    """A run cut by its deadline (one seed) or without any result still yields a readable report."""
    prof = gq.asdict(gq.PROFILES["gpu"])
    diff = {"per_seed": {"0": 0.012}, "mean": 0.012, "std": 0.0, "n": 1, "n_positive": 1}
    result = {"label": "GPU run", "card": "NVIDIA H200", "command": "bash benchmarks/gpu_quality.sh run",
              "environment": {"nvidia_smi": "NVIDIA H200, 143771 MiB, 580", "torch": "2.11", "dali": "2.4.0"},
              "status": {"cells_done": 4, "cells_expected": 12, "random_init": False, "speed": "missing (rc None)"},
              "timings": {"phases": {"total_s": 250.0}}, "budget": {"profile": prof, "min_box_size": 112},
              "data": {"scale": 0.5, "min_box_size": 112}, "speed": None, "speed_command": "(not run)",
              "quality_commands": ["python pq.py --a=1 --only=scene-scene --seed=0"],
              "quality_common": "python pq.py --a=1",
              "quality": {"split": {"train_keys": ["a"] * 840, "test_keys": ["b"] * 360, "seed": 0},
                          "classes": {"num_probe_classes": 76}, "chance_map": 0.0342,
                          "table_markdown": "| setting | linear-probe mAP (%) |",
                          "summary": {"paired_diff_to_scene-scene": {"obj-scene+bing": {"linear_map": diff}}}}}
    md = gq.markdown(result)
    assert "NVIDIA H200" in md and "4/12 cells" in md and "840 train / 360 test" in md
    assert "| obj-scene+bing | linear_map | +1.20 | — | — | +1.20 ± n/a |" in md
    assert "Not measured" in md and "--only=scene-scene --seed=0" in md
    result.update(quality=None, quality_commands=[])
    md = gq.markdown(result)
    assert "No summary" in md and "## Data wait" in md
