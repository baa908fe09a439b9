"""ObjCropLoader on the C++ operators (``use_plugin``) against the DALI-ops graph, and its guarantees.

The operators' path hands DALI only file names and positions; DALI reads the files and
``fn.objcrop.windows`` draws windows and augmentations.  It must give the views of the
DALI-ops graph fed by the NumPy callback (to float rounding of the blur kernels), keep
``set_epoch``, DDP shards and ``windows_for``, and fall back when no compiler is found.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_objcrop import BoxStore, ObjCropLoader, plugin
from dali_objcrop.constants import IMAGENET_STD
from dali_objcrop.plugin import build

REPO = Path(__file__).resolve().parents[2]

needs_ops = pytest.mark.skipif(build.cxx() is None or build.cuda_include_dir() is None,
                               reason="no C++ compiler or CUDA headers to build the operators")


def _epoch(ld, epoch):
    ld.set_epoch(epoch)
    return list(ld)


@needs_ops
@pytest.mark.parametrize("crop_op", [False, True], ids=["dali-ops-crop", "crop-op"])
@pytest.mark.parametrize("mode,boxes,recipe", [("obj-obj-dilate", "gt", "mocov2"),
                                               ("obj-obj-shift", "store", "byol"),
                                               ("scene-scene", None, "mocov2")])
def test_plugin_loader_equals_dali_ops_graph(synth_set, tmp_path, mode, boxes, recipe, crop_op):
    """Same samples, same views as the DALI-ops graph: to float rounding of the blur kernels with
    DALI's crop stage; within 1/255 of a pixel on 99% of the values with fn.objcrop.crop at 224 px
    (its triangle filter is not DALI's antialiased resize: measured on COCO, 224 px: 99% within 0.5
    level, 99.9% within 0.8; 48 px: 99% within 1.7 levels)."""
    if boxes == "store":
        boxes = BoxStore.from_coco(synth_set).save(tmp_path / "gt.boxes")
    size = 224 if crop_op else 48
    kw = dict(boxes=boxes, mode=mode, batch_size=6, size=size, device="cpu", recipe=recipe, seed=5)
    a = ObjCropLoader(str(synth_set), use_plugin=True, plugin_crop=crop_op, **kw)
    b = ObjCropLoader(str(synth_set), use_plugin=False, **kw)
    assert a.uses_plugin and not b.uses_plugin
    assert a.stats["pipeline"] == ("plugin:crop-op" if crop_op else "plugin:dali-ops-crop")
    one_level = 1.0 / (255 * min(IMAGENET_STD)) + 1e-5        # 1/255 of a pixel, normalised
    for epoch in (3,) if crop_op else (0, 3):
        ba, bb = _epoch(a, epoch), _epoch(b, epoch)
        assert len(ba) == len(bb) == len(a) > 0
        for x, y in zip(ba, bb):
            assert torch.equal(x["index"], y["index"])
            for v in ("view1", "view2"):
                assert x[v].shape == (6, 3, size, size) and x[v].dtype == torch.float32
                diff = (x[v] - y[v]).abs()
                if crop_op:
                    assert float(diff.quantile(0.99)) <= one_level, float(diff.quantile(0.99))
                else:
                    assert float(diff.max()) <= 1e-4           # blur kernels differ by an ulp
    assert a.stats["fallback"] == b.stats["fallback"]


@needs_ops
def test_plugin_loader_set_epoch_and_ddp_shards(synth_set):
    kw = dict(boxes="gt", batch_size=4, size=32, device="cpu", seed=1, use_plugin=True)
    ranks = [ObjCropLoader(str(synth_set), rank=r, world_size=2, **kw) for r in (0, 1)]
    seen = [torch.cat([b["index"] for b in _epoch(ld, 2)]) for ld in ranks]
    assert len(seen[0]) == len(seen[1]) == 12
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert sorted(seen[0].tolist() + seen[1].tolist()) == list(range(24))
    ld = ranks[0]
    e2 = [b["view1"] for b in _epoch(ld, 2)]
    e7 = [b["view1"] for b in _epoch(ld, 7)]
    e2b = [b["view1"] for b in _epoch(ld, 2)]
    assert all(torch.equal(x, y) for x, y in zip(e2, e2b))                       # set_epoch always takes effect
    assert not all(torch.equal(x, y) for x, y in zip(e2, e7))
    # windows_for recomputes what the operator drew (a view's pixels follow from its window)
    cw = ld.windows_for(np.arange(24), 2)
    assert cw.windows.shape == (24, 2, 4)


def test_plugin_loader_refuses_what_it_cannot_do(synth_set):
    with pytest.raises(ValueError, match="roi_decode"):
        ObjCropLoader(str(synth_set), boxes="gt", batch_size=8, device="cpu", roi_decode=False, use_plugin=True)


def test_loader_falls_back_without_compiler(synth_set, tmp_path):
    """No compiler, empty cache: one warning, the DALI-ops graph, batches as usual."""
    code = ("import warnings, sys\n"
            "from dali_objcrop import ObjCropLoader\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            f"    a = ObjCropLoader({str(synth_set)!r}, boxes='gt', batch_size=4, size=32, device='cpu')\n"
            f"    b = ObjCropLoader({str(synth_set)!r}, boxes='gt', batch_size=4, size=32, device='cpu')\n"
            "    n = sum(1 for _ in a)\n"
            "print(repr(a))\n"
            "print(a.uses_plugin, a.stats['pipeline'], n, len([x for x in w if 'unavailable' in str(x.message)]))\n")
    env = dict(os.environ, CXX="/nonexistent/g++", DALI_OBJCROP_HOME=str(tmp_path), PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[-4:] == ["False", "dali-ops", "6", "1"], res.stdout + res.stderr[-2000:]
    assert "pipeline='dali-ops' (the C++ operators are unavailable (" in res.stdout, res.stdout   # which and why


def test_repr_says_which_pipeline_ran_and_why(synth_set):
    kw = dict(boxes="gt", batch_size=4, size=32, device="cpu")
    a = ObjCropLoader(str(synth_set), use_plugin=False, **kw)
    assert "pipeline='dali-ops' (use_plugin=False)" in repr(a) and a.stats["pipeline_reason"] == "use_plugin=False"
    b = ObjCropLoader(str(synth_set), roi_decode=False, **kw)
    assert "pipeline='dali-ops' (roi_decode=False" in repr(b)
    if plugin.load():
        c = ObjCropLoader(str(synth_set), plugin_crop=False, **kw)
        assert ("pipeline='plugin:dali-ops-crop' (the C++ operators are loaded; views by DALI's crop stage "
                "(plugin_crop=False))") in repr(c)


@needs_ops
@pytest.mark.parametrize("crop_op", [True, False], ids=["crop-op", "dali-ops-crop"])
def test_building_block_in_a_users_coco_pipeline(synth_set, crop_op):
    """readers.coco (the user's reader, boxes and ids) + plugin.object_views in the user's @pipeline_def."""
    from nvidia.dali import fn, pipeline_def
    from dali_objcrop import CropConfig

    @pipeline_def(batch_size=4, num_threads=2, device_id=None, enable_conditionals=True)
    def user_pipe():
        jpegs, boxes, labels, ids = fn.readers.coco(file_root=str(synth_set.parent / "images"),
                                                    annotations_file=str(synth_set), ltrb=True, ratio=True,
                                                    image_ids=True, random_shuffle=True, seed=1)
        v1, v2 = plugin.object_views(jpegs, ids, boxes, epoch=4, seed=0, size=64, crop_op=crop_op,
                                     config=CropConfig(mode="obj-obj-dilate", box_scale=(0.5, 1.0)))
        return v1, v2, labels

    p = user_pipe()
    p.build()
    for _ in range(3):
        v1, v2, labels = p.run()
        a, b = np.stack([np.asarray(t) for t in v1]), np.stack([np.asarray(t) for t in v2])
        assert a.shape == b.shape == (4, 3, 64, 64) and np.isfinite(a).all() and a.std() > 0.1
        assert not np.allclose(a, b)
