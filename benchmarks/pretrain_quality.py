"""Does object-aware cropping pay off?  A small-scale reproduction of the paper's headline.

Mishra et al. (TMLR 2022) report OpenImages linear-probe mAP 49.8 (MoCo-v2, scene-scene crops) ->
58.6 (obj-obj-dilate).  This script measures the same comparison at a scale a 2-core CPU can run:
MoCo-v2 pretraining of a small ResNet at reduced resolution on real COCO photos, in three settings
with an identical budget (epochs, batch size, learning rate, augmentations, initial weights per seed):

* ``scene-scene``           two RandomResizedCrops of the image (the baseline);
* ``obj-obj-dilate+gt``     obj-obj-dilate conditioned on ground-truth COCO boxes;
* ``obj-obj-dilate+bing``   obj-obj-dilate conditioned on BING proposals (top 10, NMS 0.5);
* ``obj-scene+bing``        the paper's obj-scene on BING proposals (``--only`` / ``--settings``; not in the
                            default list; ``benchmarks/gpu_quality.sh`` runs it);
* multi-crop (``--settings=scene-mc,obj-mc``; not in the default list): ``scene-mc`` -- scene-scene global
  views plus ``local_crops`` (6) local views cut from the whole image -- against ``obj-mc`` --
  obj-obj-dilate on ground-truth boxes plus 6 local views cut inside the object views' region
  (``local_from="box"``), at the same budget (``local_size``, ``local_scale``); their paired difference
  per seed is in the summary beside the differences to scene-scene.  The local views come from the
  loader's operators' pipeline (the DALI-ops graph refuses them);

then, on a deterministic eval transform of the same photos (short side resized, centre crop of
``size``: ``dali_objcrop.train.linear_eval.extract_features``), a frozen-feature linear probe
(multi-label mAP) and a kNN classifier (multi-label mAP of similarity-weighted neighbour votes), on a
fixed seeded image-level train/test split.  Every COCO
photo of the default set holds a person, so ``person`` is left out of the probe's classes, as are
classes without a positive image in the train or the test split (AP is undefined there).

Pretraining sees only the train split's images (no labels).  Each (setting, seed) cell is written
to ``OUT/cells/SETTING__seedS.json`` when done: a killed run resumes cell by cell, ``--only SETTING
--seed S`` reruns one cell alone, and the summary (``OUT/pretrain_quality.json``, a Markdown table,
``OUT/pretrain_quality.png``) is rebuilt from every cell present that matches this configuration.

Runs (settings: :class:`Budget` and :class:`Options`, typed ``--field=value`` flags in the trainer's
style, :mod:`dali_objcrop.train.config`; ``--help`` lists them)::

    # the default: ~2 hours on an unloaded 2-core CPU (3 settings x 3 seeds)
    python benchmarks/pretrain_quality.py --out=runs/pretrain_quality

    # one cell alone (its numbers merge into the same summary)
    python benchmarks/pretrain_quality.py --out=runs/pretrain_quality --only=obj-obj-dilate+bing --seed=1

    # scaled up on a GPU: full-width ResNet-18 (or 50) at 128-224 px, more epochs
    python benchmarks/pretrain_quality.py --arch=resnet18 --size=128 --epochs=200 --batch-size=256 \\
        --device=cuda --num-threads=8 --out=runs/pq_gpu

    # minutes, end to end, on the embedded synthetic set (GT boxes stand in for BING if it is missing)
    python benchmarks/pretrain_quality.py --quick --out=/tmp/pq_quick

Each cell trains with the trainer itself (:func:`dali_objcrop.train.pretrain.train`: its model
builder, optimizer, schedules and step; the narrow CPU backbone is its ``resnet18-wW`` arch) fed by
:class:`dali_objcrop.loader.ObjCropLoader` over the train split, then probes with
``dali_objcrop.train.linear_eval`` / ``knn_eval``; BING boxes come from ``dali-objcrop proposals``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dali_objcrop.train.config import ConfigError, parse_configs

REPO = Path(__file__).resolve().parents[1]
DEFAULT_COCO = REPO.parent / "shared" / "data" / "coco_val2017_subset" / "annotations" / "instances.json"
DEFAULT_BING_MODELS = REPO.parent / "shared" / "models" / "bing"

# setting -> (crop mode, boxes source)
SETTINGS: dict[str, tuple[str, str | None]] = {
    "scene-scene": ("scene-scene", None),
    "obj-scene+bing": ("obj-scene", "bing"),       # the paper's obj-scene (BING); not in the CPU default
    "obj-obj-dilate+gt": ("obj-obj-dilate", "gt"),
    "obj-obj-dilate+bing": ("obj-obj-dilate", "bing"),
    "scene-mc": ("scene-scene", None),            # + local views from the scene (multi-crop baseline)
    "obj-mc": ("obj-obj-dilate", "gt"),            # + local views inside the object views' region
}
# multi-crop settings -> where their Budget.local_crops local views are cut (CropConfig.local_from)
MULTI_CROP: dict[str, str] = {"scene-mc": "scene", "obj-mc": "box"}
DEFAULT_SETTINGS = ["scene-scene", "obj-obj-dilate+gt", "obj-obj-dilate+bing"]  # what --settings runs by default
BASELINE = "scene-scene"
# further paired comparisons: setting -> the setting it is compared with, seed by seed
COMPARE = {"obj-mc": "scene-mc"}
METRICS = ("linear_map", "knn_map")


@dataclass(frozen=True)
class Budget:
    """Everything that is the same for every setting (the experiment's fixed budget).

    Args:
        arch: the trainer's ``arch``: ``resnet18-w0.25`` style (a ResNet-18 whose widths are scaled: narrow
            and CPU-cheap) or any torchvision ResNet name (``resnet18``, ``resnet50``) for GPUs.
        size: crop side in pixels (pretraining views and the eval transform).
        epochs: pretraining epochs over the train split.
        batch_size: images per step.
        lr: SGD learning rate per 256 images (scaled by ``batch_size / 256``, as MoCo).
        weight_decay, momentum, temperature, queue_size: MoCo-v2 settings (queue and momentum shrunk
            to the dataset: ~1k images cannot fill a 65536-key queue; a queue shorter than an epoch holds no
            older key of the query's own image).
        head_hidden, head_out: projection head widths.
        warmup_epochs: linear lr warm-up before the cosine decay.
        dilate: delta of obj-obj-dilate (0.1 for COCO, as the paper).
        top_k: proposals per image the crops draw from.
        min_box_size: boxes narrower or shorter than this many pixels are widened to it (the loader's
            224-px rule; scale it with photos that were downscaled, e.g. 112 at half size).
        recipe: augmentation recipe of the loader.
        share_heads: one projection head for both views even with an object view (the paper: separate).
        same_head_init: separate heads start from the same weights (independently initialised ones collapsed
            to the chance loss here; see ``dali_objcrop.train.heads.build_heads``).
        amp: the trainer's mixed precision (``auto``: bf16 on a GPU, off on the CPU; ``off``; ``bf16``).
        local_crops, local_size, local_scale: the local views of the multi-crop settings (:data:`MULTI_CROP`;
            the others have none): how many per image, their side in pixels (half of ``size`` by default;
            DINO: 96 of 224), their area range within the region they are cut from (DINO's).
        knn_k, knn_t: kNN neighbours and temperature.
        probe_epochs, probe_lr, probe_wd, probe_solver: linear probe (``linear_eval.linear_probe`` on
            standardised features: ``adamw`` mini-batch epochs, or ``lbfgs``, the regularised optimum).
    """

    arch: str = "resnet18-w0.25"
    size: int = 64
    epochs: int = 40
    batch_size: int = 64
    lr: float = 0.24
    weight_decay: float = 5e-4
    momentum: float = 0.99
    temperature: float = 0.2
    queue_size: int = 512
    head_hidden: int = 256
    head_out: int = 64
    warmup_epochs: int = 2
    dilate: float = 0.1
    top_k: int = 10
    min_box_size: int = 224
    recipe: str = "mocov2"
    share_heads: bool = False
    same_head_init: bool = True
    amp: str = "auto"
    knn_k: int = 20
    knn_t: float = 0.07
    probe_epochs: int = 100
    probe_lr: float = 1e-3
    probe_wd: float = 5e-4
    probe_solver: str = "adamw"
    local_crops: int = 6
    local_size: int = 32
    local_scale: tuple[float, float] = (0.05, 0.4)

    def __post_init__(self) -> None:
        for name in ("size", "epochs", "batch_size", "queue_size", "knn_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)!r}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr!r}")
        if self.probe_solver not in ("adamw", "lbfgs"):  # checked here, not after an hour of pretraining
            raise ConfigError(f"--probe-solver must be adamw or lbfgs, got {self.probe_solver!r}")
        if self.amp not in ("auto", "off", "bf16"):
            raise ConfigError(f"--amp must be auto, off or bf16, got {self.amp!r}")
        if self.local_crops < 1 or self.local_size < 1:
            raise ConfigError(f"--local-crops and --local-size must be >= 1, got {self.local_crops!r}, "
                              f"{self.local_size!r}")


@dataclass
class Options:
    """How and where to run (not part of the budget: cells of different options merge)."""

    coco: str = str(DEFAULT_COCO)     # COCO json (default: ../shared COCO subset)
    images: str = ""                  # image folder (default: images/ beside the json's folder)
    out: str = "runs/pretrain_quality"  # output folder (cells/, JSON, PNG)
    quick: bool = False               # minutes, end to end, on a synthetic set (tiny budget; not a measurement)
    quick_n: int = 96                 # synthetic images of --quick
    settings: list[str] = field(default_factory=lambda: list(DEFAULT_SETTINGS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    only: str = ""                    # run only this setting (with --seed)
    seed: int | None = None           # with --only: that one seed
    rerun: bool = False               # recompute cells already present
    summarise_only: bool = False      # run no cell: rebuild the JSON, table and plot from the cells present
    no_random_init: bool = False      # skip the untrained-backbone floor
    save_backbones: bool = True       # write each cell's pretrained backbone (state_dict) beside its JSON
    split_seed: int = 0
    test_frac: float = 0.3
    exclude: list[str] = field(default_factory=lambda: ["person"])  # classes left out of the probe
    device: str = "cpu"               # torch device of the model: cpu | cuda
    loader_device: str = "cpu"        # cpu | gpu | auto
    num_threads: int = 2              # DALI threads
    eval_workers: int = 0             # DataLoader workers of feature extraction
    torch_threads: int = 0            # torch intra-op threads (0: torch's default)
    log_every: int = 5                # print the loss every N epochs (0: never)
    label: str = ""                   # free text stored in the JSON (e.g. 'reduced budget')
    bing_store: str = ""              # a precomputed BING .boxes store for the images
    bing_method: str = "bing"         # dali-objcrop proposals --method
    bing_model_dir: str = str(DEFAULT_BING_MODELS) if DEFAULT_BING_MODELS.is_dir() else ""
    bing_top_k: int = 10
    bing_workers: int = 2
    bing_fallback_gt: bool = False    # if BING fails, GT boxes stand in (said in the JSON; default with --quick)

    def __post_init__(self) -> None:
        bad = [s for s in self.settings + ([self.only] if self.only else []) if s not in SETTINGS]
        if bad:
            raise ConfigError(f"unknown settings {bad}; choose from {list(SETTINGS)}")
        if self.seed is not None and not self.only:
            raise ConfigError("--seed needs --only=SETTING")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.loader_device not in ("cpu", "gpu", "auto"):
            raise ConfigError(f"--loader-device must be cpu, gpu or auto, got {self.loader_device!r}")


# ---- data: split, labels, eval images ----------------------------------------------------------------------
def probe_classes(y: np.ndarray, names: list[str], train: np.ndarray, test: np.ndarray,
                  exclude: tuple[str, ...] = ("person",)) -> tuple[np.ndarray, dict]:
    """Columns the probe scores: not excluded, with a positive image in both the train and the test split.

    Returns:
        ``(columns, report)``: the kept column indices and why the others were dropped.
    """
    pos_tr, pos_te = y[train].sum(0), y[test].sum(0)
    excluded = [j for j, n in enumerate(names) if n in exclude]
    unknown = set(exclude) - set(names)
    if unknown:
        raise ValueError(f"--exclude names unknown classes {sorted(unknown)}")
    keep = [j for j in range(len(names)) if j not in excluded and pos_tr[j] > 0 and pos_te[j] > 0]
    report = {"excluded": [names[j] for j in excluded],
              "absent_from_train": [names[j] for j in range(len(names)) if pos_tr[j] == 0 and j not in excluded],
              "absent_from_test": [names[j] for j in range(len(names))
                                   if pos_te[j] == 0 and pos_tr[j] > 0 and j not in excluded],
              "kept": [names[j] for j in keep]}
    if not keep:
        raise ValueError("no class has positives in both splits; nothing to probe")
    return np.asarray(keep, dtype=np.int64), report


# ---- pretraining ---------------------------------------------------------------------------------------------
def local_settings(budget: Budget, setting: str) -> dict:
    """The local-view settings of a setting (the trainer's / loader's ``local_*``); {} without local views."""
    if setting not in MULTI_CROP:
        return {}
    return dict(local_crops=budget.local_crops, local_size=budget.local_size, local_scale=tuple(budget.local_scale),
                local_from=MULTI_CROP[setting])


def trainer_config(budget: Budget, mode: str, seed: int, steps_per_epoch: int, device: str, out: str,
                   local: dict | None = None):
    """The trainer's :class:`~dali_objcrop.train.pretrain.Config` of one cell: MoCo-v2 with this budget
    (``local``: :func:`local_settings`, the multi-crop settings' local views)."""
    from dali_objcrop.train.pretrain import Config
    return Config(**(local or {}), method="mocov2", crops=mode, size=budget.size, dilate=budget.dilate,
                  recipe=budget.recipe, arch=budget.arch, share_heads=budget.share_heads,
                  same_head_init=budget.same_head_init,
                  head_hidden=budget.head_hidden, head_out=budget.head_out, queue_size=budget.queue_size,
                  temperature=budget.temperature, momentum=budget.momentum, batch_size=budget.batch_size,
                  epochs=budget.epochs, lr=budget.lr, weight_decay=budget.weight_decay,
                  warmup_steps=budget.warmup_epochs * steps_per_epoch, amp=budget.amp, device=device, seed=seed,
                  out=out, ckpt_every=-1, log_every=steps_per_epoch, progress=False)


def initial_model(budget: Budget, mode: str, seed: int, device: str = "cpu", local: dict | None = None):
    """The trainer's MoCo-v2 model of a cell before training (the same weights for every setting of a seed:
    local views add no parameters, they only pick the head they go through)."""
    from dali_objcrop.train.pretrain import build_model
    torch.manual_seed(seed)
    return build_model(trainer_config(budget, mode, seed, 1, device, "", local).resolved())


def pretrain(loader, budget: Budget, mode: str, seed: int, device: str, log_every: int = 0,
             local: dict | None = None) -> tuple[object, dict]:
    """MoCo-v2 pretraining of one cell by the trainer (:func:`dali_objcrop.train.pretrain.train`).

    Returns:
        ``(backbone, log)``: the trained backbone (eval mode) and the per-epoch losses and timings.
    """
    from dali_objcrop.train.pretrain import train
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {budget.batch_size} leaves no full batch in {len(loader.index)} images")
    model = initial_model(budget, mode, seed, device, local)  # paired design: one init per seed for every setting
    with tempfile.TemporaryDirectory() as tmp:        # the trainer's config.json and log.jsonl
        cfg = trainer_config(budget, mode, seed, steps_per_epoch, device, tmp, local)
        t0 = time.perf_counter()
        summary = train(cfg, loader=loader, model=model)
        dt = time.perf_counter() - t0
    losses = summary["epoch_losses"]
    if log_every:
        for e in range(log_every - 1, len(losses), log_every):
            print(f"    epoch {e + 1}/{budget.epochs} loss {losses[e]:.4f}", flush=True)
    log = {"epoch_losses": losses, "steps": summary["steps"], "seconds": dt,
           "images_per_s": summary["steps"] * budget.batch_size / dt if dt > 0 else math.nan,
           "data_wait_frac": summary["data_wait_frac"], "trainer_config": summary["config"],
           "loader_stats": _jsonable(loader.stats)}
    return model.backbone.eval(), log


# ---- evaluation ----------------------------------------------------------------------------------------------
def evaluate(backbone, exp: "Experiment", budget: Budget, seed: int, args) -> dict:
    """Frozen features (the trainer's centre-crop extraction), then its linear probe and kNN, on the test split.

    Returns:
        ``{"linear_map", "knn_map", "per_class_ap": {"linear", "knn"}, "feature_dim"}``.
    """
    from dali_objcrop.train.knn_eval import knn_eval
    from dali_objcrop.train.linear_eval import extract_features, linear_probe_map
    x = extract_features(backbone, exp.paths, budget.size, batch_size=128, workers=args.eval_workers,
                         device=args.device)
    y = torch.from_numpy(exp.y[:, exp.cols].astype(np.float32))
    tr, te = torch.from_numpy(exp.train), torch.from_numpy(exp.test)
    lin = linear_probe_map(x[tr], y[tr], x[te], y[te], epochs=budget.probe_epochs, lr=budget.probe_lr,
                           weight_decay=budget.probe_wd, seed=seed, solver=budget.probe_solver)
    knn = knn_eval(x[tr], y[tr], x[te], y[te], k=budget.knn_k, temperature=budget.knn_t)
    return {"linear_map": float(lin["map"]), "knn_map": float(knn["map"]), "feature_dim": int(x.shape[1]),
            "per_class_ap": {"linear": lin["per_class_ap"], "knn": knn["per_class_ap"]},
            "probe_train_loss": lin["train_loss"]}


# ---- the experiment ------------------------------------------------------------------------------------------
@dataclass
class Experiment:
    """What every cell shares: data, split, labels, classes, eval images, box stores."""

    coco_json: str
    images_dir: str
    index: object                 # dali_objcrop.ImageIndex of every usable image
    paths: list[str]              # the images' files, in index order
    train: np.ndarray
    test: np.ndarray
    y: np.ndarray
    names: list[str]
    cols: np.ndarray
    class_report: dict
    stores: dict                  # "gt" / "bing" -> BoxStore
    store_notes: dict


def bing_store(args, coco_json: str, images_dir: str, out: Path) -> tuple[object, dict]:
    """BING proposals of every image: ``--bing-store``, else ``dali-objcrop proposals`` into OUT (cached)."""
    from dali_objcrop.boxstore import BoxStore
    if args.bing_store:
        s = BoxStore.load(args.bing_store)
        return s, {"source": f"BING store {args.bing_store}", "stand_in": False, "meta": _jsonable(s.meta)}
    path = out / f"bing_{args.bing_method}_top{args.bing_top_k}.boxes"
    cmd = [sys.executable, "-m", "dali_objcrop", "proposals", coco_json, "--images", images_dir, "--out", str(path),
           "--method", args.bing_method, "--top-k", str(args.bing_top_k), "--workers", str(args.bing_workers)]
    if args.bing_model_dir:
        cmd += ["--model-dir", str(args.bing_model_dir)]
    if not path.exists():
        print("[pq] BING proposals:", " ".join(cmd), flush=True)
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if r.returncode != 0 or not path.exists():
            msg = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"BING proposals failed (rc {r.returncode}): {' | '.join(msg)}")
    s = BoxStore.load(path)
    return s, {"source": f"BING via dali-objcrop proposals --method {args.bing_method}", "stand_in": False,
               "command": cmd, "path": str(path), "meta": _jsonable(s.meta)}


def prepare(args, budget: Budget, out: Path) -> Experiment:
    """Data, split, labels, box stores and eval images (shared by every cell)."""
    from dali_objcrop.boxstore import BoxStore
    from dali_objcrop.dataset import ImageIndex
    coco_json = str(Path(args.coco).resolve())
    images_dir = str(Path(args.images).resolve()) if args.images else str(_images_beside(Path(coco_json)))
    from dali_objcrop.train.linear_eval import coco_image_labels, split_indices
    index = ImageIndex.from_coco(coco_json, images_dir)
    # labels of every class (the column filter is ours: it also needs the split)
    labels = coco_image_labels(coco_json, images_dir, drop_uninformative=False)
    if list(labels.keys) != list(index.keys):
        pos = {k: i for i, k in enumerate(labels.keys)}
        labels.targets = labels.targets[[pos[k] for k in index.keys]]
    y, names = labels.targets.astype(np.uint8), labels.classes
    train, test = split_indices(len(index), args.test_frac, args.split_seed)
    cols, report = probe_classes(y, names, train, test, tuple(args.exclude))
    stores: dict = {"gt": BoxStore.from_coco(coco_json)}
    notes: dict = {"gt": {"source": "COCO ground-truth boxes (largest first)", "meta": _jsonable(stores["gt"].meta)}}
    wanted = {SETTINGS[s][1] for s in args.settings}
    if "bing" in wanted:
        try:
            stores["bing"], notes["bing"] = bing_store(args, coco_json, images_dir, out)
        except Exception as e:
            if not args.bing_fallback_gt:
                raise
            # --quick on a checkout without BING: GT boxes stand in, and the JSON says so
            stores["bing"] = stores["gt"]
            notes["bing"] = {"source": "STAND-IN: ground-truth boxes (BING unavailable)", "stand_in": True,
                             "error": str(e)}
            print(f"[pq] BING unavailable ({e}); GT boxes stand in for it", flush=True)
    for k, s in stores.items():
        notes[k]["mean_area_fraction_top_k"] = s.mean_area_fraction(budget.top_k) if s.num_boxes else None
    print(f"[pq] {len(index)} images ({len(train)} train / {len(test)} test), {len(cols)} probe classes",
          flush=True)
    return Experiment(coco_json, images_dir, index, index.paths, train, test, y, names, cols, report, stores, notes)


def make_loader(exp: Experiment, setting: str, budget: Budget, seed: int, args):
    """The project's loader over the train split's images, for one setting."""
    from dali_objcrop.dataset import ImageIndex
    from dali_objcrop.loader import ObjCropLoader
    mode, boxes = SETTINGS[setting]
    sub = ImageIndex(root=exp.index.root, keys=[exp.index.keys[i] for i in exp.train],
                     sizes=exp.index.sizes[exp.train])
    return ObjCropLoader(sub, boxes=None if boxes is None else exp.stores[boxes], mode=mode,
                         batch_size=budget.batch_size, size=budget.size, recipe=budget.recipe, seed=seed,
                         num_threads=args.num_threads, device=args.loader_device, rank=0, world_size=1,
                         drop_last=True, dilate=budget.dilate, top_k=budget.top_k,
                         min_box_size=budget.min_box_size, **local_settings(budget, setting))


def run_cell(exp: Experiment, setting: str, seed: int, budget: Budget, args) -> dict:
    """Pretrain one (setting, seed) and evaluate it; returns the cell record."""
    t0 = time.time()
    loader = make_loader(exp, setting, budget, seed, args)
    backbone, log = pretrain(loader, budget, SETTINGS[setting][0], seed, args.device, args.log_every,
                             local_settings(budget, setting))
    del loader
    if args.save_backbones:  # lets other probes re-evaluate a cell without pretraining it again
        torch.save(backbone.state_dict(), Path(args.out) / "cells" / f"{setting}__seed{seed}.backbone.pt")
    metrics = evaluate(backbone, exp, budget, seed, args)
    return {"setting": setting, "seed": seed, "mode": SETTINGS[setting][0], "boxes": SETTINGS[setting][1],
            **local_settings(budget, setting), **metrics, "pretrain": log, "seconds": time.time() - t0,
            "torch_threads": torch.get_num_threads()}


def random_init_cell(exp: Experiment, seed: int, budget: Budget, args) -> dict:
    """The same probes on an untrained backbone (same init as every setting's seed): the floor."""
    backbone = initial_model(budget, BASELINE, seed, args.device).backbone.to(args.device)
    return {"setting": "random-init", "seed": seed, **evaluate(backbone, exp, budget, seed, args)}


def _paired(rows: list[dict], by: dict, base: str) -> dict:
    """Per metric: the per-seed differences ``row - base`` (the seeds both have), their mean, std and signs."""
    d = {}
    for m in METRICS:
        pairs = [(c["seed"], c[m] - by[(base, c["seed"])][m]) for c in rows if (base, c["seed"]) in by]
        if pairs:
            v = np.array([p[1] for p in pairs])
            d[m] = {"per_seed": {str(sd): float(x) for sd, x in pairs}, "mean": float(v.mean()),
                    "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
                    "n_positive": int((v > 0).sum())}
    return d


def summarise(cells: list[dict], settings: list[str]) -> dict:
    """Mean/std per setting and metric, the per-seed paired differences to scene-scene and, for the settings
    of :data:`COMPARE` (multi-crop: obj-mc), to the setting they are compared with."""
    summary: dict = {"per_setting": {}, "paired_diff_to_" + BASELINE: {}}
    by = {(c["setting"], c["seed"]): c for c in cells}
    for s in dict.fromkeys(list(settings) + ["random-init"]):
        rows = [c for c in cells if c["setting"] == s]
        if not rows:
            continue
        summary["per_setting"][s] = {
            m: {"mean": float(np.mean([c[m] for c in rows])),
                "std": float(np.std([c[m] for c in rows], ddof=1)) if len(rows) > 1 else 0.0,
                "n": len(rows), "seeds": [c["seed"] for c in rows], "values": [c[m] for c in rows]}
            for m in METRICS}
        if s in (BASELINE, "random-init"):
            continue
        summary["paired_diff_to_" + BASELINE][s] = _paired(rows, by, BASELINE)
        if s in COMPARE and any(c["setting"] == COMPARE[s] for c in cells):
            summary.setdefault("paired_diff_to_" + COMPARE[s], {})[s] = _paired(rows, by, COMPARE[s])
    return summary


def markdown_table(summary: dict) -> str:
    """The README table: mean +- std (n seeds) per setting, and the paired difference to scene-scene (and,
    below it, the other paired comparisons of :data:`COMPARE` present: multi-crop obj-mc vs scene-mc)."""
    pct = lambda x: f"{100 * x:.2f}"  # noqa: E731

    def diff_cells(d: dict) -> list[str]:
        out = []
        for m in METRICS:
            if d.get(m) is None:
                out.append("—")
                continue
            sd = f"{100 * d[m]['std']:.2f}" if d[m]["n"] > 1 else "n/a"
            out.append(f"{100 * d[m]['mean']:+.2f} ± {sd} ({d[m]['n_positive']}/{d[m]['n']} seeds > 0)")
        return out

    diffs = summary["paired_diff_to_" + BASELINE]
    lines = ["| setting | linear-probe mAP (%) | kNN mAP (%) | paired diff linear (pp) | paired diff kNN (pp) |",
             "|---|---|---|---|---|"]
    for s, r in summary["per_setting"].items():
        cells = [f"{pct(r[m]['mean'])} ± {pct(r[m]['std']) if r[m]['n'] > 1 else 'n/a'} (n={r[m]['n']})"
                 for m in METRICS]
        dd = diff_cells(diffs.get(s, {}))
        lines.append(f"| {s} | {cells[0]} | {cells[1]} | {dd[0]} | {dd[1]} |")
    for base in dict.fromkeys(COMPARE.values()):
        for s, d in summary.get("paired_diff_to_" + base, {}).items():
            dd = diff_cells(d)
            lines.append(f"| {s} vs {base} | | | {dd[0]} | {dd[1]} |")
    return "\n".join(lines)


def plot(cells: list[dict], summary: dict, path: Path, title: str, chance: float | None = None) -> None:
    """Per-seed points and mean +- std bars per setting, one panel per metric (dashed: chance level)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = list(summary["per_setting"])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.5 * len(METRICS), 4.2))
    for ax, m in zip(np.atleast_1d(axes), METRICS):
        for i, s in enumerate(settings):
            r = summary["per_setting"][s][m]
            ax.bar(i, 100 * r["mean"], yerr=100 * r["std"], color="#bbb" if s == "random-init" else f"C{i}",
                   alpha=0.6, capsize=4)
            ax.scatter([i] * len(r["values"]), [100 * v for v in r["values"]], color="k", s=14, zorder=3)
        ax.set_xticks(range(len(settings)), settings, rotation=20, ha="right", fontsize=8)
        if chance is not None:
            ax.axhline(100 * chance, color="k", ls="--", lw=0.8, label="chance (test prevalence)")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_ylabel(f"{m.replace('_', ' ')} (%)")
        lo = min([100 * min(summary["per_setting"][s][m]["values"]) for s in settings] +
                 ([100 * chance] if chance is not None else []))
        ax.set_ylim(max(0.0, lo - 3), None)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command line --------------------------------------------------------------------------------------------
QUICK = dict(arch="resnet18-w0.125", size=48, epochs=2, batch_size=32, queue_size=128, head_hidden=64,
             head_out=32, warmup_epochs=0, probe_epochs=50, knn_k=5, local_size=24)


def parse_args(argv: list[str] | None = None) -> tuple[Budget, Options]:
    """:class:`Budget` and :class:`Options` from ``--field=value`` flags (``--quick`` starts from :data:`QUICK`)."""
    budget, opts = parse_configs([Budget, Options], argv)
    if opts.quick:  # again, on the quick budget: flags given explicitly still win
        budget, opts = parse_configs([dataclasses.replace(Budget(), **QUICK), Options], argv)
    return budget, opts


def main(argv: list[str] | None = None) -> int:
    try:
        budget, args = parse_args(argv)
    except ConfigError as e:
        print(f"pretrain_quality.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(args.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    if args.quick:
        from dali_objcrop.synth import make_synthetic
        synth_dir = out / "synthetic"
        if not (synth_dir / "annotations.json").exists():
            make_synthetic(synth_dir, n=args.quick_n, seed=0)
        args = dataclasses.replace(args, coco=str(synth_dir / "annotations.json"), images="", exclude=[],
                                   bing_fallback_gt=True)

    settings = [args.only] if args.only else list(args.settings)
    seeds = [args.seed] if args.seed is not None else list(args.seeds)
    exp = prepare(args, budget, out)
    config = {"budget": asdict(budget), "data": {"coco": exp.coco_json, "images": exp.images_dir,
              "num_images": len(exp.index), "bad_images": exp.index.bad, "quick": args.quick},
              "split": {"seed": args.split_seed, "test_frac": args.test_frac,
                        "train_keys": [exp.index.keys[i] for i in exp.train],
                        "test_keys": [exp.index.keys[i] for i in exp.test]},
              "classes": {**exp.class_report, "num_probe_classes": len(exp.cols)},
              "boxes": exp.store_notes, "eval_transform": f"linear_eval.extract_features: short side to "
                                                          f"{round(budget.size * 8 / 7)}, centre crop {budget.size}, "
                                                          "ImageNet mean/std"}
    fp = _fingerprint(config)

    for seed in [] if args.summarise_only else seeds:
        for s in settings + ([] if args.no_random_init or args.only else ["random-init"]):
            path = out / "cells" / f"{s}__seed{seed}.json"
            if path.exists() and not args.rerun and json.loads(path.read_text()).get("config_fp") == fp:
                print(f"[pq] {s} seed {seed}: done before ({path})", flush=True)
                continue
            print(f"[pq] {s} seed {seed} ...", flush=True)
            cell = random_init_cell(exp, seed, budget, args) if s == "random-init" \
                else run_cell(exp, s, seed, budget, args)
            cell["config_fp"] = fp
            _write_json(path, cell)
            print(f"[pq] {s} seed {seed}: linear mAP {100 * cell['linear_map']:.2f}  "
                  f"kNN mAP {100 * cell['knn_map']:.2f}", flush=True)

    cells = [c for c in (json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json")))
             if c.get("config_fp") == fp]
    if not cells:
        raise SystemExit(f"no finished cell in {out / 'cells'} matches this configuration (fingerprint {fp}); "
                         "run without --summarise-only, or with the flags of the run that made the cells")
    summary = summarise(cells, list(SETTINGS))
    table = markdown_table(summary)
    # the command that computes these cells (a --summarise-only rebuild records the run's command)
    cmd = shlex.join(["python", "benchmarks/pretrain_quality.py"] +
                     [a for a in (sys.argv[1:] if argv is None else argv) if a != "--summarise-only"])
    result = {"label": args.label or ("quick smoke run (synthetic data, not a measurement)" if args.quick else ""),
              "command": cmd, "config_fp": fp, **config, "options": asdict(args),
              # expected AP of random scores is the class's test prevalence: the chance level of both metrics
              "chance_map": float(exp.y[exp.test][:, exp.cols].mean(0).mean()), "summary": summary, "table_markdown": table,
              "cells": cells,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "cpus": os.cpu_count(), "device": args.device,
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    _write_json(out / "pretrain_quality.json", result)
    (out / "pretrain_quality.md").write_text(table + "\n")
    plot(cells, summary, out / "pretrain_quality.png",
         f"MoCo-v2 {budget.arch} {budget.size}px {budget.epochs} ep, {len(exp.train)} train imgs, "
         f"{len(exp.cols)} classes" + (f"\n{args.label}" if args.label else ""), result["chance_map"])
    print(table)
    print(f"[pq] wrote {out / 'pretrain_quality.json'}, {out / 'pretrain_quality.png'}")
    return 0


# ---- helpers -------------------------------------------------------------------------------------------------
def _images_beside(coco_json: Path) -> Path:
    from dali_objcrop.dataset import coco_images_dir   # the one images-folder rule
    try:
        return coco_images_dir(coco_json)
    except FileNotFoundError as e:
        raise ValueError(f"{e}; pass --images") from None


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def _fingerprint(config: dict) -> str:
    """Cells are merged only with cells of the same budget, data, split and classes."""
    import hashlib
    key = {k: config[k] for k in ("budget", "split", "classes")}
    # the multi-crop fields count only where they differ from their defaults: cells computed before they
    # existed (every setting then ran without local views) still match a budget that leaves them alone
    default = asdict(Budget())
    key["budget"] = {k: v for k, v in key["budget"].items()
                     if not (k in _LOCAL_BUDGET and _same(v, default[k]))}
    key["data"] = {k: config["data"][k] for k in ("coco", "num_images")}
    key["boxes"] = {k: v.get("source") for k, v in config["boxes"].items()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


_LOCAL_BUDGET = ("local_crops", "local_size", "local_scale")


def _same(a, b) -> bool:
    return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)


def _write_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(_jsonable(obj), f, indent=1, allow_nan=True)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
