"""The operators as a user's own ``@pipeline_def`` meets them: no silent traps.

Each test is named after a mistake a user makes and fails on code that lets it through silently:
pixel / inverted / non-finite boxes, an object mode without boxes, ``box_scale`` left unset with a
store (derived as the loader does) or with a boxes input (warned), whole-image decodes (the ROI shift),
``device="gpu"`` / ``device_id`` without a GPU, AutoGraph warnings under ``enable_conditionals``, and an
epoch that does not advance under ``DALIGenericIterator`` (prefetch, ``auto_reset``).  CPU only.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from dali_objcrop import plugin
from dali_objcrop.boxstore import BoxStore
from dali_objcrop.plugin import build
from dali_objcrop.windows import CropConfig, box_scale_from_mean_area, sample_windows
from test_plugin_windows import ops  # noqa: F401 (a fixture: the operators, built and loaded)

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(build.cxx() is None or build.cuda_include_dir() is None,
                                reason="no C++ compiler or CUDA headers to build the operators")


def no_gpu() -> bool:
    from nvidia.dali import backend
    return backend.GetCUDADeviceCount() == 0


def run_windows(boxes_per_sample, sizes, config, box_check="error", **kw):
    """fn.objcrop.windows over one batch of (K, 4) boxes fed by external_source; numpy image_windows."""
    from nvidia.dali import fn, pipeline_def
    n = len(sizes)
    shapes = [np.array([h, w, 3], np.int64) for w, h in sizes]
    idx = [np.array(i, np.int64) for i in range(n)]
    boxes = [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes_per_sample]

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        s = fn.external_source(source=lambda: shapes, batch=True)
        i = fn.external_source(source=lambda: idx, batch=True)
        b = fn.external_source(source=lambda: boxes, batch=True)
        return plugin.windows(s, i, b, config=config, box_check=box_check, image_windows=True, **kw).image_windows

    p = pipe()
    p.build()
    return np.stack([np.asarray(t) for t in p.run()[0]])


CFG = CropConfig(mode="obj-obj-dilate", box_scale=(0.5, 1.0))


# ---- boxes in the wrong units -----------------------------------------------------------------------
def test_pixel_boxes_from_readers_coco_are_refused_naming_ratio(ops, coco_ann):
    """readers.coco without ratio=True gives pixel boxes: refused per batch, naming the sample and the fix."""
    from nvidia.dali import fn, pipeline_def
    from conftest import COCO_IMAGES

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        jpegs, boxes, _, ids = fn.readers.coco(file_root=str(COCO_IMAGES), annotations_file=str(coco_ann),
                                               ltrb=True, image_ids=True)        # ratio=True forgotten
        return plugin.object_views(jpegs, ids, boxes, config=CFG, size=32)

    p = pipe()
    p.build()
    with pytest.raises(RuntimeError, match=r"sample \d+ \(index \d+\), box \d+ .*outside \[0, 1\].*ratio=True"):
        p.run()


@pytest.mark.parametrize("bad, what", [([[0.1, 0.1, float("nan"), 0.5]], "not finite"),
                                       ([[0.1, 0.1, 0.5, float("inf")]], "not finite"),
                                       ([[0.6, 0.1, 0.2, 0.5]], "inverted"),        # xywh read as ltrb
                                       ([[12.0, 30.0, 200.0, 310.0]], "outside")])
def test_bad_boxes_are_refused(ops, bad, what):
    sizes = np.array([[640, 480], [300, 200]])
    with pytest.raises(RuntimeError, match=rf"sample 1 \(index 1\), box 0 .*{what}"):
        run_windows([[[0.1, 0.1, 0.5, 0.5]], bad], sizes, CFG)


def test_box_check_clip_accepts_boxes_reaching_outside_as_the_spec(ops):
    """Slightly outside [0, 1] is refused by default, clipped (= sample_windows) with box_check='clip'."""
    sizes = np.array([[640, 480], [300, 200]])
    boxes = [np.array([[-0.2, 0.1, 0.5, 1.3]], np.float32), np.array([[0.1, 0.1, 0.5, 0.5]], np.float32)]
    with pytest.raises(RuntimeError, match="box_check='clip'"):
        run_windows(boxes, sizes, CFG)
    got = run_windows(boxes, sizes, CFG, box_check="clip")
    want = sample_windows(sizes, np.concatenate(boxes), np.array([0, 1, 2]), np.arange(2), 0, 0, CFG).windows
    np.testing.assert_array_equal(got, want)
    with pytest.raises(RuntimeError, match="not finite"):      # clip never accepts NaN
        run_windows([boxes[0], np.array([[np.nan, 0, 1, 1]], np.float32)], sizes, CFG, box_check="clip")


def test_box_check_argument_is_validated(ops):
    with pytest.raises(ValueError, match="box_check"):
        run_windows([[[0.1, 0.1, 0.5, 0.5]]], np.array([[64, 64]]), CFG, box_check="ignore")


# ---- object modes without boxes ---------------------------------------------------------------------
def test_object_mode_without_boxes_is_refused(ops):
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def with_object_views():
        jpegs = fn.external_source(source=lambda: [np.zeros(8, np.uint8)] * 2, batch=True)
        ids = fn.external_source(source=lambda: [np.array(0, np.int64)] * 2, batch=True)
        return plugin.object_views(jpegs, ids, config=CropConfig(mode="obj-obj-dilate"))

    with pytest.raises(ValueError, match="needs boxes: pass boxes=.* or boxes_store="):
        with_object_views()

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def raw_operator():
        s = fn.external_source(source=lambda: [np.array([10, 10, 3], np.int64)] * 2, batch=True)
        i = fn.external_source(source=lambda: [np.array(0, np.int64)] * 2, batch=True)
        return tuple(fn.objcrop.windows(s, i, mode="obj-scene"))

    p = raw_operator()
    with pytest.raises(RuntimeError, match="mode 'obj-scene' needs boxes.*boxes_store"):
        p.build()
        p.run()


# ---- box_scale ---------------------------------------------------------------------------------------
def random_store(n: int, seed: int) -> BoxStore:
    rng = np.random.default_rng(seed)
    sizes = np.stack([rng.integers(200, 900, n), rng.integers(200, 900, n)], 1).astype(np.int32)
    boxes = []
    for i in range(n):
        k = int(rng.integers(0, 15))
        c, wh = rng.uniform(0.3, 0.7, (k, 2)), rng.uniform(0.3, 0.6, (k, 2))
        boxes.append(np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32))
    return BoxStore.from_arrays([f"im{i}.jpg" for i in range(n)], sizes, boxes)


def test_box_scale_unset_with_a_store_is_derived_as_the_loader_does(ops, tmp_path):
    """CropConfig(box_scale=None) + boxes_store: (min(0.2 / mean top-k area, 1), 1), the loader's value, not (1, 1)."""
    from nvidia.dali import fn, pipeline_def
    store = random_store(300, seed=4)              # > 128 boxes: NumPy's pairwise mean
    path = store.save(tmp_path / "s.boxes")
    n = len(store)
    config = CropConfig(mode="obj-obj-dilate", top_k=6)
    shapes = [np.array([h, w, 3], np.int64) for w, h in store.sizes]
    idx = [np.array(i, np.int64) for i in range(n)]

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        s = fn.external_source(source=lambda: shapes, batch=True)
        i = fn.external_source(source=lambda: idx, batch=True)
        via_wrapper = plugin.windows(s, i, config=config, boxes_store=path, image_windows=True).image_windows
        raw = fn.objcrop.windows(s, i, mode="obj-obj-dilate", top_k=6, boxes_store=str(path), image_windows=True,
                                 seed=0)   # without seed=, DALI gives the op a seed of its own
        return via_wrapper, raw[4]

    p = pipe()
    p.build()
    got, raw = [np.stack([np.asarray(t) for t in o]) for o in p.run()]
    derived = box_scale_from_mean_area(store.mean_area_fraction(6))
    assert derived[0] < 1.0
    b, off = store.gather(np.arange(n))
    want = sample_windows(store.sizes, b, off, np.arange(n), 0, 0,
                          CropConfig(mode="obj-obj-dilate", top_k=6, box_scale=derived)).windows
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(raw, want)
    unit = sample_windows(store.sizes, b, off, np.arange(n), 0, 0,
                          CropConfig(mode="obj-obj-dilate", top_k=6, box_scale=(1.0, 1.0))).windows
    assert not np.array_equal(got, unit)          # not the (1, 1) of an unset box_scale


