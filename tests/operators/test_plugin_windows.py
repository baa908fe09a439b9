"""The ``objcrop__Windows`` DALI operator (``fn.objcrop.windows``) against the NumPy specification.

Every field of ``windows.sample_windows`` and ``augment.sample_aug_params`` must be
equal EXACTLY (same counter-based key, same float64 arithmetic), for all five
modes, on random boxes including images without boxes, tiny boxes and images,
boxes reaching outside the image and more boxes than top-k; boxes come from an
input, from a ``.boxes`` store by row, and from ``readers.coco`` in a user's
own pipeline.  Also: the build cache (a DALI version change rebuilds) and the
fallback when no compiler is found.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dali_objcrop import augment, plugin
from dali_objcrop.boxstore import BoxStore
from dali_objcrop.feed import window_rois
from dali_objcrop.plugin import build
from dali_objcrop.windows import MODES, CropConfig, sample_windows

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(build.cxx() is None or build.cuda_include_dir() is None,
                                reason="no C++ compiler or CUDA headers to build the operators")


@pytest.fixture(scope="module")
def ops():
    if not plugin.load():
        pytest.fail(f"the operators did not build: {plugin.error()}")
    return plugin


def random_batch(n: int, seed: int):
    """Sizes (tiny ones included); 0..14 boxes per image: tiny, whole-image, reaching outside the image."""
    rng = np.random.default_rng(seed)
    sizes = np.stack([rng.integers(1, 1300, n), rng.integers(1, 1300, n)], 1).astype(np.int64)
    sizes[: max(1, n // 25)] = rng.integers(1, 8, (max(1, n // 25), 2))   # tiny images
    count = rng.integers(0, 15, n)
    count[1::7] = 0                                                        # images without boxes
    offsets = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
    m = int(offsets[-1])
    c = rng.uniform(-0.1, 1.1, (m, 2))                                      # centres may lie outside
    wh = rng.uniform(0.0002, 1.4, (m, 2))
    wh[::5] = rng.uniform(1e-5, 2e-3, (len(wh[::5]), 2))                   # tiny boxes
    boxes = np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32)
    boxes[::11] = [0, 0, 1, 1]
    index = rng.integers(0, 2**40, n)
    return sizes, boxes, offsets, index


def run_op(sizes, boxes, offsets, index, epoch, config, recipe, seed, store=None, rows=None):
    """Run fn.objcrop.windows over one batch fed by external_source; returns numpy outputs (N, ...)."""
    from nvidia.dali import fn, pipeline_def
    n = len(index)
    per_boxes = [np.ascontiguousarray(boxes[offsets[i]:offsets[i + 1]]).reshape(-1, 4) for i in range(n)]
    shapes = [np.array([h, w, 3], np.int64) for w, h in sizes]
    idx = [np.array(i, np.int64) for i in index]
    epochs = [np.array(epoch, np.int64)] * n

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        s = fn.external_source(source=lambda: shapes, batch=True)
        i = fn.external_source(source=lambda: idx, batch=True)
        e = fn.external_source(source=lambda: epochs, batch=True)
        if store is None:
            b = fn.external_source(source=lambda: per_boxes, batch=True)
            out = plugin.windows(s, i, b, epoch=e, config=config, recipe=recipe, seed=seed, details=True,
                                 box_check="clip",
                                 resize_rois=True, blur_kernels=True, image_windows=True)
        else:
            r = fn.external_source(source=lambda: [np.array(x, np.int64) for x in rows], batch=True)
            out = plugin.windows(s, i, epoch=e, config=config, recipe=recipe, seed=seed, details=True,
                                 box_check="clip",
                                 boxes_store=store, store_row=r, resize_rois=True, blur_kernels=True,
                                 image_windows=True)
        return (out.roi, out.windows, out.flip, out.aug, out.details, out.resize_rois, out.blur_kernels,
                out.image_windows)

    p = pipe()
    p.build()
    outs = p.run()
    return ([np.stack([np.asarray(t) for t in o]) for o in outs[:6]] + [[np.asarray(t) for t in outs[6]]]
            + [np.stack([np.asarray(t) for t in outs[7]])])


def check_equal(outs, sizes, boxes, offsets, index, epoch, config, recipe, seed):
    """Every output of the windows operator equals the specification, field by field, with V = 2 + M view rows
    (M = config.local_crops: the global views, then the local views); returns the specification's windows."""
    roi, win, flip, aug, det, rois, kernels, image_windows = outs
    m = config.local_crops
    nv = 2 + m
    n = len(index)
    cw = sample_windows(sizes, boxes, offsets, index, seed, epoch, config)
    assert cw.num_local == m
    assert win.shape == (n, nv, 4) and flip.shape == (n, nv) and aug.shape == (n, nv, 9)
    assert det.shape == (n, 12 + 5 * m) and rois.shape == (n, nv, 4) and image_windows.shape == (n, nv, 4)
    assert win.dtype == np.int32 and flip.dtype == np.uint8 and aug.dtype == np.float32 and det.dtype == np.int32
    # windows: relative to the roi, and in the whole image's pixels (image_windows=True)
    want = cw.all_windows
    np.testing.assert_array_equal(image_windows, want, err_msg="image_windows")
    absolute = win + np.concatenate([roi[:, :2], roi[:, :2]], 1)[:, None, :]
    np.testing.assert_array_equal(absolute, want, err_msg="windows + roi")
    lo, hi = want[:, :, :2].min(1), want[:, :, 2:].max(1)                  # the union of ALL views
    np.testing.assert_array_equal(roi, np.concatenate([lo, hi - lo], 1), err_msg="roi")
    np.testing.assert_array_equal(flip.astype(bool), cw.all_flip, err_msg="flip")
    # details: regions, box index, fallback, shift; then per local view [region x1, y1, x2, y2, box index]
    np.testing.assert_array_equal(det[:, :8].reshape(-1, 2, 4), cw.regions)
    np.testing.assert_array_equal(det[:, 8], cw.box_index)
    np.testing.assert_array_equal(det[:, 9].astype(bool), cw.fallback)
    if config.mode == "obj-obj-shift":
        np.testing.assert_array_equal(det[:, 10:12], cw.extras["shift"])
    else:
        assert (det[:, 10:12] == 0).all()
    local = det[:, 12:].reshape(n, m, 5)
    np.testing.assert_array_equal(local[:, :, :4], cw.local_regions, err_msg="local regions")
    np.testing.assert_array_equal(local[:, :, 4], cw.local_box_index, err_msg="local box index")
    # the inputs the loader's DALI-ops crop stage takes: fn.resize rois per view (as feed.window_rois, which
    # takes two views at a time) and blur kernels
    for v in range(nv):
        start, end = window_rois(win[:, [v, v]], flip[:, [v, v]].astype(bool))[:2]
        np.testing.assert_array_equal(rois[:, v], np.concatenate([start, end], 1), err_msg=f"resize_rois {v}")
    # augmentation draws: view v from its own slots with Recipe.view_aug(v) (local views: recipe.local)
    rec = augment.get_recipe(recipe)
    widths = []
    for v in range(nv):
        p = augment.sample_aug_params(cw.keys, v, rec.view_aug(v))
        for c, name in enumerate(plugin.AUG_COLUMNS):
            np.testing.assert_array_equal(aug[:, v, c], np.asarray(p[name], np.float32), err_msg=f"{name}{v}")
        widths.append(p["blur_window"])
    width = np.max(widths, axis=0)                                         # W: the largest kernel of all views
    for v in range(nv):
        kern, size = augment.gaussian_kernels(_sigma64(cw.keys, v, rec))
        for i in range(n):
            assert kernels[i].shape == (nv, width[i])
            k = kernels[i][v]
            pad = (len(k) - size[i]) // 2
            assert (k[:pad] == 0).all() and (k[pad + size[i]:] == 0).all()
            np.testing.assert_allclose(k[pad:pad + size[i]], kern[i, :size[i]], rtol=2e-7, atol=1e-9)
    return cw


