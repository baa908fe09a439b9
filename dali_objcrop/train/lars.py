"""LARS (You et al. 2017, "Large Batch Training of Convolutional Networks"), as BYOL uses it.

SGD with momentum whose per-tensor step is scaled by the trust ratio
``eta * ||w|| / ||g + wd * w||``.  Biases and batch-norm parameters (1-D
tensors) get neither weight decay nor the trust ratio, as in BYOL.
"""
from __future__ import annotations

from typing import Iterable

import torch


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Split parameters into ``[{weights: wd, lars}, {biases/norms: no wd, no lars}]``."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lars": True},
            {"params": no_decay, "weight_decay": 0.0, "lars": False}]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling on top of SGD with momentum.

    Args:
        params: parameters or groups; a group with ``lars=False`` is plain SGD.
        lr: learning rate.
        momentum: heavy-ball momentum.
        weight_decay: L2 weight decay added to the gradient.
        eta: trust coefficient (0.001 in BYOL).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"bad LARS arguments: lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                             f"eta={eta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad.clone()
                if g["lars"]:
                    w_norm, d_norm = torch.norm(p), torch.norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d.mul_(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d
                else:
                    state["momentum_buffer"].mul_(g["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-g["lr"])
        return loss
