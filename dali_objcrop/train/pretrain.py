"""Self-supervised pretraining (MoCo-v2, BYOL, DenseCL) on object-aware crops, in one readable file.

One file of ~700 lines on purpose (nanoGPT-style): the whole training loop, its checkpoints and its
resume read top to bottom; the methods, heads, LARS and the configuration live beside it.

One code path for the CPU, one GPU and many GPUs: DDP is detected from
torchrun's environment (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), with gloo on
the CPU and NCCL on GPUs; only the master process logs and writes checkpoints.

Launch (installed as ``dali_objcrop.train.pretrain``; ``dali-objcrop pretrain`` is the same entry point)::

    # one process (CPU or one GPU), embedded synthetic set, small and quick
    dali-objcrop pretrain --method=mocov2 --crops=obj-obj-dilate --arch=resnet18 --size=96 --steps=200

    # 8 GPUs on one node, COCO with ground-truth boxes
    torchrun --standalone --nproc_per_node=8 -m dali_objcrop.train.pretrain --method=byol --crops=obj-obj-dilate \\
        --data=coco/annotations/instances_train2017.json --boxes=gt --batch-size=64 --epochs=200 --out=runs/byol

    # BING proposals from a box store, settings from a JSON file, flags override it
    torchrun --nproc_per_node=4 -m dali_objcrop.train.pretrain --config=cfg.json --boxes=coco.boxes --crops=obj-scene

    # two nodes (run on each, NODE_RANK 0 and 1)
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER:29500 -m dali_objcrop.train.pretrain --method=densecl ...

    # multi-crop: 6 local views of 96 px per image, cut inside the object views' region (MoCo-v2 / BYOL)
    dali-objcrop pretrain --method=byol --crops=obj-obj-dilate --local-crops=6 --local-size=96 --local-from=box ...

    # continue exactly where a run stopped (its config comes from the flags; it must match the checkpoint)
    dali-objcrop pretrain ... --resume=auto           # or --resume=runs/x/ckpt.pt

Configuration: the :class:`Config` dataclass; every field is a flag
(``--batch-size=64`` or ``--batch_size 64``), typed from the dataclass, unknown
keys rejected; ``--config=FILE.json`` loads a dict of fields first; ``--help``
lists them (:mod:`dali_objcrop.train.config`, shared with the evaluations and
the benchmarks).  The
resolved config (method defaults filled in) is saved in every checkpoint and
in ``config.json``.  ``batch_size`` is per process; learning rates scale with
the global batch (``lr * batch_size * world_size / 256``).

Logs: ``OUT/log.jsonl`` (one JSON record per logged step), TensorBoard event
files when the optional ``tensorboard`` package is importable, and a tqdm bar
showing images/s and the fraction of step time spent waiting for data.

Exact resume: checkpoints (every ``ckpt_every`` steps, written atomically)
hold the model with its queues, the optimizer and the step.
The loader is keyed by (seed, epoch, sample index), shuffle-BN permutations by
(seed, step), so a resumed run re-creates the same batches (the batches of the
interrupted epoch before the checkpoint are read and skipped) and, on the CPU,
produces the same loss sequence as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import errno
import inspect
import json
import math
import os
import pickle
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

# absolute imports: this file also runs as a script (python / torchrun dali_objcrop/train/pretrain.py)
from dali_objcrop import faults
from dali_objcrop.train import config
from dali_objcrop.train.heads import Backbone, head_keys, local_head_key, preset
from dali_objcrop.train.lars import LARS, param_groups
from dali_objcrop.train.methods import byol, densecl, mocov2
from dali_objcrop.train.methods.common import cosine_schedule, lr_at

METHODS = {"mocov2": mocov2, "byol": byol, "densecl": densecl}
BN_MODES = ("shuffle", "sync", "local")


@dataclass
class Config:
    """Every setting of a run.  0 / -1 / "" mean "the method's default" where noted."""

    # what to learn and from what
    method: str = "mocov2"            # mocov2 | byol | densecl
    crops: str = "obj-obj-dilate"     # a dali_objcrop crop mode
    data: str = ""                    # COCO json or image folder; "" = the embedded synthetic set
    images_dir: str = ""              # image folder of a COCO json ("" = beside it)
    allow_outside_root: bool = False  # accept file_name entries outside the image folder (refused by default)
    boxes: str = "gt"                 # gt | path of a .boxes store | none (scene-scene only)
    size: int = 224                   # crop side in pixels
    dilate: float = 0.1               # delta of obj-obj-dilate (0.1 COCO, 0.2 OpenImages)
    recipe: str = ""                  # augmentation recipe ("" = the method's: mocov2 or byol)
    num_threads: int = 4              # DALI threads per process
    loader_device: str = "auto"       # cpu | gpu | auto
    prepare_ahead: int = 1            # batches whose inputs a loader thread prepares ahead (0: in the loop)
    local_crops: int = 0              # M local (multi-crop) views per image: extra queries / online views (0: none)
    local_size: int = 96              # local views' side in pixels
    local_scale: tuple[float, float] = (0.05, 0.4)  # local crop area range, a fraction of its region
    local_from: str = "box"           # where local views are cut: box | boxes | scene (see dali_objcrop.CropConfig)
    # model
    arch: str = "resnet50"            # any torchvision ResNet, or resnet18-wW: ResNet-18 with widths x W (CPU-cheap)
    share_heads: bool = False         # one projection head for both views even with an object view
    same_head_init: bool = True       # separate heads start from the same weights (independent ones collapse)
    head_hidden: int = 0              # projector hidden width (0 = preset)
    head_out: int = 0                 # projector output width (0 = preset)
    pred_hidden: int = 0              # BYOL predictor hidden width (0 = preset)
    queue_size: int = 0               # MoCo/DenseCL negatives per queue (0 = 65536)
    temperature: float = 0.0          # InfoNCE temperature (0 = 0.2)
    momentum: float = -1.0            # key/target EMA (MoCo/DenseCL 0.999; BYOL start, cosine to 1: 0.99)
    lam: float = 0.5                  # DenseCL dense-loss weight
    bn: str = "shuffle"               # shuffle | sync | local: BN of the key encoder across ranks
    # optimisation
    batch_size: int = 256             # per process
    epochs: int = 200
    steps: int = 0                    # > 0: train this many steps instead of epochs
    lr: float = 0.0                   # base lr per 256 images (0 = method: 0.03 MoCo/DenseCL, 0.2 BYOL)
    weight_decay: float = -1.0        # (-1 = method: 1e-4 MoCo/DenseCL, 1.5e-6 BYOL)
    warmup_steps: int = 0             # linear lr warm-up before the cosine decay
    # system
    device: str = "auto"              # auto (cuda when available) | cpu | cuda
    seed: int = 0
    out: str = "runs/pretrain"
    ckpt_every: int = 1000            # steps between checkpoints (0 = only at the end, -1 = none)
    keep_ckpts: bool = False          # also keep ckpt_STEP.pt for every checkpoint
    resume: str = ""                  # "" | auto (OUT/ckpt.pt if present) | path of a checkpoint
    restart: bool = False             # start over in an --out that holds a run (its checkpoints and log are removed)
    log_every: int = 10
    compile: bool = False             # torch.compile the backbones
    amp: str = "auto"                 # auto (bf16 on GPU, off on CPU) | bf16 | off
    channels_last: bool = True        # on GPU only
    torch_threads: int = 0            # torch intra-op threads (0 = leave as is)
    progress: bool = True

    def resolved(self) -> "Config":
        """A copy with the method's defaults filled in and every value checked."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        d = METHODS[self.method].DEFAULTS
        c = dataclasses.replace(self)
        c.queue_size = c.queue_size or d.get("queue_size", 0)
        c.temperature = c.temperature or d.get("temperature", 0.0)
        c.momentum = d["momentum"] if c.momentum < 0 else c.momentum
        c.lr = c.lr or d["base_lr"]
        c.weight_decay = d["weight_decay"] if c.weight_decay < 0 else c.weight_decay
        c.recipe = c.recipe or ("byol" if self.method == "byol" else "mocov2")
        if c.bn not in BN_MODES:
            raise ValueError(f"bn must be one of {BN_MODES}, got {c.bn!r}")
        if c.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {c.device!r}")
        if c.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be auto, bf16 or off, got {c.amp!r}")
        for name in ("size", "batch_size", "log_every"):
            if getattr(c, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(c, name)!r}")
        if c.steps < 0 or c.epochs < 0 or (c.steps == 0 and c.epochs == 0):
            raise ValueError(f"need steps > 0 or epochs > 0, got steps={c.steps}, epochs={c.epochs}")
        if not 0.0 <= c.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {c.momentum}")
        for name in ("lr", "weight_decay", "temperature", "momentum", "lam", "dilate"):
            if not math.isfinite(getattr(c, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(c, name)!r}")
        if c.lr <= 0:
            raise ValueError(f"lr must be > 0, got {c.lr!r}")
        if c.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {c.weight_decay!r}")
        if c.method != "byol" and c.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {c.temperature!r}")
        for name in ("num_threads",):
            if getattr(c, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(c, name)!r}")
        for name in ("prepare_ahead", "warmup_steps", "torch_threads"):
            if getattr(c, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(c, name)!r}")
        if c.ckpt_every < -1:
            raise ValueError(f"ckpt_every must be >= -1, got {c.ckpt_every!r}")
        if c.loader_device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"loader_device must be auto, cpu or gpu, got {c.loader_device!r}")
        if c.resume and c.restart:
            raise ValueError("give --resume or --restart, not both")
        from dali_objcrop.windows import CropConfig
        c.local_scale = tuple(float(v) for v in c.local_scale)
        # crops one of the modes, dilate in [0, 1], the local views' settings: its own checks
        CropConfig(mode=c.crops, dilate=c.dilate, local_crops=c.local_crops, local_size=c.local_size,
                   local_scale=c.local_scale, local_from=c.local_from)
        if c.local_crops and c.method == "densecl":
            raise ValueError(f"--local-crops={c.local_crops} with --method=densecl: {densecl.LOCAL_VIEWS}")
        return c