def _sigma64(keys, v, rec):
    """The float64 sigma that sample_aug_params draws for view v (its float32 output rounds it)."""
    from dali_objcrop import rng
    lo, hi = rec.view_aug(v).blur_sigma
    return lo + rng.uniforms(keys, rng.aug_slot(v, augment.K_BLUR))[1] * (hi - lo)


CONFIGS = [CropConfig(mode=m, box_scale=(0.45, 1.0)) for m in MODES] + [
    CropConfig(mode="obj-obj-dilate", box_scale=None, dilate=0.2, top_k=3, num_tries=1, flip_p=0.3),
    CropConfig(mode="obj-obj-shift", shift_range=(0.0, 400.0), min_box_size=64, ratio=(0.5, 2.0)),
    CropConfig(mode="obj-scene", box_scale=(0.05, 0.5), scale=(0.08, 1.0), min_box_size=1, top_k=1),
]


@pytest.mark.parametrize("k", range(len(CONFIGS)), ids=[f"{c.mode}-{i}" for i, c in enumerate(CONFIGS)])
def test_windows_op_equals_numpy(ops, k):
    config = CONFIGS[k]
    sizes, boxes, offsets, index = random_batch(300, seed=k)
    recipe = "byol" if k % 2 else "mocov2"
    assert (np.diff(offsets) > config.top_k).any() and (np.diff(offsets) == 0).any()
    assert (boxes < 0).any() and (boxes > 1).any()
    outs = run_op(sizes, boxes, offsets, index, 5 + k, config, recipe, seed=1234 + k)
    check_equal(outs, sizes, boxes, offsets, index, 5 + k, config, recipe, 1234 + k)


