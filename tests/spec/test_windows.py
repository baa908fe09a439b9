"""Crop-window maths: geometry rules, torchvision parity, determinism, fallbacks."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dali_objcrop import rng
from dali_objcrop.windows import (MODES, CropConfig, box_scale_from_mean_area, random_resized_crop,
                                  sample_windows)


def random_batch(n: int, seed: int = 0, max_boxes: int = 12, small_images: bool = True):
    """Random image sizes (some under 224 px) and ragged normalised boxes (some tiny, some empty images)."""
    r = np.random.default_rng(seed)
    w = r.integers(60 if small_images else 300, 1200, n)
    h = r.integers(60 if small_images else 300, 900, n)
    counts = r.integers(0, max_boxes + 1, n)
    counts[::7] = 0
    offsets = np.concatenate([[0], np.cumsum(counts)])
    m = int(offsets[-1])
    x1, y1 = r.random(m) * 0.9, r.random(m) * 0.9
    bw, bh = r.random(m) ** 2 * 0.6 + 0.001, r.random(m) ** 2 * 0.6 + 0.001
    boxes = np.stack([x1, y1, np.minimum(x1 + bw, 1), np.minimum(y1 + bh, 1)], 1).astype(np.float32)
    return np.stack([w, h], 1), boxes, offsets


def box_pixels(b: np.ndarray, w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Independent re-statement of the pixel rule: floor the min corner, ceil the max corner, >= 1 px."""
    x1 = np.clip(np.floor(b[:, 0] * w), 0, w - 1)
    y1 = np.clip(np.floor(b[:, 1] * h), 0, h - 1)
    x2 = np.maximum(np.minimum(np.ceil(b[:, 2] * w), w), x1 + 1)
    y2 = np.maximum(np.minimum(np.ceil(b[:, 3] * h), h), y1 + 1)
    return np.stack([x1, y1, x2, y2], 1)


