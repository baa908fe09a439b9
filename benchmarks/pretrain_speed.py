"""Pretraining throughput: the real object-aware loader against synthetic device-resident input.

Runs ``train/pretrain.py``'s training loop (same model, optimizer, step) twice
per round: fed by :class:`dali_objcrop.loader.ObjCropLoader` (decode, object-aware
crops, augmentations) and by one pre-made batch that already lives on the
training device (the upper bound: no data work at all).  Reports images/s and
the fraction of step time the loop spent waiting in ``next(loader)`` (the loop
synchronises with the GPU every step, so on a GPU that is time the GPU idles).
Goal on a GPU: data wait under 3% of step time.  Measured after 2 warm-up
steps.  Rounds alternate the order of the two feeds (shared machines are noisy).

Usage::

    python benchmarks/pretrain_speed.py                      # CPU defaults: ResNet-18, 64 px, batch 16
    python benchmarks/pretrain_speed.py --arch=resnet50 --size=224 --batch-size=128 --steps=60 \\
        --data=coco/annotations/instances_train2017.json --num-threads=8 --json=speed.json   # one GPU

Output: a JSON with the config, the device and, per feed and round, images/s
and data-wait fraction, plus the real/synthetic throughput ratio.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from train.pretrain import Config, make_loader, train  # noqa: E402


class ResidentBatches:
    """The loader interface over one random batch already on ``device`` (no data work per step)."""

    def __init__(self, batch_size: int, size: int, device: torch.device, steps_per_epoch: int = 10**6,
                 dtype=torch.float32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.batch = {"view1": torch.randn(batch_size, 3, size, size, generator=g).to(device, dtype),
                      "view2": torch.randn(batch_size, 3, size, size, generator=g).to(device, dtype),
                      "index": torch.arange(batch_size, device=device)}
        self.steps_per_epoch = steps_per_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for _ in range(self.steps_per_epoch):
            yield self.batch


def run_once(cfg: Config, feed: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        c = Config(**{**asdict(cfg), "out": out})
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if feed == "loader":
            loader = make_loader(c.resolved(), 0, 1)
        else:
            loader = ResidentBatches(c.batch_size, c.size, device)
        t = time.perf_counter()
        s = train(c, loader=loader)
        wall = time.perf_counter() - t
    return {"feed": feed, "images_per_s": s["images_per_s"], "data_wait_frac": s["data_wait_frac"],
            "final_loss": s["losses"][-1]["loss"] if s["losses"] else None, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="mocov2")
    p.add_argument("--crops", default="obj-obj-dilate")
    p.add_argument("--arch", default="resnet50" if gpu else "resnet18")
    p.add_argument("--size", type=int, default=224 if gpu else 64)
    p.add_argument("--batch-size", type=int, default=128 if gpu else 16)
    p.add_argument("--steps", type=int, default=60 if gpu else 12)
    p.add_argument("--data", default="", help="COCO json or image folder ('' = the embedded synthetic set)")
    p.add_argument("--boxes", default="gt")
    p.add_argument("--num-threads", type=int, default=8 if gpu else 2)
    p.add_argument("--prepare-ahead", type=int, default=1,
                   help="loader batches prepared on a background thread (0: in the training loop's thread)")
    p.add_argument("--queue-size", type=int, default=65536 if gpu else 4096)
    p.add_argument("--compile", action="store_true")
    # on a small CPU the loader's DALI threads need cores too; 2 OpenMP threads fighting them (and any other
    # process) for 2 cores measured ~6x slower than 1 thread here
    p.add_argument("--torch-threads", type=int, default=0 if gpu else 1,
                   help="torch intra-op threads (0 = torch's default; CPU default 1)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", default="", help="write results here (printed either way)")
    a = p.parse_args(argv)
    cfg = Config(method=a.method, crops=a.crops, arch=a.arch, size=a.size, batch_size=a.batch_size, steps=a.steps,
                 data=a.data, boxes=a.boxes, num_threads=a.num_threads, prepare_ahead=a.prepare_ahead,
                 queue_size=a.queue_size, compile=a.compile,
                 torch_threads=a.torch_threads,
                 ckpt_every=0, log_every=max(1, a.steps), progress=False)
    runs = []
    for r in range(a.rounds):
        order = ("loader", "resident") if r % 2 == 0 else ("resident", "loader")
        for feed in order:
            try:
                res = run_once(cfg, feed)
            except ImportError as e:  # e.g. a GPU machine without DALI: still measure the resident feed
                res = {"feed": feed, "error": f"{type(e).__name__}: {e}"}
                print(f"round {r} {feed:8s}: not run ({res['error']})", flush=True)
            else:
                print(f"round {r} {feed:8s}: {res['images_per_s']:8.1f} img/s, data wait "
                      f"{100 * res['data_wait_frac']:5.1f}% of step time", flush=True)
            res["round"] = r
            runs.append(res)

    def mean(feed, key):
        v = [x[key] for x in runs if x["feed"] == feed and key in x]
        return sum(v) / len(v) if v else None
    summary = {f"{feed}_{k}": mean(feed, k) for feed in ("loader", "resident")
               for k in ("images_per_s", "data_wait_frac")}
    if summary["loader_images_per_s"] is not None and summary["resident_images_per_s"] is not None:
        summary["loader_over_resident"] = summary["loader_images_per_s"] / summary["resident_images_per_s"]
        summary["goal_data_wait_under_3pct_met"] = bool(summary["loader_data_wait_frac"] < 0.03)
    result = {"config": asdict(cfg.resolved()), "argv": sys.argv[1:] if argv is None else argv,
              "device": torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} torch threads)",
              "torch": torch.__version__, "runs": runs, "summary": summary}
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
