"""DenseCL (Wang et al. 2021, "Dense Contrastive Learning for Self-Supervised Visual Pre-Training").

MoCo v2 plus a dense head (1x1 convolutions on the last feature map) trained
with a pixel-level InfoNCE: each query location's positive is the key location
whose *backbone* feature is most similar (argmax cosine); negatives come from a
second queue holding each image's mean dense key.  Loss
``(1 - lambda) * global + lambda * dense`` with lambda 0.5.  Symmetrised and with
per-view queues and heads for the same reasons as :mod:`dali_objcrop.train.methods.mocov2`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..heads import Backbone, HeadSpec, build_heads
from .common import all_gather_cat, enqueue, pool, shuffled_forward, target_copy, update_momentum
from .mocov2 import mocov2_loss

DEFAULTS = dict(queue_size=65536, momentum=0.999, temperature=0.2, base_lr=0.03, weight_decay=1e-4,
                optimizer="sgd", head="densecl_global", lam=0.5)


# why --method=densecl refuses --local-crops (Config.resolved and DenseCL.forward say this)
LOCAL_VIEWS = ("a multi-crop DenseCL (the dense loss of each local view's small feature map against the global "
               "views' dense keys, and its weighting) is not implemented; multi-crop runs with --method=mocov2 "
               "or byol (or pass --local-crops=0)")


def dense_info_nce(q: torch.Tensor, k: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, queue: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """DenseCL's dense loss with positives matched by backbone-feature similarity.

    Args:
        q: (N, D, S) normalised dense queries (S = h*w locations).
        k: (N, D, S) normalised dense keys of the other view.
        fq: (N, C, S) backbone features of the query view (used only for matching).
        fk: (N, C, S) backbone features of the key view.
        queue: (D, K) normalised negatives.
        temperature: softmax temperature.

    Returns:
        Scalar float32 loss averaged over all N*S locations.
    """
    q, k, queue = q.float(), k.float(), queue.float()
    with torch.no_grad():
        sim = F.normalize(fq.float(), dim=1).transpose(1, 2) @ F.normalize(fk.float(), dim=1)  # (N, S, S)
        match = sim.argmax(2)                                                                  # (N, S)
    k_pos = torch.gather(k, 2, match.unsqueeze(1).expand(-1, k.shape[1], -1))                # (N, D, S)
    l_pos = (q * k_pos).sum(1).reshape(-1, 1)                                                 # (N*S, 1)
    l_neg = q.transpose(1, 2).reshape(-1, q.shape[1]) @ queue                                 # (N*S, K)
    logits = torch.cat([l_pos, l_neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=q.device))


def densecl_loss(global_loss: torch.Tensor, dense_loss: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """``(1 - lam) * global_loss + lam * dense_loss``."""
    return (1.0 - lam) * global_loss + lam * dense_loss


class DenseCL(nn.Module):
    """DenseCL with global and dense heads per view key and two per-view queues.

    Args:
        backbone: the trunk.
        global_head: widths of the global MLP (MoCo v2's 2048-2048-128).
        dense_head: widths of the dense 1x1-conv head (``conv=True``).
        keys: ``(view1_key, view2_key)``.
        queue_size, temperature: as MoCo v2.
        lam: weight of the dense loss.
        same_head_init: separate heads start from the same weights (see :func:`dali_objcrop.train.heads.build_heads`).
    """

    def __init__(self, backbone: Backbone, global_head: HeadSpec, dense_head: HeadSpec, keys: tuple[str, str],
                 queue_size: int = 65536, temperature: float = 0.2, lam: float = 0.5, same_head_init: bool = True):
        super().__init__()
        if queue_size < 1 or temperature <= 0 or not 0.0 <= lam <= 1.0:
            raise ValueError(f"bad DenseCL parameters: queue_size={queue_size}, temperature={temperature}, "
                             f"lam={lam}")
        if not dense_head.conv:
            raise ValueError("dense_head must be a 1x1-conv head (HeadSpec(conv=True))")
        self.shuffle_bn = True  # shuffle-BN of the key encoder across ranks; off with SyncBN
        self.keys, self.temperature, self.lam = tuple(keys), float(temperature), float(lam)
        self.backbone = backbone
        self.heads = build_heads(backbone.dim, global_head, self.keys, same_head_init)
        self.dense_heads = build_heads(backbone.dim, dense_head, self.keys, same_head_init)
        self.backbone_k, self.heads_k, self.dense_heads_k = (target_copy(m) for m in
                                                             (self.backbone, self.heads, self.dense_heads))
        self.register_buffer("queue", F.normalize(torch.randn(2, global_head.sizes[-1], queue_size), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_dense", F.normalize(torch.randn(2, dense_head.sizes[-1], queue_size), dim=1))
        self.register_buffer("queue_dense_ptr", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _embed(backbone: nn.Module, heads: nn.ModuleDict, dense_heads: nn.ModuleDict, x: torch.Tensor, key: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = backbone(x)                                                     # (N, C, h, w)
        g = F.normalize(heads[key](pool(f)), dim=1)                         # (N, D)
        d = F.normalize(dense_heads[key](f), dim=1).flatten(2)              # (N, D, S)
        return g, d, f.flatten(2)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, shuffle_seed: int = 0, local: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch; returns ``(loss, {"keys", "dense_keys", "loss_global", "loss_dense"})``.

        Local (multi-crop) views are refused (``local`` not None raises ValueError): see :data:`LOCAL_VIEWS`.
        """
        if local is not None:
            raise ValueError(f"DenseCL takes no local views: {LOCAL_VIEWS}")
        q1, qd1, f1 = self._embed(self.backbone, self.heads, self.dense_heads, v1, self.keys[0])
        q2, qd2, f2 = self._embed(self.backbone, self.heads, self.dense_heads, v2, self.keys[1])
        with torch.no_grad():
            def key_fn(key):
                return lambda x: self._embed(self.backbone_k, self.heads_k, self.dense_heads_k, x, key)
            k1, kd1, kf1 = shuffled_forward(key_fn(self.keys[0]), v1, shuffle_seed * 2, self.shuffle_bn)
            k2, kd2, kf2 = shuffled_forward(key_fn(self.keys[1]), v2, shuffle_seed * 2 + 1, self.shuffle_bn)
        queue, queue_d = self.queue.clone().detach(), self.queue_dense.clone().detach()
        loss_g = mocov2_loss(q1, q2, k1, k2, queue, self.temperature)
        loss_d = 0.5 * (dense_info_nce(qd1, kd2, f1.detach(), kf2, queue_d[1], self.temperature)
                        + dense_info_nce(qd2, kd1, f2.detach(), kf1, queue_d[0], self.temperature))
        dense_keys = torch.stack([F.normalize(kd1.float().mean(2), dim=1), F.normalize(kd2.float().mean(2), dim=1)])
        aux = {"keys": torch.stack([k1, k2]).detach(), "dense_keys": dense_keys.detach(),
               "loss_global": loss_g.detach(), "loss_dense": loss_d.detach()}
        return densecl_loss(loss_g, loss_d, self.lam), aux

    @torch.no_grad()
    def after_step(self, aux: dict[str, torch.Tensor], momentum: float) -> None:
        """Once the optimizer has stepped: momentum-update the key encoder, enqueue both queues."""
        for online, target in ((self.backbone, self.backbone_k), (self.heads, self.heads_k),
                               (self.dense_heads, self.dense_heads_k)):
            update_momentum(online, target, momentum)
        for name, queue, ptr in (("keys", self.queue, self.queue_ptr),
                                 ("dense_keys", self.queue_dense, self.queue_dense_ptr)):
            keys = all_gather_cat(aux[name].transpose(0, 1).contiguous()).transpose(0, 1)
            enqueue(queue, ptr, keys)
