"""Local (multi-crop) views in the crop-window specification: regions per source, distributions, M = 0."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dali_objcrop import augment, rng
from dali_objcrop.windows import LOCAL_SOURCES, MODES, CropConfig, sample_windows
from test_windows import box_pixels, contains, random_batch

OBJECT_MODES = [m for m in MODES if m != "scene-scene"]


def widened(px: np.ndarray, w, h, min_size: int = 224) -> np.ndarray:
    """Independent re-statement of the min-size rule on pixel rectangles (N, 4)."""
    out = px.copy()
    for lo, hi, size in ((0, 2, w), (1, 3, h)):
        target = np.minimum(np.maximum(px[:, hi] - px[:, lo], min_size), size)
        new_lo = np.clip(np.floor((px[:, lo] + px[:, hi] - target) / 2), 0, size - target)
        out[:, lo], out[:, hi] = new_lo, new_lo + target
    return out


@pytest.mark.parametrize("mode", MODES)
def test_zero_local_views_leave_every_output_unchanged(mode):
    sizes, boxes, offsets = random_batch(500, seed=3)
    idx = np.arange(500)
    plain = sample_windows(sizes, boxes, offsets, idx, 7, 1, CropConfig(mode=mode))
    for m, src in ((0, "box"), (6, "scene")) + (((6, "box"), (4, "boxes")) if mode != "scene-scene" else ()):
        cw = sample_windows(sizes, boxes, offsets, idx, 7, 1, CropConfig(mode=mode, local_crops=m, local_from=src))
        for name in ("windows", "flip", "regions", "box_index", "fallback", "keys"):
            np.testing.assert_array_equal(getattr(cw, name), getattr(plain, name), err_msg=name)
        np.testing.assert_array_equal(cw.box, plain.box)
        assert cw.local_windows.shape == (500, m, 4) and cw.local_flip.shape == (500, m)
    assert plain.num_local == 0 and plain.all_windows.shape == (500, 2, 4)


@pytest.mark.parametrize("mode", OBJECT_MODES)
@pytest.mark.parametrize("source", LOCAL_SOURCES)
def test_local_windows_inside_their_region(mode, source):
    """Every local window lies in its region, and the region is the one the source names."""
    n = 800
    sizes, boxes, offsets = random_batch(n, seed=5)
    cw = sample_windows(sizes, boxes, offsets, np.arange(n), 2, 3,
                        CropConfig(mode=mode, local_crops=5, local_from=source))
    w, h = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    whole = np.stack([np.zeros(n), np.zeros(n), w, h], 1)
    for j in range(5):
        win, reg = cw.local_windows[:, j].astype(np.float64), cw.local_regions[:, j].astype(np.float64)
        assert contains(reg, win).all() and (win[:, 2] > win[:, 0]).all() and (win[:, 3] > win[:, 1]).all()
        if source == "scene":
            np.testing.assert_array_equal(reg, whole)
            assert (cw.local_box_index[:, j] == -1).all()
            continue
        no_box = cw.box_index < 0
        np.testing.assert_array_equal(reg[no_box], whole[no_box])
        if source == "box":
            obj = [v for v, kind in enumerate(CropConfig(mode=mode).view_kinds) if kind != "scene"]
            r = cw.regions[:, obj].astype(np.float64)
            union = np.stack([r[:, :, 0].min(1), r[:, :, 1].min(1), r[:, :, 2].max(1), r[:, :, 3].max(1)], 1)
            np.testing.assert_array_equal(reg, union)
            np.testing.assert_array_equal(cw.local_box_index[:, j], cw.box_index)
        else:   # boxes: proposal (b + j) mod k, widened to the minimum size
            rows = np.flatnonzero(~no_box)
            k = np.minimum(np.diff(offsets), 10)[rows]
            want = (cw.box_index[rows] + j) % k
            np.testing.assert_array_equal(cw.local_box_index[rows, j], want)
            b = boxes[offsets[rows] + want].astype(np.float64)
            px = box_pixels(b, w[rows], h[rows])
            np.testing.assert_array_equal(reg[rows], widened(px, w[rows], h[rows]))


def test_boxes_source_covers_distinct_proposals():
    """With at least M proposals, the M local views of a sample sit in M different proposals."""
    n = 300
    sizes, boxes, offsets = random_batch(n, seed=8, max_boxes=12)
    cw = sample_windows(sizes, boxes, offsets, np.arange(n), 0, 0,
                        CropConfig(local_crops=4, local_from="boxes"))
    rows = np.flatnonzero(np.minimum(np.diff(offsets), 10) >= 4)
    assert len(rows) > 50
    assert all(len(set(cw.local_box_index[i])) == 4 for i in rows)


def test_local_scale_and_ratio_follow_the_asked_ranges():
    """Area fraction ~ U(local_scale), log aspect ratio ~ U(log ratio) on regions large enough that the first
    try is accepted (KS tests); a narrower range moves the distribution (the test can fail)."""
    from scipy.stats import kstest
    n = 4000
    sizes = np.tile([1600, 1200], (n, 1))
    lo, hi = 0.05, 0.4
    for scale in ((lo, hi), (0.1, 0.3)):
        cw = sample_windows(sizes, np.zeros((0, 4)), np.zeros(n + 1, np.int64), np.arange(n), 4, 0,
                            CropConfig(mode="scene-scene", local_crops=2, local_from="scene", local_scale=scale))
        win = cw.local_windows.reshape(-1, 4).astype(np.float64)
        ww, hh = win[:, 2] - win[:, 0], win[:, 3] - win[:, 1]
        area = ww * hh / (1600 * 1200)
        p_scale = kstest(area, "uniform", args=(lo, hi - lo)).pvalue
        p_ratio = kstest(np.log(ww / hh), "uniform", args=(math.log(3 / 4), math.log(4 / 3) - math.log(3 / 4))).pvalue
        assert p_ratio > 1e-3, p_ratio
        if scale == (lo, hi):
            assert p_scale > 1e-3, p_scale
            assert area.min() >= lo - 0.002 and area.max() <= hi + 0.002
        else:
            assert p_scale < 1e-6   # the other range is told apart


def test_local_views_recomputable_alone_and_per_epoch():
    sizes, boxes, offsets = random_batch(200, seed=1)
    config = CropConfig(local_crops=6, local_from="boxes")
    full = sample_windows(sizes, boxes, offsets, np.arange(200), 9, 2, config)
    for i in (0, 17, 199):
        one = sample_windows(sizes[i:i + 1], boxes[offsets[i]:offsets[i + 1]], [0, offsets[i + 1] - offsets[i]],
                             np.array([i]), 9, 2, config)
        np.testing.assert_array_equal(one.local_windows[0], full.local_windows[i])
        np.testing.assert_array_equal(one.local_flip[0], full.local_flip[i])
    other = sample_windows(sizes, boxes, offsets, np.arange(200), 9, 3, config)
    assert (other.local_windows != full.local_windows).any()
    # the local views differ from each other (their own slots)
    assert (full.local_windows[:, 0] != full.local_windows[:, 1]).any(axis=1).mean() > 0.9


def test_local_slots_do_not_overlap_any_other_slot():
    used = {rng.SLOT_BOX, rng.SLOT_SHIFT}
    used |= {rng.view_slot(v, o) for v in (0, 1) for o in range(rng.SLOTS_PER_VIEW)}
    used |= {rng.aug_slot(v, k) for v in (0, 1) for k in range(rng.SLOTS_PER_AUG)}
    local = [rng.view_slot(v, o) for v in range(2, 2 + rng.MAX_LOCAL_VIEWS) for o in range(rng.LOCAL_AUG)]
    local += [rng.aug_slot(v, k) for v in range(2, 2 + rng.MAX_LOCAL_VIEWS) for k in range(rng.SLOTS_PER_AUG)]
    assert len(set(local)) == len(local) and not used & set(local)
    with pytest.raises(ValueError, match="view"):
        rng.view_slot(2 + rng.MAX_LOCAL_VIEWS, 0)


def test_local_augmentation_recipe_and_draws():
    byol = augment.get_recipe("byol")
    assert byol.view_aug(2).blur_p == 0.5 and byol.view_aug(2).solarize_p == 0 and byol.view_aug(1).solarize_p == 0.2
    keys = rng.sample_keys(0, 0, np.arange(4000))
    p2 = augment.sample_aug_params(keys, 2, byol.view_aug(2))
    p3 = augment.sample_aug_params(keys, 3, byol.view_aug(3))
    assert abs(p2["blur"].mean() - 0.5) < 0.03 and not p2["solarize"].any()
    assert (p2["brightness"] != p3["brightness"]).mean() > 0.5   # each local view draws its own


@pytest.mark.parametrize("kwargs, match", [
    (dict(local_crops=-1), "local_crops"), (dict(local_crops=17), "local_crops"),
    (dict(local_crops=2, local_scale=(0.5, 0.2)), "local_scale"), (dict(local_size=0), "local_size"),
    (dict(local_from="objects"), "local_from"),
    (dict(mode="scene-scene", local_crops=2, local_from="box"), "scene"),
    (dict(mode="scene-scene", local_crops=2, local_from="boxes"), "scene"),
])
def test_local_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CropConfig(**kwargs)