# settings a resumed run must share with its checkpoint (others, e.g. steps or out, may change)
RESUME_MUST_MATCH = ("method", "crops", "arch", "share_heads", "same_head_init", "head_hidden", "head_out",
                     "pred_hidden", "queue_size", "batch_size", "size", "seed", "data", "boxes", "recipe", "dilate",
                     "local_crops", "local_size", "local_scale", "local_from")
# settings added after checkpoints were written without them: a checkpoint lacking one ran with this value
_RESUME_DEFAULTS = {k: getattr(Config, k) for k in ("local_crops", "local_size", "local_scale", "local_from")}


def _setting(config: dict, key: str):
    """A saved setting, comparable with the Config's (lists of a JSON round trip as tuples)."""
    v = config.get(key, _RESUME_DEFAULTS.get(key))
    return tuple(v) if isinstance(v, list) else v


def parse_config(argv: list[str] | None = None) -> Config:
    """A :class:`Config` from ``--config=FILE.json`` (optional) then ``--field=value`` flags.

    Flags may use ``-`` or ``_`` (``--batch-size`` = ``--batch_size``), ``--f=v``
    or ``--f v``; a bare boolean flag (``--compile``) means true.  Unknown
    fields and badly typed values raise ``ValueError`` naming them (the shared
    style of :mod:`dali_objcrop.train.config`).
    """
    return config.parse_config(Config, argv)


