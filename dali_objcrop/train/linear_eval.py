"""Linear evaluation of a frozen backbone: multi-label mAP (COCO-style labels) or top-1 (class folders).

Features are extracted once (centre crop, no augmentation, frozen backbone in
eval mode), standardised with the training split's statistics, and a linear
layer is trained on them: binary cross-entropy per class with mean average
precision for image-level labels derived from a COCO JSON (the paper's
OpenImages / COCO protocol), softmax cross-entropy with top-1 accuracy for an
``ImageFolder``-style tree (class = first folder).  A class present in every
image (``person`` in the ../shared COCO subset) or in none carries no
information and is left out (and listed).

Usage (settings: :class:`EvalConfig`, :class:`LinearConfig`; ``--help`` lists them)::

    dali-objcrop linear-eval --ckpt=runs/x/ckpt.pt --data=coco/annotations/instances.json --size=224
    dali-objcrop linear-eval --ckpt=none --arch=resnet18 --data=DIR    # random-init baseline
    python -m dali_objcrop.train.linear_eval ...                       # the same

Importable: :func:`image_labels`, :func:`extract_features`, :func:`split_indices`,
:func:`split_features`, :func:`linear_probe`, :func:`linear_probe_map`,
:func:`mean_average_precision`.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dali_objcrop.constants import IMAGENET_MEAN, IMAGENET_STD
from dali_objcrop.train.config import ConfigError, parse_or_exit


@dataclass
class ImageLabels:
    """Images with their labels.

    Attributes:
        root: image folder.
        keys: image paths relative to ``root``.
        targets: (N, C) float32 multi-hot (``multilabel``) or (N,) int64 class ids.
        classes: class names, aligned with the target columns / ids.
        multilabel: COCO-style image labels (True) or one class per image (False).
        dropped: classes left out (present in every image or in none).
    """

    root: Path
    keys: list[str]
    targets: np.ndarray
    classes: list[str]
    multilabel: bool
    dropped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


def coco_image_labels(annotations: str | Path, images_dir: str | Path | None = None,
                      drop_uninformative: bool = True, allow_outside_root: bool = False) -> ImageLabels:
    """Image-level multi-hot labels from a COCO JSON (a class is on if any of its boxes is in the image).

    Args:
        annotations: COCO JSON path.
        images_dir: image folder (default: ``images`` beside the JSON or beside its folder, as the loader).
        drop_uninformative: leave out classes present in every image or in none.
        allow_outside_root: accept ``file_name`` entries outside the image folder.
    """
    from dali_objcrop.dataset import ImageIndex, coco_images_dir, load_coco
    coco = load_coco(annotations)
    # the loader's rule for the image folder; unreadable files left out, as the loader does
    index = ImageIndex.from_coco(annotations, coco_images_dir(annotations, images_dir),
                                 allow_outside_root=allow_outside_root)
    id_of = {im["file_name"]: im["id"] for im in coco.images}
    cats = sorted(coco.categories, key=lambda c: c["id"]) or \
        [{"id": i, "name": str(i)} for i in sorted({a["category_id"] for v in coco.anns_by_image.values() for a in v})]
    col = {c["id"]: j for j, c in enumerate(cats)}
    y = np.zeros((len(index), len(cats)), dtype=np.float32)
    for i, key in enumerate(index.keys):
        for a in coco.anns_by_image.get(id_of[key], []):
            y[i, col[a["category_id"]]] = 1.0
    names = [c["name"] for c in cats]
    dropped: list[str] = []
    if drop_uninformative:
        freq = y.mean(0)
        keep = (freq > 0) & (freq < 1)
        dropped = [n for n, k in zip(names, keep) if not k]
        y, names = y[:, keep], [n for n, k in zip(names, keep) if k]
    if y.shape[1] == 0:
        raise ValueError(f"{annotations}: no class is present in some but not all images; nothing to evaluate")
    return ImageLabels(index.root, list(index.keys), y, names, True, dropped)


def folder_labels(root: str | Path) -> ImageLabels:
    """One label per image from an ``ImageFolder`` tree (``root/CLASS/.../image``)."""
    from dali_objcrop.dataset import ImageIndex
    index = ImageIndex.from_folder(root, check=False)
    cls_of = [Path(k).parts[0] if len(Path(k).parts) > 1 else "" for k in index.keys]
    names = sorted(set(cls_of))
    if len(names) < 2 or "" in names:
        raise ValueError(f"{root}: single-label evaluation needs images in >= 2 class folders, got {names[:5]}")
    ids = {n: j for j, n in enumerate(names)}
    return ImageLabels(index.root, list(index.keys), np.array([ids[c] for c in cls_of], dtype=np.int64), names,
                       False)


def image_labels(data: str | Path, images_dir: str | Path | None = None,
                 allow_outside_root: bool = False) -> ImageLabels:
    """:func:`coco_image_labels` for a ``.json`` path, :func:`folder_labels` for a folder."""
    p = Path(data)
    if p.suffix.lower() == ".json":
        return coco_image_labels(p, images_dir, allow_outside_root=allow_outside_root)
    if p.is_dir():
        return folder_labels(p)
    raise ValueError(f"data must be a COCO .json file or an image folder, got {data!r}")


class _CenterCropImages(torch.utils.data.Dataset):
    """Decode, resize the short side to ``size * 8/7``, centre-crop ``size``, normalise."""

    def __init__(self, paths: list[str], size: int):
        import torchvision.transforms as T
        self.paths = paths
        self.tf = T.Compose([T.Resize(round(size * 8 / 7)), T.CenterCrop(size), T.ToTensor(),
                             T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image
        with Image.open(self.paths[i]) as im:
            return self.tf(im.convert("RGB"))


@torch.no_grad()
def extract_features(backbone: nn.Module, paths: list[str], size: int = 224, batch_size: int = 64,
                     workers: int = 2, device: str | torch.device = "cpu") -> torch.Tensor:
    """Pooled features ``(N, C)`` float32 (CPU) of a frozen backbone on centre crops of ``paths``.

    Args:
        backbone: module mapping images to a feature map ``(N, C, h, w)`` or features ``(N, C)``.
        paths: image files.
        size: crop side in pixels.
    """
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval().to(device)
    dl = torch.utils.data.DataLoader(_CenterCropImages(paths, size), batch_size=batch_size, num_workers=workers,
                                     shuffle=False)
    out = []
    for x in dl:
        f = backbone(x.to(device)).float()
        out.append((f.mean((2, 3)) if f.ndim == 4 else f).cpu())
    backbone.train(was_training)
    return torch.cat(out)


def split_indices(n: int, test_frac: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded image-level split: ``(train indices, test indices)``, both sorted."""
    if not 0.0 < test_frac < 1.0 or n < 2:
        raise ValueError(f"need 0 < test_frac < 1 and n >= 2, got test_frac={test_frac}, n={n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = min(n - 1, max(1, round(n * test_frac)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def split_features(backbone: nn.Module, labels: ImageLabels, size: int = 224, test_frac: float = 0.3,
                   seed: int = 0, batch_size: int = 64, workers: int = 2, device: str | torch.device = "cpu"
                   ) -> dict[str, torch.Tensor]:
    """Features and targets of a fixed split: ``{train_x, train_y, test_x, test_y}``."""
    x = extract_features(backbone, [str(labels.root / k) for k in labels.keys], size, batch_size, workers, device)
    y = torch.from_numpy(labels.targets)
    tr, te = split_indices(len(labels), test_frac, seed)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return {"train_x": x[tr], "train_y": y[tr], "test_x": x[te], "test_y": y[te]}


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean over classes of average precision (classes with no positive in ``targets`` are NaN, left out).

    Args:
        scores: (N, C) any monotone scores.
        targets: (N, C) 0/1.

    Returns:
        ``(mAP, per-class AP (C,))``.
    """
    from sklearn.metrics import average_precision_score
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores and targets must be (N, C) of one shape, got {scores.shape}, {targets.shape}")
    ap = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        if targets[:, c].any():
            ap[c] = average_precision_score(targets[:, c], scores[:, c])
    if np.isnan(ap).all():
        raise ValueError("no class has a positive example in targets")
    return float(np.nanmean(ap)), ap


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 multilabel: bool, epochs: int = 100, lr: float = 1e-3, weight_decay: float = 5e-4,
                 batch_size: int = 256, seed: int = 0, solver: str = "adamw", max_iter: int = 500) -> dict:
    """Train a linear classifier on frozen features and score it on the test split.

    Features are standardised with the training split's mean and std.  Two solvers:

    * ``adamw``: seeded mini-batches, AdamW, cosine schedule over ``epochs``
      (``weight_decay`` is AdamW's decoupled decay).  Few samples mean few
      steps: on small sets it can stop well short of the optimum.
    * ``lbfgs``: full-batch L-BFGS (strong Wolfe line search, up to ``max_iter``
      iterations) on the loss plus ``weight_decay / 2 * ||W||^2``: the
      regularised optimum itself, independent of learning rate and epochs
      (the logistic-regression probe of CLIP and scikit-learn).

    Both are deterministic on the CPU.

    Args:
        train_x, test_x: (N, C) features.
        train_y, test_y: (N, K) multi-hot (``multilabel``) or (N,) class ids.
        multilabel: BCE + mAP if True, cross-entropy + top-1 otherwise.

    Returns:
        ``{"map", "per_class_ap"}`` or ``{"top1"}``, plus ``"train_loss"``.
    """
    if solver not in ("adamw", "lbfgs"):
        raise ValueError(f"solver must be 'adamw' or 'lbfgs', got {solver!r}")
    g = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    n_out = train_y.shape[1] if multilabel else int(max(train_y.max(), test_y.max())) + 1
    head = nn.Linear(xtr.shape[1], n_out)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()

    def data_loss(idx=None):
        x, y = (xtr, train_y) if idx is None else (xtr[idx], train_y[idx])
        logits = head(x)
        return F.binary_cross_entropy_with_logits(logits, y.float()) if multilabel \
            else F.cross_entropy(logits, y.long())

    if solver == "lbfgs":
        opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            total = data_loss() + 0.5 * weight_decay * head.weight.pow(2).sum()
            total.backward()
            return total
        opt.step(closure)
        loss = data_loss()
    else:
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = max(1, -(-len(xtr) // batch_size))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
        loss = torch.tensor(float("nan"))
        for _ in range(epochs):
            perm = torch.randperm(len(xtr), generator=g)
            for s in range(steps_per_epoch):
                loss = data_loss(perm[s * batch_size:(s + 1) * batch_size])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        scores = head(xte)
    if multilabel:
        m, ap = mean_average_precision(scores.numpy(), test_y.numpy())
        return {"map": m, "per_class_ap": [None if np.isnan(a) else float(a) for a in ap],
                "train_loss": float(loss.detach())}
    return {"top1": float((scores.argmax(1) == test_y).float().mean()), "train_loss": float(loss.detach())}


def linear_probe_map(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                     **kwargs) -> dict:
    """:func:`linear_probe` with multi-label BCE and mean average precision."""
    return linear_probe(train_x, train_y, test_x, test_y, multilabel=True, **kwargs)


def backbone_from(ckpt: str, arch: str = "resnet18", seed: int = 0) -> nn.Module:
    """The backbone of a pretraining checkpoint, or a random-init ``arch`` when ``ckpt`` is ``none``."""
    if ckpt.lower() == "none":
        from dali_objcrop.train.heads import Backbone
        torch.manual_seed(seed)
        return Backbone(arch)
    from dali_objcrop.train.pretrain import load_backbone
    return load_backbone(ckpt)[0]


@dataclass
class EvalConfig:
    """Which backbone, which images, which split (shared by linear and kNN evaluation)."""

    ckpt: str = ""                    # pretraining checkpoint, or none: a random-init backbone of arch
    arch: str = "resnet18"            # backbone when ckpt=none
    data: str = ""                    # COCO json or class-folder tree ("" = the embedded synthetic set)
    images_dir: str = ""              # image folder of a COCO json ("" = beside it)
    allow_outside_root: bool = False  # accept COCO file_name entries outside the image folder (refused by default)
    size: int = 224                   # centre-crop side in pixels
    test_frac: float = 0.3
    seed: int = 0                     # split, random-init backbone and probe seed
    batch_size: int = 64              # feature extraction
    workers: int = 2                  # feature extraction DataLoader workers
    device: str = "auto"              # auto (cuda when available) | cpu | cuda
    out: str = ""                     # write the result JSON here

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def torch_device(self) -> str:
        return ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device


@dataclass
class LinearConfig:
    """The linear probe."""

    solver: str = "lbfgs"             # lbfgs: full-batch, the regularised optimum; adamw: mini-batch epochs
    epochs: int = 100                 # adamw only
    lr: float = 1e-3                  # adamw only
    weight_decay: float = 5e-4        # L2 strength (lbfgs) / decoupled decay (adamw)

    def __post_init__(self) -> None:
        if self.solver not in ("lbfgs", "adamw"):
            raise ConfigError(f"solver must be lbfgs or adamw, got {self.solver!r}")


def features_from_config(ev: EvalConfig) -> tuple[ImageLabels, dict[str, torch.Tensor]]:
    """Labels of ``ev.data`` and the backbone's features on its fixed split."""
    if not ev.ckpt:
        raise ConfigError("--ckpt required: a pretraining checkpoint, or none for a random-init backbone")
    data = ev.data
    if not data:
        from dali_objcrop.synth import ensure_default_dataset
        data = str(ensure_default_dataset())
    labels = image_labels(data, ev.images_dir or None, ev.allow_outside_root)
    feats = split_features(backbone_from(ev.ckpt, ev.arch, ev.seed), labels, ev.size, ev.test_frac, ev.seed,
                           ev.batch_size, ev.workers, ev.torch_device)
    return labels, feats


def main(argv: list[str] | None = None) -> int:
    """``python -m dali_objcrop.train.linear_eval --ckpt=... [--field=value ...]`` (``--help`` lists the fields)."""
    ev, lin = parse_or_exit([EvalConfig, LinearConfig], argv, "linear-eval", required=("ckpt",))
    labels, f = features_from_config(ev)
    res = linear_probe(f["train_x"], f["train_y"], f["test_x"], f["test_y"], labels.multilabel, lin.epochs, lin.lr,
                       lin.weight_decay, seed=ev.seed, solver=lin.solver)
    res.update({"classes": labels.classes, "dropped_classes": labels.dropped, "n_train": len(f["train_x"]),
                "n_test": len(f["test_x"]), "config": {**asdict(ev), **asdict(lin)}})
    metric = "map" if labels.multilabel else "top1"
    print(f"linear {metric}: {100 * res[metric]:.2f}  ({len(labels.classes)} classes, dropped {labels.dropped})")
    if ev.out:
        Path(ev.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
