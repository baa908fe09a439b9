"""ObjCropLoader: shapes, dtypes, normalisation, windows, pixels, determinism, sharding, epochs."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dali_objcrop import augment
from dali_objcrop.boxstore import BoxStore
from dali_objcrop.constants import IMAGENET_MEAN, IMAGENET_STD
from dali_objcrop.loader import ObjCropLoader, shard_batches, window_rois
from dali_objcrop.windows import MODES, sample_windows

NO_AUG = augment.Recipe("none", (augment.ViewAug(jitter_p=0, gray_p=0, blur_p=0),) * 2)
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def to_uint8_range(x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: (N, 3, H, W) in [0, 255]."""
    return (x.float() * STD + MEAN) * 255.0


def loader(ann, **kw) -> ObjCropLoader:
    args = dict(boxes="gt", batch_size=4, size=64, device="cpu", num_threads=1, seed=3)
    args.update(kw)
    return ObjCropLoader(str(ann) if isinstance(ann, Path) else ann, **args)


def write_coco(root: Path, images: list[tuple[str, np.ndarray | None, list]], write: bool = True) -> Path:
    """COCO json + image files; images = [(file name, BGR array or None (already written), [xywh boxes])]."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    ims, anns = [], []
    for i, (name, img, boxes) in enumerate(images):
        path = root / "images" / name
        if img is not None and write:
            cv2.imwrite(str(path), img)
        if img is not None:
            h, w = img.shape[:2]
        else:
            from PIL import Image
            with Image.open(path) as im:
                w, h = im.size
        ims.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for b in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "bbox": list(map(float, b)),
                         "area": float(b[2] * b[3]), "iscrowd": 0})
    ann = root / "annotations.json"
    ann.write_text(json.dumps({"images": ims, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    return ann


# ---- shapes, dtypes, normalisation ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shapes_dtypes_and_normalisation(synth_set, dtype):
    ld = loader(synth_set, dtype=dtype, recipe=NO_AUG)
    batches = list(ld)
    assert len(batches) == len(ld) == 24 // 4
    b = batches[0]
    for v in ("view1", "view2"):
        assert b[v].shape == (4, 3, 64, 64) and b[v].dtype == dtype and b[v].device.type == "cpu"
        px = to_uint8_range(b[v])
        assert px.min() > -2 and px.max() < 257, "values must be ImageNet-normalised uint8 pixels"
    assert b["index"].dtype == torch.int64 and b["index"].shape == (4,)
    idx = torch.cat([x["index"] for x in batches])
    assert sorted(idx.tolist()) == list(range(24))


def test_loader_windows_are_the_window_module(synth_set):
    ld = loader(synth_set, mode="obj-obj-dilate")
    store = BoxStore.from_coco(synth_set)
    idx = np.array([5, 0, 17, 3])
    rows = store.rows_for(ld.index.keys)
    boxes, offsets = store.gather(rows[idx], ld.config.top_k)
    ref = sample_windows(ld.index.sizes[idx], boxes, offsets, idx, 3, 2, ld.config)
    got = ld.windows_for(idx, 2)
    np.testing.assert_array_equal(got.windows, ref.windows)
    np.testing.assert_array_equal(got.flip, ref.flip)
    inp = ld.inputs_for(idx, 2)                     # ROI decoding: the union of the two windows
    lo = ref.windows[:, :, :2].min(axis=1)
    np.testing.assert_array_equal(inp["anchor"], lo)
    np.testing.assert_array_equal(inp["shape"], ref.windows[:, :, 2:].max(axis=1) - lo)
    s0, e0, s1, e1 = window_rois(ref.windows - np.tile(lo, 2)[:, None, :], ref.flip)
    np.testing.assert_array_equal(inp["roi_start0"], s0)
    np.testing.assert_array_equal(inp["roi_end1"], e1)
    full = loader(synth_set, mode="obj-obj-dilate", roi_decode=False).inputs_for(idx, 2)
    assert "anchor" not in full
    np.testing.assert_array_equal(full["roi_start1"], window_rois(ref.windows, ref.flip)[2])


def test_box_scale_follows_store_mean_area(synth_set):
    ld = loader(synth_set, mode="obj-scene")
    lo, hi = ld.config.box_scale
    frac = BoxStore.from_coco(synth_set).mean_area_fraction(10)
    assert hi == 1.0 and lo == pytest.approx(min(0.2 / frac, 1.0))


# ---- pixels come from the windows ------------------------------------------------------------------
def reference_crop(img_rgb: np.ndarray, win, flip: bool, size: int) -> np.ndarray:
    x1, y1, x2, y2 = (int(v) for v in win)
    c = img_rgb[y1:y2, x1:x2]
    c = cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA if c.shape[0] > size else cv2.INTER_LINEAR)
    return c[:, ::-1] if flip else c


@pytest.mark.parametrize("mode,roi_decode", [(m, True) for m in MODES] + [("obj-obj-shift", False)])
def test_views_are_the_windows_pixels(synth_set, mode, roi_decode):
    """Each view equals a reference crop+resize of its window (and not of a mirrored/wrong one)."""
    ld = loader(synth_set, mode=mode, recipe=NO_AUG, size=48, roi_decode=roi_decode)
    b = next(iter(ld))
    idx = b["index"].numpy()
    cw = ld.windows_for(idx, 0)
    for r, i in enumerate(idx):
        img = cv2.imread(ld.index.paths[i])[:, :, ::-1]
        for v, key in enumerate(("view1", "view2")):
            got = to_uint8_range(b[key][r:r + 1])[0].permute(1, 2, 0).numpy()
            ref = reference_crop(img, cw.windows[r, v], cw.flip[r, v], 48).astype(np.float32)
            wrong = reference_crop(img, cw.windows[r, v], not cw.flip[r, v], 48).astype(np.float32)
            err = np.abs(got - ref).mean()
            assert err < 6.0, f"{mode} sample {i} view {v}: mean abs diff {err:.1f} from its window"
            if np.abs(ref - wrong).mean() > 20:  # the flip is visible: the right one must be closer
                assert err < np.abs(got - wrong).mean()


@pytest.mark.parametrize("mode", ["obj-scene", "obj-obj", "obj-obj-dilate", "obj-obj-shift"])
def test_view1_comes_from_inside_the_box(tmp_path, mode):
    """Images whose only box has a unique colour (red on blue): view 1 is red in every object mode."""
    rng = np.random.default_rng(0)
    items = []
    for k in range(6):
        img = np.zeros((120, 160, 3), np.uint8)
        img[:] = (255, 0, 0)                                  # blue background (BGR)
        x, y = int(rng.integers(0, 100)), int(rng.integers(0, 60))
        w, h = int(rng.integers(30, 60)), int(rng.integers(30, 60))
        img[y:y + h, x:x + w] = (0, 0, 255)                   # red box
        items.append((f"{k}.png", img, [(x, y, w, h)]))
    ann = write_coco(tmp_path, items)
    ld = loader(ann, mode=mode, recipe=NO_AUG, size=32, min_box_size=1, batch_size=3)
    for b in ld:
        px = to_uint8_range(b["view1"])
        red = (px[:, 0] > 200) & (px[:, 2] < 60)
        assert red.float().mean(dim=(1, 2)).min() > 0.9, "view 1 must lie inside the red box"
    assert ld.stats["fallback"] == 0


# ---- augmentation draws ----------------------------------------------------------------------------
def test_aug_params_are_counter_based_and_have_the_recipe_rates():
    keys = np.arange(20000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    moco = augment.get_recipe("mocov2")
    p = augment.sample_aug_params(keys, 0, moco.views[0])
    assert abs(p["jitter"].mean() - 0.8) < 0.02 and abs(p["gray"].mean() - 0.2) < 0.02
    assert abs(p["blur"].mean() - 0.5) < 0.02 and not p["solarize"].any()
    assert p["brightness"][p["jitter"]].min() >= 0.6 and p["brightness"].max() <= 1.4
    assert np.abs(p["hue"]).max() <= 36.0 + 1e-4
    assert (p["saturation"][p["gray"]] == 0).all()
    assert ((p["blur_window"] % 2 == 1) & (p["blur_window"] <= 13)).all()
    kern, size = augment.gaussian_kernels(p["sigma"][:50])
    np.testing.assert_allclose(kern.sum(axis=1), 1.0, rtol=1e-5)
    assert (size == p["blur_window"][:50]).all() and (kern[np.arange(50), size // 2] == kern.max(axis=1)).all()
    q = augment.sample_aug_params(keys[::-1].copy(), 0, moco.views[0])
    np.testing.assert_array_equal(p["sigma"][::-1], q["sigma"])  # per-sample, order-free
    byol = augment.get_recipe("byol")
    b0 = augment.sample_aug_params(keys, 0, byol.views[0])
    b1 = augment.sample_aug_params(keys, 1, byol.views[1])
    assert b0["blur"].all() and abs(b1["blur"].mean() - 0.1) < 0.02
    assert not b0["solarize"].any() and abs(b1["solarize"].mean() - 0.2) < 0.02
    with pytest.raises(ValueError, match="recipe"):
        augment.get_recipe("simclr")


# ---- determinism and epochs ------------------------------------------------------------------------
def test_same_seed_same_pixels_other_seed_other_pixels(synth_set):
    a = next(iter(loader(synth_set, recipe="byol")))
    b = next(iter(loader(synth_set, recipe="byol", num_threads=2)))     # thread count does not matter
    c = next(iter(loader(synth_set, recipe="byol", seed=4)))
    for k in ("view1", "view2", "index"):
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["view1"], c["view1"])


def test_set_epoch_takes_effect_even_after_an_abandoned_epoch(synth_set):
    ld = loader(synth_set)
    it = iter(ld)
    first = next(it)["index"]                      # epoch 0, abandoned mid-way
    np.testing.assert_array_equal(first.numpy(), ld.batches(0)[0])
    del it
    ld.set_epoch(5)
    got = torch.cat([b["index"] for b in ld]).numpy()
    np.testing.assert_array_equal(got, np.concatenate(ld.batches(5)))
    assert ld.epoch == 6                           # next iteration without set_epoch: 6
    again = next(iter(loader(synth_set)))          # a fresh loader starts at epoch 0
    assert torch.equal(again["index"], first)


# ---- sharding --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,bs,world", [(23, 4, 2), (24, 4, 3), (5, 4, 4), (100, 7, 3)])
def test_shards_are_disjoint_complete_and_equal(n, bs, world):
    keep = [shard_batches(n, bs, 0, 1, r, world, drop_last=False) for r in range(world)]
    assert len({len(b) for b in keep}) == 1, "equal batch counts on every rank"
    flat = np.concatenate([np.concatenate(b) for b in keep])
    assert set(flat.tolist()) == set(range(n)), "complete"
    assert len(flat) - n <= world - 1, "at most world_size - 1 padding repeats"
    drop = [shard_batches(n, bs, 0, 1, r, world, drop_last=True) for r in range(world)]
    assert len({len(b) for b in drop}) == 1 and all(len(x) == bs for b in drop for x in b)
    dflat = np.concatenate([np.concatenate(b) for b in drop]) if drop[0] else np.zeros(0, int)
    assert len(set(dflat.tolist())) == len(dflat) == (n // (world * bs)) * world * bs, "disjoint"
    assert not np.array_equal(np.concatenate(shard_batches(n, bs, 0, 2, 0, world, drop_last=False)),
                              np.concatenate(keep[0])), "a global reshuffle each epoch"


def test_two_rank_loader_shards(synth_set):
    seen = []
    for rank in (0, 1):
        ld = loader(synth_set, rank=rank, world_size=2, batch_size=5, drop_last=False)
        idx = [b["index"] for b in ld]
        assert len(idx) == len(ld) == 3          # 12 per rank: 5 + 5 + 2
        seen.append(torch.cat(idx).tolist())
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(24))


def test_rank_from_torchrun_env(synth_set, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    ld = loader(synth_set)
    assert (ld.rank, ld.world_size) == (1, 3) and len(ld) == 24 // 12


# ---- argument checks -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [({"mode": "obj"}, "mode"), ({"batch_size": 0}, "batch_size"),
                                      ({"on_bad_image": "ignore"}, "on_bad_image"),
                                      ({"device": "tpu"}, "device"), ({"dtype": torch.int8}, "dtype"),
                                      ({"crop_backend": "nope"}, "crop_backend"),
                                      ({"boxes": None}, "needs boxes"), ({"recipe": "simclr"}, "recipe")])
def test_bad_arguments_name_the_value(synth_set, kw, match):
    with pytest.raises(ValueError, match=match):
        loader(synth_set, **kw)


def test_fewer_images_than_a_batch(synth_set):
    with pytest.raises(ValueError, match=r"every epoch would be empty: 24 images < 1 ranks x batch size 50"):
        loader(synth_set, batch_size=50)  # drop_last: an epoch without a batch is refused, not silent
    ld = loader(synth_set, batch_size=50, drop_last=False)
    (b,) = list(ld)
    assert len(b["index"]) == 24 and len(ld) == 1


def test_recipe_probabilities_shape_the_graph():
    from dali_objcrop.ops_graph import aug_stages
    from dali_objcrop.pipelines import input_fields
    moco, byol = augment.get_recipe("mocov2"), augment.get_recipe("byol")
    assert aug_stages(moco.views[0]) == {"colour": "drawn", "blur": "drawn", "solarize": "off"}
    assert aug_stages(byol.views[0])["blur"] == "always" and aug_stages(byol.views[1])["solarize"] == "drawn"
    f = input_fields("dali", True, "byol")
    assert "blur0" not in f and "blur_h0" in f and "solarize1" in f and "solarize0" not in f
    assert input_fields("dali", False, NO_AUG) == ("jpegs", "index", "roi_start0", "roi_end0", "roi_start1",
                                                   "roi_end1")


def test_scene_scene_without_boxes(synth_set):
    ld = loader(synth_set, boxes=None, mode="scene-scene")
    assert sum(len(b["index"]) for b in ld) == 24


# ---- the augmentations apply the drawn parameters --------------------------------------------------
def _view(ld, recipe_view) -> tuple[np.ndarray, dict]:
    """First batch's view 1 (N, H, W, 3) in [0, 255] and view 1's drawn parameters."""
    b = next(iter(ld))
    px = to_uint8_range(b["view1"]).permute(0, 2, 3, 1).numpy()
    p = augment.sample_aug_params(ld.windows_for(b["index"].numpy(), 0).keys, 0, recipe_view)
    return px, p


@pytest.mark.parametrize("what", ["blur", "solarize", "gray", "brightness"])
def test_augmentations_match_a_numpy_reference(synth_set, what):
    kw = dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    kw.update({"blur": dict(blur_p=1.0), "solarize": dict(solarize_p=1.0), "gray": dict(gray_p=1.0),
               "brightness": dict(jitter_p=1.0, contrast=0.0, saturation=0.0, hue=0.0)}[what])
    va = augment.ViewAug(**kw)
    rec = augment.Recipe(what, (va, va))
    plain, _ = _view(loader(synth_set, recipe=NO_AUG, mode="obj-obj-dilate"), va)
    got, p = _view(loader(synth_set, recipe=rec, mode="obj-obj-dilate"), va)
    for r in range(len(got)):
        x = plain[r]
        if what == "blur":
            kern, k = augment.gaussian_kernels(p["sigma"][r:r + 1])
            g = kern[0, :k[0]]
            ref = cv2.sepFilter2D(x, -1, g, g, borderType=cv2.BORDER_REFLECT_101)
        elif what == "solarize":
            ref = np.where(x >= 128, 255 - x, x)
        elif what == "gray":
            ref = np.repeat((x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None], 3, axis=-1)
        else:
            ref = np.clip(x * p["brightness"][r], 0, 255)
        tol = 3.0 if what == "solarize" else 1.0   # solarise flips pixels within rounding of 128
        err = np.abs(got[r] - ref)
        assert np.median(err) < 0.5 and np.mean(err) < tol, f"{what} sample {r}: mean error {err.mean():.2f}"


@pytest.mark.filterwarnings("ignore:The external source node")
def test_a_registered_crop_backend_is_used(synth_set):
    """A backend registered by name replaces the crop stage and gets the fields it asks for."""
    from nvidia.dali import fn, types

    from dali_objcrop import pipelines as L

    seen = {}

    def grey_crop(images, inp, size):      # a uint8 backend ignoring the windows: all views mid-grey
        seen["fields"] = sorted(inp)
        v = fn.resize(images, size=[size, size]) * 0 + 128
        return fn.cast(v, dtype=types.UINT8), fn.cast(v, dtype=types.UINT8)

    L.register_crop_backend("grey-test", grey_crop, inputs=("window", "flip"))
    try:
        b = next(iter(loader(synth_set, crop_backend="grey-test", recipe=NO_AUG)))
        assert "window" in seen["fields"] and "roi_start0" not in seen["fields"]
        px = to_uint8_range(b["view1"])
        assert (px - 128).abs().max() < 0.01
        with pytest.raises(ValueError, match="unknown crop input"):
            L.register_crop_backend("bad", grey_crop, inputs=("windows",))
    finally:
        L.CROP_BACKENDS.pop("grey-test", None)


def _ddp_worker(rank: int, world: int, ann: str, port: int, out: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ld = ObjCropLoader(ann, boxes="gt", batch_size=3, size=32, device="cpu", num_threads=1, drop_last=False)
        ld.set_epoch(2)
        idx = [b["index"].tolist() for b in ld]
        Path(out, f"{rank}.json").write_text(json.dumps({"rank": ld.rank, "world": ld.world_size, "idx": idx}))
    finally:
        dist.destroy_process_group()


def test_ranks_come_from_torch_distributed(synth_set, tmp_path):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, str(synth_set), port, str(tmp_path)), nprocs=2, join=True)
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"]) for r in res] == [(0, 2), (1, 2)]
    assert len(res[0]["idx"]) == len(res[1]["idx"]) == 4            # 12 per rank: 3+3+3+3
    a, b = (set(sum(r["idx"], [])) for r in res)
    assert not a & b and a | b == set(range(24))


# ---- GPU (skipped without CUDA; run by the GPU check) ---------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_matches_cpu(synth_set, dtype):
    """device='gpu' (nvJPEG, GPU resize/filters) gives the CPU pipeline's batches on CUDA, up to decoder
    and resampler rounding; same indices, same windows."""
    cpu = next(iter(loader(synth_set, mode="obj-obj-dilate", recipe="byol", size=64)))
    ld = loader(synth_set, mode="obj-obj-dilate", recipe="byol", size=64, device="gpu", dtype=dtype,
                decoder_kwargs={"hw_decoder_load": 0.5})
    gpu = next(iter(ld))
    assert gpu["view1"].is_cuda and gpu["view1"].dtype == dtype and gpu["index"].is_cuda
    assert torch.equal(gpu["index"].cpu(), cpu["index"])
    for k in ("view1", "view2"):
        diff = (to_uint8_range(gpu[k].float().cpu()) - to_uint8_range(cpu[k])).abs()
        assert diff.mean() < 4.0, f"{k}: mean pixel difference {diff.mean():.2f}"


@pytest.mark.parametrize("recipe", ["mocov2", "byol"])
def test_gpu_graph_traces_without_a_gpu(recipe):
    """The GPU graph (mixed decode, GPU resize / colour / filters, CPU per-sample arguments) passes DALI's
    Python-side checks (e.g. named arguments must be CPU nodes); only building it needs CUDA."""
    from nvidia.dali import pipeline_def, types

    from dali_objcrop.pipelines import _objcrop_graph
    pipe_fn = pipeline_def(_objcrop_graph, enable_conditionals=True)
    pipe_fn(lambda: None, 64, "mixed", "dali", types.FLOAT16, {"hw_decoder_load": 0.5}, True,
            augment.get_recipe(recipe), batch_size=2, num_threads=1, device_id=None)


def test_prepare_ahead_changes_no_batch(synth_set):
    """Inputs prepared on the background thread (1 or 3 batches ahead) == prepared in the calling thread,
    over two epochs, an abandoned epoch and an explicit set_epoch."""
    def run(ahead):
        ld = loader(synth_set, mode="obj-obj-shift", prepare_ahead=ahead)
        out = [b for _ in range(2) for b in ld]
        it = iter(ld)
        out.append(next(it))            # epoch 2 abandoned after one batch
        ld.set_epoch(7)
        out += list(ld)
        return out, ld.stats
    ref, ref_stats = run(0)
    for ahead in (1, 3):
        got, stats = run(ahead)
        assert len(got) == len(ref) == 2 * 6 + 1 + 6
        for a, b in zip(got, ref):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["view1"], b["view1"]) \
                and torch.equal(a["view2"], b["view2"])
        assert stats["fallback"] == ref_stats["fallback"] and stats["samples"] == ref_stats["samples"]
    with pytest.raises(ValueError, match="prepare_ahead"):
        loader(synth_set, prepare_ahead=-1)


def test_folder_index_and_store_inputs(synth_set, tmp_path):
    """data as a folder or an ImageIndex, boxes as a BoxStore or a saved .boxes path: same batches."""
    from dali_objcrop.dataset import ImageIndex
    store = BoxStore.from_coco(synth_set)
    path = store.save(tmp_path / "gt.boxes")
    images = Path(synth_set).parent / "images"
    ref = next(iter(loader(synth_set)))
    for data, boxes in ((str(images), path), (ImageIndex.from_folder(images), store)):
        b = next(iter(loader(data, boxes=boxes)))
        assert torch.equal(b["index"], ref["index"]) and torch.equal(b["view1"], ref["view1"])
    (images.parent / "empty_dir").mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="no images"):
        loader(images.parent / "empty_dir", boxes=None, mode="scene-scene")
