"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent").

Online network (backbone, projector, predictor) regresses the target network's
projection of the other view; the target is an EMA of the online network with
momentum going from 0.99 to 1 on a cosine.  Projector and predictor
4096 -> 256, LARS (lr 0.2 x batch/256, weight decay 1.5e-6), symmetric loss.
With an object view, view 1 goes through the object projector and view 2
through the scene projector (Mishra et al. 2022); the predictor is shared.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..heads import Backbone, HeadSpec, build_heads, mlp
from .common import pool, target_copy, update_momentum

DEFAULTS = dict(momentum=0.99, base_lr=0.2, weight_decay=1.5e-6, optimizer="lars", head="byol_projector")


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's ``2 - 2 cos(p, z)``, averaged over the batch (float32).

    Args:
        p: (N, D) online predictions.
        z: (N, D) target projections (no gradient).
    """
    return (2.0 - 2.0 * F.cosine_similarity(p.float(), z.float(), dim=1)).mean()


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric BYOL loss: view 1's prediction against view 2's target and vice versa (summed)."""
    return regression_loss(p1, z2) + regression_loss(p2, z1)


class BYOL(nn.Module):
    """BYOL with one projector per view key and a shared predictor.

    Args:
        backbone: the trunk.
        projector: projector widths (BYOL: 4096 -> 256).
        predictor: predictor widths (BYOL: 4096 -> 256).
        keys: ``(view1_key, view2_key)``.
        same_head_init: separate heads start from the same weights (see :func:`dali_objcrop.train.heads.build_heads`).
    """

    def __init__(self, backbone: Backbone, projector: HeadSpec, predictor: HeadSpec, keys: tuple[str, str],
                 same_head_init: bool = True):
        super().__init__()
        self.keys = tuple(keys)
        self.backbone, self.heads = backbone, build_heads(backbone.dim, projector, self.keys, same_head_init)
        self.predictor = mlp(projector.sizes[-1], predictor)
        self.backbone_k, self.heads_k = target_copy(self.backbone), target_copy(self.heads)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, shuffle_seed: int = 0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch of view pairs; returns ``(loss, {})`` (no state change)."""
        p1 = self.predictor(self.heads[self.keys[0]](pool(self.backbone(v1))))
        p2 = self.predictor(self.heads[self.keys[1]](pool(self.backbone(v2))))
        with torch.no_grad():
            z1 = self.heads_k[self.keys[0]](pool(self.backbone_k(v1)))
            z2 = self.heads_k[self.keys[1]](pool(self.backbone_k(v2)))
        return byol_loss(p1, p2, z1, z2), {}

    @torch.no_grad()
    def after_step(self, aux: dict[str, torch.Tensor], momentum: float) -> None:
        """Once the optimizer has stepped: EMA-update the target network."""
        update_momentum(self.backbone, self.backbone_k, momentum)
        update_momentum(self.heads, self.heads_k, momentum)
