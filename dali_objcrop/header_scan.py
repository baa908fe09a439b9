"""The header scan of an image list, across worker processes (the image index's build step).

Each file's status and size are :func:`~dali_objcrop.dataset.scan_image`'s (``ok``, ``missing``, ``empty``,
``unreadable``, ``truncated``, or a size that differs from the annotation's), but a JPEG's markers are
read directly (its first 4 KiB, 128 KiB where large ICC/Photoshop segments come first) plus its last 64
bytes: 14 us per COCO photo instead of PIL's 54; anything else goes to ``scan_image`` (PIL).  Blocks of
files go to ``forkserver`` worker processes (the caller may hold DALI or CUDA threads, which a fork would
copy mid-state); a small list is scanned inline.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from .dataset import EMPTY, MISSING, OK, TRUNCATED, scan_image

PARALLEL_FROM = 4096      # images from which the scan uses worker processes
SCAN_BLOCK = 2048         # images per scan task


# ---------------------------------------------------------------------------------------------------
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, when ``head`` holds it and the start of scan after it
    (PIL reads the markers up to the scan too: a file cut before it is unreadable); None otherwise."""
    i, n, wh = 2, len(head), None
    while i + 4 <= n:
        if head[i] != 0xFF:
            return None
        m = head[i + 1]
        if m == 0xFF:
            i += 1
        elif m == 0xDA:
            return wh
        elif m == 0x01 or 0xD0 <= m <= 0xD8:
            i += 2
        else:
            if m in _SOF:
                if i + 9 > n:
                    return None
                wh = (head[i + 7] << 8) | head[i + 8], (head[i + 5] << 8) | head[i + 6]
            i += 2 + ((head[i + 2] << 8) | head[i + 3])
    return None


def scan_fast(path: str) -> tuple[str, tuple[int, int] | None]:
    """:func:`~dali_objcrop.dataset.scan_image`'s status and size, reading a JPEG's markers (first 4 KiB,
    128 KiB where large APP segments come first) and last 64 bytes directly; PIL for anything else
    (9 us per file instead of PIL's 54 on COCO photos)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return MISSING, None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return EMPTY, None
        head = os.pread(fd, 4096, 0)
        if head[:3] == b"\xff\xd8\xff":
            wh = _jpeg_size(head)
            if wh is None and len(head) == 4096:   # big APP segments (ICC, Photoshop): look further
                wh = _jpeg_size(os.pread(fd, 1 << 17, 0))
            if wh is not None and wh[0] and wh[1]:
                tail = os.pread(fd, 64, max(0, size - 64))
                return (OK if b"\xff\xd9" in tail else TRUNCATED), wh
    except OSError:
        pass
    finally:
        os.close(fd)
    status, wh, _ = scan_image(path)
    return status, wh


def _scan_block(task: tuple[str, list[str], np.ndarray | None]) -> tuple[list[str], np.ndarray]:
    """Statuses and (n, 2) sizes of a block of keys (``sizes`` given: a differing header is a reject)."""
    root, keys, sizes = task
    want = None if sizes is None else [tuple(x) for x in np.asarray(sizes).tolist()]
    status, out, join = [], [], os.path.join
    for j, k in enumerate(keys):
        st, wh = scan_fast(join(root, k))
        if wh is None:
            wh = (0, 0)
        elif st == OK and want is not None and wh != want[j]:
            st = f"size {wh[0]}x{wh[1]} differs from annotation {want[j][0]}x{want[j][1]}"
        status.append(st)
        out.append(wh)
    return status, np.array(out, np.int32).reshape(-1, 2)


class Scan:
    """The header scan of a key list: blocks handed to worker processes (or done inline when small)."""

    def __init__(self, root: Path, keys: list[str], sizes: np.ndarray | None, workers: int | None,
                 progress: Callable[[int], None] | None = None) -> None:
        self.n, self.progress = len(keys), progress
        blocks = [(str(root), keys[s:s + SCAN_BLOCK], None if sizes is None else sizes[s:s + SCAN_BLOCK])
                  for s in range(0, len(keys), SCAN_BLOCK)]
        workers = workers or os.cpu_count() or 1
        self.pool = None
        if workers > 1 and len(keys) >= PARALLEL_FROM:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor
            # forkserver: the caller may hold DALI / CUDA / torch threads, which a fork would copy mid-state
            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("forkserver"))
            self.futures = [self.pool.submit(_scan_block, b) for b in blocks]
        else:
            self.blocks = blocks

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def result(self) -> tuple[list[str], np.ndarray]:
        status, sizes = [], []
        try:
            if self.pool is None:
                parts = (_scan_block(b) for b in self.blocks)
            else:
                parts = (f.result() for f in self.futures)
            for st, wh in parts:
                status += st
                sizes.append(wh)
                if self.progress is not None:
                    self.progress(len(st))
        finally:
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)
        return status, (np.concatenate(sizes) if sizes else np.zeros((0, 2), np.int32))