def contains(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    return ((inner[:, 0] >= outer[:, 0]) & (inner[:, 1] >= outer[:, 1])
            & (inner[:, 2] <= outer[:, 2]) & (inner[:, 3] <= outer[:, 3]))


def chosen_boxes(boxes, offsets, cw):
    rows = np.flatnonzero(cw.box_index >= 0)
    return rows, boxes[offsets[rows] + cw.box_index[rows]].astype(np.float64)


@pytest.mark.parametrize("mode", MODES)
def test_windows_inside_image_and_nonempty(mode):
    sizes, boxes, offsets = random_batch(5000, seed=1)
    cw = sample_windows(sizes, boxes, offsets, np.arange(5000), seed=3, epoch=0,
                        config=CropConfig(mode=mode, box_scale=(0.3, 1.0)))
    w, h = sizes[:, 0, None], sizes[:, 1, None]
    win = cw.windows
    assert win.shape == (5000, 2, 4) and win.dtype == np.int32
    assert (win[..., 0] >= 0).all() and (win[..., 1] >= 0).all()
    assert (win[..., 2] <= w).all() and (win[..., 3] <= h).all()
    assert (win[..., 2] > win[..., 0]).all() and (win[..., 3] > win[..., 1]).all()
    for v in (0, 1):
        assert contains(cw.regions[:, v], win[:, v]).all()


@pytest.mark.parametrize("mode", ["obj-scene", "obj-obj", "obj-obj-dilate", "obj-obj-shift"])
def test_view1_inside_box_or_min_size_window(mode):
    sizes, boxes, offsets = random_batch(4000, seed=2)
    cfg = CropConfig(mode=mode, box_scale=(0.5, 1.0))
    cw = sample_windows(sizes, boxes, offsets, np.arange(4000), 7, 1, cfg)
    rows, b = chosen_boxes(boxes, offsets, cw)
    w, h = sizes[rows, 0], sizes[rows, 1]
    bp = box_pixels(b, w, h)
    reg = cw.regions[rows, 0].astype(np.int64)
    # the region holds the box, is at least min(224, side) wide/high, and is no larger than needed
    assert contains(reg, bp).all()
    rw, rh = reg[:, 2] - reg[:, 0], reg[:, 3] - reg[:, 1]
    assert (rw == np.maximum(bp[:, 2] - bp[:, 0], np.minimum(224, w))).all()
    assert (rh == np.maximum(bp[:, 3] - bp[:, 1], np.minimum(224, h))).all()
    # centred on the box unless the image edge pushes it back in
    cx_box, cx_reg = (bp[:, 0] + bp[:, 2]) / 2, (reg[:, 0] + reg[:, 2]) / 2
    free = (reg[:, 0] > 0) & (reg[:, 2] < w)
    assert (np.abs(cx_box - cx_reg)[free] <= 0.5).all()
    assert contains(reg, cw.windows[rows, 0].astype(np.int64)).all()
    # the box crop's area is within the configured scale of the region (or the centre fallback)
    win = cw.windows[rows, 0].astype(np.int64)
    frac = (win[:, 2] - win[:, 0]) * (win[:, 3] - win[:, 1]) / (rw * rh)
    assert np.median(frac) > 0.5


def test_view2_inside_dilated_box():
    sizes, boxes, offsets = random_batch(4000, seed=3)
    for delta in (0.0, 0.1, 0.2):
        cw = sample_windows(sizes, boxes, offsets, np.arange(4000), 0, 0,
                            CropConfig(mode="obj-obj-dilate", dilate=delta, box_scale=(0.4, 1.0)))
        rows, b = chosen_boxes(boxes, offsets, cw)
        w, h = sizes[rows, 0], sizes[rows, 1]
        grown = np.clip(b + np.array([-delta, -delta, delta, delta]), 0, 1)
        gp = box_pixels(grown, w, h)
        reg = cw.regions[rows, 1].astype(np.int64)
        assert contains(reg, gp).all()
        rw = reg[:, 2] - reg[:, 0]
        assert (rw == np.maximum(gp[:, 2] - gp[:, 0], np.minimum(224, w))).all()
        assert contains(reg, cw.windows[rows, 1].astype(np.int64)).all()
        if delta > 0:  # dilation really grows the region of view 2 relative to view 1
            grew = (reg[:, 2] - reg[:, 0]) >= (cw.regions[rows, 0, 2] - cw.regions[rows, 0, 0])
            assert grew.all()


def test_obj_obj_equals_dilate_zero():
    sizes, boxes, offsets = random_batch(1000, seed=4)
    a = sample_windows(sizes, boxes, offsets, np.arange(1000), 5, 2, CropConfig(mode="obj-obj", dilate=0.3))
    b = sample_windows(sizes, boxes, offsets, np.arange(1000), 5, 2, CropConfig(mode="obj-obj-dilate", dilate=0.0))
    np.testing.assert_array_equal(a.windows, b.windows)


def test_shift_distance_within_range():
    # big images, small boxes in the middle: the move never needs clamping
    n = 3000
    r = np.random.default_rng(5)
    sizes = np.tile([2000, 1600], (n, 1))
    cx, cy = r.uniform(0.4, 0.6, n), r.uniform(0.4, 0.6, n)
    boxes = np.stack([cx - 0.02, cy - 0.02, cx + 0.02, cy + 0.02], 1).astype(np.float32)
    offsets = np.arange(n + 1)
    cw = sample_windows(sizes, boxes, offsets, np.arange(n), 1, 0,
                        CropConfig(mode="obj-obj-shift", shift_range=(80, 120)))
    d = np.hypot(*cw.extras["shift"].T)
    assert (d >= 80 - 1).all() and (d <= 120 + 1).all()
    ang = np.arctan2(cw.extras["shift"][:, 1], cw.extras["shift"][:, 0])
    assert np.histogram(ang, bins=8)[0].min() > n / 8 * 0.7  # direction uniform
    # near the border the move is clamped so the shifted box stays inside the image
    sizes, boxes, offsets = random_batch(3000, seed=6)
    cw = sample_windows(sizes, boxes, offsets, np.arange(3000), 1, 0, CropConfig(mode="obj-obj-shift"))
    rows, b = chosen_boxes(boxes, offsets, cw)
    d = np.hypot(*cw.extras["shift"][rows].T)
    assert (d <= 120 + 1).all()
    bp = box_pixels(b, sizes[rows, 0], sizes[rows, 1])
    moved = bp + np.concatenate([cw.extras["shift"][rows]] * 2, axis=1)
    img = np.stack([np.zeros(len(rows)), np.zeros(len(rows)), sizes[rows, 0], sizes[rows, 1]], 1)
    assert contains(img, moved).all()
    assert contains(cw.regions[rows, 1].astype(np.int64), moved).all()


def test_scene_crops_match_torchvision_distribution():
    """Area and aspect ratio of our scene crops follow RandomResizedCrop.get_params (two-sample KS)."""
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("torchvision.transforms")
    from scipy.stats import ks_2samp
    from PIL import Image
    n = 6000
    results = {}
    for (W, H) in [(640, 480), (200, 900)]:   # the second forces many tries and centre fallbacks
        sizes = np.tile([W, H], (n, 1))
        cw = sample_windows(sizes, np.zeros((0, 4)), np.zeros(n + 1, np.int64), np.arange(n), 11, 0,
                            CropConfig(mode="scene-scene"))
        win = cw.windows[:, 0].astype(np.float64)
        ours_w, ours_h = win[:, 2] - win[:, 0], win[:, 3] - win[:, 1]
        torch.manual_seed(0)
        img = Image.new("RGB", (W, H))
        tv = np.array([T.RandomResizedCrop.get_params(img, scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3])
                       for _ in range(n)], dtype=np.float64)  # (i, j, h, w)
        tv_h, tv_w = tv[:, 2], tv[:, 3]
        for name, a, b in [("area", ours_w * ours_h / (W * H), tv_w * tv_h / (W * H)),
                           ("aspect", ours_w / ours_h, tv_w / tv_h),
                           ("left", win[:, 0] / W, tv[:, 1] / W)]:
            stat = ks_2samp(a, b).pvalue
            results[(W, H, name)] = stat
            assert stat > 1e-3, f"{W}x{H} {name}: KS p-value {stat:.2g}"
        # the centre fallback is hit equally often
        full = lambda w_, h_: np.mean((w_ == W) & (h_ == H) | (w_ == W) & (h_ == np.rint(W / 0.75)))
        assert abs(full(ours_w, ours_h) - full(tv_w, tv_h)) < 0.03


