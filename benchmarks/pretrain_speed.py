"""Pretraining throughput: the real object-aware loader against synthetic device-resident input.

Runs the trainer's loop (:func:`dali_objcrop.train.pretrain.train`: same model, optimizer, step) twice
per round: fed by :class:`dali_objcrop.loader.ObjCropLoader` (decode, object-aware
crops, augmentations) and by one pre-made batch that already lives on the
training device (the upper bound: no data work at all).  Reports images/s and
the fraction of step time the loop spent waiting in ``next(loader)`` (the loop
synchronises with the GPU every step, so on a GPU that is time the GPU idles).
Goal on a GPU: data wait under 3% of step time.  Measured after 2 warm-up
steps.  Rounds alternate the order of the two feeds (shared machines are noisy).

Usage (settings: the trainer's :class:`~dali_objcrop.train.pretrain.Config` fields with this
benchmark's defaults, plus :class:`SpeedOptions`; typed ``--field=value`` flags, ``--help`` lists them)::

    python benchmarks/pretrain_speed.py                      # CPU defaults: ResNet-18, 64 px, batch 16
    python benchmarks/pretrain_speed.py --arch=resnet50 --size=224 --batch-size=128 --steps=60 \\
        --data=coco/annotations/instances_train2017.json --num-threads=8 --json=speed.json   # one GPU

Output: a JSON with the config, the device and, per feed and round, images/s
and data-wait fraction, plus the real/synthetic throughput ratio.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dali_objcrop.train.config import parse_or_exit
from dali_objcrop.train.pretrain import Config, make_loader, train


@dataclass
class SpeedOptions:
    """This benchmark's own settings (the rest are the trainer's Config fields)."""

    rounds: int = 1                   # rounds of (loader, resident); the order alternates per round
    json: str = ""                    # write results here (printed either way)


def default_config(gpu: bool) -> Config:
    """The trainer's configuration this benchmark starts from (GPU: ResNet-50 at 224 px; CPU: small)."""
    # on a small CPU the loader's DALI threads need cores too; 2 OpenMP threads fighting them (and any other
    # process) for 2 cores measured ~6x slower than 1 thread here, hence torch_threads=1 on the CPU
    return Config(method="mocov2", crops="obj-obj-dilate", boxes="gt", arch="resnet50" if gpu else "resnet18",
                  size=224 if gpu else 64, batch_size=128 if gpu else 16, steps=60 if gpu else 12,
                  num_threads=8 if gpu else 2, prepare_ahead=1, queue_size=65536 if gpu else 4096,
                  torch_threads=0 if gpu else 1, ckpt_every=-1, log_every=10**9, progress=False)


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
        c = dataclasses.replace(cfg, out=out)
        gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        device = torch.device("cuda" if gpu else "cpu")  # where the trainer puts the model
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
    cfg, opts = parse_or_exit([default_config(gpu), SpeedOptions], argv, "pretrain_speed.py")
    runs = []
    for r in range(opts.rounds):
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
    result = {"config": asdict(cfg.resolved()), "options": asdict(opts), "argv": sys.argv[1:] if argv is None else argv,
              "device": torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} torch threads)",
              "torch": torch.__version__, "runs": runs, "summary": summary}
    print(json.dumps(summary, indent=1))
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
