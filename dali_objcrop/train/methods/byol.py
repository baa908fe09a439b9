"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent").

Online network (backbone, projector, predictor) regresses the target network's
projection of the other view; the target is an EMA of the online network with
momentum going from 0.99 to 1 on a cosine.  Projector and predictor
4096 -> 256, LARS (lr 0.2 x batch/256, weight decay 1.5e-6), symmetric loss.
With an object view, view 1 goes through the object projector and view 2
through the scene projector (Mishra et al. 2022); the predictor is shared.

Multi-crop (as SwAV / DINO): the M local views of an image are extra online views only -- backbone,
the projector of ``local_key`` and the predictor, in one forward pass for all N*M of them -- and
each one's prediction regresses the target projections of *both* global views.  Targets come from
the global views only.  The loss keeps BYOL's scale (the symmetric two-view loss is a sum of two
pair losses) and weighs every prediction/target pair the same: ``2 * (sum over the 2 + 2M pairs) /
(2 + 2M)``; without local views it is the two-view loss, computed as before.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..heads import Backbone, HeadSpec, build_heads, mlp
from .common import local_batch, per_local, pool, target_copy, update_momentum

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


def multicrop_loss(p1: torch.Tensor, p2: torch.Tensor, pl: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
                   m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BYOL with local views as extra online views.

    Args:
        p1, p2, z1, z2: as :func:`byol_loss`.
        pl: (N * M, D) online predictions of the local views, image ``i``'s in rows ``i * M ..``.
        m: M, local views per image (>= 1).

    Returns:
        ``(loss, global_loss, local_loss)``: ``global_loss`` is :func:`byol_loss`, ``local_loss`` the mean
        over the M local views of ``regression(p_l, z1) + regression(p_l, z2)`` (the same scale), and
        ``loss = (global_loss + M * local_loss) / (1 + M)``: every one of the 2 + 2M pairs weighs the same.
    """
    g = byol_loss(p1, p2, z1, z2)
    loc = regression_loss(pl, per_local(z1, m)) + regression_loss(pl, per_local(z2, m))
    return (g + m * loc) / (1 + m), g, loc


class BYOL(nn.Module):
    """BYOL with one projector per view key and a shared predictor.

    Args:
        backbone: the trunk.
        projector: projector widths (BYOL: 4096 -> 256).
        predictor: predictor widths (BYOL: 4096 -> 256).
        keys: ``(view1_key, view2_key)``.
        same_head_init: separate heads start from the same weights (see :func:`dali_objcrop.train.heads.build_heads`).
        local_key: the projector of the local views (:func:`dali_objcrop.train.heads.local_head_key`; None:
            view 1's, ``keys[0]``).
    """

    def __init__(self, backbone: Backbone, projector: HeadSpec, predictor: HeadSpec, keys: tuple[str, str],
                 same_head_init: bool = True, local_key: str | None = None):
        super().__init__()
        self.keys = tuple(keys)
        self.local_key = self.keys[0] if local_key is None else local_key
        if self.local_key not in self.keys:
            raise ValueError(f"local_key must be one of the view heads {self.keys}, got {local_key!r}")
        self.backbone, self.heads = backbone, build_heads(backbone.dim, projector, self.keys, same_head_init)
        self.predictor = mlp(projector.sizes[-1], predictor)
        self.backbone_k, self.heads_k = target_copy(self.backbone), target_copy(self.heads)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, shuffle_seed: int = 0, local: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch of view pairs; returns ``(loss, {})`` (no state change).

        ``local``: (N, M, 3, s, s) local views (extra online views; see the module doc); with them the dict
        holds ``loss_global`` and ``loss_local``.  The targets are the global views' only.
        """
        flat, m = local_batch(local, len(v1))
        p1 = self.predictor(self.heads[self.keys[0]](pool(self.backbone(v1))))
        p2 = self.predictor(self.heads[self.keys[1]](pool(self.backbone(v2))))
        with torch.no_grad():
            z1 = self.heads_k[self.keys[0]](pool(self.backbone_k(v1)))
            z2 = self.heads_k[self.keys[1]](pool(self.backbone_k(v2)))
        if not m:
            return byol_loss(p1, p2, z1, z2), {}
        pl = self.predictor(self.heads[self.local_key](pool(self.backbone(flat))))   # all N * M local views at once
        loss, g, loc = multicrop_loss(p1, p2, pl, z1, z2, m)
        return loss, {"loss_global": g.detach(), "loss_local": loc.detach()}

    @torch.no_grad()
    def after_step(self, aux: dict[str, torch.Tensor], momentum: float) -> None:
        """Once the optimizer has stepped: EMA-update the target network."""
        update_momentum(self.backbone, self.backbone_k, momentum)
        update_momentum(self.heads, self.heads_k, momentum)
