"""benchmarks/pretrain_quality.py: --quick runs end to end and writes a well-formed JSON; pure helpers."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmark_module

REPO = Path(__file__).resolve().parents[2]
pq = benchmark_module.load("pretrain_quality")


def test_probe_classes_drops_excluded_and_one_sided_classes():
    names = ["person", "cat", "dog", "zebra", "bear"]
    y = np.array([[1, 1, 0, 1, 0], [1, 0, 1, 0, 0], [1, 0, 1, 0, 1], [1, 0, 1, 0, 0]], dtype=np.uint8)
    train, test = np.array([0, 1]), np.array([2, 3])
    cols, rep = pq.probe_classes(y, names, train, test, ("person",))
    assert [names[c] for c in cols] == ["dog"]          # cat: no test positive; zebra: none in test; bear: none in train
    assert rep["excluded"] == ["person"]
    assert rep["absent_from_train"] == ["bear"]
    assert rep["absent_from_test"] == ["cat", "zebra"]
    with pytest.raises(ValueError, match="unknown classes"):
        pq.probe_classes(y, names, train, test, ("unicorn",))


def test_summarise_pairs_by_seed():
    cells = [{"setting": s, "seed": k, "linear_map": base + k * 0.01, "knn_map": base}
             for s, base in (("scene-scene", 0.5), ("obj-obj-dilate+gt", 0.6)) for k in (0, 1, 2)]
    cells.append({"setting": "obj-obj-dilate+bing", "seed": 1, "linear_map": 0.4, "knn_map": 0.4})
    s = pq.summarise(cells, list(pq.SETTINGS))
    assert s["per_setting"]["scene-scene"]["linear_map"]["mean"] == pytest.approx(0.51)
    assert s["per_setting"]["scene-scene"]["linear_map"]["std"] == pytest.approx(0.01)
    d = s["paired_diff_to_scene-scene"]["obj-obj-dilate+gt"]["linear_map"]
    assert d["mean"] == pytest.approx(0.1) and d["std"] == pytest.approx(0.0, abs=1e-12) and d["n_positive"] == 3
    dbing = s["paired_diff_to_scene-scene"]["obj-obj-dilate+bing"]["knn_map"]
    assert dbing["per_seed"] == {"1": pytest.approx(-0.1)} and dbing["n"] == 1
    assert "obj-obj-dilate+gt" in pq.markdown_table(s)


def test_settings_are_typed_flags_and_reach_the_trainer():
    """--name=value (or --name value) flags, unknown ones rejected; the budget becomes the trainer's config."""
    budget, opts = pq.parse_args(["--arch=resnet18", "--size=128", "--device=cpu", "--epochs=3", "--seeds", "0", "2",
                                  "--settings=scene-scene,obj-obj-dilate+gt", "--out=/tmp/x", "--share-heads=false",
                                  "--no-random-init", "--exclude="])
    assert (budget.arch, budget.size, budget.epochs, budget.share_heads) == ("resnet18", 128, 3, False)
    assert opts.seeds == [0, 2] and opts.settings == ["scene-scene", "obj-obj-dilate+gt"] and opts.exclude == []
    assert opts.no_random_init and opts.out == "/tmp/x"
    quick, _ = pq.parse_args(["--quick", "--epochs=5"])
    assert quick.arch == pq.QUICK["arch"] and quick.epochs == 5          # explicit flags win over --quick
    for bad, msg in ((["--epoch=3"], "unknown flag --epoch"), (["--settings=obj-everything"], "unknown settings"),
                     (["--seed=1"], "--seed needs --only"), (["--probe-solver=sgd"], "probe-solver")):
        with pytest.raises(ValueError, match=msg):
            pq.parse_args(bad)
    cfg = pq.trainer_config(budget, "obj-obj-dilate", 1, steps_per_epoch=7, device="cpu", out="/tmp/y").resolved()
    assert (cfg.method, cfg.crops, cfg.arch, cfg.seed, cfg.epochs, cfg.warmup_steps) == (
        "mocov2", "obj-obj-dilate", "resnet18", 1, 3, 2 * 7)
    assert (cfg.lr, cfg.queue_size, cfg.momentum, cfg.head_hidden) == (
        budget.lr, budget.queue_size, budget.momentum, budget.head_hidden)


