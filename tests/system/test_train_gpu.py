"""dali_objcrop/train/pretrain.py on a GPU (skipped without CUDA and DALI; run by benchmarks/gpu_run.sh): a one-rank
torchrun (NCCL process group, DDP wrapper), bf16 autocast, channels_last, the DALI loader on the GPU
(nvJPEG decode, GPU crops), a checkpoint, and a resume that continues from it."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(importlib.util.find_spec("nvidia") is None
                                 or importlib.util.find_spec("nvidia.dali") is None, reason="needs DALI")]

ARGS = ["--arch=resnet18", "--size=64", "--batch-size=8", "--queue-size=64", "--head-hidden=128", "--head-out=64",
        "--pred-hidden=128", "--num-threads=2", "--log-every=1", "--progress=false", "--loader-device=gpu",
        "--crops=obj-obj-dilate", "--ckpt-every=3"]


def torchrun(args: list[str]) -> None:
    from test_train_ddp import torchrun as run  # this folder is on sys.path (pytest's rootdir-relative import)
    run(args, timeout=150, nproc=1, omp_threads=2)


@pytest.mark.parametrize("method", ["mocov2", "densecl"])
def test_gpu_ddp_bf16_run_and_resume(method, synth_set, tmp_path):
    out = tmp_path / "run"
    torchrun([f"--method={method}", f"--data={synth_set}", "--steps=4", f"--out={out}", *ARGS])
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["world_size"] == 1
    assert {k.split(".")[1] for k in ckpt["model"] if k.startswith("heads.")} == {"obj", "scene"}
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    # resume from the step-3 checkpoint in a fresh process and run on to step 6
    torchrun([f"--method={method}", f"--data={synth_set}", "--steps=6", f"--out={out}", "--resume=auto", *ARGS])
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)["step"] == 6
