"""Crop-window throughput: windows for 1,000,000 samples per mode, one core.

    python benchmarks/windows_speed.py [--n=1000000] [--json=OUT]   # --help: the settings

Prints seconds per mode and writes a JSON; the goal is under 1 s per
million samples on one core.  Asserts nothing about speed.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np

from dali_objcrop.train.config import parse_or_exit
from dali_objcrop.windows import MODES, CropConfig, sample_windows


def fake_batch(n: int, seed: int = 0):
    """COCO-like sizes and 0-10 proposals per image (some images without any)."""
    r = np.random.default_rng(seed)
    sizes = np.stack([r.integers(200, 1000, n), r.integers(200, 800, n)], 1)
    counts = r.integers(0, 11, n)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    m = int(offsets[-1])
    x1, y1 = r.random(m) * 0.7, r.random(m) * 0.7
    boxes = np.stack([x1, y1, x1 + 0.05 + r.random(m) * 0.25, y1 + 0.05 + r.random(m) * 0.25], 1)
    return sizes, boxes.astype(np.float32), offsets


@dataclass
class WindowsSpeedConfig:
    """How many samples, how often (typed --field=value flags)."""

    n: int = 1_000_000                # samples per mode
    repeats: int = 3                  # best of this many
    json: str = ""                    # write the rows here


def main(argv: list[str] | None = None) -> None:
    args, = parse_or_exit([WindowsSpeedConfig], argv, "windows_speed.py")
    sizes, boxes, offsets = fake_batch(args.n)
    rows = []
    for mode in MODES:
        cfg = CropConfig(mode=mode, box_scale=(0.5, 1.0))
        times, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            sample_windows(sizes, boxes, offsets, np.arange(args.n), seed=0, epoch=0, config=cfg)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        best = min(times)
        rows.append({"mode": mode, "samples": args.n, "seconds_best": best, "seconds_median": float(np.median(times)),
                     "cpu_seconds_best": min(cpu), "samples_per_s": args.n / best})
        print(f"{mode:16s} {best:6.3f} s wall, {min(cpu):6.3f} s CPU, best of {args.repeats}  "
              f"({args.n / best / 1e6:.2f} M samples/s)")
    out = {"config": asdict(args), "results": rows,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "numpy": np.__version__}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
