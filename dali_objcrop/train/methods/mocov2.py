"""MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning"; He et al. 2020).

Query encoder (backbone + MLP head) trained by InfoNCE against a momentum key
encoder and a queue of past keys: queue 65536, momentum 0.999, T 0.2, head
2048-2048-128, SGD lr 0.03 x batch/256, weight decay 1e-4, cosine schedule.

The loss is symmetrised (both views serve as query), because with separate
object and scene heads (Mishra et al. 2022) an asymmetric loss would never
train the head of the key view.  Each view keeps its own queue, so a query's
negatives come from the same head as its positive key.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..heads import Backbone, HeadSpec, build_heads
from .common import all_gather_cat, enqueue, info_nce, pool, shuffled_forward, target_copy, update_momentum

DEFAULTS = dict(queue_size=65536, momentum=0.999, temperature=0.2, base_lr=0.03, weight_decay=1e-4,
                optimizer="sgd", head="mocov2")


def mocov2_loss(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric MoCo loss: ``(nce(q1, k2, queue[1]) + nce(q2, k1, queue[0])) / 2``.

    Args:
        q1, q2: (N, D) normalised queries of view 1 and 2.
        k1, k2: (N, D) normalised keys of view 1 and 2.
        queue: (2, D, K) past keys of view 1 (``queue[0]``) and view 2 (``queue[1]``).
    """
    return 0.5 * (info_nce(q1, k2, queue[1], temperature) + info_nce(q2, k1, queue[0], temperature))


class MoCoV2(nn.Module):
    """MoCo v2 with one head per view key (see :func:`dali_objcrop.train.heads.head_keys`).

    Args:
        backbone: the trunk (its ``dim`` sets the head input).
        head: layer widths of the projection head.
        keys: ``(view1_key, view2_key)``, e.g. ``("obj", "scene")``.
        queue_size: negatives per view queue.
        temperature: InfoNCE temperature.
        same_head_init: separate heads start from the same weights (see :func:`dali_objcrop.train.heads.build_heads`).
    """

    def __init__(self, backbone: Backbone, head: HeadSpec, keys: tuple[str, str], queue_size: int = 65536,
                 temperature: float = 0.2, same_head_init: bool = True):
        super().__init__()
        if queue_size < 1 or temperature <= 0:
            raise ValueError(f"queue_size must be >= 1 and temperature > 0, got {queue_size}, {temperature}")
        self.shuffle_bn = True  # shuffle-BN of the key encoder across ranks; off with SyncBN
        self.keys, self.temperature = tuple(keys), float(temperature)
        self.backbone, self.heads = backbone, build_heads(backbone.dim, head, self.keys, same_head_init)
        self.backbone_k, self.heads_k = target_copy(self.backbone), target_copy(self.heads)
        self.register_buffer("queue", F.normalize(torch.randn(2, head.sizes[-1], queue_size), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _embed(self, backbone: nn.Module, heads: nn.ModuleDict, x: torch.Tensor, key: str) -> torch.Tensor:
        return F.normalize(heads[key](pool(backbone(x))), dim=1)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, shuffle_seed: int = 0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch of view pairs; returns ``(loss, {"keys": (2, N, D)})`` (no state change)."""
        q1 = self._embed(self.backbone, self.heads, v1, self.keys[0])
        q2 = self._embed(self.backbone, self.heads, v2, self.keys[1])
        with torch.no_grad():
            k1, = shuffled_forward(lambda x: (self._embed(self.backbone_k, self.heads_k, x, self.keys[0]),),
                                   v1, shuffle_seed * 2, self.shuffle_bn)
            k2, = shuffled_forward(lambda x: (self._embed(self.backbone_k, self.heads_k, x, self.keys[1]),),
                                   v2, shuffle_seed * 2 + 1, self.shuffle_bn)
        loss = mocov2_loss(q1, q2, k1, k2, self.queue.clone().detach(), self.temperature)
        return loss, {"keys": torch.stack([k1, k2]).detach()}

    @torch.no_grad()
    def after_step(self, aux: dict[str, torch.Tensor], momentum: float) -> None:
        """Once the optimizer has stepped: momentum-update the key encoder, enqueue all ranks' keys."""
        update_momentum(self.backbone, self.backbone_k, momentum)
        update_momentum(self.heads, self.heads_k, momentum)
        keys = aux["keys"]
        gathered = all_gather_cat(keys.transpose(0, 1).contiguous()).transpose(0, 1)  # (2, N*world, D)
        enqueue(self.queue, self.queue_ptr, gathered)