@pytest.mark.slow
def test_quick_end_to_end(tmp_path):
    out = tmp_path / "pq"
    # one torch thread: a CPU cell is then bit-for-bit deterministic (more threads may split work differently)
    cmd = [sys.executable, str(REPO / "benchmarks" / "pretrain_quality.py"), "--quick", "--quick-n=64",
           "--seeds", "0", "1", f"--out={out}", "--log-every=0", "--torch-threads=1"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "pretrain_quality.json").read_text())
    assert (out / "pretrain_quality.png").stat().st_size > 1000
    # everything needed to rerun any cell is in the JSON
    for key in ("budget", "split", "classes", "boxes", "data", "command", "summary", "cells", "machine"):
        assert key in res, key
    assert res["data"]["quick"] is True and "not a measurement" in res["label"]
    assert set(res["split"]["train_keys"]).isdisjoint(res["split"]["test_keys"])
    assert len(res["split"]["train_keys"]) + len(res["split"]["test_keys"]) == res["data"]["num_images"]
    cells = {(c["setting"], c["seed"]) for c in res["cells"]}
    assert cells == {(s, k) for s in list(pq.DEFAULT_SETTINGS) + ["random-init"] for k in (0, 1)}
    for c in res["cells"]:
        for m in pq.METRICS:
            assert 0.0 <= c[m] <= 1.0 and math.isfinite(c[m])
    for c in res["cells"]:
        if c["setting"] != "random-init":
            assert c["pretrain"]["steps"] > 0 and all(math.isfinite(v) for v in c["pretrain"]["epoch_losses"])
    per = res["summary"]["per_setting"]
    assert set(per) == set(pq.DEFAULT_SETTINGS) | {"random-init"} and per["scene-scene"]["linear_map"]["n"] == 2
    diff = res["summary"]["paired_diff_to_scene-scene"]["obj-obj-dilate+gt"]["linear_map"]
    assert set(diff["per_seed"]) == {"0", "1"}
    bing = res["boxes"]["bing"]
    assert bing["stand_in"] is True or bing["meta"]["method"].startswith("bing"), bing  # says what it used

    # one cell alone: reuses the others, recomputes only that one, summary unchanged in shape
    before = {(c["setting"], c["seed"]): c["linear_map"] for c in res["cells"]}
    r = subprocess.run(cmd + ["--only=scene-scene", "--seed=1", "--rerun"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res2 = json.loads((out / "pretrain_quality.json").read_text())
    after = {(c["setting"], c["seed"]): c["linear_map"] for c in res2["cells"]}
    assert set(after) == set(before)
    assert all(after[k] == before[k] for k in before if k != ("scene-scene", 1))  # others merged, not rerun
    # the rerun cell, alone in a fresh process, reproduces its cell exactly: the same initial weights, batches,
    # losses and probe (the pipeline is seeded end to end and deterministic on the CPU with one torch thread)
    old = next(c for c in res["cells"] if (c["setting"], c["seed"]) == ("scene-scene", 1))
    new = next(c for c in res2["cells"] if (c["setting"], c["seed"]) == ("scene-scene", 1))
    assert new["pretrain"]["epoch_losses"] == old["pretrain"]["epoch_losses"]
    assert (new["linear_map"], new["knn_map"], new["per_class_ap"]) == (old["linear_map"], old["knn_map"],
                                                                         old["per_class_ap"])


# ---- multi-crop settings ------------------------------------------------------------------------------------
def test_multi_crop_settings_reach_loader_and_trainer():
    budget, opts = pq.parse_args(["--settings=scene-mc,obj-mc", "--local-crops=4", "--local-size=28"])
    assert opts.settings == ["scene-mc", "obj-mc"] and (budget.local_crops, budget.local_size) == (4, 28)
    assert "scene-mc" not in pq.DEFAULT_SETTINGS and "obj-mc" not in pq.DEFAULT_SETTINGS
    assert (pq.SETTINGS["scene-mc"], pq.SETTINGS["obj-mc"]) == (("scene-scene", None), ("obj-obj-dilate", "gt"))
    default = pq.Budget()
    assert default.local_crops == 6
    for setting, src in (("scene-mc", "scene"), ("obj-mc", "box")):
        local = pq.local_settings(default, setting)
        assert local == dict(local_crops=6, local_size=default.local_size, local_scale=(0.05, 0.4), local_from=src)
        cfg = pq.trainer_config(default, pq.SETTINGS[setting][0], 0, 7, "cpu", "/tmp/y", local).resolved()
        assert (cfg.local_crops, cfg.local_from, cfg.local_size) == (6, src, default.local_size)
    assert pq.local_settings(default, "obj-obj-dilate+gt") == {}
    assert pq.trainer_config(default, "scene-scene", 0, 7, "cpu", "/tmp/y").resolved().local_crops == 0
    # one initialisation per seed whatever the setting: local views add no parameters
    a = pq.initial_model(default, "obj-obj-dilate", 1, local=pq.local_settings(default, "obj-mc"))
    b = pq.initial_model(default, "obj-obj-dilate", 1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.local_key == "obj" and pq.initial_model(default, "scene-scene", 1, local=pq.local_settings(
        default, "scene-mc")).local_key == "scene"
    with pytest.raises(ValueError, match="local-crops"):
        pq.parse_args(["--local-crops=0"])


def test_fingerprint_ignores_multi_crop_fields_at_their_defaults():
    """Cells computed before the multi-crop settings existed keep matching a budget that leaves them alone."""
    import dataclasses
    base = {"split": {"seed": 0}, "classes": {"kept": ["cat"]}, "data": {"coco": "x", "num_images": 3},
            "boxes": {"gt": {"source": "gt"}}}
    now = dict(base, budget=dataclasses.asdict(pq.Budget()))
    before = dict(base, budget={k: v for k, v in dataclasses.asdict(pq.Budget()).items() if not k.startswith("local_")})
    assert pq._fingerprint(now) == pq._fingerprint(before)
    other = dict(base, budget=dataclasses.asdict(pq.Budget(local_size=40)))
    assert pq._fingerprint(other) != pq._fingerprint(now)


def test_summary_compares_obj_mc_with_scene_mc():
    cells = [{"setting": s, "seed": k, "linear_map": base + k * 0.01, "knn_map": base}
             for s, base in (("scene-scene", 0.5), ("scene-mc", 0.55), ("obj-mc", 0.6)) for k in (0, 1)]
    s = pq.summarise(cells, list(pq.SETTINGS))
    d = s["paired_diff_to_scene-mc"]["obj-mc"]["linear_map"]
    assert d["mean"] == pytest.approx(0.05) and d["n"] == 2 and d["n_positive"] == 2
    assert set(s["paired_diff_to_scene-mc"]) == {"obj-mc"}
    assert s["paired_diff_to_scene-scene"]["obj-mc"]["knn_map"]["mean"] == pytest.approx(0.1)
    assert "| obj-mc vs scene-mc |" in pq.markdown_table(s)
    assert "paired_diff_to_scene-mc" not in pq.summarise([c for c in cells if c["setting"] != "scene-mc"],
                                                         list(pq.SETTINGS))


class _LocalBatches:
    """A loader stand-in with local views (the trainer's side of a multi-crop cell, without DALI)."""

    def __init__(self, budget, m):
        self.b, self.m, self.epoch, self.stats = budget, m, 0, {"samples": 0}

    def __len__(self):
        return 2

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.epoch)
        n, s, ls = self.b.batch_size, self.b.size, self.b.local_size
        for _ in range(2):
            yield {"view1": torch.randn(n, 3, s, s, generator=g), "view2": torch.randn(n, 3, s, s, generator=g),
                   "local": torch.randn(n, self.m, 3, ls, ls, generator=g)}


def test_multi_crop_cell_pretrains_through_the_trainer():
    budget, _ = pq.parse_args(["--quick", "--epochs=1", "--batch-size=4", "--local-crops=2"])
    local = pq.local_settings(budget, "obj-mc")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backbone, log = pq.pretrain(_LocalBatches(budget, 2), budget, "obj-obj-dilate", 0, "cpu", local=local)
    finally:
        torch.set_num_threads(threads)
    assert log["steps"] == 2 and all(math.isfinite(v) for v in log["epoch_losses"])
    assert (log["trainer_config"]["local_crops"], log["trainer_config"]["local_from"]) == (2, "box")


@pytest.mark.slow
def test_quick_multi_crop_cells_end_to_end(tmp_path):
    """One tiny scene-mc and obj-mc cell with the real loader (its operators make the local views)."""
    from dali_objcrop.pipelines import local_views_supported
    ok, why = local_views_supported()
    if not ok:
        pytest.skip(f"operators without local views: {why}")
    out = tmp_path / "pq"
    cmd = [sys.executable, str(REPO / "benchmarks" / "pretrain_quality.py"), "--quick", "--quick-n=48",
           "--settings=scene-mc,obj-mc", "--seeds=0", "--no-random-init", "--epochs=1", "--local-crops=2",
           f"--out={out}", "--log-every=0", "--torch-threads=1"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "pretrain_quality.json").read_text())
    cells = {c["setting"]: c for c in res["cells"]}
    assert set(cells) == {"scene-mc", "obj-mc"}
    assert (cells["scene-mc"]["local_from"], cells["obj-mc"]["local_from"]) == ("scene", "box")
    for c in cells.values():
        assert c["local_crops"] == 2 and c["pretrain"]["trainer_config"]["local_crops"] == 2
        assert c["pretrain"]["steps"] > 0 and all(math.isfinite(v) for v in c["pretrain"]["epoch_losses"])
    assert "obj-mc" in res["summary"]["paired_diff_to_scene-mc"]