def test_box_scale_unset_with_a_boxes_input_warns(ops):
    with pytest.warns(UserWarning, match="box_scale is None with a boxes input"):
        got = run_windows([[[0.1, 0.1, 0.5, 0.5]]], np.array([[640, 480]]), CropConfig(mode="obj-obj"))
    want = sample_windows(np.array([[640, 480]]), np.array([[0.1, 0.1, 0.5, 0.5]], np.float32), np.array([0, 1]),
                          np.arange(1), 0, 0, CropConfig(mode="obj-obj")).windows
    np.testing.assert_array_equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_windows([[[0.1, 0.1, 0.5, 0.5]]], np.array([[640, 480]]), CFG)     # given: no warning


# ---- the ROI shift: images decoded by the user ------------------------------------------------------
def test_object_views_on_already_decoded_images_equals_roi_decode(ops, coco_ann):
    """decoded=True: the user's own whole-image decode gives the views of the ROI decode (no shift to forget)."""
    from nvidia.dali import fn, pipeline_def, types
    from conftest import COCO_IMAGES
    cfg = CropConfig(mode="obj-obj-dilate", box_scale=(0.5, 1.0))

    @pipeline_def(batch_size=6, num_threads=2, device_id=None, seed=0)
    def pipe():
        jpegs, boxes, _, ids = fn.readers.coco(file_root=str(COCO_IMAGES), annotations_file=str(coco_ann),
                                               ltrb=True, ratio=True, image_ids=True)
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB, adjust_orientation=False)
        a = plugin.object_views(jpegs, ids, boxes, config=cfg, size=64, seed=2, epoch=1)
        b = plugin.object_views(images, ids, boxes, config=cfg, size=64, seed=2, epoch=1, decoded=True)
        return (*a, *b)

    p = pipe()
    p.build()
    a1, a2, b1, b2 = [np.stack([np.asarray(t) for t in o]) for o in p.run()]
    for a, b in ((a1, b1), (a2, b2)):
        d = np.abs(a - b)            # normalised units: ~0.017 per grey level
        assert d.mean() < 2e-3 and d.max() < 0.1, (d.mean(), d.max())


