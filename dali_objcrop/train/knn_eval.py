"""Weighted k-nearest-neighbour evaluation of frozen features (Wu et al. 2018, "Unsupervised Feature
Learning via Non-Parametric Instance Discrimination").

Cosine similarity on L2-normalised features, the ``k`` nearest training images
vote with weight ``exp(sim / T)``: top-1 for single-label data, mAP of the
vote scores for multi-label (COCO-style) data.

Usage (settings: :class:`~dali_objcrop.train.linear_eval.EvalConfig`, :class:`KnnConfig`; ``--help``)::

    dali-objcrop knn-eval --ckpt=runs/x/ckpt.pt --data=coco/annotations/instances.json --size=224 --k=20
    python -m dali_objcrop.train.knn_eval ...      # the same

Importable: :func:`knn_scores`, :func:`knn_eval`.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dali_objcrop.train.config import ConfigError, parse_or_exit
from dali_objcrop.train.linear_eval import EvalConfig, features_from_config, mean_average_precision


@torch.no_grad()
def knn_scores(train_x: torch.Tensor, train_targets: torch.Tensor, test_x: torch.Tensor, k: int = 20,
               temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Similarity-weighted votes ``(M, C)`` of the ``k`` nearest training samples.

    Args:
        train_x: (N, D) features; test_x: (M, D).
        train_targets: (N, C) multi-hot or one-hot float targets.
        k: neighbours (capped at N).
        temperature: vote weight ``exp(cos / T)``.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    tr = F.normalize(train_x.float(), dim=1)
    y = train_targets.float()
    k = min(k, len(tr))
    out = []
    for s in range(0, len(test_x), chunk):
        sim = F.normalize(test_x[s:s + chunk].float(), dim=1) @ tr.T         # (m, N)
        top, idx = sim.topk(k, dim=1)                                        # (m, k)
        w = (top / temperature).exp()
        out.append((w.unsqueeze(2) * y[idx]).sum(1))                         # (m, C)
    return torch.cat(out)


def knn_eval(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             k: int = 20, temperature: float = 0.07) -> dict:
    """kNN accuracy: ``{"top1"}`` for (N,) class ids, ``{"map", "per_class_ap"}`` for (N, C) multi-hot targets."""
    if train_y.ndim == 2:
        scores = knn_scores(train_x, train_y, test_x, k, temperature)
        m, ap = mean_average_precision(scores.numpy(), test_y.numpy())
        return {"map": m, "per_class_ap": [None if a != a else float(a) for a in ap], "k": k}
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    scores = knn_scores(train_x, F.one_hot(train_y.long(), n_cls), test_x, k, temperature)
    return {"top1": float((scores.argmax(1) == test_y).float().mean()), "k": k}


@dataclass
class KnnConfig:
    """The kNN classifier."""

    k: int = 20                       # neighbours that vote
    temperature: float = 0.07         # vote weight exp(similarity / temperature)

    def __post_init__(self) -> None:
        if self.k < 1 or self.temperature <= 0:
            raise ConfigError(f"need k >= 1 and temperature > 0, got k={self.k}, temperature={self.temperature}")


def main(argv: list[str] | None = None) -> int:
    """``python -m dali_objcrop.train.knn_eval --ckpt=... [--field=value ...]`` (``--help`` lists the fields)."""
    ev, kc = parse_or_exit([EvalConfig, KnnConfig], argv, "knn-eval", required=("ckpt",))
    labels, f = features_from_config(ev)
    res = knn_eval(f["train_x"], f["train_y"], f["test_x"], f["test_y"], kc.k, kc.temperature)
    res.update({"classes": labels.classes, "dropped_classes": labels.dropped, "config": {**asdict(ev), **asdict(kc)}})
    metric = "map" if labels.multilabel else "top1"
    print(f"kNN (k={kc.k}) {metric}: {100 * res[metric]:.2f}")
    if ev.out:
        Path(ev.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
