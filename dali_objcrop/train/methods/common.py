"""Pieces every method shares: schedules, EMA, contrastive loss, queues, shuffle-BN across ranks.

All free functions; nothing here keeps state of its own.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def cosine_schedule(step: int, max_steps: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step ``max_steps`` and after)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    t = min(max(step, 0), max_steps) / max_steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_at(step: int, max_steps: int, base_lr: float, warmup_steps: int = 0) -> float:
    """Learning rate: linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``max_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return cosine_schedule(step - warmup_steps, max(1, max_steps - warmup_steps), base_lr, 0.0)


@torch.no_grad()
def update_momentum(online: nn.Module, target: nn.Module, m: float) -> None:
    """EMA of parameters: ``target = m * target + (1 - m) * online`` (buffers are left alone).

    Args:
        online: the trained module.
        target: a module of identical structure (the key / target encoder).
        m: momentum in [0, 1]; 1 freezes the target.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m}")
    tp = [p.data for p in target.parameters()]
    op = [p.data for p in online.parameters()]
    if len(tp) != len(op):
        raise ValueError(f"online and target differ in structure ({len(op)} vs {len(tp)} parameters)")
    torch._foreach_mul_(tp, m)
    torch._foreach_add_(tp, op, alpha=1.0 - m)


def target_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy (no gradients) to serve as key / target encoder."""
    t = copy.deepcopy(module)
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: positive ``q.k``, negatives ``q.queue``; mean cross-entropy.

    Args:
        q: (N, D) L2-normalised queries (with gradient).
        k: (N, D) L2-normalised positive keys.
        queue: (D, K) L2-normalised negative keys.
        temperature: softmax temperature (MoCo v2: 0.2).

    Returns:
        Scalar float32 loss.
    """
    q, k, queue = q.float(), k.float(), queue.float()
    l_pos = (q * k).sum(1, keepdim=True)                      # (N, 1)
    l_neg = q @ queue                                         # (N, K)
    logits = torch.cat([l_pos, l_neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (no gradient) from every rank along dim 0; ``x`` itself without DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


@torch.no_grad()
def shuffled_forward(fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], x: torch.Tensor, seed: int,
                     enabled: bool = True) -> tuple[torch.Tensor, ...]:
    """Shuffle-BN (He et al. 2020, MoCo section 3.3): run ``fn`` on a batch shuffled across ranks.

    Each rank's BN then sees samples of other ranks, so the key encoder's batch
    statistics cannot leak which key belongs to which query.  The permutation is
    drawn from ``seed`` (identical on every rank, so no broadcast is needed and
    a resumed run draws the same one).  With one process, or ``enabled=False``
    (SyncBN, or plain per-rank BN), it is ``fn(x)``.

    Returns:
        ``fn``'s outputs (a tuple of tensors with batch dim 0), in ``x``'s order.
    """
    if not enabled or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn(x)
    world, rank, n = dist.get_world_size(), dist.get_rank(), len(x)
    xs = all_gather_cat(x)
    perm = torch.randperm(world * n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    outs = fn(xs[perm.view(world, n)[rank]])
    inv = torch.argsort(perm)
    return tuple(all_gather_cat(o)[inv].view(world, n, *o.shape[1:])[rank] for o in outs)


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Write ``keys`` (V, N, D) into ``queue`` (V, D, K) at ``ptr`` (wrapping), advance ``ptr`` in place."""
    K = queue.shape[-1]
    n = keys.shape[1]
    idx = (int(ptr) + torch.arange(n, device=queue.device)) % K
    queue[:, :, idx] = keys.to(queue.dtype).transpose(1, 2)
    ptr.fill_((int(ptr) + n) % K)


def pool(f: torch.Tensor) -> torch.Tensor:
    """Global average pool ``(N, C, h, w) -> (N, C)``."""
    return f.mean((2, 3))


def local_batch(local: torch.Tensor | None, n: int) -> tuple[torch.Tensor | None, int]:
    """The local (multi-crop) views of a batch as one batch for one forward pass: ``(views, M)``.

    Args:
        local: ``(N, M, 3, s, s)`` -- each image's M local views (the loader's ``batch["local"]``), or None.
        n: N, the global views' batch size (the local views of image ``i`` are rows ``i * M .. i * M + M - 1``
            of the result).

    Returns:
        ``((N * M, 3, s, s), M)``; ``(None, 0)`` for None or M = 0 (no local views: the two-view loss).
    """
    if local is None:
        return None, 0
    if local.dim() != 5 or local.shape[0] != n:
        raise ValueError(f"local views must be (N, M, 3, s, s) with N = {n} (the global views' batch), "
                         f"got {tuple(local.shape)}")
    m = int(local.shape[1])
    return (local.flatten(0, 1) if m else None), m


def per_local(x: torch.Tensor, m: int) -> torch.Tensor:
    """``(N, ...) -> (N * M, ...)``: each image's row repeated for its M local views (row ``i * M + j``)."""
    return x.repeat_interleave(m, dim=0)