# ---- devices -----------------------------------------------------------------------------------------
@pytest.mark.skipif(not no_gpu(), reason="checks the CPU-only machine's errors")
def test_gpu_device_without_a_gpu_fails_early_naming_it(ops):
    from nvidia.dali import fn, pipeline_def

    def graph(device):
        jpegs = fn.external_source(source=lambda: [np.zeros(8, np.uint8)], batch=True)
        ids = fn.external_source(source=lambda: [np.array(0, np.int64)], batch=True)
        return plugin.object_views(jpegs, ids, config=CropConfig(mode="scene-scene"), device=device)

    with pytest.raises(ValueError, match="device='gpu' but no CUDA GPU"):
        pipeline_def(graph, batch_size=1, num_threads=1, device_id=0)("gpu")
    with pytest.raises(ValueError, match=r"device_id=0 but no CUDA GPU.*device_id=None"):
        pipeline_def(graph, batch_size=1, num_threads=1, device_id=0)("cpu")


# ---- AutoGraph ---------------------------------------------------------------------------------------
def test_no_autograph_warnings_under_enable_conditionals(ops, coco_ann, tmp_path):
    """The first object_views call (which loads the operators) inside enable_conditionals=True is quiet."""
    from conftest import COCO_IMAGES
    code = f"""
from nvidia.dali import fn, pipeline_def
from dali_objcrop import CropConfig, plugin
@pipeline_def(batch_size=2, num_threads=1, device_id=None, enable_conditionals=True)
def pipe():
    jpegs, boxes, _, ids = fn.readers.coco(file_root={str(COCO_IMAGES)!r}, annotations_file={str(coco_ann)!r},
                                           ltrb=True, ratio=True, image_ids=True)
    return plugin.object_views(jpegs, ids, boxes, size=32, crop_op=False,
                               config=CropConfig(mode="obj-obj-dilate", box_scale=(0.5, 1.0)))
p = pipe(); p.build(); p.run(); print("ran")
"""
    script = tmp_path / "user_pipe.py"          # AutoGraph converts only functions with a source file
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "ran" in r.stdout, r.stderr[-3000:]
    assert "AutoGraph" not in r.stderr, r.stderr[-3000:]