def test_custom_recipe_and_epoch_change(ops):
    rec = augment.Recipe("odd", (augment.ViewAug(jitter_p=0.3, hue=0.05, blur_sigma=(0.3, 3.1), solarize_p=0.7),
                                 augment.ViewAug(gray_p=0.9, blur_p=0.01, brightness=1.5)))
    sizes, boxes, offsets, index = random_batch(64, seed=99)
    config = CropConfig(mode="obj-obj-dilate", box_scale=(0.3, 1.0))
    a = run_op(sizes, boxes, offsets, index, 0, config, rec, seed=7)
    check_equal(a, sizes, boxes, offsets, index, 0, config, rec, 7)
    b = run_op(sizes, boxes, offsets, index, 1, config, rec, seed=7)
    assert not np.array_equal(a[1], b[1])       # another epoch, other windows


def test_windows_from_box_store(ops, tmp_path):
    sizes, boxes, offsets, index = random_batch(80, seed=3)
    store = BoxStore.from_arrays([f"im{i}.jpg" for i in range(80)], sizes.astype(np.int32),
                                 [boxes[offsets[i]:offsets[i + 1]] for i in range(80)])
    path = store.save(tmp_path / "b.boxes")
    st = BoxStore.load(path)
    rows = np.random.default_rng(0).permutation(80)          # the batch's store rows differ from its keys
    b, off = st.gather(rows)
    config = CropConfig(mode="obj-obj-shift", box_scale=(0.5, 1.0), top_k=4)
    outs = run_op(st.sizes[rows], b, off, index, 2, config, "mocov2", 11, store=str(path), rows=rows)
    check_equal(outs, st.sizes[rows], b, off, index, 2, config, "mocov2", 11)


def test_bad_box_store_is_named(ops, tmp_path):
    bad = tmp_path / "not.boxes"
    bad.write_bytes(b"hello, this is not a box store at all")
    with pytest.raises(Exception, match="not.boxes"):
        run_op(np.array([[10, 10]]), np.zeros((0, 4), np.float32), np.array([0, 0]), np.array([0]), 0,
               CropConfig(), "mocov2", 0, store=str(bad), rows=[0])


