"""Local (multi-crop) views in the show / crop-stats / demo tools: drawn where they are, measured as the
specification samples them, and nothing changed without them."""
from __future__ import annotations

import json
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from dali_objcrop import cli
from dali_objcrop.stats import FIGURES, LOCAL_FIGURES, local_per_sample_stats, summarize_local
from dali_objcrop.synth import make_synthetic
from dali_objcrop.tools import crop_config, crop_stats, load_tool_data, show_rows, windows_for
from dali_objcrop.visualize import LOCAL_RGB, WINDOW_RGB, crop_grid, cut_crop, draw_sample
from dali_objcrop.windows import LOCAL_SOURCES, CropConfig, sample_windows


@pytest.fixture(scope="module")
def synth16(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("local_tools_synth"), n=16, seed=3)


def near(pixels: np.ndarray, rgb, tol: int = 30) -> np.ndarray:
    """Which pixels (..., 3) are within ``tol`` of ``rgb`` in every channel."""
    return (np.abs(pixels.astype(np.int64) - np.asarray(rgb)) <= tol).all(axis=-1)


def near_local(pixels: np.ndarray) -> np.ndarray:
    return np.any([near(pixels, c) for c in LOCAL_RGB], axis=0)


# ---- drawing ---------------------------------------------------------------------------------------
def test_local_colours_apart_from_the_other_colours():
    from dali_objcrop.visualize import BOX_RGB, PROPOSAL_RGB, TEXT_RGB
    others = np.array([PROPOSAL_RGB, BOX_RGB, *WINDOW_RGB, TEXT_RGB, (128, 128, 128)])
    assert not near_local(others).any()


def test_draw_sample_local_windows_where_they_are_and_only_with_local_views():
    """On a flat grey image the local colour lies on each local window's outline (scaled to the panel),
    and nowhere when there are no local views."""
    img = np.full((200, 400, 3), 128, np.uint8)
    win = np.array([[0, 0, 100, 100], [200, 100, 400, 200]])
    local = np.array([[120, 20, 240, 80], [20, 130, 90, 190], [300, 10, 380, 60]])
    s = 100 / 200   # panel height 100
    plain = draw_sample(img, None, None, win, height=100)
    for empty in (None, np.zeros((0, 4), int)):
        np.testing.assert_array_equal(draw_sample(img, None, None, win, height=100, local_windows=empty), plain)
    assert not near_local(plain).any()
    panel = draw_sample(img, None, None, win, height=100, local_windows=local, local_flips=[True, False, False])
    hit = near_local(panel)
    assert hit.any()
    for j, (x1, y1, x2, y2) in enumerate(local):
        px1, py1, px2, py2 = (int(round(x1 * s)), int(round(y1 * s)), int(round(x2 * s)) - 1,
                              int(round(y2 * s)) - 1)
        bottom = panel[py2, px1:px2 + 1]
        right = panel[py1:py2 + 1, px2]
        # the bottom and right edges carry view j's own colour (the letter sits at the top-left)
        assert near(bottom, LOCAL_RGB[j]).mean() > 0.9 and near(right, LOCAL_RGB[j]).mean() > 0.9, j
    # nothing local-coloured far from every local window's outline (beyond the letters inside)
    mask = np.zeros(hit.shape, bool)
    for x1, y1, x2, y2 in (local * s).round().astype(int):
        mask[max(0, y1 - 2):y2 + 2, max(0, x1 - 2):x2 + 2] = True
    assert not (hit & ~mask).any()