# ---- distributed set-up ---------------------------------------------------------------------------------------
@dataclass
class Dist:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Start the process group when launched by torchrun (NCCL on GPU, gloo on CPU).

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """
    ddp = int(os.environ.get("RANK", -1)) != -1
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device")
    if ddp:
        local_rank = int(os.environ["LOCAL_RANK"])
        device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
        return Dist(True, dist.get_rank(), local_rank, dist.get_world_size(), device)
    return Dist(False, 0, 0, 1, torch.device("cuda") if cuda else torch.device("cpu"))


# ---- model, optimizer, data ---------------------------------------------------------------------------------
def build_model(cfg: Config) -> nn.Module:
    """The method's model for a resolved config (deterministic given ``torch.manual_seed``)."""
    keys = head_keys(cfg.crops, cfg.share_heads)
    local_key = local_head_key(cfg.crops, cfg.local_from, cfg.share_heads)   # one of keys: no new parameters
    backbone = Backbone(cfg.arch, zero_init_residual=cfg.method == "byol")
    if cfg.method == "mocov2":
        return mocov2.MoCoV2(backbone, preset("mocov2", cfg.head_hidden, cfg.head_out), keys, cfg.queue_size,
                             cfg.temperature, cfg.same_head_init, local_key)
    if cfg.method == "byol":
        proj = preset("byol_projector", cfg.head_hidden, cfg.head_out)
        pred = preset("byol_predictor", cfg.pred_hidden, proj.sizes[-1])
        return byol.BYOL(backbone, proj, pred, keys, cfg.same_head_init, local_key)
    return densecl.DenseCL(backbone, preset("densecl_global", cfg.head_hidden, cfg.head_out),
                           preset("densecl_dense", cfg.head_hidden, cfg.head_out), keys, cfg.queue_size,
                           cfg.temperature, cfg.lam, cfg.same_head_init)


