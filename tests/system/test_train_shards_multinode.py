"""Two nodes simulated on this machine: two ``torchrun --nnodes 2 --node-rank 0|1`` launches meet at a
rendezvous on 127.0.0.1 (gloo), pretrain from WebDataset shards, checkpoint, are killed, and resume exactly."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["--arch=resnet18", "--size=32", "--batch-size=4", "--queue-size=32", "--head-hidden=64", "--head-out=32",
        "--num-threads=1", "--log-every=1", "--progress=false", "--loader-device=cpu", "--method=mocov2",
        "--crops=obj-obj-dilate", "--steps=5", "--ckpt-every=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], port: int, fault: str | None = None) -> list[subprocess.Popen]:
    """Node 0 and node 1 (one process each), as two separate torchrun launches (``fault``: their
    ``DALI_OBJCROP_FAULT``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if fault:
        env["DALI_OBJCROP_FAULT"] = fault
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
               str(REPO / "dali_objcrop" / "train" / "pretrain.py"), *args]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float = 300) -> None:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-5000:]


def _log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if ln.strip()]


@pytest.mark.slow
def test_two_nodes_from_shards_checkpoint_kill_resume(synth_set, tmp_path):
    from dali_objcrop import plugin
    from dali_objcrop.boxstore import BoxStore
    from dali_objcrop.dataset import ImageIndex
    from dali_objcrop.shards import pack
    if not plugin.load():
        pytest.skip(f"operators unavailable: {plugin.error()}")
    shards = tmp_path / "shards"
    pack(ImageIndex.from_coco(synth_set, synth_set.parent / "images"), shards, BoxStore.from_coco(synth_set),
         shard_bytes=200_000, progress=False)
    # the uninterrupted reference (24 images / (2 ranks x 4) = 3 steps per epoch: 5 steps cross an epoch)
    full = tmp_path / "full"
    _wait(_launch([f"--data={shards}", "--boxes=shards", f"--out={full}", *TINY], _free_port()))
    ref = _log(full)
    assert [r["step"] for r in ref] == [1, 2, 3, 4, 5] and [r["epoch"] for r in ref] == [0, 0, 0, 1, 1]
    # the same run, killed: node 0's process (the master rank) is SIGKILLed right after writing its first
    # checkpoint (step 2; the fault hook); node 1's process then loses its peer and fails; whatever is left of
    # either launch is killed too
    run = tmp_path / "run"
    procs = _launch([f"--data={shards}", "--boxes=shards", f"--out={run}", *TINY], _free_port(),
                    fault="pretrain.checkpoint:1:kill")
    procs[0].wait(timeout=300)
    try:
        procs[1].wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    assert procs[0].returncode != 0
    import torch
    assert torch.load(run / "ckpt.pt", map_location="cpu", weights_only=False)["step"] == 2
    assert [r["step"] for r in _log(run)] == [1, 2]
    # both nodes relaunched with --resume=auto: the rest of the run equals the uninterrupted one
    _wait(_launch([f"--data={shards}", "--boxes=shards", f"--out={run}", "--resume=auto", *TINY], _free_port()))
    again = _log(run)
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in again] == [r["loss"] for r in ref]
    a = torch.load(full / "ckpt.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