def test_random_resized_crop_fallback_is_torchvision_centre_crop():
    keys = rng.sample_keys(0, 0, np.arange(3))
    region = np.array([[0, 0, 100, 1000], [0, 0, 1000, 100], [10, 20, 110, 120]])
    # scale (1, 1) with a ratio range excluding the region's own ratio: every try fails -> fallback
    win = random_resized_crop(keys, 0, region, np.ones(3), np.ones(3), (3 / 4, 4 / 3), 10)
    np.testing.assert_array_equal(win[0], [0, 433, 100, 433 + 133])   # h = round(100 / 0.75)
    np.testing.assert_array_equal(win[1], [433, 0, 433 + 133, 100])   # w = round(100 * 4/3)
    np.testing.assert_array_equal(win[2], [10, 20, 110, 120])          # square: whole region


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_and_recomputable_alone(mode):
    sizes, boxes, offsets = random_batch(500, seed=7)
    cfg = CropConfig(mode=mode, box_scale=(0.3, 1.0))
    idx = np.arange(1000, 1500)
    a = sample_windows(sizes, boxes, offsets, idx, 42, 3, cfg)
    b = sample_windows(sizes, boxes, offsets, idx, 42, 3, cfg)
    np.testing.assert_array_equal(a.windows, b.windows)
    np.testing.assert_array_equal(a.flip, b.flip)
    for i in (0, 17, 499):   # one sample alone, no stream replay
        one = sample_windows(sizes[i:i + 1], boxes[offsets[i]:offsets[i + 1]], offsets[i:i + 2] - offsets[i],
                             idx[i:i + 1], 42, 3, cfg)
        np.testing.assert_array_equal(one.windows[0], a.windows[i])
        assert one.flip[0].tolist() == a.flip[i].tolist()
    c = sample_windows(sizes, boxes, offsets, idx, 43, 3, cfg)
    d = sample_windows(sizes, boxes, offsets, idx, 42, 4, cfg)
    assert (c.windows != a.windows).any() and (d.windows != a.windows).any()