def build_optimizer(cfg: Config, model: nn.Module, world_size: int) -> torch.optim.Optimizer:
    """SGD (MoCo-v2, DenseCL) or LARS (BYOL) at ``lr * global batch / 256``."""
    lr = cfg.lr * cfg.batch_size * world_size / 256
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if METHODS[cfg.method].DEFAULTS["optimizer"] == "lars":
        return LARS(param_groups(params, cfg.weight_decay), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.SGD([p for _, p in params], lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)


def make_loader(cfg: Config, rank: int, world_size: int):
    """The object-aware DALI loader for this rank (the embedded synthetic set when ``data`` is empty)."""
    from dali_objcrop.loader import ObjCropLoader
    from dali_objcrop.shard_loader import is_shard_set
    from dali_objcrop.synth import ensure_default_dataset
    data = cfg.data or str(ensure_default_dataset())
    boxes = None if cfg.boxes.lower() in ("", "none") else cfg.boxes
    common = dict(boxes=boxes, mode=cfg.crops, batch_size=cfg.batch_size, size=cfg.size, recipe=cfg.recipe,
                  seed=cfg.seed, num_threads=cfg.num_threads, device=cfg.loader_device, rank=rank,
                  world_size=world_size, drop_last=True, dilate=cfg.dilate)
    if cfg.local_crops:   # M = 0: the loader's own defaults (the call of a run without local views is unchanged)
        common.update(local_crops=cfg.local_crops, local_size=cfg.local_size, local_scale=cfg.local_scale,
                      local_from=cfg.local_from)
    if is_shard_set(data):   # files-only settings do not apply to shards: refused if set
        if cfg.images_dir or cfg.allow_outside_root:
            raise ValueError("--images-dir and --allow-outside-root apply to image files, not to a shard set")
        return ObjCropLoader.from_shards(data, **common)
    return ObjCropLoader(data, images_dir=cfg.images_dir or None, prepare_ahead=cfg.prepare_ahead,
                         allow_outside_root=cfg.allow_outside_root, **common)


# ---- checkpoints ----------------------------------------------------------------------------------------------
class _CheckpointFile:
    """A write-only file for ``torch.save`` that keeps the first ``OSError`` of a write: torch's
    zip writer turns it into an unhelpful ``RuntimeError`` ("unexpected pos ...")."""

    def __init__(self, f) -> None:
        self._f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self._f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self._f.flush()


def save_checkpoint(path: str | os.PathLike, model: nn.Module, opt: torch.optim.Optimizer, step: int,
                    cfg: Config, world_size: int) -> None:
    """Write a checkpoint atomically (temporary file, fsync, rename); the config is stored as a plain
    dict so that :func:`load_checkpoint` reads it with ``weights_only=True``.

    Raises:
        OSError: the write failed (the message names the path and says when the disk is full); the
            previous checkpoint at ``path`` is left as it was and the temporary file is removed.
    """
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "config": asdict(cfg),
             "world_size": world_size}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    out = None
    try:
        with open(tmp, "wb") as f:
            out = _CheckpointFile(f)
            torch.save(state, out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        cause = (out.error if out is not None and out.error is not None else e)
        code = getattr(cause, "errno", None)
        if code in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(code, f"disk full: cannot write checkpoint {path} (step {step}); {path} still holds "
                                f"the previous checkpoint, free space and resume") from cause
        raise OSError(code or errno.EIO, f"cannot write checkpoint {path} (step {step}): {cause}") from cause


def _check_zip(path) -> None:
    """torch.save writes a zip whose every record carries a CRC-32 that torch.load never checks: a
    flipped bit would load as a silently different weight.  Check them all (as fast as reading)."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except zipfile.BadZipFile as e:
        raise ValueError(f"not a complete checkpoint file ({e})") from None
    if bad is not None:
        raise ValueError(f"record {bad} fails its CRC-32 check")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, unsafe, or of other settings (names the file)."""


class OutputExistsError(FileExistsError):
    """``out`` holds an earlier run and neither ``resume`` nor ``restart`` says what to do with it."""


RUN_FILES = ("ckpt.pt", "log.jsonl", "config.json")   # (+ ckpt_*.pt, tb/): what a run leaves in its out


def _run_files(out: Path) -> list[Path]:
    return [out / n for n in RUN_FILES if (out / n).exists()] + sorted(out.glob("ckpt_*.pt")) + \
        ([out / "tb"] if (out / "tb").is_dir() else [])


def _claim_out(out: Path, cfg: Config, env: "Dist") -> None:
    """Refuse to write over an earlier run in ``out`` unless ``resume`` or ``restart`` says so;
    ``restart`` removes that run's checkpoints, log, config and event files.  The master decides
    and tells the other ranks (they all stop, or all go on once the old files are gone)."""
    err = None
    if env.master:
        found = _run_files(out)
        if found and not cfg.resume:
            if cfg.restart:
                import shutil
                for p in found:
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            else:
                err = (f"{out} holds an earlier run ({', '.join(p.name for p in found[:5])}); pass --resume=auto "
                       f"to continue it, --restart to replace it, or choose another --out")
    if env.ddp:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise OutputExistsError(err)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, cfg: Config | None = None, world_size: int | None = None) -> dict:
    """Read a checkpoint (on the CPU); with ``cfg``, check it can continue this run.

    Only plain data is unpickled (``weights_only=True``): a checkpoint that would run code
    when loaded is refused with a ``ValueError`` naming it."""
    try:
        _check_zip(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: it is not a plain-data checkpoint (loading it would run "
                              f"code or needs objects outside tensors and plain containers): "
                              f"{str(e).splitlines()[0]}") from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read checkpoint {path}: damaged or truncated ({first}); resume from another "
                              f"checkpoint (--resume=PATH) or start over (--restart)") from None
    need = {"model", "config", "step"} | ({"optimizer", "world_size"} if cfg is not None else set())
    if not isinstance(state, dict) or not need <= set(state) or not isinstance(state["config"], dict):
        raise CheckpointError(f"{path} is not a pretraining checkpoint (needs {', '.join(sorted(need))})")
    if cfg is not None:
        saved = state["config"]
        now = asdict(cfg)
        # without local views on either side their size, scale and source change nothing
        unused = (("local_size", "local_scale", "local_from")
                  if _setting(saved, "local_crops") == 0 == _setting(now, "local_crops") else ())
        diff = {k: (_setting(saved, k), _setting(now, k)) for k in RESUME_MUST_MATCH
                if k not in unused and _setting(saved, k) != _setting(now, k)}
        if diff:
            raise ValueError(f"cannot resume {path}: settings differ (checkpoint, now): {diff}")
        if world_size is not None and state["world_size"] != world_size:
            raise ValueError(f"cannot resume {path} exactly: saved with world_size {state['world_size']}, "
                             f"now {world_size}")
    return state