# ---- the epoch -------------------------------------------------------------------------------------
def epoch_pipeline(files, seed, prefetch, policy_pad=True, shard_id=0, num_shards=1):
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=4, num_threads=2, device_id=None, seed=seed, prefetch_queue_depth=prefetch)
    def pipe():
        jpegs, keys = fn.readers.file(files=files, labels=list(range(len(files))), random_shuffle=True,
                                      pad_last_batch=policy_pad, name="Reader", shard_id=shard_id,
                                      num_shards=num_shards, stick_to_shard=False)
        epoch = plugin.reader_epoch("Reader")
        shape = fn.peek_image_shape(jpegs, adjust_orientation=False)
        w = plugin.windows(shape, keys, epoch=epoch, config=CropConfig(mode="scene-scene"), seed=7,
                           image_windows=True)
        return w.image_windows, keys, epoch, shape

    return pipe()


def run_epochs(files, epochs, prefetch, policy, shard_id=0, num_shards=1):
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    it = DALIGenericIterator([epoch_pipeline(files, 3, prefetch, True, shard_id, num_shards)],
                             ["win", "key", "epoch", "shape"],
                             reader_name="Reader", auto_reset=True, last_batch_policy=getattr(LastBatchPolicy, policy))
    out = []
    for e in range(epochs):
        rows = []
        for batch in it:
            b = batch[0]
            rows += list(zip(b["key"].numpy().ravel(), b["epoch"].numpy().ravel(), b["win"].numpy(),
                             b["shape"].numpy()))
        out.append(rows)
    return out


@pytest.mark.parametrize("prefetch, policy", [(2, "PARTIAL"), (3, "FILL"), (1, "DROP")])
def test_reader_epoch_advances_under_dali_generic_iterator(ops, coco_ann, prefetch, policy):
    """reader_epoch: every sample of iterator epoch e is keyed by e (prefetch, auto_reset), crops differ per epoch,
    equal sample_windows(seed, e, key), and a rerun gives the same crops."""
    from conftest import COCO_IMAGES
    files = sorted(str(p) for p in COCO_IMAGES.glob("*.jpg"))[:10]      # 10 images, batch 4: a padded last batch
    out = run_epochs(files, 3, prefetch, policy)
    cfg = CropConfig(mode="scene-scene")
    per_key = {}
    for e, rows in enumerate(out):
        assert rows and all(int(ep) == e for _, ep, _, _ in rows), (e, [int(r[1]) for r in rows])
        keys = np.array([k for k, _, _, _ in rows])
        if policy != "FILL":
            assert len(set(keys.tolist())) == len(keys) or policy == "FILL"
        sizes = np.array([[s[1], s[0]] for _, _, _, s in rows])
        want = sample_windows(sizes, np.zeros((0, 4), np.float32), np.zeros(len(rows) + 1, np.int64), keys, 7, e,
                              cfg).windows
        np.testing.assert_array_equal(np.stack([w for _, _, w, _ in rows]), want)
        for k, _, w, _ in rows:
            per_key.setdefault(int(k), []).append(w)
    assert any(len(ws) > 1 and not np.array_equal(ws[0], ws[1]) for ws in per_key.values())   # epochs differ
    again = run_epochs(files, 3, prefetch, policy)
    for a, b in zip(out, again):
        assert [int(k) for k, *_ in a] == [int(k) for k, *_ in b]
        np.testing.assert_array_equal(np.stack([w for _, _, w, _ in a]), np.stack([w for _, _, w, _ in b]))


def test_reader_epoch_needs_pad_last_batch(ops, coco_ann):
    from conftest import COCO_IMAGES
    files = sorted(str(p) for p in COCO_IMAGES.glob("*.jpg"))[:10]
    p = epoch_pipeline(files, 0, 1, policy_pad=False)
    p.build()
    with pytest.raises(Exception, match="pad_last_batch=True"):
        p.run()


def test_reader_epoch_with_shards_that_rotate(ops, coco_ann):
    """Two DDP-like ranks (num_shards=2, stick_to_shard=False: shards of 6 and 5 samples swap each epoch):
    every rank's samples of iterator epoch e are keyed by e."""
    from conftest import COCO_IMAGES
    files = sorted(str(p) for p in COCO_IMAGES.glob("*.jpg"))[:11]
    for rank in (0, 1):
        out = run_epochs(files, 3, 2, "PARTIAL", shard_id=rank, num_shards=2)
        for e, rows in enumerate(out):
            assert rows and all(int(ep) == e for _, ep, _, _ in rows), (rank, e, [int(r[1]) for r in rows])
