"""A loader stand-in for the trainer's tests: deterministic random batches, no DALI."""
from __future__ import annotations


class RandomBatches:
    """Two batches per epoch of ``view1``, ``view2`` (n, 3, size, size) and, with ``local_crops`` = M > 0,
    ``local`` (n, M, 3, local_size, local_size): normal noise from a generator seeded by the epoch, so an
    epoch's batches are the same whenever it is read (what the trainer's resume tests need)."""

    def __init__(self, n: int = 4, size: int = 32, local_crops: int = 0, local_size: int = 16) -> None:
        self.n, self.size, self.m, self.ls, self.epoch = n, size, local_crops, local_size, 0

    def __len__(self) -> int:
        return 2

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import torch
        g = torch.Generator().manual_seed(self.epoch)
        n, s = self.n, self.size
        for _ in range(2):
            b = {"view1": torch.randn(n, 3, s, s, generator=g), "view2": torch.randn(n, 3, s, s, generator=g)}
            if self.m:
                b["local"] = torch.randn(n, self.m, 3, self.ls, self.ls, generator=g)
            yield b