def test_users_own_coco_pipeline(ops, coco_ann):
    """readers.coco + peek_image_shape + our windows op + DALI's ROI decode, in a user's @pipeline_def."""
    from nvidia.dali import fn, pipeline_def
    from conftest import COCO_IMAGES
    config = CropConfig(mode="obj-obj-dilate", box_scale=(0.5, 1.0))

    @pipeline_def(batch_size=8, num_threads=2, device_id=None, seed=0)
    def user_pipe(epoch):
        jpegs, boxes, _, ids = fn.readers.coco(file_root=str(COCO_IMAGES), annotations_file=str(coco_ann),
                                               ltrb=True, ratio=True, image_ids=True, random_shuffle=False,
                                               name="coco")
        shape = fn.peek_image_shape(jpegs, adjust_orientation=False)
        roi, win, flip, aug = plugin.windows(shape, ids, boxes, epoch=epoch, config=config, seed=3)
        images = fn.decoders.image_slice(jpegs, fn.slice(roi, 0, 2, axes=[0]), fn.slice(roi, 2, 2, axes=[0]),
                                         axis_names="WH", device="cpu", adjust_orientation=False)
        return images, roi, win, boxes, ids, shape

    p = user_pipe(epoch=2)
    p.build()
    images, roi, win, boxes, ids, shape = [[np.asarray(t) for t in o] for o in p.run()]
    n_b = [len(b) for b in boxes]
    offsets = np.concatenate([[0], np.cumsum(n_b)]).astype(np.int64)
    sizes = np.array([[s[1], s[0]] for s in shape])
    cw = sample_windows(sizes, np.concatenate(boxes).reshape(-1, 4), offsets, np.concatenate(ids).ravel(), 3, 2,
                        config)
    for i in range(8):
        assert images[i].shape == (roi[i][3], roi[i][2], 3)       # the decoder cut exactly the roi
        np.testing.assert_array_equal(win[i] + np.tile(roi[i][:2], 2), cw.windows[i])


def test_version_change_rebuilds(tmp_path, monkeypatch):
    """The cache key holds DALI's version and the sources: another version -> another library, built anew."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "tiny.cc").write_text('extern "C" int objcrop_tiny() { return 7; }\n')
    monkeypatch.setenv("DALI_OBJCROP_HOME", str(tmp_path / "home"))
    a = build.library_path(cuda=False, sources=src)
    assert a.is_file() and a.parent.name.startswith(build.dali_version() + "-")
    mtime = a.stat().st_mtime_ns
    assert build.library_path(cuda=False, sources=src) == a and a.stat().st_mtime_ns == mtime   # cached
    monkeypatch.setattr(build, "dali_version", lambda: "9.9.9")
    b = build.library_path(cuda=False, sources=src)
    assert b != a and b.parent.name.startswith("9.9.9-") and b.is_file()
    (src / "tiny.cc").write_text('extern "C" int objcrop_tiny() { return 8; }\n')
    c = build.library_path(cuda=False, sources=src)
    assert c not in (a, b) and c.is_file()


def test_build_error_carries_the_compiler_message(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.cc").write_text("this is not C++;\n")
    monkeypatch.setenv("DALI_OBJCROP_HOME", str(tmp_path / "home"))
    with pytest.raises(build.PluginBuildError, match="broken.cc"):
        build.library_path(cuda=False, sources=src)


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    """Without a compiler (and an empty cache) load() warns once and returns False."""
    code = ("import warnings\n"
            "warnings.simplefilter('always')\n"
            "from dali_objcrop import plugin\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    a, b = plugin.load(), plugin.available()\n"
            "print(a, b, len([x for x in w if 'C++ operators unavailable' in str(x.message)]))\n")
    env = dict(os.environ, CXX="/nonexistent/g++", DALI_OBJCROP_HOME=str(tmp_path), PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False", "1"], res.stdout + res.stderr


def test_package_ships_operator_sources(tmp_path):
    """setup.py's build_py copies csrc/dali/* and csrc/*.h where plugin.build finds them in an install."""
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    shipped = tmp_path / "dali_objcrop" / "kernels" / "csrc"
    assert (shipped / "objcrop_core.h").is_file()
    assert sorted(p.name for p in (shipped / "dali").iterdir()) == sorted(
        p.name for p in (REPO / "csrc" / "dali").iterdir() if p.suffix in (".cc", ".cu", ".h"))
