"""show / crop-stats tools and the crop diagnostics maths (stats.py), on hand-made rectangles and the
embedded synthetic set."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from dali_objcrop import cli
from dali_objcrop.stats import (FIGURES, count_in_rects, max_box_fraction_inside, per_sample_stats, rect_iou,
                                summarize, union_summed_area)
from dali_objcrop.synth import make_synthetic
from dali_objcrop.visualize import crop_grid, crop_to_uint8, cut_crop
from dali_objcrop.windows import MODES


@pytest.fixture(scope="module")
def synth16(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("tools_synth"), n=16, seed=3)


# ---- stats maths on hand-made rectangles -----------------------------------------------------------
def one_image(windows, gt, size=(100, 80)):
    """per_sample_stats for samples of one image with ground-truth boxes ``gt`` (pixels)."""
    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    windows = np.asarray(windows).reshape(-1, 2, 4)
    return per_sample_stats(np.array([size]), gt, np.array([0, len(gt)]), np.zeros(len(windows), int), windows)


def test_iou_identical_disjoint_and_half():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [5, 0, 15, 10]])
    np.testing.assert_allclose(rect_iou(a, b), [1.0, 0.0, 50 / 150])


def test_intersection_on_object_known_overlap():
    # views overlap in [20, 60) x [10, 50) = 1600 px; the GT box covers [20, 40) x [10, 50) of it = 800 px
    s = one_image([[[0, 0, 60, 50], [20, 10, 100, 80]]], gt=[[20, 10, 40, 70]])
    assert s["overlap"][0] == 1600 and s["overlap_on_object"][0] == 800
    f = summarize(s)
    assert f["intersection_on_object"] == pytest.approx(0.5)
    assert f["view_iou"] == pytest.approx(1600 / (3000 + 80 * 70 - 1600))
    assert f["mean_window_area"] == pytest.approx((3000 + 5600) / 2 / 8000)


def test_overlapping_boxes_counted_once_and_clipped():
    # two GT boxes overlapping each other: the union, not the sum; one box partly outside the image
    s = one_image([[[0, 0, 100, 80], [0, 0, 100, 80]]], gt=[[0, 0, 50, 40], [25, 20, 75, 60], [90, 70, 130, 99]])
    union = 50 * 40 + 50 * 40 - 25 * 20 + 10 * 10
    assert s["overlap_on_object"][0] == union
    assert summarize(s)["intersection_on_object"] == pytest.approx(union / 8000)


def test_disjoint_views_and_no_gt():
    s = one_image([[[0, 0, 10, 10], [50, 50, 60, 60]], [[0, 0, 10, 10], [0, 0, 10, 10]]], gt=[])
    f = summarize(s)
    assert f["view_iou"] == pytest.approx(0.5)      # 0 and 1
    assert f["views_overlap"] == pytest.approx(0.5)
    assert f["intersection_on_object"] == 0.0        # only the overlapping sample counts; no objects
    assert f["views_with_object"] == 0.0


def test_summed_area_matches_dense_mask():
    r = np.random.default_rng(0)
    w, h = 37, 23
    boxes = np.sort(r.uniform(-5, 45, (7, 2, 2)), axis=1).transpose(0, 2, 1).reshape(7, 4)[:, [0, 2, 1, 3]]
    mask = np.zeros((h, w), bool)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    for b in boxes:  # pixel centre inside the box
        mask |= (xs >= b[0]) & (xs < b[2]) & (ys >= b[1]) & (ys < b[3])
    sat = union_summed_area(boxes, w, h)
    rects = np.array([[0, 0, w, h], [3, 4, 20, 19], [10, 10, 10, 15], [30, 0, 37, 23]])
    want = [mask[y1:y2, x1:x2].sum() for x1, y1, x2, y2 in rects]
    np.testing.assert_array_equal(count_in_rects(sat, rects), want)


def test_views_with_object_half_rule():
    gt = np.array([[0, 0, 10, 10], [50, 50, 70, 70]], np.float64)
    wins = np.array([[0, 0, 5, 10],      # exactly half of box 0 -> counts
                     [0, 0, 4, 10],      # 40% of box 0
                     [55, 55, 100, 100],  # 75% x 75% = 56% of box 1
                     [20, 20, 40, 40]])  # nothing
    frac = max_box_fraction_inside(wins, np.zeros(4, int), gt, np.array([0, 2]))
    np.testing.assert_allclose(frac, [0.5, 0.4, 0.5625, 0.0])


def test_per_sample_stats_rejects_bad_rows():
    with pytest.raises(ValueError, match="image rows"):
        per_sample_stats(np.array([[10, 10]]), np.zeros((0, 4)), np.array([0, 0]), np.array([1]),
                         np.zeros((1, 2, 4), int))


# ---- visualize -------------------------------------------------------------------------------------
def test_cut_crop_geometry_and_flip():
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :30] = 255                                     # left half white
    c = cut_crop(img, [20, 0, 40, 40], flip=False, size=(20, 40))
    assert c.shape == (40, 20, 3) and c[:, :10].min() == 255 and c[:, 10:].max() == 0
    f = cut_crop(img, [20, 0, 40, 40], flip=True, size=(20, 40))
    np.testing.assert_array_equal(f, c[:, ::-1])
    with pytest.raises(ValueError, match="window"):
        cut_crop(img, [50, 0, 70, 10])


def test_crop_to_uint8_undoes_normalisation():
    img = np.random.default_rng(0).integers(0, 256, (8, 9, 3)).astype(np.uint8)
    mean, std = np.array([120.0, 110.0, 100.0]), np.array([60.0, 50.0, 40.0])
    chw = ((img - mean) / std).transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(crop_to_uint8(chw, mean, std), img)


def test_crop_grid_png(tmp_path):
    r = np.random.default_rng(1)
    img = r.integers(0, 256, (120, 200, 3)).astype(np.uint8)
    row = {"image": img, "proposals": np.array([[10, 10, 50, 60]]), "box": np.array([10, 10, 50, 60.0]),
           "windows": np.array([[0, 0, 100, 100], [50, 20, 200, 120]]), "flips": [True, False],
           "crops": [cut_crop(img, [0, 0, 100, 100], True, 64), cut_crop(img, [50, 20, 200, 120], False, 64)],
           "key": "a.jpg", "mode": "obj-scene"}
    no_box = dict(row, box=np.full(4, np.nan), proposals=np.zeros((0, 4)))
    grid = crop_grid([row, no_box], tmp_path / "g.png", height=100)
    png = cv2.imread(str(tmp_path / "g.png"))
    assert png is not None and png.shape == grid.shape
    # two rows of (title strip 22 + panel header 18 + 100) and one gap
    assert png.shape[0] == 2 * 140 + 6


# ---- CLI on the embedded synthetic set -----------------------------------------------------------
@pytest.mark.parametrize("mode", ["scene-scene", "obj-obj-dilate", "obj-obj-shift"])
def test_show_cli(synth16, tmp_path, mode):
    out = tmp_path / "show.png"
    assert cli.main(["show", "--coco", str(synth16), "--mode", mode, "--out", str(out), "-n", "3",
                     "--height", "128", "--seed", "2"]) == 0
    png = cv2.imread(str(out))
    assert png is not None
    assert png.shape[0] == 3 * (22 + 18 + 128) + 2 * 6


def test_show_same_windows_as_sample_windows(synth16):
    """show draws exactly the windows of the single source of truth."""
    from dali_objcrop.tools import crop_config, load_tool_data, show_rows
    from dali_objcrop.windows import box_scale_from_mean_area, sample_windows
    data = load_tool_data(synth16)
    cfg = crop_config(data.store, "obj-scene")
    assert cfg.box_scale == box_scale_from_mean_area(data.store.mean_area_fraction(10))
    pos = np.array([1, 5, 9])
    rows = show_rows(data, pos, cfg, seed=4, epoch=2, size=32)
    b, off = data.store.gather(data.rows[pos], 10)
    want = sample_windows(data.index.sizes[pos], b, off, pos, 4, 2, cfg)
    np.testing.assert_array_equal(np.stack([r["windows"] for r in rows]), want.windows)
    assert all(r["crops"][0].shape == (32, 32, 3) for r in rows)


def test_crop_stats_cli_all_modes(synth16, tmp_path):
    out = tmp_path / "stats.json"
    assert cli.main(["crop-stats", "--coco", str(synth16), "--mode", "all", "--json", str(out),
                     "--samples", "200"]) == 0
    d = json.loads(out.read_text())
    assert set(d["modes"]) == set(MODES)
    for mode, r in d["modes"].items():
        assert r["samples"] == 200 and r["fallback"] == 0
        for k in FIGURES:
            assert 0.0 <= r[k] <= 1.0, (mode, k, r[k])
    # obj-obj views come from the same region: they overlap more than independent scene crops
    assert d["modes"]["obj-obj"]["view_iou"] > d["modes"]["scene-scene"]["view_iou"]


def test_crop_stats_cli_one_mode_with_box_store(synth16, tmp_path):
    from dali_objcrop.boxstore import BoxStore
    store = tmp_path / "gt.boxes"
    BoxStore.from_coco(synth16, top_k=3).save(store)
    out = tmp_path / "one.json"
    assert cli.main(["crop-stats", "--coco", str(synth16), "--boxes", str(store), "--mode", "obj-scene",
                     "--json", str(out), "--samples", "64", "--seed", "1"]) == 0
    d = json.loads(out.read_text())
    assert d["mode"] == "obj-scene" and d["samples"] == 64
    assert all(0.0 <= d[k] <= 1.0 for k in FIGURES)


def test_touches_object_and_chance_level():
    # sample 1: overlap [0,10)x[0,10) has 25 object px; sample 2: overlap far from the object
    s = one_image([[[0, 0, 10, 10], [0, 0, 10, 10]], [[60, 60, 100, 80], [60, 60, 100, 80]]], gt=[[5, 5, 15, 15]])
    f = summarize(s)
    assert f["intersection_touches_object"] == pytest.approx(0.5)
    assert f["intersection_on_object"] == pytest.approx((25 / 100 + 0) / 2)
    assert f["image_on_object"] == pytest.approx(100 / 8000)


def test_crop_stats_real_coco_reproduces_paper_obj_scene(coco_ann):
    """On real COCO photos with GT boxes, object crops kept inside their box (no 224-px widening) put
    ~99% of the views' overlap on objects (paper, appendix D: 0.99), far above scene-scene crops."""
    from dali_objcrop.tools import crop_config, crop_stats, load_tool_data
    data = load_tool_data(coco_ann)
    n = len(data.index)
    obj = crop_stats(data, crop_config(data.store, "obj-scene", min_box_size=1), samples=n, seed=0)
    scene = crop_stats(data, crop_config(data.store, "scene-scene"), samples=n, seed=0)
    assert obj["intersection_on_object"] > 0.97
    assert scene["image_on_object"] < scene["intersection_on_object"] < 0.8
    assert obj["fallback"] == 0


