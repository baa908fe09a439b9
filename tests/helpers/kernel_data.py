"""Test data shared by the CPU and GPU kernel tests."""
from __future__ import annotations

import numpy as np


def boxes_for(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ragged normalised boxes for n images (0-3 each, some images without any) and their offsets."""
    rng = np.random.default_rng(seed)
    count = rng.integers(0, 4, n)
    offsets = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
    c = rng.uniform(0.2, 0.8, (offsets[-1], 2))
    wh = rng.uniform(0.02, 0.6, (offsets[-1], 2))
    return np.clip(np.concatenate([c - wh / 2, c + wh / 2], 1), 0, 1).astype(np.float32), offsets
