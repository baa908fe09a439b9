"""The epoch sampler: which dataset positions each rank gets in each epoch, in which batches."""
from __future__ import annotations

import numpy as np

from .iteration import resolve_rank
from .rng import SALT_SAMPLE_ORDER, epoch_generator


def shard_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                  shuffle: bool = True, drop_last: bool = True) -> list[np.ndarray]:
    """This rank's batches of dataset positions for one epoch.

    A global permutation from ``(seed, epoch)`` (the same on every rank) is dealt
    round-robin to the ranks, so shards are disjoint and every rank gets the same
    number of batches.

    Args:
        n: dataset size.
        batch_size: samples per batch (per rank).
        seed, epoch: the shuffle key.
        rank, world_size: this rank and the number of ranks.
        shuffle: False keeps dataset order (still dealt round-robin).
        drop_last: True: only full batches; the ``n mod (world_size *
            batch_size)`` samples left over (different ones each epoch) are
            dropped.  False: every sample is delivered; the permutation is padded
            by wrapping around to a multiple of ``world_size`` (at most
            ``world_size - 1`` repeats, as ``DistributedSampler``; with more
            ranks than samples the permutation repeats as often as needed, so no
            rank is left empty), and each rank's last batch may be partial.

    Returns:
        list of int64 arrays (the batches, in order).
    """
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    rank, world_size = resolve_rank(rank, world_size)
    if shuffle:
        order = epoch_generator(seed, epoch, SALT_SAMPLE_ORDER).permutation(n)
    else:
        order = np.arange(n)
    if drop_last:
        per_rank = (n // (world_size * batch_size)) * batch_size
        order = order[: per_rank * world_size]
    else:
        total = -(-n // world_size) * world_size
        order = np.resize(order, total)   # wraps around as often as needed (more ranks than images too)
        per_rank = total // world_size
    mine = order[rank::world_size][:per_rank].astype(np.int64)
    return [mine[i:i + batch_size] for i in range(0, per_rank, batch_size)]
