"""Loader throughput: every crop mode and crop backend, scene-scene, and a torchvision baseline.

Measures images/s (two 224 px views per image, MoCo-v2 recipe by default) of

* ``ObjCropLoader`` for every mode (``--modes``), every registered crop backend
  (``--backends``) of the DALI-ops graph fed by the NumPy callback (``use_plugin=False``),
  and the loader on dali_objcrop's C++ operators: backend ``plugin`` (DALI reads the files,
  ``fn.objcrop.windows`` + ROI decode + ``fn.objcrop.crop``) and, when asked for,
  ``plugin-dali-crop`` (the windows operator feeding DALI's own crop stage), on the CPU and,
  when torch sees CUDA, on the GPU;
* a torchvision ``DataLoader`` doing the same two-view MoCo-v2 recipe with
  ``--threads`` worker processes (PIL decode, RandomResizedCrop(scale 0.2-1),
  ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, RandomGrayscale p 0.2, PIL Gaussian
  blur sigma 0.1-2 p 0.5 (as the MoCo-v2 code), flip, ToTensor, Normalize).

Method: every configuration is built once; then ``--reps`` rounds run the
configurations round-robin (so a change of machine load hits all of them
alike), each round starting a fresh iterator, discarding ``--warmup`` batches
(the queues the loaders fill ahead), then counting images for ``--seconds``.
A row's ``images_per_s`` is the median over rounds; min, max and the relative
spread ``(max - min) / median`` come with it.  The machine is shared: compare
rows of one run (ratios), not runs.

Usage (settings: :class:`ThroughputConfig`; ``--help`` lists them)::

    python benchmarks/throughput.py                      # embedded synthetic set
    python benchmarks/throughput.py --coco=../shared/data/coco_val2017_subset/annotations/instances.json \\
        --images=../shared/data/coco_val2017_subset/images --json=out/throughput.json --png=out/throughput.png

Output JSON: ``{"results": [{"loader": "dali" | "torchvision", "mode", "backend",
"device": "cpu" | "gpu", "batch_size", "threads", "images_per_s", ...extras}, ...],
"machine": {...}, "ratios": {...}}``; the torchvision rows carry ``"mode": "scene-scene"``.
Ratios include ``cpu: <device>/plugin/<mode> / dali``: the plugin loader's CPU ms per image over
the DALI-ops graph's (lower is better) in the same run.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dali_objcrop.constants import IMAGENET_MEAN, IMAGENET_STD
from dali_objcrop.train.config import ConfigError, parse_or_exit
from dali_objcrop.windows import MODES


# ---------------------------------------------------------------------------------------------
# the torchvision baseline
# ---------------------------------------------------------------------------------------------
class _PILGaussianBlur:
    """MoCo-v2's blur: PIL GaussianBlur with radius sigma ~ U(sigma_lo, sigma_hi)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        import random

        from PIL import ImageFilter
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def mocov2_transform(size: int = 224):
    """The MoCo-v2 augmentation of one view (torchvision, PIL)."""
    from torchvision import transforms as T
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([_PILGaussianBlur((0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


class TwoViewDataset:
    """Image paths -> dict(view1, view2, index), decoded with PIL."""

    def __init__(self, paths: list[str], size: int = 224):
        self.paths, self.transform = list(paths), mocov2_transform(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image
        with Image.open(self.paths[i]) as im:
            img = im.convert("RGB")
        return {"view1": self.transform(img), "view2": self.transform(img), "index": i}


def torchvision_loader(paths: list[str], batch_size: int, workers: int, size: int = 224):
    import torch
    return torch.utils.data.DataLoader(TwoViewDataset(paths, size), batch_size=batch_size, shuffle=True,
                                       num_workers=workers, drop_last=True, persistent_workers=False,
                                       prefetch_factor=2 if workers else None)


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (Linux /proc), 0 where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def _cpu_seconds(it, pids: set[int]) -> float:
    """CPU seconds of this process (all its threads: DALI's too) plus its worker processes.

    Workers are remembered in ``pids`` across iterators: a live (or zombie) worker is read from /proc, and
    once it has been joined its time moves into ``RUSAGE_CHILDREN``, so a worker that exits when an epoch
    ends inside a round keeps counting (reading only the current iterator's workers lost it).
    """
    pids.update(w.pid for w in (getattr(it, "_workers", None) or []) if w.pid)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ru.ru_utime + ru.ru_stime + sum(_proc_cpu_seconds(p) for p in pids)


def measure_once(loader, warmup: int, seconds: float) -> tuple[float, float]:
    """One round: fresh iterator, ``warmup`` batches discarded, then ``seconds`` counted.

    Returns:
        ``(images per second, CPU milliseconds per image)``; the CPU time counts
        every thread and worker process of the loader, so it is robust to other
        load on a shared machine (wall-clock throughput is not).
    """
    it = iter(loader)
    for _ in range(warmup):
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)
    pids: set[int] = set()
    n, t0, c0 = 0, time.perf_counter(), _cpu_seconds(it, pids)
    while time.perf_counter() - t0 < seconds:
        try:
            b = next(it)
        except StopIteration:  # an epoch ended inside the round: the restart is part of the cost
            it = iter(loader)
            continue
        n += len(b["index"])
    dt, cpu = time.perf_counter() - t0, _cpu_seconds(it, pids) - c0
    del it
    return n / dt, (1000.0 * cpu / n if n else float("nan"))


def add_round_arguments(p, batch_size: int = 64, threads: int = 2) -> None:
    """The side-by-side benchmarks' shared flags (argparse): batch size, DALI threads, and the rounds of
    :func:`measure_rounds` (``--seconds`` counted per round after ``--warmup`` batches, ``--reps`` rounds), seed."""
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--threads", type=int, default=threads)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)


def measure_rounds(loaders: dict, reps: int, warmup: int, seconds: float) -> dict[str, list[tuple[float, float]]]:
    """``reps`` rounds of :func:`measure_once` over named loaders, round-robin (load changes on a shared machine
    hit every loader alike): per name, one ``(images/s, CPU ms per image)`` per round."""
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in loaders}
    for _ in range(reps):
        for name, it in loaders.items():
            rounds[name].append(measure_once(it, warmup, seconds))
    return rounds


def machine_info() -> dict:
    import torch
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "load_average_start": os.getloadavg()}
    try:
        import nvidia.dali as dali
        info["dali"] = dali.__version__
    except ImportError:
        pass
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def data_from_args(args) -> tuple[str, str | None]:
    """(COCO json, image folder) from the flags; the embedded synthetic set by default."""
    if args.coco:
        return args.coco, args.images or None
    if args.images:
        return args.images, None
    from dali_objcrop.synth import ensure_default_dataset
    ann = ensure_default_dataset()
    return str(ann), str(Path(ann).parent / "images")


def build_configs(args, data: str, images_dir: str | None) -> list[tuple[dict, object]]:
    """(row template, loader) for every configuration to measure."""
    import torch

    from dali_objcrop.loader import ObjCropLoader
    from dali_objcrop.pipelines import CROP_BACKENDS
    try:  # the fused-kernel backends register themselves when their module is importable
        import dali_objcrop.kernels  # noqa: F401
    except Exception as e:  # noqa: BLE001 - an optional backend must not stop the benchmark
        print(f"[throughput] kernels not loaded: {e}", file=sys.stderr)
    devices = args.devices or (["cpu", "gpu"] if torch.cuda.is_available() else ["cpu"])
    backends = args.backends or list(CROP_BACKENDS) + (["plugin"] if _plugin_available() else [])
    boxes = args.boxes or ("gt" if data.endswith(".json") else None)
    configs = []
    for device in devices:
        for backend in backends:
            for mode in args.modes:
                row = {"loader": "dali", "mode": mode, "backend": backend, "device": device,
                       "batch_size": args.batch_size, "threads": args.threads}
                plugin = backend.startswith("plugin")
                try:
                    ld = ObjCropLoader(data, boxes=boxes if mode != "scene-scene" or boxes else None, mode=mode,
                                       batch_size=args.batch_size, size=args.size, recipe=args.recipe,
                                       num_threads=args.threads, device=device,
                                       crop_backend="dali" if plugin else backend,
                                       seed=args.seed, images_dir=images_dir, rank=0, world_size=1,
                                       max_images=args.max_images or None, use_plugin=plugin,
                                       plugin_crop=(backend == "plugin") if plugin else None)
                    row["pipeline"] = ld.stats["pipeline"]
                except (ValueError, RuntimeError) as e:
                    print(f"[throughput] skip {row}: {e}", file=sys.stderr)
                    continue
                configs.append((row, ld))
    if not args.no_torchvision:
        from dali_objcrop.loader import resolve_data
        index, _ = resolve_data(data, images_dir, args.max_images or None)
        paths = index.paths
        row = {"loader": "torchvision", "mode": "scene-scene", "backend": "torchvision", "device": "cpu",
               "batch_size": args.batch_size, "threads": args.threads}
        configs.append((row, torchvision_loader(paths, args.batch_size, args.threads, args.size)))
    return configs


def _plugin_available() -> bool:
    try:
        from dali_objcrop import plugin
        return plugin.load()
    except Exception as e:  # noqa: BLE001 - the benchmark runs without the operators
        print(f"[throughput] plugin not available: {e}", file=sys.stderr)
        return False


def run(args) -> dict:
    data, images_dir = data_from_args(args)
    machine = machine_info()
    configs = build_configs(args, data, images_dir)
    rounds: list[list[float]] = [[] for _ in configs]
    cpu: list[list[float]] = [[] for _ in configs]
    for r in range(args.reps):
        for k, (row, ld) in enumerate(configs):
            ips, ms = measure_once(ld, args.warmup, args.seconds)
            rounds[k].append(ips)
            cpu[k].append(ms)
            print(f"[round {r + 1}/{args.reps}] {row['loader']:11s} {row['device']} {row['backend']:6s} "
                  f"{row['mode']:15s} {ips:8.1f} img/s  {ms:6.2f} CPU ms/img  (load {os.getloadavg()[0]:.1f})",
                  flush=True)
    results = []
    for (row, _), vals, ms in zip(configs, rounds, cpu):
        med = statistics.median(vals)
        results.append({**row, "images_per_s": round(med, 2), "images_per_s_min": round(min(vals), 2),
                        "images_per_s_max": round(max(vals), 2),
                        "spread": round((max(vals) - min(vals)) / med, 3) if med else None,
                        "rounds": [round(v, 2) for v in vals],
                        "cpu_ms_per_image": round(statistics.median(ms), 3),
                        "cpu_ms_per_image_rounds": [round(v, 3) for v in ms],
                        "recipe": args.recipe, "size": args.size})
    machine["load_average_end"] = os.getloadavg()
    out = {"results": results, "machine": machine, "ratios": ratios(results),
           "ratios_paired": paired_ratios([row for row, _ in configs], rounds),
           "settings": {"data": data, "images": images_dir, "seconds": args.seconds, "reps": args.reps,
                        "warmup": args.warmup, "max_images": args.max_images, "command": " ".join(sys.argv)},
           "config": asdict(args)}
    return out


def paired_ratios(rows: list[dict], rounds: list[list[float]]) -> dict:
    """Median over rounds of each DALI row's images/s over its scene-scene's in the same round (and CPU
    rows over torchvision's): pairs measured seconds apart, so slow drifts of machine load cancel."""
    out = {}
    tv = next((k for k, r in enumerate(rows) if r["loader"] == "torchvision"), None)
    for k, r in enumerate(rows):
        if r["loader"] != "dali":
            continue
        base = next((j for j, s in enumerate(rows) if s["loader"] == "dali" and s["mode"] == "scene-scene"
                     and s["device"] == r["device"] and s["backend"] == r["backend"]), None)
        for name, j in (("scene-scene", base), ("torchvision", tv if r["device"] == "cpu" else None)):
            if j is not None and all(rounds[j]):
                out[f"{r['device']}/{r['backend']}/{r['mode']} / {name}"] = round(
                    statistics.median(a / b for a, b in zip(rounds[k], rounds[j])), 3)
    return out


def ratios(results: list[dict]) -> dict:
    """Each DALI row over the same device/backend's scene-scene, and CPU rows over torchvision.

    Two figures per ratio: images/s (wall clock) and the inverse ratio of CPU
    milliseconds per image (``cpu:``), which other load on the machine distorts less.
    """
    out = {}
    tv = next((r for r in results if r["loader"] == "torchvision"), None)
    for r in results:
        if r["loader"] != "dali":
            continue
        key = f"{r['device']}/{r['backend']}/{r['mode']}"
        base = next((s for s in results if s["loader"] == "dali" and s["mode"] == "scene-scene"
                     and s["device"] == r["device"] and s["backend"] == r["backend"]), None)
        for name, ref in (("scene-scene", base), ("torchvision", tv if r["device"] == "cpu" else None)):
            if ref and ref["images_per_s"]:
                out[f"{key} / {name}"] = round(r["images_per_s"] / ref["images_per_s"], 3)
                if r["cpu_ms_per_image"]:
                    out[f"cpu: {key} / {name}"] = round(ref["cpu_ms_per_image"] / r["cpu_ms_per_image"], 3)
        graph = next((s for s in results if s["loader"] == "dali" and s["backend"] == "dali"
                      and s["mode"] == r["mode"] and s["device"] == r["device"]), None)
        if r["backend"].startswith("plugin") and graph and graph["cpu_ms_per_image"]:
            # the goal reads this way round: plugin CPU ms per image / the DALI-ops graph's
            out[f"cpu ms: {key} / dali"] = round(r["cpu_ms_per_image"] / graph["cpu_ms_per_image"], 3)
            out[f"{key} / dali"] = round(r["images_per_s"] / graph["images_per_s"], 3)
    return out


def plot(results: list[dict], png: str, title: str = "") -> None:
    """Two bar charts, one bar per row: images/s (median, whiskers min..max) and CPU ms per image."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['loader']}\n{r['device']}/{r['backend']}\n{r['mode']}" for r in results]
    colours = ["#888888" if r["loader"] == "torchvision" else ("#2a7ab9" if r["mode"] == "scene-scene"
                                                                  else "#e07b39") for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 2.0 * len(results)), 4.4))
    panels = ((axes[0], "images_per_s", "rounds", "images/s (two views each), higher is better", "{:.0f}"),
              (axes[1], "cpu_ms_per_image", "cpu_ms_per_image_rounds", "CPU ms per image, lower is better",
               "{:.1f}"))
    for ax, key, per_round, ylabel, fmt in panels:
        med = np.array([r[key] for r in results], dtype=float)
        lo = med - np.array([min(r[per_round]) for r in results])
        hi = np.array([max(r[per_round]) for r in results]) - med
        ax.bar(range(len(results)), med, yerr=[lo, hi], color=colours, capsize=4)
        for i, v in enumerate(med):
            ax.text(i, v, fmt.format(v), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(title or "loader throughput (median of rounds, whiskers min..max)", fontsize=9)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


@dataclass
class ThroughputConfig:
    """What to measure and for how long (typed --field=value flags, dali_objcrop.train.config)."""

    coco: str = ""                    # COCO annotation json (default: the embedded synthetic set)
    images: str = ""                  # image folder (of --coco, or alone: a plain folder, scene-scene only)
    boxes: str = ""                   # a .boxes store (default: the GT boxes of --coco)
    json: str = ""                    # write the results here
    png: str = ""                     # write a bar chart here
    batch_size: int = 64
    threads: int = 2                  # DALI threads = torchvision workers
    seconds: float = 10.0             # counted seconds per configuration and round
    reps: int = 3                     # rounds (median and spread over them)
    warmup: int = 3                   # batches discarded at the start of each round
    modes: list[str] = field(default_factory=lambda: ["all"])  # crop modes, or all
    # crop backends: those of the DALI-ops graph (dali, cupy), plugin, plugin-dali-crop
    # (default: every registered one of the graph, plus plugin where it builds)
    backends: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)          # cpu, gpu (default: cpu, plus gpu if present)
    recipe: str = "mocov2"            # mocov2 | byol
    size: int = 224
    seed: int = 0
    max_images: int = 0               # use only the first N images (0: all)
    no_torchvision: bool = False      # skip the torchvision baseline

    def __post_init__(self) -> None:
        if self.modes == ["all"]:
            self.modes = list(MODES)
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ConfigError(f"unknown modes {bad}; choose from {MODES}")
        for d in self.devices:
            if d not in ("cpu", "gpu"):
                raise ConfigError(f"unknown device {d!r}")
        if self.recipe not in ("mocov2", "byol"):
            raise ConfigError(f"--recipe must be mocov2 or byol, got {self.recipe!r}")
        for name in ("batch_size", "threads", "reps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.seconds <= 0 or self.warmup < 0:
            raise ConfigError("--seconds must be > 0 and --warmup >= 0")


def parse_args(argv=None) -> ThroughputConfig:
    """The settings from ``--field=value`` flags; a bad one exits 2 with its message."""
    return parse_or_exit([ThroughputConfig], argv, "throughput.py")[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    out = run(args)
    for r in out["results"]:
        print(f"{r['loader']:11s} {r['device']} {r['backend']:11s} {r['mode']:15s} "
              f"{r['images_per_s']:8.1f} img/s  (min {r['images_per_s_min']:.1f}, max {r['images_per_s_max']:.1f})"
              f"  {r['cpu_ms_per_image']:6.2f} CPU ms/img")
    for k, v in out["ratios"].items():
        print(f"  {k}: {v:.3f}")
    for k, v in out["ratios_paired"].items():
        print(f"  paired: {k}: {v:.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    if args.png:
        la = out["machine"]["load_average_start"][0], out["machine"]["load_average_end"][0]
        plot(out["results"], args.png, f"{'/'.join(Path(out['settings']['data']).parts[-3:])}: batch {args.batch_size}, "
             f"{args.threads} threads, {args.recipe}; median of {args.reps} rounds (whiskers min..max); "
             f"machine load {la[0]:.1f} -> {la[1]:.1f} on {os.cpu_count()} cores")
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