def test_crop_grid_local_thumbnails_and_layout(tmp_path):
    r = np.random.default_rng(2)
    img = r.integers(0, 256, (120, 200, 3)).astype(np.uint8)
    wins = np.array([[0, 0, 100, 100], [50, 20, 200, 120]])
    lw = np.array([[10, 10, 40, 40], [60, 30, 120, 90], [150, 0, 200, 50]])
    lf = [False, True, False]
    row = {"image": img, "windows": wins, "flips": [False, False], "key": "a.jpg", "mode": "obj-obj",
           "crops": [cut_crop(img, w, False, 64) for w in wins]}
    plain_layout: list = []
    plain = crop_grid([row], None, height=100, layout=plain_layout)
    local_row = dict(row, local_windows=lw, local_flips=lf, local_size=32, local_from="box",
                     local_crops=[cut_crop(img, w, f, 32) for w, f in zip(lw, lf)])
    layout: list = []
    grid = crop_grid([local_row], tmp_path / "l.png", height=100, layout=layout)
    assert cv2.imread(str(tmp_path / "l.png")).shape == grid.shape
    assert [p["name"] for p in plain_layout[0]["panels"]] == ["image", "view1", "view2"]
    panels = {p["name"]: p for p in layout[0]["panels"]}
    assert list(panels) == ["image", "view1", "view2", "local"]
    # the two-view part is where it was; the thumbnails come after it
    for name in ("image", "view1", "view2"):
        assert {k: panels[name][k] for k in "xywh"} == {k: plain_layout[0]["panels"][0 if name == "image" else
                                                                                     1 if name == "view1" else 2][k]
                                                      for k in "xywh"}
    assert grid.shape[0] == plain.shape[0] and grid.shape[1] > plain.shape[1]
    loc = panels["local"]
    assert len(loc["tiles"]) == 3 and loc["h"] == 100
    for j, (x, y, w, h) in enumerate(loc["tiles"]):
        assert loc["x"] <= x and x + w <= loc["x"] + loc["w"] and loc["y"] <= y and y + h <= loc["y"] + loc["h"]
        tile = grid[y:y + h, x:x + w]
        frame = np.concatenate([tile[0], tile[-1], tile[:, 0], tile[:, -1]])
        assert near(frame, LOCAL_RGB[j]).mean() > 0.9, j           # framed in view j's colour
        want = cv2.resize(local_row["local_crops"][j], (w, h), interpolation=cv2.INTER_LINEAR)
        inner = np.s_[h // 2:-3, 3:-3]                            # below the letter, inside the frame
        assert np.abs(tile[inner].astype(int) - want[inner]).mean() < 2, j
    with pytest.raises(ValueError, match="local crops"):
        crop_grid([dict(local_row, local_crops=local_row["local_crops"][:2])], None, height=100)


# ---- show ------------------------------------------------------------------------------------------
def test_show_rows_local_views_equal_sample_windows(synth16):
    data = load_tool_data(synth16)
    pos = np.array([0, 3, 7])
    for src in LOCAL_SOURCES:
        cfg = crop_config(data.store, "obj-obj-dilate", local_crops=4, local_from=src, local_size=40)
        rows = show_rows(data, pos, cfg, seed=5, epoch=1, size=32)
        b, off = data.store.gather(data.rows[pos], cfg.top_k)
        want = sample_windows(data.index.sizes[pos], b, off, pos, 5, 1, cfg)
        np.testing.assert_array_equal(np.stack([r["local_windows"] for r in rows]), want.local_windows)
        np.testing.assert_array_equal(np.stack([r["local_flips"] for r in rows]), want.local_flip)
        np.testing.assert_array_equal(np.stack([r["windows"] for r in rows]), want.windows)
        assert all(len(r["local_crops"]) == 4 and r["local_crops"][0].shape == (40, 40, 3) for r in rows)
    plain = show_rows(data, pos, crop_config(data.store, "obj-obj-dilate"), seed=5, epoch=1, size=32)
    assert not any(k.startswith("local") for r in plain for k in r)


def test_show_cli_local_views(synth16, tmp_path):
    args = ["show", "--coco", str(synth16), "--mode", "obj-obj-dilate", "-n", "2", "--height", "96", "--seed", "2"]
    assert cli.main(args + ["--out", str(tmp_path / "plain.png")]) == 0
    assert cli.main(args + ["--out", str(tmp_path / "local.png"), "--local-crops", "6", "--local-from", "boxes",
                            "--local-size", "48"]) == 0
    plain, local = cv2.imread(str(tmp_path / "plain.png")), cv2.imread(str(tmp_path / "local.png"))
    assert local.shape[0] == plain.shape[0] and local.shape[1] > plain.shape[1]   # thumbnails to the right
    # scene-scene takes its local views from the scene without being told
    assert cli.main(["show", "--coco", str(synth16), "--mode", "scene-scene", "-n", "1", "--out",
                     str(tmp_path / "s.png"), "--local-crops", "2"]) == 0
    with pytest.raises(ValueError, match="local_from"):
        cli.main(["show", "--coco", str(synth16), "--mode", "scene-scene", "-n", "1", "--out",
                  str(tmp_path / "s.png"), "--local-crops", "2", "--local-from", "box"])


# ---- demo rows (the loader's batches, with and without "local") ---------------------------------------
def fake_loader(data, cfg, seed=3):
    """What the demo reads of an ObjCropLoader, with the tools' windows (equal to the loader's)."""
    return SimpleNamespace(config=cfg, store=data.store, store_rows=data.rows, index=data.index, seed=seed,
                           mode=cfg.mode, windows_for=lambda idx, epoch: windows_for(data, idx, cfg, seed, epoch))


def test_demo_rows_local_windows_then_thumbnails_when_the_batch_carries_them(synth16):
    import torch

    from dali_objcrop.cli.demo import grid_rows, local_config
    data = load_tool_data(synth16)
    cfg = crop_config(data.store, "obj-scene")
    loader = fake_loader(data, cfg)
    idx = torch.tensor([2, 9, 4])
    views = torch.zeros(3, 3, 32, 32)
    batch = {"index": idx, "view1": views, "view2": views}
    assert not any(k.startswith("local") for r in grid_rows(loader, batch, 3, 1) for k in r)
    local = local_config("obj-scene", 3, "boxes", 24)
    rows = grid_rows(loader, batch, 3, 1, local)
    want = windows_for(data, idx.numpy(), crop_config(data.store, "obj-scene", local_crops=3, local_from="boxes"),
                       3, 1)
    np.testing.assert_array_equal(np.stack([r["windows"] for r in rows]), want.windows)   # the loader's
    np.testing.assert_array_equal(np.stack([r["local_windows"] for r in rows]), want.local_windows)
    assert all("local_crops" not in r for r in rows)                                      # no crops yet
    # once the batches carry the local views (B, M, 3, s, s), they are drawn as delivered
    batch["local"] = torch.randn(3, 3, 3, 24, 24)
    rows = grid_rows(loader, batch, 3, 1, local)
    assert all(len(r["local_crops"]) == 3 and tuple(r["local_crops"][0].shape) == (3, 24, 24) for r in rows)
    torch.testing.assert_close(rows[1]["local_crops"][2], batch["local"][1, 2])
    layout: list = []
    crop_grid(rows, None, height=64, layout=layout)
    assert all([p["name"] for p in r["panels"]][-1] == "local" for r in layout)
    # a loader that samples local views itself: its own windows are drawn
    own = crop_config(data.store, "obj-scene", local_crops=2, local_from="scene")
    rows = grid_rows(fake_loader(data, own), {k: v for k, v in batch.items() if k != "local"}, 3, 1)
    np.testing.assert_array_equal(np.stack([r["local_windows"] for r in rows]),
                                  windows_for(data, idx.numpy(), own, 3, 1).local_windows)
    assert rows[0]["local_from"] == "scene"


def test_loader_local_kwargs_only_what_the_loader_takes():
    from dali_objcrop.tools import loader_local_kwargs
    cfg = CropConfig(local_crops=4, local_from="boxes", local_size=64)

    def old(data, mode="obj-obj-dilate"): ...

    def new(data, mode="obj-obj-dilate", local_crops=0, local_from="box", local_size=96): ...
    assert loader_local_kwargs(old, cfg) == {}
    assert loader_local_kwargs(new, cfg) == {"local_crops": 4, "local_from": "boxes", "local_size": 64}
    assert loader_local_kwargs(new, CropConfig()) == {}


# ---- crop-stats ------------------------------------------------------------------------------------
def dense_union(gt: np.ndarray, w: int, h: int) -> np.ndarray:
    """The pixels whose centres lie in some box, by brute force."""
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    mask = np.zeros((h, w), bool)
    for b in gt:
        mask |= (xs >= b[0]) & (xs < b[2]) & (ys >= b[1]) & (ys < b[3])
    return mask


def test_local_stats_on_hand_made_rectangles():
    # one 100x80 image, GT box [20, 10, 40, 70); global views; local view 0 overlaps both, local 1 neither
    gt = np.array([[20, 10, 40, 70]], np.float64)
    glob = np.array([[[0, 0, 60, 50], [20, 10, 100, 80]]])
    local = np.array([[[10, 0, 30, 20], [80, 0, 100, 5]]])
    ps = local_per_sample_stats(np.array([[100, 80]]), gt, np.array([0, 1]), np.array([0]), glob, local)
    # local 0 with view 1: [10, 0, 30, 20) -> 400 px, object [20, 10, 30, 20) = 100; with view 2: [20, 10, 30, 20)
    np.testing.assert_array_equal(ps["overlap"][0], [[400, 100], [0, 0]])
    np.testing.assert_array_equal(ps["overlap_on_object"][0], [[100, 100], [0, 0]])
    np.testing.assert_array_equal(ps["window_on_object"][0], [100, 0])
    f = summarize_local(ps)
    assert f["intersection_on_object"] == pytest.approx((0.25 + 1.0) / 2)
    assert f["intersection_on_object_pooled"] == pytest.approx(200 / 500)
    assert f["views_overlap"] == pytest.approx(0.5)
    assert f["window_on_object"] == pytest.approx((100 / 400 + 0) / 2)
    assert f["intersection_on_object_view1"] == pytest.approx(0.25)
    assert f["intersection_on_object_view2"] == pytest.approx(1.0)
    assert f["local_views"] == 2 and f["samples"] == 1
    with pytest.raises(ValueError, match="local_windows"):
        local_per_sample_stats(np.array([[100, 80]]), gt, np.array([0, 1]), np.array([0]), glob, local[0])


@pytest.mark.parametrize("mode", ["obj-obj-dilate", "obj-scene"])
def test_crop_stats_local_equals_direct_recomputation(synth16, mode):
    """The local figures of crop_stats, recomputed by brute force from sample_windows and the GT boxes, for
    every source: samples s = image s % N at epoch s // N, pairs (local j, global v) that overlap."""
    data = load_tool_data(synth16)
    n, samples, m = len(data.index), 40, 3
    cfg = crop_config(data.store, mode, local_crops=m)
    got = crop_stats(data, cfg, samples, seed=4, local_sources=LOCAL_SOURCES)
    assert set(got["local"]["sources"]) == set(LOCAL_SOURCES) and got["local"]["sources_skipped"] == {}
    masks = {}
    for src in LOCAL_SOURCES:
        c = CropConfig(mode=mode, box_scale=cfg.box_scale, local_crops=m, local_from=src)
        fracs, own = [], []
        for s in range(samples):
            p, e = s % n, s // n
            b, off = data.store.gather(data.rows[[p]], c.top_k)
            cw = sample_windows(data.index.sizes[[p]], b, off, np.array([p]), 4, e, c)
            w, h = data.index.sizes[p]
            if p not in masks:
                masks[p] = dense_union(data.gt_boxes[data.gt_offsets[p]:data.gt_offsets[p + 1]], w, h)
            mask = masks[p]
            for j in range(m):
                lx1, ly1, lx2, ly2 = cw.local_windows[0, j]
                own.append(mask[ly1:ly2, lx1:lx2].mean())
                for v in (0, 1):
                    gx1, gy1, gx2, gy2 = cw.windows[0, v]
                    x1, y1, x2, y2 = max(lx1, gx1), max(ly1, gy1), min(lx2, gx2), min(ly2, gy2)
                    if x2 > x1 and y2 > y1:
                        fracs.append(mask[y1:y2, x1:x2].mean())
        f = got["local"]["sources"][src]
        assert f["intersection_on_object"] == pytest.approx(np.mean(fracs), abs=1e-12), src
        assert f["window_on_object"] == pytest.approx(np.mean(own), abs=1e-12), src
        assert f["views_overlap"] == pytest.approx(len(fracs) / (samples * m * 2)), src
        assert f["samples"] == samples and f["local_views"] == m
        assert all(0.0 <= f[k] <= 1.0 for k in LOCAL_FIGURES), src


def test_crop_stats_without_local_views_unchanged(synth16):
    """M = 0: no local figures; M > 0: the global figures are those of M = 0 (same windows)."""
    data = load_tool_data(synth16)
    plain = crop_stats(data, crop_config(data.store, "obj-obj-shift"), 50, seed=1)
    assert "local" not in plain
    with_local = crop_stats(data, crop_config(data.store, "obj-obj-shift", local_crops=6), 50, seed=1,
                            local_sources=LOCAL_SOURCES)
    assert {k: v for k, v in with_local.items() if k != "local"} == plain


def test_crop_stats_cli_local_sources(synth16, tmp_path):
    out = tmp_path / "local.json"
    assert cli.main(["crop-stats", "--coco", str(synth16), "--mode", "all", "--json", str(out), "--samples", "64",
                     "--local-crops", "4"]) == 0
    d = json.loads(out.read_text())
    assert d["source"]["local_crops"] == 4 and d["source"]["local_from"] == list(LOCAL_SOURCES)
    for mode, r in d["modes"].items():
        want = {"scene"} if mode == "scene-scene" else set(LOCAL_SOURCES)
        assert set(r["local"]["sources"]) == want and r["local"]["crops"] == 4, mode
        assert set(r["local"]["sources_skipped"]) == set(LOCAL_SOURCES) - want, mode
    one = tmp_path / "one.json"
    assert cli.main(["crop-stats", "--coco", str(synth16), "--mode", "obj-scene", "--json", str(one), "--samples",
                     "32", "--local-crops", "2", "--local-from", "boxes"]) == 0
    assert list(json.loads(one.read_text())["local"]["sources"]) == ["boxes"]
    with pytest.raises(SystemExit):
        cli.main(["crop-stats", "--coco", str(synth16), "--json", str(one), "--local-from", "objects"])
    # without --local-crops the JSON holds exactly the two-view figures it always did
    plain = tmp_path / "plain.json"
    assert cli.main(["crop-stats", "--coco", str(synth16), "--mode", "obj-scene", "--json", str(plain),
                     "--samples", "32"]) == 0
    d = json.loads(plain.read_text())
    assert "local" not in d and "local_crops" not in d["source"]
    assert set(d) == set(FIGURES) | {"mode", "fallback", "config", "source", "samples", "window_area_view1",
                                     "window_area_view2", "views_with_object_view1", "views_with_object_view2"}


def test_crop_stats_local_real_coco_object_sources_beat_scene(coco_ann):
    """On real COCO photos with GT boxes as the proposals, local views drawn in the object regions (box) or
    in the proposals (boxes) put more of their overlap with the global views, and of themselves, on
    objects than local views drawn anywhere in the scene."""
    data = load_tool_data(coco_ann)
    n = len(data.index)
    r = crop_stats(data, crop_config(data.store, "obj-obj-dilate", local_crops=6), samples=2 * n, seed=0,
                   local_sources=LOCAL_SOURCES)
    f = r["local"]["sources"]
    for src in ("box", "boxes"):
        assert f[src]["intersection_on_object"] > f["scene"]["intersection_on_object"], src
        assert f[src]["window_on_object"] > f["scene"]["window_on_object"] + 0.05, src
