"""MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning"; He et al. 2020).

Query encoder (backbone + MLP head) trained by InfoNCE against a momentum key
encoder and a queue of past keys: queue 65536, momentum 0.999, T 0.2, head
2048-2048-128, SGD lr 0.03 x batch/256, weight decay 1e-4, cosine schedule.

The loss is symmetrised (both views serve as query), because with separate
object and scene heads (Mishra et al. 2022) an asymmetric loss would never
train the head of the key view.  Each view keeps its own queue, so a query's
negatives come from the same head as its positive key.

Multi-crop (Caron et al. 2020, SwAV; as DINO): the M local views of an image are extra queries only
-- encoded by the query encoder and the head of ``local_key`` in one forward pass for all N*M of
them, each contrasted with the momentum keys of *both* global views (and that key's queue).  Keys
and queue entries come from the global views only.  The loss averages the InfoNCE of every
query/key pair: ``(2 global pairs + 2M local pairs) / (2 + 2M)``; without local views it is the
two-view loss above, computed as before.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..heads import Backbone, HeadSpec, build_heads
from .common import (all_gather_cat, enqueue, info_nce, local_batch, per_local, pool, shuffled_forward, target_copy,
                     update_momentum)

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


def multicrop_loss(q1: torch.Tensor, q2: torch.Tensor, ql: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                   queue: torch.Tensor, temperature: float, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MoCo with local views as extra queries: the mean InfoNCE over all query/key pairs.

    Args:
        q1, q2, k1, k2, queue, temperature: as :func:`mocov2_loss`.
        ql: (N * M, D) normalised local queries, image ``i``'s M views in rows ``i * M ..``.
        m: M, local views per image (>= 1).

    Returns:
        ``(loss, global_loss, local_loss)``: ``global_loss`` is :func:`mocov2_loss` (the two global pairs),
        ``local_loss`` the mean over the 2M local pairs (each local query against the key of view 1 with
        ``queue[0]`` and of view 2 with ``queue[1]``), and ``loss = (global_loss + M * local_loss) / (1 + M)``
        -- each of the 2 + 2M pairs weighs the same.
    """
    g = mocov2_loss(q1, q2, k1, k2, queue, temperature)
    loc = 0.5 * (info_nce(ql, per_local(k1, m), queue[0], temperature)
                 + info_nce(ql, per_local(k2, m), queue[1], temperature))
    return (g + m * loc) / (1 + m), g, loc


class MoCoV2(nn.Module):
    """MoCo v2 with one head per view key (see :func:`dali_objcrop.train.heads.head_keys`).

    Args:
        backbone: the trunk (its ``dim`` sets the head input).
        head: layer widths of the projection head.
        keys: ``(view1_key, view2_key)``, e.g. ``("obj", "scene")``.
        queue_size: negatives per view queue.
        temperature: InfoNCE temperature.
        same_head_init: separate heads start from the same weights (see :func:`dali_objcrop.train.heads.build_heads`).
        local_key: the head of the local views (:func:`dali_objcrop.train.heads.local_head_key`; None:
            view 1's, ``keys[0]``).
    """

    def __init__(self, backbone: Backbone, head: HeadSpec, keys: tuple[str, str], queue_size: int = 65536,
                 temperature: float = 0.2, same_head_init: bool = True, local_key: str | None = None):
        super().__init__()
        if queue_size < 1 or temperature <= 0:
            raise ValueError(f"queue_size must be >= 1 and temperature > 0, got {queue_size}, {temperature}")
        self.shuffle_bn = True  # shuffle-BN of the key encoder across ranks; off with SyncBN
        self.keys, self.temperature = tuple(keys), float(temperature)
        self.local_key = self.keys[0] if local_key is None else local_key
        if self.local_key not in self.keys:
            raise ValueError(f"local_key must be one of the view heads {self.keys}, got {local_key!r}")
        self.backbone, self.heads = backbone, build_heads(backbone.dim, head, self.keys, same_head_init)
        self.backbone_k, self.heads_k = target_copy(self.backbone), target_copy(self.heads)
        self.register_buffer("queue", F.normalize(torch.randn(2, head.sizes[-1], queue_size), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _embed(self, backbone: nn.Module, heads: nn.ModuleDict, x: torch.Tensor, key: str) -> torch.Tensor:
        return F.normalize(heads[key](pool(backbone(x))), dim=1)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, shuffle_seed: int = 0, local: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch of view pairs; returns ``(loss, {"keys": (2, N, D)})`` (no state change).

        ``local``: (N, M, 3, s, s) local views (extra queries; see the module doc); with them the dict also
        holds ``loss_global`` and ``loss_local``.  The keys are the global views' only.
        """
        flat, m = local_batch(local, len(v1))
        q1 = self._embed(self.backbone, self.heads, v1, self.keys[0])
        q2 = self._embed(self.backbone, self.heads, v2, self.keys[1])
        with torch.no_grad():
            k1, = shuffled_forward(lambda x: (self._embed(self.backbone_k, self.heads_k, x, self.keys[0]),),
                                   v1, shuffle_seed * 2, self.shuffle_bn)
            k2, = shuffled_forward(lambda x: (self._embed(self.backbone_k, self.heads_k, x, self.keys[1]),),
                                   v2, shuffle_seed * 2 + 1, self.shuffle_bn)
        if not m:
            loss = mocov2_loss(q1, q2, k1, k2, self.queue.clone().detach(), self.temperature)
            return loss, {"keys": torch.stack([k1, k2]).detach()}
        ql = self._embed(self.backbone, self.heads, flat, self.local_key)   # all N * M local views at once
        loss, g, loc = multicrop_loss(q1, q2, ql, k1, k2, self.queue.clone().detach(), self.temperature, m)
        return loss, {"keys": torch.stack([k1, k2]).detach(), "loss_global": g.detach(), "loss_local": loc.detach()}

    @torch.no_grad()
    def after_step(self, aux: dict[str, torch.Tensor], momentum: float) -> None:
        """Once the optimizer has stepped: momentum-update the key encoder, enqueue all ranks' keys."""
        update_momentum(self.backbone, self.backbone_k, momentum)
        update_momentum(self.heads, self.heads_k, momentum)
        keys = aux["keys"]
        gathered = all_gather_cat(keys.transpose(0, 1).contiguous()).transpose(0, 1)  # (2, N*world, D)
        enqueue(self.queue, self.queue_ptr, gathered)