def test_fallback_counted_and_scene_semantics():
    sizes, boxes, offsets = random_batch(700, seed=8)
    no_box = np.diff(offsets) == 0
    assert no_box.any()
    cw = sample_windows(sizes, boxes, offsets, np.arange(700), 0, 0, CropConfig(mode="obj-obj-dilate"))
    assert cw.num_fallback == int(no_box.sum())
    np.testing.assert_array_equal(cw.fallback, no_box)
    assert (cw.box_index[no_box] == -1).all() and np.isnan(cw.box[no_box]).all()
    # fallback rows are exactly what scene-scene gives for them
    sc = sample_windows(sizes, boxes, offsets, np.arange(700), 0, 0, CropConfig(mode="scene-scene"))
    np.testing.assert_array_equal(cw.windows[no_box], sc.windows[no_box])
    assert sc.num_fallback == 0


def test_top_k_limits_the_choice():
    n = 2000
    sizes = np.tile([640, 480], (n, 1))
    boxes = np.tile(np.array([[0.1, 0.1, 0.3, 0.3]], np.float32), (n * 5, 1))
    offsets = np.arange(0, n * 5 + 1, 5)
    cw = sample_windows(sizes, boxes, offsets, np.arange(n), 0, 0, CropConfig(top_k=2))
    assert set(np.unique(cw.box_index)) == {0, 1}
    cw = sample_windows(sizes, boxes, offsets, np.arange(n), 0, 0, CropConfig(top_k=10))
    assert set(np.unique(cw.box_index)) == {0, 1, 2, 3, 4}


def test_flip_probability():
    n = 20000
    sizes = np.tile([640, 480], (n, 1))
    off = np.zeros(n + 1, np.int64)
    f = sample_windows(sizes, np.zeros((0, 4)), off, np.arange(n), 0, 0, CropConfig(mode="scene-scene")).flip
    assert abs(f.mean() - 0.5) < 0.02 and abs(np.corrcoef(f[:, 0], f[:, 1])[0, 1]) < 0.03
    f = sample_windows(sizes, np.zeros((0, 4)), off, np.arange(n), 0, 0,
                       CropConfig(mode="scene-scene", flip_p=0.0)).flip
    assert not f.any()


def test_box_scale_from_mean_area():
    assert box_scale_from_mean_area(0.39) == pytest.approx((0.2 / 0.39, 1.0))
    assert box_scale_from_mean_area(0.05) == (1.0, 1.0)
    with pytest.raises(ValueError, match="mean_area_fraction"):
        box_scale_from_mean_area(0.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="obj-obj-zoom"), "mode"), (dict(scale=(0.5, 0.2)), "scale"), (dict(ratio=(0, 1)), "ratio"),
    (dict(dilate=-0.1), "dilate"), (dict(shift_range=(120, 80)), "shift_range"), (dict(top_k=0), "top_k"),
    (dict(num_tries=11), "num_tries"), (dict(box_scale=(0.0, 1.0)), "box_scale"), (dict(flip_p=2), "flip_p"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CropConfig(**kwargs)


def test_bad_batch_shapes_raise():
    with pytest.raises(ValueError, match="offsets"):
        sample_windows(np.ones((3, 2), int) * 100, np.zeros((0, 4)), np.zeros(3, np.int64), np.arange(3), 0, 0,
                       CropConfig())
    with pytest.raises(ValueError, match="seed"):
        sample_windows(np.ones((1, 2), int) * 100, np.zeros((0, 4)), np.zeros(2, np.int64), np.arange(1), -1, 0,
                       CropConfig())


def test_rng_uniforms_are_uniform_and_exact():
    keys = rng.sample_keys(0, 0, np.arange(200000))
    hi, lo = rng.uniforms(keys, 3)
    for u in (hi, lo):
        assert 0 <= u.min() and u.max() < 1
        assert abs(u.mean() - 0.5) < 0.005
        assert np.histogram(u, bins=20)[0].std() < 200000 / 20 * 0.03
    assert abs(np.corrcoef(hi, lo)[0, 1]) < 0.01
    # SplitMix64 known value: mix64(0) is the first output of SplitMix64 seeded with 0
    assert int(rng.mix64(np.array([0], np.uint64))[0]) == 0xE220A8397B1DCDAF
    assert math.isclose(float(hi[0]), float(rng.uniforms(keys[:1], 3)[0][0]))
