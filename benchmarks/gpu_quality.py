"""One prepared GPU run: does object-aware cropping pay off at a larger scale, and the loader's data wait.

Driven by ``benchmarks/gpu_quality.sh`` (``prepare`` here, ``run`` on the GPU machine, ``dry-run`` on a CPU);
``docs/gpu_quality.md`` says what it measures, the time budget and the exact sequence of device calls.

``prepare`` (here, CPU, once) writes a git-ignored carry folder (default ``.carry/gpuq``, under 60 MiB):

* the COCO photos of ``../shared`` downscaled by ``--scale`` (0.5: 640x480 -> 320x240, OpenCV INTER_AREA,
  JPEG quality 90) with the COCO json rewritten consistently (image sizes, boxes, areas; same order, same
  file names, so the seeded 840 / 360 split of ``pretrain_quality.py`` is the CPU study's split);
* the BING store (``dali-objcrop proposals --method bing``, top 10, computed here on the ORIGINAL photos as in
  the CPU study; boxes are stored normalised, so they hold unchanged for the downscaled photos);
* ``--speed-images`` original full-size photos with their annotations for the data-wait figure;
* ``MANIFEST.json``: the scale, the matching ``min_box_size`` (224 px x scale, so small boxes are widened to
  the same fraction of the image as at full size), counts, bytes, checksums and the commands used.

``run --profile=gpu`` (on one H100/H200 with DALI carried over) then runs, under one wall-clock budget:

1. the data-wait figure: ``benchmarks/pretrain_speed.py``, MoCo-v2 ResNet-50, 224 px, bf16, batch 128, the
   loader (background input preparation, ``prepare_ahead=1``) against a resident batch, on the full-size
   photos repeated into one epoch longer than the measured steps;
2. the quality comparison: ``benchmarks/pretrain_quality.py`` cells (scene-scene, obj-scene+bing,
   obj-obj-dilate+gt, obj-obj-dilate+bing; seeds 0, 1, 2), one process per cell, one lane of processes per
   setting running at once on the GPU (seed-major within a lane, so a run cut by its deadline keeps whole
   seeds of every setting), then the untrained floor (random-init) and the summary;
3. the report: ``OUT/gpu_quality.json`` (everything), ``OUT/gpu_quality.md`` (the README table, the per-seed
   paired differences, the data-wait table, the card, the commands), ``OUT/gpu_quality.png`` and
   ``OUT/gpu_quality.log``.

``run --profile=toy`` is the same code at toy scale on the CPU (the test runs it).  Work files live in
``--work`` (on the GPU machine ``/tmp/gpu_quality_work``, which survives while the machine stays warm): a rerun
skips the cells and the speed figure already done by the same configuration.

Flags of ``pretrain_quality.py`` / ``pretrain_speed.py`` are passed only as ``--name=value`` (list-valued flags
such as ``--seeds`` are left at their defaults), so the call survives their move to dataclass configs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_COCO = SHARED / "data" / "coco_val2017_subset" / "annotations" / "instances.json"
DEFAULT_BING_MODELS = SHARED / "models" / "bing"
PQ = REPO / "benchmarks" / "pretrain_quality.py"
SPEED = REPO / "benchmarks" / "pretrain_speed.py"

SEEDS = (0, 1, 2)  # pretrain_quality.py's default --seeds (not passed: a list flag)
SETTINGS = ("scene-scene", "obj-scene+bing", "obj-obj-dilate+gt", "obj-obj-dilate+bing")
# the multi-crop comparison (pretrain_quality.py's scene-mc / obj-mc: 6 local views from the scene or inside the
# object views' region): its own call, `run --settings=scene-mc,obj-mc` (gpu_run.sh step gpu_quality_mc)
MULTI_CROP_SETTINGS = ("scene-mc", "obj-mc")
BASE_MIN_BOX = 224  # the loader's small-box rule at full size (docs/method.md)
MANIFEST = "MANIFEST.json"
OUT_FILES = ("gpu_quality.json", "gpu_quality.md", "gpu_quality.png", "gpu_quality.log")


@dataclass(frozen=True)
class Profile:
    """Everything that differs between the GPU run and its CPU dry run (sizes and devices only).

    Attributes:
        quality: budget flags of ``pretrain_quality.py`` (``--name=value``; the rest keep the CPU study's
            defaults: lr 0.24 per 256, wd 5e-4, queue 512, key momentum 0.99, T 0.2, 2 warm-up epochs).
        lanes: ``pretrain_quality.py`` processes running at once (one per setting on the GPU).
        speed: flags of ``pretrain_speed.py``.
        speed_reps: the speed photos are listed this many times (one epoch longer than ``steps``).
        total_s: wall-clock budget of the whole run; speed_s: cap of the data-wait phase; tail_s: kept after
            the lanes' deadline for the random-init floor, the summary and the report.
        cell_min_s: a lane starts no new cell with less time than this left before its deadline.
    """

    name: str
    quality: dict
    device: str
    loader_device: str
    num_threads: int
    eval_workers: int
    torch_threads: int
    lanes: int
    speed: dict
    speed_reps: int
    total_s: float
    speed_s: float
    tail_s: float
    cell_min_s: float
    needs_gpu: bool
    label: str = ""


PROFILES = {
    # Budget arithmetic (docs/gpu_quality.md): 15 min of device time = ~2 min machine start + ~3 min DALI's
    # 9 carry parts + this run (~4.6 min with its transfer) + a rerun of it (which skips finished work) +
    # ~1 min slack.  Inside the 255 s: ~10 s set-up, <= 75 s data wait, lanes until 255 - 50 s, then random-init,
    # the summary and the report.  Quality budget: the CPU study's schedule (40 epochs x 13 steps of 64 = 520 MoCo
    # steps) with the CPU study's hyper-parameters, scaled up in network (full-width ResNet-18, MoCo-v2 head
    # 2048-128) and resolution (128 px, 4x the pixels).  Estimated ~12-15 ms a step alone on an H200
    # (0.3 T multiply-adds a step: 64 images x 8 ResNet-18 passes at 128 px; the RN50 figure of the README
    # ran ~46 T multiply-adds/s), ~30 s a cell with 4 lanes sharing the GPU, + ~12 s of start and evaluation:
    # ~130 s a lane for its 3 seeds.
    "gpu": Profile(
        name="gpu",
        quality=dict(arch="resnet18", size=128, epochs=40, batch_size=64, head_hidden=2048, head_out=128,
                     queue_size=512, warmup_epochs=2, probe_epochs=100, knn_k=20),
        device="cuda", loader_device="gpu", num_threads=3, eval_workers=0, torch_threads=1, lanes=4,
        speed=dict(arch="resnet50", size=224, batch_size=128, steps=50, rounds=2, num_threads=8,
                   prepare_ahead=1, queue_size=65536, boxes="gt", crops="obj-obj-dilate", torch_threads=0),
        speed_reps=56, total_s=255.0, speed_s=75.0, tail_s=50.0, cell_min_s=25.0, needs_gpu=True,
        label="GPU run (benchmarks/gpu_quality.sh run): full-width ResNet-18, 128 px, 40 epochs, batch 64"),
    # Same code paths, toy sizes: a few photos, a few steps, a tiny network, the CPU.
    "toy": Profile(
        name="toy",
        quality=dict(arch="resnet18-w0.125", size=32, epochs=1, batch_size=8, head_hidden=32, head_out=16,
                     queue_size=32, warmup_epochs=0, probe_epochs=5, knn_k=3),
        device="cpu", loader_device="cpu", num_threads=1, eval_workers=0, torch_threads=1, lanes=2,
        speed=dict(arch="resnet18", size=32, batch_size=4, steps=3, rounds=2, num_threads=1, prepare_ahead=1,
                   queue_size=64, boxes="gt", crops="obj-obj-dilate", torch_threads=1),
        speed_reps=2, total_s=1500.0, speed_s=300.0, tail_s=300.0, cell_min_s=0.0, needs_gpu=False,
        label="DRY RUN (toy scale on the CPU; not a measurement)"),
}


# ---- prepare (here) ---------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _images_beside(coco_json: Path) -> Path:
    from dali_objcrop.dataset import coco_images_dir   # the one images-folder rule
    try:
        return coco_images_dir(coco_json)
    except FileNotFoundError as e:
        raise SystemExit(f"{e}; pass --images") from None


def scale_coco(coco: dict, images: list[dict], new_sizes: dict[int, tuple[int, int]]) -> dict:
    """The COCO dict restricted to ``images`` with sizes, boxes and areas scaled to ``new_sizes`` (per axis).

    Args:
        coco: the source COCO dict (``images``, ``annotations``, ``categories``...).
        images: the image records to keep, in the order to keep.
        new_sizes: image id -> (new width, new height).
    """
    ids = {im["id"] for im in images}
    factors = {im["id"]: (new_sizes[im["id"]][0] / im["width"], new_sizes[im["id"]][1] / im["height"])
               for im in images}
    out_images = [{**im, "width": new_sizes[im["id"]][0], "height": new_sizes[im["id"]][1]} for im in images]
    anns = []
    for a in coco["annotations"]:
        if a["image_id"] not in ids:
            continue
        sx, sy = factors[a["image_id"]]
        x, y, w, h = a["bbox"]
        b = {k: v for k, v in a.items() if k != "segmentation"}  # polygons are not used and not scaled
        b["bbox"] = [round(x * sx, 3), round(y * sy, 3), round(w * sx, 3), round(h * sy, 3)]
        if "area" in a:
            b["area"] = round(a["area"] * sx * sy, 3)
        anns.append(b)
    return {**{k: v for k, v in coco.items() if k not in ("images", "annotations")},
            "images": out_images, "annotations": anns}


def subset_coco(coco: dict, images: list[dict]) -> dict:
    """The COCO dict restricted to ``images`` (sizes and boxes unchanged)."""
    ids = {im["id"] for im in images}
    return {**{k: v for k, v in coco.items() if k not in ("images", "annotations")}, "images": list(images),
            "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}


def _check_ignored(path: Path) -> None:
    """The carry folder must be git-ignored where it lies inside a checkout (else every device call sends it)."""
    try:
        r = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=path.parent, capture_output=True)
    except OSError:
        return
    if r.returncode == 1:
        raise SystemExit(f"{path} is inside a git checkout and not ignored; use a path under .carry/ "
                         "(ignored by .gitignore) so that only the calls that name it carry it")


def prepare(args) -> int:
    """Write the carry folder (downscaled photos + rewritten json, BING store, speed photos, manifest)."""
    import cv2
    import numpy as np
    from dali_objcrop.boxstore import BoxStore

    t0 = time.time()
    src_json = Path(args.coco).resolve()
    src_images = Path(args.images).resolve() if args.images else _images_beside(src_json)
    out = Path(args.out).resolve()
    work = Path(args.work).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_ignored(out)
    if out.exists():
        shutil.rmtree(out)
    (out / "coco" / "images").mkdir(parents=True)
    (out / "speed" / "images").mkdir(parents=True)
    work.mkdir(parents=True, exist_ok=True)

    coco = json.loads(src_json.read_text())
    images = coco["images"][: args.max_images] if args.max_images else list(coco["images"])
    if len(images) < 2:
        raise SystemExit(f"{src_json}: need at least 2 images, got {len(images)}")

    # 1. downscaled photos, same names and order
    new_sizes: dict[int, tuple[int, int]] = {}
    for im in images:
        path = src_images / im["file_name"]
        a = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if a is None:
            raise SystemExit(f"cannot decode {path}")
        if (a.shape[1], a.shape[0]) != (im["width"], im["height"]):
            raise SystemExit(f"{path}: {a.shape[1]}x{a.shape[0]} pixels, the json says {im['width']}x{im['height']}")
        w, h = max(1, round(im["width"] * args.scale)), max(1, round(im["height"] * args.scale))
        small = cv2.resize(a, (w, h), interpolation=cv2.INTER_AREA)
        if not cv2.imwrite(str(out / "coco" / "images" / im["file_name"]), small,
                           [cv2.IMWRITE_JPEG_QUALITY, args.jpeg_quality]):
            raise SystemExit(f"cannot write the downscaled copy of {path}")
        new_sizes[im["id"]] = (w, h)
    scaled = scale_coco(coco, images, new_sizes)
    (out / "coco" / "annotations").mkdir()
    (out / "coco" / "annotations" / "instances.json").write_text(json.dumps(scaled))

    # 2. BING on the original photos (as the CPU study), then the same normalised boxes with the new sizes
    orig_json = src_json
    if len(images) != len(coco["images"]):
        orig_json = work / "orig_subset.json"
        orig_json.write_text(json.dumps(subset_coco(coco, images)))
    orig_store_path = work / f"bing_orig_{len(images)}_top{args.top_k}.boxes"
    bing_cmd = [sys.executable, "-m", "dali_objcrop", "proposals", str(orig_json), "--images", str(src_images),
                "--out", str(orig_store_path), "--method", "bing", "--top-k", str(args.top_k),
                "--workers", str(args.workers), "--no-progress"]
    if args.bing_model_dir:
        bing_cmd += ["--model-dir", str(args.bing_model_dir)]
    keys = [im["file_name"] for im in images]
    if orig_store_path.exists() and list(BoxStore.load(orig_store_path).keys) != keys:
        orig_store_path.unlink()  # a store of other images: recompute
    if not orig_store_path.exists():
        print("[gpuq] BING:", shlex.join(bing_cmd), flush=True)
        r = subprocess.run(bing_cmd, cwd=REPO, env=_child_env())
        if r.returncode != 0 or not orig_store_path.exists():
            raise SystemExit(f"BING proposals failed (rc {r.returncode}): {shlex.join(bing_cmd)}")
    orig = BoxStore.load(orig_store_path)
    if not str(orig.meta.get("method", "")).startswith("bing"):
        raise SystemExit(f"{orig_store_path}: method {orig.meta.get('method')!r}, expected BING")
    rows = [orig.row_of(k) for k in keys]
    boxes = [np.asarray(orig.boxes_of(r), dtype=np.float64) for r in rows]
    scores = ([np.asarray(orig.scores[orig.offsets[r]:orig.offsets[r + 1]]) for r in rows]
              if orig.scores is not None else None)
    sizes = np.array([new_sizes[im["id"]] for im in images], dtype=np.int32)
    store = BoxStore.from_arrays(keys, sizes, boxes, scores, method=orig.meta.get("method", "bing"),
                                 params={**orig.meta.get("params", {}), "computed_on": "original photos",
                                         "rescaled_to_scale": args.scale}, normalized=True)
    if store.num_boxes != sum(len(b) for b in boxes):
        raise SystemExit(f"rescaling dropped boxes: {store.num_boxes} of {sum(len(b) for b in boxes)} kept")
    store_path = store.save(out / f"bing_top{args.top_k}.boxes")

    # 3. full-size photos for the data-wait figure (the bytes as they are)
    speed_images = images[: args.speed_images]
    for im in speed_images:
        shutil.copyfile(src_images / im["file_name"], out / "speed" / "images" / im["file_name"])
    (out / "speed" / "instances.json").write_text(json.dumps(subset_coco(coco, speed_images)))

    total = _dir_bytes(out)
    manifest = {
        "what": "carry folder of benchmarks/gpu_quality.py ; send it as carry [\"<this folder>\"]",
        "source_coco": str(src_json), "source_images": str(src_images),
        "num_images": len(images), "scale": args.scale, "jpeg_quality": args.jpeg_quality,
        "min_box_size": max(1, round(BASE_MIN_BOX * args.scale)),
        "bing": {"command": bing_cmd, "top_k": args.top_k, "store": store_path.name, "meta": store.meta,
                 "mean_area_fraction_top_k": store.mean_area_fraction(args.top_k)},
        "speed_images": len(speed_images),
        "bytes": {"total": total, "coco": _dir_bytes(out / "coco"), "speed": _dir_bytes(out / "speed"),
                  "bing": store_path.stat().st_size},
        "sha256": {"coco/annotations/instances.json": _sha256(out / "coco" / "annotations" / "instances.json"),
                   store_path.name: _sha256(store_path),
                   "speed/instances.json": _sha256(out / "speed" / "instances.json")},
        "command": os.environ.get("GPUQ_COMMAND") or shlex.join([sys.executable] + sys.argv),
        "seconds": round(time.time() - t0, 1),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    mib = _dir_bytes(out) / 2**20
    if mib > args.max_mib:
        raise SystemExit(f"{out} holds {mib:.1f} MiB, over --max-mib {args.max_mib}: lower --scale, "
                         "--jpeg-quality or --speed-images")
    rel = os.path.relpath(out, REPO)
    print(f"[gpuq] wrote {out}: {len(images)} photos at x{args.scale} ({manifest['bytes']['coco'] / 2**20:.1f} MiB), "
          f"{len(speed_images)} full-size speed photos ({manifest['bytes']['speed'] / 2**20:.1f} MiB), BING store "
          f"({store.num_boxes} boxes); {mib:.1f} MiB in all, {manifest['seconds']:.0f} s")
    print(f"[gpuq] on the GPU machine: carry [\"{rel}\"], command: bash benchmarks/gpu_quality.sh run --data={rel}")
    return 0


# ---- run (GPU machine, or the CPU at toy scale) ---------------------------------------------------------------
def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Log:
    """Prints and appends to ``WORK/gpu_quality.log`` (thread-safe)."""

    def __init__(self, path: Path):
        self.path, self.lock = path, threading.Lock()

    def __call__(self, msg: str) -> None:
        line = f"[gpuq {time.strftime('%H:%M:%S')}] {msg}"
        with self.lock:
            print(line, flush=True)
            with open(self.path, "a") as f:
                f.write(line + "\n")


def run_with_deadline(cmd: list[str], timeout: float, log_path: Path) -> tuple[int | None, float]:
    """Run ``cmd`` (output appended to ``log_path``) for at most ``timeout`` s; returns ``(rc, seconds)``.

    ``rc`` is None when the command ran out of time: its whole process group (it runs in a session of its
    own) gets SIGTERM, then SIGKILL 5 s later.
    """
    t0 = time.perf_counter()
    if timeout <= 0:
        return None, 0.0
    with open(log_path, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        p = subprocess.Popen(cmd, cwd=REPO, env=_child_env(), stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            f.write(f"[gpuq] killed after {timeout:.0f} s (deadline)\n")
    return rc, time.perf_counter() - t0


def quality_flags(profile: Profile, data: Path, work: Path, manifest: dict) -> list[str]:
    """The ``pretrain_quality.py`` flags every cell of this run shares (``--name=value`` only)."""
    budget = {**profile.quality, "min_box_size": manifest["min_box_size"]}
    flags = [f"--coco={data / 'coco' / 'annotations' / 'instances.json'}", f"--images={data / 'coco' / 'images'}",
             f"--bing-store={data / manifest['bing']['store']}", f"--out={work / 'pq'}",
             "--split-seed=0", "--test-frac=0.3"]
    flags += [f"--{k.replace('_', '-')}={v}" for k, v in budget.items()]
    flags += [f"--device={profile.device}", f"--loader-device={profile.loader_device}",
              f"--num-threads={profile.num_threads}", f"--eval-workers={profile.eval_workers}",
              f"--torch-threads={profile.torch_threads}", "--log-every=10", "--save-backbones=false",
              f"--label={profile.label}"]
    return flags


def speed_data(data: Path, work: Path, reps: int) -> Path:
    """The speed photos listed ``reps`` times (links ``rNN_<name>``) in a COCO json; returns the json path."""
    src = json.loads((data / "speed" / "instances.json").read_text())
    root = work / "speed"
    if root.exists():
        shutil.rmtree(root)
    (root / "images").mkdir(parents=True)
    images, anns, next_ann = [], [], 1
    by_image: dict[int, list[dict]] = {}
    for a in src["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for r in range(reps):
        for im in src["images"]:
            name = f"r{r:02d}_{im['file_name']}"
            os.symlink((data / "speed" / "images" / im["file_name"]).resolve(), root / "images" / name)
            new_id = len(images) + 1
            images.append({**im, "id": new_id, "file_name": name})
            for a in by_image.get(im["id"], []):
                anns.append({**a, "id": next_ann, "image_id": new_id})
                next_ann += 1
    path = root / "instances.json"
    path.write_text(json.dumps({**{k: v for k, v in src.items() if k not in ("images", "annotations")},
                                "images": images, "annotations": anns}))
    return path


def environment(profile: Profile) -> dict:
    """Card (nvidia-smi), versions; raises SystemExit where the GPU profile lacks its GPU or DALI."""
    env: dict = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = smi.stdout.strip() if smi.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        env["nvidia_smi"] = None
    env["card"] = env["nvidia_smi"].splitlines()[0].split(",")[0].strip() if env["nvidia_smi"] else None
    probe = ("import json, torch\nr = {'torch': torch.__version__, 'cuda': torch.cuda.is_available()}\n"
             "try:\n import nvidia.dali as d; r['dali'] = d.__version__\nexcept Exception as e:\n r['dali'] = None\n"
             " r['dali_error'] = f'{type(e).__name__}: {e}'\nprint(json.dumps(r))\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_child_env(), timeout=120)
    try:
        env.update(json.loads(r.stdout.strip().splitlines()[-1]))
    except (json.JSONDecodeError, IndexError):
        raise SystemExit(f"cannot import torch here: {r.stderr.strip()[-500:]}") from None
    if profile.needs_gpu:
        if not env["card"] or not env["cuda"]:
            raise SystemExit("no CUDA GPU here (nvidia-smi / torch.cuda): the gpu profile needs one "
                             "(use dry-run on a CPU)")
        if not env["dali"]:
            raise SystemExit(f"DALI is not importable ({env.get('dali_error')}): send the carry-dali parts first "
                             "(docs/gpu_quality.md), so that /tmp/dali_site exists")
    return env


def run_key(profile: Profile, manifest: dict, qflags: list[str]) -> str:
    """Identifies the configuration of the work folder's finished cells (a rerun reuses them only if equal)."""
    key = {"manifest_sha256": manifest["sha256"], "quality_flags": qflags, "speed": profile.speed,
           "speed_reps": profile.speed_reps}  # not the time limits or lanes: a rerun may change those
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run(args) -> int:
    """Data wait, the quality lanes, random-init and summary, then the report; always writes the report."""
    t_start = time.time()
    profile = PROFILES[args.profile]
    over = {k: getattr(args, k) for k in ("total_s", "lanes") if getattr(args, k) is not None}
    if args.epochs is not None:
        over["quality"] = {**profile.quality, "epochs": args.epochs}
    profile = replace(profile, **over)
    deadline = t_start + profile.total_s
    data = Path(args.data).resolve()
    work = Path(args.work or ("/tmp/gpu_quality_work" if profile.needs_gpu else "runs/gpu_quality_work")).resolve()
    out = Path(args.out or os.environ.get("OUT") or "runs/gpu_quality").resolve()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    log = Log(work / "gpu_quality.log")
    command = os.environ.get("GPUQ_COMMAND") or shlex.join([sys.executable] + sys.argv)
    log(f"profile {profile.name}, budget {profile.total_s:.0f} s, data {data}, work {work}, out {out}")
    log(f"command: {command}")

    if not (data / MANIFEST).exists():
        raise SystemExit(f"{data / MANIFEST} is missing: run `bash benchmarks/gpu_quality.sh prepare` here and "
                         "carry its folder (docs/gpu_quality.md)")
    manifest = json.loads((data / MANIFEST).read_text())
    for rel, digest in manifest["sha256"].items():
        if _sha256(data / rel) != digest:
            raise SystemExit(f"{data / rel} differs from its checksum in {MANIFEST}: resend the carry folder")
    env = environment(profile)
    log(f"card: {env['card']}; torch {env['torch']}, DALI {env['dali']}, {env['cpus']} CPUs")

    qflags = quality_flags(profile, data, work, manifest)
    key = run_key(profile, manifest, qflags)
    key_file = work / "RUN_KEY"
    if not key_file.exists() or key_file.read_text().strip() != key:
        for stale in ("pq", "pretrain_speed.json", "commands.jsonl"):  # another configuration's: start afresh
            p = work / stale
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        key_file.write_text(key)
    timings: dict = {"phases": {}, "cells": []}
    history = work / "commands.jsonl"  # every command run for this configuration, over all attempts

    def record(phase: str, cmd: list[str]) -> None:
        with open(history, "a") as f:
            f.write(json.dumps({"phase": phase, "cmd": shlex.join(cmd), "time": time.time()}) + "\n")

    # 1. data wait: MoCo-v2 ResNet-50 224 px bf16 batch 128, loader vs resident batch
    speed_json = work / "pretrain_speed.json"
    speed_cmd = [sys.executable, str(SPEED)]
    speed_rc: int | None | str = "reused"
    if speed_json.exists() and not args.redo_speed:
        log(f"data wait: reusing {speed_json} (same configuration; --redo-speed measures again)")
    else:
        t = time.perf_counter()
        speed_path = speed_data(data, work, profile.speed_reps)
        speed_cmd += [f"--data={speed_path}", f"--json={speed_json}"] + \
                     [f"--{k.replace('_', '-')}={v}" for k, v in profile.speed.items()]
        log(f"data wait: {shlex.join(speed_cmd)}")
        record("speed", speed_cmd)
        speed_rc, secs = run_with_deadline(speed_cmd, min(profile.speed_s, deadline - time.time()),
                                           work / "logs" / "speed.log")
        timings["phases"]["speed_s"] = round(time.perf_counter() - t, 1)
        log(f"data wait: rc {speed_rc}, {secs:.0f} s")
    speed = json.loads(speed_json.read_text()) if speed_json.exists() else None

    # 2. quality lanes: one process per cell, seed-major within a lane, all lanes at once
    t_q = time.time()
    lane_deadline = deadline - profile.tail_s
    settings = tuple(args.settings.split(",")) if getattr(args, "settings", "") else SETTINGS
    lanes = [list(settings[i::profile.lanes]) for i in range(profile.lanes)]
    cells_dir = work / "pq" / "cells"
    lock = threading.Lock()

    def lane(i: int, settings: list[str]) -> None:
        last = 0.0  # this lane's last cell's seconds: a cell that would not finish before the deadline is not begun
        for seed in SEEDS:
            for s in settings:
                rec = {"setting": s, "seed": seed, "lane": i}
                if (cells_dir / f"{s}__seed{seed}.json").exists():
                    rec.update(status="done before", seconds=0.0)
                else:
                    left = lane_deadline - time.time()
                    if left < max(profile.cell_min_s, 0.9 * last):
                        rec.update(status="not started (deadline)", seconds=0.0)
                    else:
                        cmd = [sys.executable, str(PQ)] + qflags + [f"--only={s}", f"--seed={seed}"]
                        with lock:
                            record("quality", cmd)
                        rc, secs = run_with_deadline(cmd, left, work / "logs" / f"lane{i}.log")
                        # the cell file is written atomically once the cell is evaluated: it counts even when the
                        # process was stopped afterwards (pretrain_quality.py then rebuilds its summary and plot)
                        ok = (cells_dir / f"{s}__seed{seed}.json").exists()
                        last = secs
                        why = "" if rc == 0 else (" (stopped at the deadline while summarising)" if rc is None
                                                  else f" (rc {rc} after writing it)")
                        rec.update(status="done" if ok else ("killed (deadline)" if rc is None else f"failed rc {rc}"),
                                   seconds=round(secs, 1), note=why.strip(" ()") if ok else "")
                    log(f"cell {s} seed {seed} (lane {i}): {rec['status']}, {rec['seconds']:.0f} s")
                with lock:
                    timings["cells"].append(rec)

    threads = [threading.Thread(target=lane, args=(i, ls), daemon=True) for i, ls in enumerate(lanes) if ls]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    timings["phases"]["lanes_s"] = round(time.time() - t_q, 1)
    done = {(c["setting"], c["seed"]) for c in timings["cells"] if c["status"] in ("done", "done before")}
    complete = len(done) == len(settings) * len(SEEDS)

    # 3. random-init floor + summary (the default-settings call runs only random-init when every cell is there),
    #    else (or if that fails) the summary of the cells there are
    t = time.perf_counter()
    final_cmd = [sys.executable, str(PQ)] + qflags + ([f"--settings={','.join(settings)}"] if settings != SETTINGS
                                                      else [])
    summary_rc: int | None = None
    if complete:
        left = deadline - time.time() - 25  # keeps 25 s for the summary-only fallback inside the budget
        log(f"random-init floor + summary ({left:.0f} s left): {shlex.join(final_cmd)}")
        summary_rc, _ = run_with_deadline(final_cmd, left, work / "logs" / "final.log")
        record("quality", final_cmd)
    else:
        log(f"{len(done)} of {len(settings) * len(SEEDS)} cells finished: no random-init floor, summary only")
    if summary_rc != 0 and any(cells_dir.glob("*.json")):
        summarise_cmd = final_cmd + ["--summarise-only"]
        summary_rc, _ = run_with_deadline(summarise_cmd, max(20.0, deadline - time.time()),
                                          work / "logs" / "final.log")
        record("quality", summarise_cmd)
    timings["phases"]["random_init_and_summary_s"] = round(time.perf_counter() - t, 1)
    pq_json = work / "pq" / "pretrain_quality.json"
    quality = json.loads(pq_json.read_text()) if summary_rc == 0 and pq_json.exists() else None

    # 4. report
    past = [json.loads(line) for line in history.read_text().splitlines()] if history.exists() else []
    quality_cmds = [c["cmd"] for c in past if c["phase"] == "quality"]
    speed_cmds = [c["cmd"] for c in past if c["phase"] == "speed"]
    timings["phases"]["total_s"] = round(time.time() - t_start, 1)
    status = {"cells_expected": len(settings) * len(SEEDS), "cells_done": len(done), "complete": complete,
              "random_init": bool(quality and "random-init" in quality["summary"]["per_setting"]),
              "speed": "ok" if speed else f"missing (rc {speed_rc})", "summary_rc": summary_rc}
    result = {"study": "gpu_quality", "profile": profile.name, "label": profile.label, "command": command,
              "card": env["card"], "environment": env, "status": status,
              "budget": {"profile": asdict(profile), "min_box_size": manifest["min_box_size"],
                         "note": "docs/gpu_quality.md, 'Budget'"},
              "timings": timings, "data": manifest, "quality_commands": quality_cmds,
              "quality_common": shlex.join(final_cmd),
              "speed_command": speed_cmds[-1] if speed_cmds else "(not run)",
              "quality": quality, "speed": speed}
    (out / "gpu_quality.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "gpu_quality.md").write_text(markdown(result))
    png = work / "pq" / "pretrain_quality.png"
    if quality and png.exists():
        shutil.copyfile(png, out / "gpu_quality.png")
    with open(out / "gpu_quality.log", "w") as f:
        for p in [work / "gpu_quality.log"] + sorted((work / "logs").glob("*.log")):
            f.write(f"===== {p.name}\n{p.read_text(errors='replace')}\n")
    log(f"status {json.dumps(status)}; wrote {', '.join(n for n in OUT_FILES if (out / n).exists())} in {out}")
    print((out / "gpu_quality.md").read_text())
    return 0 if (quality and speed and complete) else 1


# ---- report ---------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    """The README-ready Markdown: quality table, per-seed paired differences, data wait, card, commands."""
    q, sp, st = result["quality"], result["speed"], result["status"]
    p = result["budget"]["profile"]
    b = {**p["quality"], "min_box_size": result["budget"]["min_box_size"]}
    lines = [f"# Does it pay off at GPU scale? ({result['label']})", "",
             f"Card: **{result['card'] or 'none (CPU)'}** "
             f"({result['environment'].get('nvidia_smi') or 'no nvidia-smi'}); "
             f"torch {result['environment'].get('torch')}, DALI {result['environment'].get('dali')}.",
             f"Status: {st['cells_done']}/{st['cells_expected']} cells, random-init floor "
             f"{'yes' if st['random_init'] else 'no'}, data wait {st['speed']}; "
             f"{result['timings']['phases'].get('total_s')} s in all.", "",
             "Budget: MoCo-v2, " + ", ".join(f"{k} {v}" for k, v in b.items()) +
             f"; photos downscaled x{result['data']['scale']} (min box {result['data']['min_box_size']} px); "
             f"{p['lanes']} cells at a time; seeds {', '.join(map(str, SEEDS))}.", ""]
    if q:
        lines += ["## Linear probe and kNN on the held-back photos", "",
                  f"{len(q['split']['train_keys'])} train / {len(q['split']['test_keys'])} test photos (seed "
                  f"{q['split']['seed']}), {q['classes']['num_probe_classes']} classes, chance "
                  f"{100 * q['chance_map']:.2f}% mAP.", "", q["table_markdown"], "",
                  "## Paired differences to scene-scene, per seed (pp)", "",
                  "| setting | metric | " + " | ".join(f"seed {s}" for s in SEEDS) + " | mean ± std |",
                  "|---|---|" + "---|" * len(SEEDS) + "---|"]
        for s, d in q["summary"]["paired_diff_to_scene-scene"].items():
            for m, v in d.items():
                per = [f"{100 * v['per_seed'][str(k)]:+.2f}" if str(k) in v["per_seed"] else "—" for k in SEEDS]
                sd = f"{100 * v['std']:.2f}" if v["n"] > 1 else "n/a"
                lines.append(f"| {s} | {m} | " + " | ".join(per) + f" | {100 * v['mean']:+.2f} ± {sd} |")
        lines.append("")
    else:
        lines += ["## Linear probe and kNN", "", "No summary: no cell finished (see gpu_quality.log).", ""]
    lines += ["## Data wait: MoCo-v2 " + f"{p['speed']['arch']} {p['speed']['size']} px, batch "
              f"{p['speed']['batch_size']}, prepare_ahead {p['speed']['prepare_ahead']}", ""]
    if sp:
        s = sp["summary"]
        lines += ["| feed | images/s | data wait (share of step time) |", "|---|---|---|",
                  f"| loader | {s['loader_images_per_s']:,.1f} | {100 * s['loader_data_wait_frac']:.2f}% |",
                  f"| resident batch | {s['resident_images_per_s']:,.1f} | {100 * s['resident_data_wait_frac']:.2f}% |",
                  "", f"Loader / resident: {s.get('loader_over_resident', float('nan')):.3f}; goal data wait < 3%: "
                  f"{'met' if s.get('goal_data_wait_under_3pct_met') else 'NOT met'} "
                  f"(device {sp.get('device')}, amp {sp['config'].get('amp')}, {sp['config'].get('steps')} steps x "
                  f"{len([r for r in sp['runs'] if r['feed'] == 'loader'])} rounds).", ""]
    else:
        lines += ["Not measured (see gpu_quality.log).", ""]
    lines += ["## Commands", "", "```bash", result["command"] + "   # this attempt", "# data wait:",
              result["speed_command"]]
    cmds = result["quality_commands"]
    if cmds:  # the cells share one flag list: print it once, then what each call adds
        common = result["quality_common"]
        lines += ["# quality (all attempts, in order): every call is", common + " \\", "#   followed by:"]
        lines += ["#   " + (c[len(common):].strip() or "(nothing: random-init floor + summary)") for c in cmds]
    lines += ["```", ""]
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="write the carry folder (here, once)")
    pp.add_argument("--coco", default=str(DEFAULT_COCO), help="COCO json of the photos (default: ../shared subset)")
    pp.add_argument("--images", default="", help="their folder (default: images/ beside the json's folder)")
    pp.add_argument("--out", default=str(REPO / ".carry" / "gpuq"), help="carry folder (git-ignored)")
    pp.add_argument("--work", default=str(REPO / "runs" / "gpu_quality_prepare"),
                    help="cache of the BING store of the original photos")
    pp.add_argument("--max-images", type=int, default=0, help="first N photos only (0: all; the toy uses a few)")
    pp.add_argument("--scale", type=float, default=0.5, help="downscale factor of the training photos")
    pp.add_argument("--jpeg-quality", type=int, default=90)
    pp.add_argument("--speed-images", type=int, default=128, help="full-size photos for the data-wait figure")
    pp.add_argument("--top-k", type=int, default=10, help="BING proposals kept per photo")
    pp.add_argument("--workers", type=int, default=2, help="BING worker processes")
    pp.add_argument("--bing-model-dir", default=str(DEFAULT_BING_MODELS) if DEFAULT_BING_MODELS.is_dir() else "")
    pp.add_argument("--max-mib", type=float, default=60.0, help="refuse a carry folder larger than this")
    rp = sub.add_parser("run", help="the measurement (GPU) or its dry run (toy, CPU)")
    rp.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    rp.add_argument("--data", default=str(REPO / ".carry" / "gpuq"), help="the carry folder written by prepare")
    rp.add_argument("--work", default="", help="work folder (default /tmp/gpu_quality_work on the GPU)")
    rp.add_argument("--out", default="", help="report folder (default $OUT, else runs/gpu_quality)")
    rp.add_argument("--epochs", type=int, default=None, help="override the profile's pretraining epochs")
    rp.add_argument("--total-s", type=float, default=None, help="override the profile's wall-clock budget")
    rp.add_argument("--lanes", type=int, default=None, help="override the profile's parallel cells")
    rp.add_argument("--redo-speed", action="store_true", help="measure the data wait again even if done")
    rp.add_argument("--settings", default="", help="pretrain_quality settings, comma-separated (default: the four "
                    "of SETTINGS; the multi-crop comparison: " + ",".join(MULTI_CROP_SETTINGS) + ")")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        if not 0.05 <= args.scale <= 1.0:
            raise SystemExit(f"--scale must be in [0.05, 1], got {args.scale}")
        return prepare(args)
    if args.lanes is not None and args.lanes < 1:
        raise SystemExit("--lanes must be >= 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
