"""Counter-based randomness shared by every crop backend.

Every random number used by dali_objcrop is a pure function of
``(seed, epoch, sample_index, slot)``: a sample's crops can be recomputed alone,
in any order, on the CPU (NumPy) or on the GPU (``csrc/``), without replaying a
stream.  The generator is SplitMix64 (Steele et al., 2014) used as a hash:

    key  = mix(mix(mix(seed) ^ epoch) ^ sample_index)
    h    = mix(key + slot)                    # one 64-bit draw per slot
    u_hi = (h >> 32) * 2**-32,  u_lo = (h & 0xffffffff) * 2**-32

Each slot yields two uniforms in [0, 1) that are exact in float64 on every
platform, so the CUDA kernel reproduces the NumPy windows bit for bit.  The slot
table below is the contract between this module, the DALI graph and the kernel:
never renumber a slot, only append.
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S32 = (np.uint64(s) for s in (30, 27, 31, 32))
_LO32 = np.uint64(0xFFFFFFFF)
_INV32 = 1.0 / 4294967296.0

# --- slot table (each slot gives two uniforms: hi, lo) ----------------------
SLOT_BOX = 0                # hi: which proposal, lo: unused
SLOT_SHIFT = 1              # hi: shift direction, lo: shift radius
SLOT_VIEW_BASE = 2          # view v uses slots SLOT_VIEW_BASE + v * SLOTS_PER_VIEW + ...
SLOTS_PER_VIEW = 16
VIEW_TRY = 0                #   + t for try t in [0, 10): hi: scale, lo: log-ratio
VIEW_POS = 10               #   hi: top (i), lo: left (j)
VIEW_FLIP = 11              #   hi: flip, lo: unused
SLOT_AUG_BASE = 40          # augmentation: SLOT_AUG_BASE + v * SLOTS_PER_AUG + k
SLOTS_PER_AUG = 8
MAX_TRIES = 10
# Local (multi-crop) views: view 2 + j is local view j; each has a block of SLOTS_PER_LOCAL slots from
# SLOT_LOCAL_BASE: the VIEW_* offsets above, then its augmentation draws at LOCAL_AUG + k.
SLOT_LOCAL_BASE = 64
SLOTS_PER_LOCAL = 32
LOCAL_AUG = 16
MAX_LOCAL_VIEWS = 16


def _local_base(view: int) -> int:
    if not 2 <= view < 2 + MAX_LOCAL_VIEWS:
        raise ValueError(f"view must be 0, 1 (global) or 2..{1 + MAX_LOCAL_VIEWS} (local), got {view!r}")
    return SLOT_LOCAL_BASE + (view - 2) * SLOTS_PER_LOCAL


def view_slot(view: int, offset: int) -> int:
    """Slot number of ``offset`` (one of the ``VIEW_*`` constants) for view ``view``: 0 and 1 are the
    global views, ``2 + j`` local view ``j``."""
    if view in (0, 1):
        return SLOT_VIEW_BASE + view * SLOTS_PER_VIEW + offset
    return _local_base(view) + offset


def aug_slot(view: int, k: int) -> int:
    """Slot number of augmentation draw ``k`` (0..7) for view ``view`` (0, 1 global; ``2 + j`` local)."""
    if view in (0, 1):
        return SLOT_AUG_BASE + view * SLOTS_PER_AUG + k
    return _local_base(view) + LOCAL_AUG + k


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 step (add the golden gamma, then finalise) on a uint64 array."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    t = np.empty_like(z)
    # in place: this runs ~20 times per sample batch, temporaries dominate its cost
    for shift, mult in ((_S30, _M1), (_S27, _M2)):
        np.right_shift(z, shift, out=t)
        np.bitwise_xor(z, t, out=z)
        np.multiply(z, mult, out=z)
    np.right_shift(z, _S31, out=t)
    return np.bitwise_xor(z, t, out=z)


def sample_keys(seed: int, epoch: int, index: np.ndarray) -> np.ndarray:
    """Per-sample 64-bit keys for ``index`` (any integer array) at ``(seed, epoch)``."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    base = mix64(np.array([seed], dtype=np.uint64))
    base = mix64(base ^ np.uint64(epoch))
    idx = np.asarray(index)
    if idx.size and idx.min() < 0:
        raise ValueError("sample indices must be non-negative")
    return mix64(base ^ idx.astype(np.uint64))


def uniforms(keys: np.ndarray, slot: int) -> tuple[np.ndarray, np.ndarray]:
    """Two float64 uniforms in [0, 1) per key for one slot: ``(u_hi, u_lo)``."""
    h = mix64(keys + np.uint64(slot))
    return (h >> _S32).astype(np.float64) * _INV32, (h & _LO32).astype(np.float64) * _INV32


# --- per-epoch orders (NumPy PCG64 streams keyed by (seed, epoch, salt)) ----------------------------
# One salt per order, so that the orders of one (seed, epoch) are independent; never change one (a run's
# data order is part of what a resumed run must reproduce).
SALT_SAMPLE_ORDER = 0x5EED     # the files loader's global permutation (sampling.shard_batches)
SALT_SHARD_ORDER = 0x5A4D      # the shard loader's order of the shards
SALT_SHARD_READER = 0x5AAD     # the seed of DALI's webdataset reader shuffle buffer


def epoch_generator(seed: int, epoch: int, salt: int) -> np.random.Generator:
    """The NumPy generator of one per-epoch order: ``PCG64([seed, epoch, salt])``."""
    return np.random.Generator(np.random.PCG64([seed, epoch, salt]))