def load_backbone(path: str | os.PathLike) -> tuple[Backbone, Config]:
    """The pretrained (online / query) backbone of a checkpoint, and the run's config."""
    state = load_checkpoint(path)
    unknown = sorted(set(state["config"]) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise ValueError(f"{path} was written by another version of dali_objcrop/train/pretrain.py: unknown settings {unknown}")
    cfg = Config(**state["config"])
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    return model.backbone, cfg


def _trim_log(log: Path, step: int) -> None:
    """Keep the records of steps up to ``step``; a line a killed run left half-written is dropped."""
    if not log.exists():
        return
    kept, torn = [], 0
    for ln in log.read_text(errors="replace").splitlines():
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            s = rec["step"] if isinstance(rec, dict) else None
        except ValueError:
            s = None
        if not isinstance(s, int):
            torn += 1
            continue
        if s <= step:
            kept.append(ln)
    if torn:
        print(f"{log}: dropped {torn} unreadable line(s) (a write cut short)", file=sys.stderr)
    tmp = log.with_name(log.name + f".{os.getpid()}.tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, log)


# ---- training loop --------------------------------------------------------------------------------------------
def _local_views(batch: dict, cfg: Config, device: torch.device, channels_last: bool) -> torch.Tensor | None:
    """The batch's local views on ``device`` ((B, M, 3, s, s), each view channels-last where asked), or None
    when ``cfg.local_crops`` is 0; a loader whose batches disagree with ``cfg.local_crops`` is refused."""
    local = batch.get("local")
    m = cfg.local_crops
    if not m:
        if local is not None and local.shape[1] > 0:
            raise ValueError(f"the loader yields local views ({tuple(local.shape)}) but --local-crops=0: pass "
                             f"--local-crops={local.shape[1]} (and its --local-size / --local-from) or a loader "
                             f"without local views")
        return None
    b, s = len(batch["view1"]), cfg.local_size
    if local is None or tuple(local.shape) != (b, m, 3, s, s):
        got = "none" if local is None else tuple(local.shape)
        raise ValueError(f"--local-crops={m} --local-size={s} needs batches with \"local\" of shape {(b, m, 3, s, s)}, "
                         f"the loader gave {got}")
    local = local.to(device, non_blocking=True)
    if channels_last:   # per view: the model runs the B * M views as one (B * M, 3, s, s) batch
        local = local.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (b, m))
    return local


class _Logger:
    """JSONL (+ TensorBoard when importable) on the master process."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        self.file = open(out / "log.jsonl", "a")
        try:  # optional: needs the tensorboard package, not a dependency of this project
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tb"))
        except ImportError:
            pass

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def train(cfg: Config, loader=None, model: nn.Module | None = None) -> dict:
    """Run (or resume) one pretraining job; returns a summary (master's numbers).

    The master process holds an exclusive lock on ``OUT/run.lock`` for the whole run: a second
    run on the same ``out`` (which would interleave the log and overwrite the checkpoints) fails
    at once with an error naming the lock and the holder.

    Args:
        cfg: the configuration (resolved here).
        loader: anything with ``__len__``, ``set_epoch`` and iteration yielding
            ``{"view1", "view2"}`` batches (and ``"local"``, (B, M, 3, s, s), with ``local_crops = M > 0``);
            default :func:`make_loader` (benchmarks pass device-resident synthetic batches or a loader over
            their own split).
        model: a model from :func:`build_model` to train in place (the caller keeps
            it, e.g. to evaluate its backbone); default: built here after
            ``torch.manual_seed(cfg.seed)``.

    Returns:
        ``{"steps", "losses" (this call's logged losses), "epoch_losses" (this
        call's mean loss per epoch, the master's batches), "images_per_s",
        "data_wait_frac", "checkpoint", "config"}``.
    """
    from dali_objcrop.joblock import JobLock
    env = setup_distributed(cfg.device)
    lock = JobLock(Path(cfg.out) / "run.lock", "training run").acquire() if env.master else None
    try:
        return _train(cfg, loader, model)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, loader=None, model: nn.Module | None = None) -> dict:
    cfg = cfg.resolved()
    env = setup_distributed(cfg.device)
    device, cuda = env.device, env.device.type == "cuda"
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    out = Path(cfg.out)
    if env.master:
        out.mkdir(parents=True, exist_ok=True)
    _claim_out(out, cfg, env)
    resume = cfg.resume
    if resume == "auto":
        resume = str(out / "ckpt.pt") if (out / "ckpt.pt").exists() else ""
    state = load_checkpoint(resume, cfg, env.world_size) if resume else None   # before anything costly
    if cfg.bn == "sync" and not cuda:
        raise ValueError("bn='sync' needs CUDA (SyncBatchNorm); use bn='shuffle' on the CPU")

    if model is None:
        torch.manual_seed(cfg.seed)  # the same initial weights (and queues) on every rank
        model = build_model(cfg)
    if hasattr(model, "shuffle_bn"):
        model.shuffle_bn = cfg.bn == "shuffle"
    if cfg.bn == "sync" and env.ddp:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    use_cl = cuda and cfg.channels_last
    if use_cl:
        model.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg, model, env.world_size)
    base_lrs = [g["lr"] for g in opt.param_groups]

    if loader is None:
        loader = make_loader(cfg, env.rank, env.world_size)
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise ValueError(f"the loader has no full batch (batch_size {cfg.batch_size} x {env.world_size} ranks)")
    total = cfg.steps or cfg.epochs * steps_per_epoch

    step = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            step = int(state["step"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot resume from {resume}: its model or optimizer state does not fit this "
                                  f"run ({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from None
    if (resume or cfg.resume) and env.master:  # drop records of steps after the checkpoint: they are redone
        _trim_log(out / "log.jsonl", step)
    if env.master:  # only now: a refused resume leaves the run's config.json as it was
        _write_json_atomic(out / "config.json", asdict(cfg))
    # any later torch randomness (none in the methods here): offset by rank, and a function of the step
    # rather than a saved RNG state, so a resumed run draws what the uninterrupted one would have
    torch.manual_seed(cfg.seed + 1000 * env.rank + step)

    if cfg.compile:
        model.backbone.compile()
        model.backbone_k.compile()
    ddp_model = model
    if env.ddp:
        # rank-local buffers (queues are kept identical by all-gather; BN running stats are unused in training):
        # no buffer broadcast on every forward (the queue alone is 2 x 128 x 65536 floats)
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else {"broadcast_buffers": False}
        ddp_model = DDP(model, device_ids=[env.local_rank] if cuda else None, **no_sync)
    use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and cuda)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_amp else nullcontext

    logger = _Logger(out, env.master)
    bar = None
    if env.master and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc=f"{cfg.method} {cfg.crops}", unit="step", dynamic_ncols=True)

    global_batch = cfg.batch_size * env.world_size
    warm_until = step + 2                    # throughput counts from here (first steps build/compile)
    meas_time = meas_wait = 0.0
    meas_steps = 0
    win_time = win_wait = 0.0
    win_steps = 0
    losses: list[dict] = []
    epoch_losses: list[float] = []
    epoch, skip = divmod(step, steps_per_epoch)
    model.train()
    while step < total:
        loader.set_epoch(epoch)
        it = iter(loader)
        for _ in range(skip):  # resume mid-epoch: the loader is keyed by (seed, epoch, index); read and drop
            next(it)
        skip = 0
        ep_sum, ep_n = torch.zeros((), dtype=torch.float64, device=device), 0  # this rank's epoch mean loss
        t0 = time.perf_counter()
        while step < total:
            try:
                batch = next(it)
            except StopIteration:
                break
            t_data = time.perf_counter()
            v1 = batch["view1"].to(device, non_blocking=True)
            v2 = batch["view2"].to(device, non_blocking=True)
            if use_cl:
                v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
            local = _local_views(batch, cfg, device, use_cl)   # (B, M, 3, s, s) or None (M = 0)
            extra = {} if local is None else {"local": local}   # M = 0: the two-view call, as before

            lr_scale = lr_at(step, total, 1.0, cfg.warmup_steps)
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * lr_scale
            m = cosine_schedule(step, total, cfg.momentum, 1.0) if cfg.method == "byol" else cfg.momentum

            with autocast():
                loss, aux = ddp_model(v1, v2, shuffle_seed=cfg.seed * 1_000_003 + step, **extra)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # fail early on a diverged run; this also waits for the GPU to finish the step, so the time
            # spent in next(loader) below is time the GPU really idles waiting for data
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            model.after_step(aux, m)
            ep_sum += loss.detach()
            ep_n += 1
            step += 1

            t1 = time.perf_counter()
            wait, dt = t_data - t0, t1 - t0
            if step > warm_until:
                meas_time, meas_wait, meas_steps = meas_time + dt, meas_wait + wait, meas_steps + 1
            win_time, win_wait, win_steps = win_time + dt, win_wait + wait, win_steps + 1

            if step % cfg.log_every == 0 or step == total:
                stats = {"loss": loss.detach().float()}
                stats.update({k: v.float() for k, v in aux.items() if k.startswith("loss_")})
                vals = torch.stack(list(stats.values()))
                if env.ddp:
                    dist.all_reduce(vals)
                    vals /= env.world_size
                rec = {"step": step, "epoch": epoch, **{k: float(v) for k, v in zip(stats, vals.tolist())},
                       "lr": opt.param_groups[0]["lr"], "momentum": m,
                       "images_per_s": global_batch * win_steps / max(win_time, 1e-9),
                       "data_wait_frac": win_wait / max(win_time, 1e-9), "time": time.time()}
                losses.append(rec)
                logger.log(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.1f}",
                                    wait=f"{100 * rec['data_wait_frac']:.1f}%")
                win_time = win_wait = 0.0
                win_steps = 0
            if bar is not None:
                bar.update(1)
            if env.master and cfg.ckpt_every >= 0 and ((cfg.ckpt_every and step % cfg.ckpt_every == 0)
                                                       or step == total):
                save_checkpoint(out / "ckpt.pt", model, opt, step, cfg, env.world_size)
                if cfg.keep_ckpts:
                    save_checkpoint(out / f"ckpt_{step:07d}.pt", model, opt, step, cfg, env.world_size)
                faults.point("pretrain.checkpoint")
            t0 = time.perf_counter()  # logging and checkpoint I/O count neither as step nor as data time
        if ep_n:
            epoch_losses.append(float(ep_sum) / ep_n)
        epoch += 1
    if bar is not None:
        bar.close()
    logger.close()
    if env.ddp:
        dist.barrier()
    return {"steps": step, "losses": losses, "epoch_losses": epoch_losses,
            "images_per_s": global_batch * meas_steps / meas_time if meas_time > 0 else math.nan,
            "data_wait_frac": meas_wait / meas_time if meas_time > 0 else math.nan,
            "checkpoint": str(out / "ckpt.pt") if cfg.ckpt_every >= 0 else None, "config": asdict(cfg),
            "world_size": env.world_size}


def main(argv: list[str] | None = None) -> int:
    cfg, = config.parse_or_exit([Config], argv, "pretrain")
    try:
        cfg.resolved()
    except ValueError as e:  # a value out of range: one line and exit 2, as a bad flag
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2
    from dali_objcrop.joblock import OutputLockedError
    try:
        try:
            summary = train(cfg)
        except (CheckpointError, OutputExistsError, OutputLockedError) as e:  # refused before training: one line
            print(f"pretrain: error: {e}", file=sys.stderr)
            return 1
        if summary["losses"] and int(os.environ.get("RANK", 0)) == 0:
            last = summary["losses"][-1]
            print(f"done: step {summary['steps']} loss {last['loss']:.4f} "
                  f"{summary['images_per_s']:.1f} img/s, data wait {100 * summary['data_wait_frac']:.1f}%")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0

if __name__ == "__main__":
    sys.exit(main())
