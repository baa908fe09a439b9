"""Two-rank gloo runs of dali_objcrop/train/pretrain.py under torchrun with the object-aware DALI loader (CPU):
finite losses per method, checkpoint-then-resume equals the uninterrupted run, the right heads in the
checkpoint, and linear / kNN evaluation of the pretrained backbone producing an mAP."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow   # three torchrun runs of ~15-30 s each, and their resumes

TINY = ["--arch=resnet18", "--size=32", "--batch-size=4", "--queue-size=32", "--head-hidden=64", "--head-out=32",
        "--pred-hidden=64", "--num-threads=1", "--log-every=1", "--progress=false", "--loader-device=cpu"]
STEPS = 5  # 24 images / (2 ranks x 4) = 3 steps per epoch: the run crosses an epoch boundary


def torchrun(args: list[str], timeout: int = 240, nproc: int = 2, omp_threads: int = 1) -> None:
    """``dali-objcrop pretrain`` under torchrun (standalone, ``nproc`` processes); fails showing its output."""
    env = {**os.environ, "OMP_NUM_THREADS": str(omp_threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "dali_objcrop", "pretrain", *args]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", params=["mocov2", "byol", "densecl"])
def run(request, synth_set, tmp_path_factory):
    """An uninterrupted 2-rank run of STEPS steps, checkpoints kept every 2 steps."""
    method = request.param
    out = tmp_path_factory.mktemp(f"run_{method}")
    torchrun([f"--method={method}", "--crops=obj-obj-dilate", f"--data={synth_set}", f"--steps={STEPS}",
              "--ckpt-every=2", "--keep-ckpts", f"--out={out}", *TINY])
    return method, out


def test_two_rank_run_logs_finite_losses(run):
    method, out = run
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    assert [r["epoch"] for r in log] == [0, 0, 0, 1, 1]
    assert all(0.0 <= r["data_wait_frac"] <= 1.0 for r in log)
    # images/s counts both ranks' images (2 x 4) over the step's own time: one logged step cannot have taken
    # longer than the wall time since the record before it (a rate of one rank's images fails here)
    for prev, r in zip(log, log[1:]):
        assert 2 * 4 / r["images_per_s"] <= r["time"] - prev["time"] + 1e-3, (prev, r)
    if method == "byol":  # EMA momentum on its cosine from 0.99 towards 1
        assert log[0]["momentum"] == pytest.approx(0.99) and log[-1]["momentum"] > log[0]["momentum"]
    if method == "densecl":
        assert all(math.isfinite(r["loss_dense"]) and math.isfinite(r["loss_global"]) for r in log)
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == STEPS and ckpt["world_size"] == 2 and ckpt["config"]["method"] == method
    heads = {k.split(".")[1] for k in ckpt["model"] if k.startswith("heads.")}
    assert heads == {"obj", "scene"}  # obj-obj-dilate has an object view: separate heads
    if method != "byol":  # the queue saw every rank's keys: STEPS * 2 ranks * 4 (mod 32)
        assert int(ckpt["model"]["queue_ptr"]) == (STEPS * 8) % 32


def test_resume_equals_uninterrupted(run, tmp_path):
    """Resume from the step-2 checkpoint in a fresh torchrun: steps 3..5 (across the epoch) are identical."""
    method, out = run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    # the interrupted run's log already holds steps 1..5: records after the checkpoint must be replaced
    (resumed / "log.jsonl").write_text((out / "log.jsonl").read_text())
    data = json.loads((out / "config.json").read_text())["data"]
    torchrun([f"--method={method}", "--crops=obj-obj-dilate", f"--data={data}", f"--steps={STEPS}",
              f"--out={resumed}", f"--resume={out / 'ckpt_0000002.pt'}", *TINY])
    full, again = read_log(out), read_log(resumed)
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5]
    assert again[:2] == full[:2]
    assert [r["loss"] for r in again[2:]] == [r["loss"] for r in full[2:]]
    assert [r["lr"] for r in again[2:]] == [r["lr"] for r in full[2:]]
    a = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(resumed / "ckpt.pt", map_location="cpu", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_linear_and_knn_eval_produce_map(run, synth_set):
    """Linear and kNN evaluation from the checkpoint: the features separate the images, the probes fit
    them, the mAP is the mean of the per-class APs over classes with a test positive.  (How the probes
    score separable features and shuffled labels is pinned on larger synthetic features in
    tests/spec/test_train_eval.py::test_probe_map_separable_high_shuffled_near_chance.)"""
    import numpy as np
    method, out = run
    if method != "mocov2":
        pytest.skip("evaluated once, on the MoCo-v2 checkpoint")
    from dali_objcrop.train.knn_eval import knn_eval
    from dali_objcrop.train.linear_eval import image_labels, linear_probe_map, split_features
    from dali_objcrop.train.pretrain import load_backbone
    backbone, cfg = load_backbone(out / "ckpt.pt")
    assert cfg.method == "mocov2" and cfg.arch == "resnet18"
    labels = image_labels(synth_set)
    assert labels.multilabel and labels.targets.shape == (24, len(labels.classes))
    f = split_features(backbone, labels, size=32, test_frac=0.3, seed=0, workers=0)
    xtr, ytr, xte, yte = f["train_x"], f["train_y"], f["test_x"], f["test_y"]
    assert len(xtr) + len(xte) == 24 and xtr.shape[1] == 512 and ytr.shape[1] == len(labels.classes)
    assert torch.isfinite(xtr).all() and torch.isfinite(xte).all()
    # not collapsed: no two images share a feature vector
    assert torch.cdist(xtr, xtr).add(torch.eye(len(xtr)) * 1e9).min() > 1e-3
    # the probes fit what they are given: 17 images in 512 dimensions are separable, each is its own neighbour
    assert linear_probe_map(xtr, ytr, xtr, ytr, solver="lbfgs", max_iter=200)["map"] > 0.99
    assert knn_eval(xtr, ytr, xtr, ytr, k=1)["map"] == pytest.approx(1.0)
    for res in (linear_probe_map(xtr, ytr, xte, yte, epochs=30), knn_eval(xtr, ytr, xte, yte, k=5)):
        ap = np.array([np.nan if a is None else a for a in res["per_class_ap"]], np.float64)
        assert len(ap) == len(labels.classes)
        assert np.array_equal(np.isnan(ap), ~yte.numpy().any(0).astype(bool))  # NaN: no test positive
        assert res["map"] == pytest.approx(np.nanmean(ap)) and 0.0 < res["map"] <= 1.0