def test_show_cli_via_loader(synth16, tmp_path):
    """--loader draws the DALI pipeline's crops (CPU) beside the loader's windows."""
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "loader.png"
    assert cli.main(["show", "--coco", str(synth16), "--mode", "obj-obj-dilate", "--out", str(out), "-n", "2",
                     "--height", "96", "--size", "64", "--loader"]) == 0
    png = cv2.imread(str(out))
    assert png is not None and png.shape[0] == 2 * (22 + 18 + 96) + 6


@pytest.mark.parametrize("mode", ["obj-scene", "obj-obj-shift"])
def test_tool_windows_equal_loader_windows(synth16, mode):
    """What show draws and crop-stats measures is what the loader crops (same config, keys, positions)."""
    pytest.importorskip("nvidia.dali")
    from dali_objcrop.loader import ObjCropLoader
    from dali_objcrop.tools import crop_config, load_tool_data, windows_for
    data = load_tool_data(synth16)
    loader = ObjCropLoader(synth16, boxes="gt", mode=mode, batch_size=4, seed=7, device="cpu")
    assert list(loader.index.keys) == list(data.index.keys)
    pos = np.arange(len(data.index))
    cfg = crop_config(data.store, mode)
    assert cfg == loader.config
    np.testing.assert_array_equal(windows_for(data, pos, cfg, 7, 3).windows, loader.windows_for(pos, 3).windows)
