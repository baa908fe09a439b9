"""What local (multi-crop) views cost the loader: CPU ms per image, side by side in one run.

``ObjCropLoader`` on the operators with two global views (224 px) against the same loader with M local views
(96 px, DINO's multi-crop), for each ``mode:source`` pair asked for, each against the two-view loader of its
own mode, on the same photos, recipe, batch size and threads.  Two global 224 px views + 6 local 96 px views
hold 1.55x the pixels of two global views; the goal is at most 1.6x the CPU ms per image (the decode of the
windows' union and the hand-over are shared).  What a local view costs grows with its window's area (the
antialiased resize reads every source pixel of the window, and the decoder decodes the union of all
windows), so ``scene`` local views beside object-conditioned global views cost the most.

Method (``throughput.py``'s): every configuration built once, ``--reps`` rounds round-robin, each discarding
``--warmup`` batches then counting ``--seconds``; CPU time = every thread of the process.  Prints one JSON
object (rows, ratios to the two-view loader, paired per round, machine) and writes it to ``--json``, with a
bar chart beside it (``.png``).

    python benchmarks/multicrop_cost.py --coco ../shared/data/coco_val2017_subset/annotations/instances.json \\
        --images ../shared/data/coco_val2017_subset/images --json benchmarks/results/multicrop_cost_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from throughput import add_round_arguments, machine_info, measure_rounds   # benchmarks/throughput.py


def pixel_ratio(size: int, local_size: int, local_crops: int) -> float:
    """Output pixels of 2 global + M local views over those of the 2 global views."""
    return (2 * size * size + local_crops * local_size * local_size) / (2 * size * size)


def plot(rows: list[dict], png: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    names = [r["loader"] for r in rows]
    ms = [r["cpu_ms_per_image"] for r in rows]
    colours = ["#999999" if r["ratio_to_two_views"] == 1.0 else "#4C72B0" for r in rows]
    bars = ax.barh(names[::-1], ms[::-1], color=colours[::-1])
    for b, r in zip(bars, rows[::-1]):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {r['cpu_ms_per_image']:.2f} ms "
                f"({r['ratio_to_two_views']:.2f}x)", va="center", fontsize=8)
    ax.set_xlabel("CPU ms per image (all threads; lower is better)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(ms) * 1.35)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coco", required=True, help="COCO annotations json")
    p.add_argument("--images", required=True, help="its image folder")
    p.add_argument("--recipe", default="mocov2")
    p.add_argument("--local-crops", type=int, default=6)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--pairs", default="obj-obj-dilate:box,obj-obj-dilate:boxes,obj-obj-dilate:scene,scene-scene:scene",
                   help="mode:local_from pairs, comma-separated")
    add_round_arguments(p)
    p.add_argument("--json", help="also write the JSON here (and a .png beside it)")
    a = p.parse_args(argv)
    from dali_objcrop import ObjCropLoader
    common = dict(boxes="gt", images_dir=a.images, batch_size=a.batch_size, size=224,
                  recipe=a.recipe, seed=a.seed, num_threads=a.threads, device="cpu")
    pairs = [tuple(p.split(":")) for p in a.pairs.split(",") if p]
    configs, baseline = {}, {}
    for mode, src in pairs:
        base = f"{mode}: 2 global"
        if base not in configs:
            configs[base] = ObjCropLoader(a.coco, mode=mode, **common)
        name = f"{mode}: 2 global + {a.local_crops} local ({src})"
        configs[name] = ObjCropLoader(a.coco, mode=mode, local_crops=a.local_crops, local_size=a.local_size,
                                      local_from=src, **common)
        baseline[name] = baseline[base] = base
    first = next(iter(configs.values()))
    machine = machine_info()                      # load average at the start
    rounds = measure_rounds(configs, a.reps, a.warmup, a.seconds)
    rows = []
    for name, rs in rounds.items():
        ms = statistics.median(r[1] for r in rs)
        base = statistics.median(r[1] for r in rounds[baseline[name]])
        rows.append({"loader": name, "pipeline": configs[name].stats["pipeline"],
                     "images_per_s": round(statistics.median(r[0] for r in rs), 1),
                     "cpu_ms_per_image": round(ms, 3), "cpu_ms_per_image_rounds": [round(r[1], 3) for r in rs],
                     "ratio_to_two_views": round(ms / base, 3),
                     "ratio_to_two_views_paired": round(statistics.median(
                         u[1] / t[1] for u, t in zip(rs, rounds[baseline[name]])), 3)})
    out = {"settings": {**vars(a), "images": len(first.index)},
           "pixel_ratio": round(pixel_ratio(224, a.local_size, a.local_crops), 3),
           "goal": "2 global 224 px + 6 local 96 px views <= 1.6x the CPU ms per image of 2 global views",
           "results": rows, "machine": {**machine, "load_average_end": os.getloadavg()}}
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text)
        plot(rows, str(Path(a.json).with_suffix(".png")),
             f"{a.recipe}, batch {a.batch_size}, {a.threads} threads, {len(first.index)} COCO photos; "
             f"pixels x{out['pixel_ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
