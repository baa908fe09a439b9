"""How much of a training step the loop spends inside ``next(loader)``, with and without the loader's
background input preparation (``ObjCropLoader(prepare_ahead=...)``).

A GPU training step mostly waits for the GPU with the GIL released; ``time.sleep(step_ms)`` stands in for
it here, so the figure is the loader's own cost to the training loop on this machine, with no GPU needed.
Settings alternate within each round (shared machines are noisy).

Usage::

    python benchmarks/loader_overlap.py --step-ms=400 --batches=8 --rounds=2 --json=overlap.json
    python benchmarks/loader_overlap.py --coco=../shared/data/coco_val2017_subset/annotations/instances.json

Output: per setting the median over rounds of the wait per batch (ms) and its fraction of the step.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dali_objcrop.loader import ObjCropLoader
from dali_objcrop.train.config import ConfigError, parse_or_exit


def measure(loader: ObjCropLoader, batches: int, step_s: float) -> float:
    """Mean seconds per batch spent in ``next()`` after one warm-up batch."""
    it = iter(loader)
    next(it)
    waited = 0.0
    for _ in range(batches):
        t = time.perf_counter()
        next(it)
        waited += time.perf_counter() - t
        time.sleep(step_s)
    for _ in it:  # finish the epoch, so the next iteration starts clean
        pass
    return waited / batches


@dataclass
class OverlapConfig:
    """The loader, the simulated step and the settings compared (typed --field=value flags)."""

    coco: str = ""                    # COCO json (default: the embedded synthetic set)
    mode: str = "obj-obj-dilate"
    batch_size: int = 64
    size: int = 224
    threads: int = 2                  # DALI threads
    device: str = "cpu"               # cpu | gpu
    step_ms: float = 400.0            # GIL-free time of one training step
    batches: int = 8                  # timed batches per setting and round
    rounds: int = 2
    ahead: list[int] = field(default_factory=lambda: [0, 1])  # prepare_ahead values compared
    json: str = ""

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "gpu"):
            raise ConfigError(f"--device must be cpu or gpu, got {self.device!r}")


def main(argv: list[str] | None = None) -> int:
    a, = parse_or_exit([OverlapConfig], argv, "loader_overlap.py")
    if a.coco:
        data = a.coco
    else:
        from dali_objcrop.synth import ensure_default_dataset
        data = str(ensure_default_dataset())
    loaders = {k: ObjCropLoader(data, boxes="gt", mode=a.mode, batch_size=a.batch_size, size=a.size,
                                num_threads=a.threads, device=a.device, rank=0, world_size=1, prepare_ahead=k)
               for k in a.ahead}
    need = a.batches + 2
    if len(next(iter(loaders.values()))) < need:
        raise SystemExit(f"need {need} batches of {a.batch_size} per epoch; use a smaller --batch-size or --batches")
    waits: dict[int, list[float]] = {k: [] for k in a.ahead}
    for r in range(a.rounds):
        order = a.ahead if r % 2 == 0 else a.ahead[::-1]
        for k in order:
            w = measure(loaders[k], a.batches, a.step_ms / 1000)
            waits[k].append(w)
            print(f"[round {r + 1}/{a.rounds}] prepare_ahead={k}: {1000 * w:7.1f} ms per batch in next() "
                  f"({100 * w / (w + a.step_ms / 1000):.1f}% of the step)", flush=True)
    res = {str(k): {"wait_ms": round(1000 * statistics.median(v), 2), "rounds_ms": [round(1000 * x, 2) for x in v],
                    "wait_frac": round(statistics.median(v) / (statistics.median(v) + a.step_ms / 1000), 4)}
           for k, v in waits.items()}
    out = {"settings": asdict(a), "data": data, "results": res}
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
