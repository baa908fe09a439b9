"""Evaluation helpers of train/: labels from COCO JSON and class folders, mAP, linear probe, kNN (CPU, fast)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_objcrop.train.knn_eval import knn_eval
from dali_objcrop.train.linear_eval import (coco_image_labels, extract_features, folder_labels, image_labels,
                                            linear_probe, linear_probe_map, mean_average_precision, split_indices)


def test_coco_labels_drop_a_class_in_every_image(synth_set, tmp_path):
    d = json.loads(Path(synth_set).read_text())
    # add a class present in every image (like `person` in the COCO subset) and one present in none
    d["categories"] += [{"id": 100, "name": "everywhere"}, {"id": 101, "name": "nowhere"}]
    d["annotations"] += [{"id": 10**6 + im["id"], "image_id": im["id"], "category_id": 100, "bbox": [0, 0, 5, 5],
                          "area": 25, "iscrowd": 0} for im in d["images"]]
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps(d))
    shutil.copytree(Path(synth_set).parent / "images", tmp_path / "images")
    lab = coco_image_labels(ann)
    assert lab.multilabel and lab.dropped == ["everywhere", "nowhere"]
    assert "everywhere" not in lab.classes and lab.targets.shape == (24, len(lab.classes))
    first = next(im for im in d["images"] if im["file_name"] == lab.keys[0])
    want = {c["name"] for c in d["categories"] for a in d["annotations"]
            if a["image_id"] == first["id"] and a["category_id"] == c["id"]} - {"everywhere"}
    assert {c for c, on in zip(lab.classes, lab.targets[0]) if on} == want


def test_coco_subset_leaves_out_person(coco_ann):
    lab = coco_image_labels(coco_ann)
    assert "person" in lab.dropped and "person" not in lab.classes and len(lab) > 1000


def test_folder_labels_top1_and_knn(synth_set, tmp_path):
    images = sorted((Path(synth_set).parent / "images").glob("*.jpg"))[:8]
    for i, p in enumerate(images):
        (tmp_path / f"class{i % 2}").mkdir(exist_ok=True)
        shutil.copy(p, tmp_path / f"class{i % 2}" / p.name)
    lab = image_labels(tmp_path)
    assert not lab.multilabel and lab.classes == ["class0", "class1"] and sorted(lab.targets.tolist()) == [0] * 4 + [1] * 4
    feats = extract_features(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()),
                             [str(lab.root / k) for k in lab.keys], size=32, workers=0)
    assert feats.shape == (8, 4) and feats.dtype == torch.float32
    with pytest.raises(ValueError, match="2 class folders"):
        folder_labels(Path(synth_set).parent)


def test_probes_on_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (120,), generator=g)
    x = torch.randn(120, 16, generator=g) * 0.3 + torch.nn.functional.one_hot(y, 16).float() * 3
    tr, te = (torch.from_numpy(i) for i in split_indices(120, 0.25, seed=0))
    assert len(set(tr.tolist()) & set(te.tolist())) == 0 and len(tr) + len(te) == 120
    for kw in (dict(solver="lbfgs", max_iter=100), dict(solver="adamw", lr=3e-2, epochs=100)):
        assert linear_probe(x[tr], y[tr], x[te], y[te], multilabel=False, **kw)["top1"] > 0.95, kw
    assert knn_eval(x[tr], y[tr], x[te], y[te], k=5)["top1"] > 0.95
    ym = torch.nn.functional.one_hot(y, 3).float()
    assert linear_probe_map(x[tr], ym[tr], x[te], ym[te], solver="lbfgs", max_iter=100)["map"] > 0.95
    assert knn_eval(x[tr], ym[tr], x[te], ym[te], k=5)["map"] > 0.95
    # chance: random features score far lower
    noise = torch.randn(120, 16, generator=g)
    assert linear_probe(noise[tr], y[tr], noise[te], y[te], multilabel=False, solver="lbfgs",
                        max_iter=100)["top1"] < 0.8
    with pytest.raises(ValueError, match="solver"):
        linear_probe(x[tr], y[tr], x[te], y[te], multilabel=False, solver="sgd")


def test_probe_map_separable_high_shuffled_near_chance():
    """Multi-label mAP, both probes: labels that are linear in the features score near 1; the same labels
    shuffled across images score near chance (the test split's mean class prevalence)."""
    g = torch.Generator().manual_seed(0)
    n, c, d = 600, 5, 24
    y = (torch.rand(n, c, generator=g) < 0.3).float()
    directions = torch.linalg.qr(torch.randn(d, c, generator=g))[0].T   # (c, d) orthonormal
    x = 2.0 * y @ directions + 0.3 * torch.randn(n, d, generator=g)
    tr, te = (torch.from_numpy(i) for i in split_indices(n, 0.3, seed=0))
    probes = {"lbfgs": lambda a, b, cc, dd: linear_probe_map(a, b, cc, dd, solver="lbfgs", max_iter=100)["map"],
              "adamw": lambda a, b, cc, dd: linear_probe_map(a, b, cc, dd, lr=3e-2, epochs=100)["map"],
              "knn": lambda a, b, cc, dd: knn_eval(a, b, cc, dd, k=20)["map"]}
    for name, probe in probes.items():
        assert probe(x[tr], y[tr], x[te], y[te]) > 0.95, name
    for seed in (0, 1):
        ys = y[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
        chance = float(ys[te].mean(0).mean())   # expected AP of a random ranking, about the prevalence
        for name, probe in probes.items():
            m = probe(x[tr], ys[tr], x[te], ys[te])
            assert abs(m - chance) < 0.08, (name, seed, m, chance)


def test_mean_average_precision_known_values():
    t = np.array([[1, 0], [0, 0], [1, 0], [0, 1]])
    s = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.3], [0.2, 0.9]])
    m, ap = mean_average_precision(s, t)
    assert ap[1] == pytest.approx(1.0) and ap[0] == pytest.approx((1 / 1 + 2 / 4) / 2)  # positives ranked 1st and 4th
    assert m == pytest.approx((ap[0] + ap[1]) / 2)
    m2, ap2 = mean_average_precision(s[:, :1].repeat(2, 1), np.c_[t[:, :1], np.zeros(4)])
    assert np.isnan(ap2[1]) and m2 == pytest.approx(ap[0])  # a class without positives is left out


def test_eval_commands_take_typed_settings(synth_set, tmp_path, capsys):
    """``dali-objcrop linear-eval`` / ``knn-eval``: --field=value settings, saved with the result; bad ones exit 2."""
    from dali_objcrop.cli import main
    common = ["--ckpt=none", "--arch=resnet18-w0.125", f"--data={synth_set}", "--size=32", "--workers=0",
              "--device=cpu"]
    assert main(["linear-eval", *common, "--solver=adamw", "--epochs=3", f"--out={tmp_path / 'lin.json'}"]) == 0
    assert main(["knn-eval", *common, "--k=3", f"--out={tmp_path / 'knn.json'}"]) == 0
    lin, knn = (json.loads((tmp_path / f).read_text()) for f in ("lin.json", "knn.json"))
    assert lin["config"]["solver"] == "adamw" and lin["config"]["epochs"] == 3 and lin["config"]["size"] == 32
    assert knn["config"]["k"] == 3 and knn["config"]["arch"] == "resnet18-w0.125"
    assert 0 <= lin["map"] <= 1 and 0 <= knn["map"] <= 1
    capsys.readouterr()
    for argv, msg in ((["knn-eval", *common, "--neighbours=3"], "unknown flag --neighbours"),
                      (["linear-eval", "--size=32"], "--ckpt required")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err
