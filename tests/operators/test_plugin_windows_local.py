"""Local (multi-crop) views of ``fn.objcrop.windows`` against the NumPy specification.

With ``local_crops = M > 0`` every output has ``2 + M`` view rows (the global views, then the local
views in order) and must equal ``windows.sample_windows`` (``all_windows``, ``all_flip``, ``local_regions``,
``local_box_index``) and ``augment.sample_aug_params(keys, 2 + j, recipe.local)`` EXACTLY: every object
mode x every ``local_from``, M in {1, 6, 16}, boxes from an input and from a ``.boxes`` store.  M = 0
leaves every output as the two-view operator gives it; bad local arguments are refused by name.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dali_objcrop import augment, plugin
from dali_objcrop.boxstore import BoxStore
from dali_objcrop.plugin import build
from dali_objcrop.windows import LOCAL_SOURCES, MODES, CropConfig, box_scale_from_mean_area
from test_plugin_windows import check_equal, ops, random_batch, run_op  # noqa: F401 (ops: a fixture)

pytestmark = pytest.mark.skipif(build.cxx() is None or build.cuda_include_dir() is None,
                                reason="no C++ compiler or CUDA headers to build the operators")

# a recipe whose local augmentation differs from both global views in every number (30-number aug)
ODD = augment.Recipe("odd", (augment.ViewAug(jitter_p=0.3, hue=0.05, blur_sigma=(0.3, 3.1), solarize_p=0.7),
                             augment.ViewAug(gray_p=0.9, blur_p=0.01, brightness=1.5)),
                     augment.ViewAug(jitter_p=0.6, brightness=0.7, contrast=0.1, saturation=0.9, hue=0.3,
                                     gray_p=0.4, blur_p=0.8, blur_sigma=(0.5, 4.5), solarize_p=0.35))

CASES = [(mode, src) for mode in MODES for src in LOCAL_SOURCES if mode != "scene-scene" or src == "scene"]


def _config(mode: str, src: str, m: int, k: int) -> CropConfig:
    """A local-view configuration that varies with the case number k (scales, ratio, top-k, tries, sizes)."""
    local_scale = ((0.05, 0.4), (0.02, 1.0), (0.3, 0.3))[k % 3]
    return CropConfig(mode=mode, box_scale=(0.45, 1.0), local_crops=m, local_from=src, local_scale=local_scale,
                      top_k=(10, 3, 1, 5)[k % 4], num_tries=(10, 1)[k % 2],
                      min_box_size=(224, 32)[(k // 3) % 2], ratio=((3 / 4, 4 / 3), (0.5, 2.0))[(k // 2) % 2],
                      flip_p=(0.5, 0.3)[k % 2], dilate=(0.1, 0.2)[k % 2],
                      shift_range=((80.0, 120.0), (0.0, 400.0))[(k // 2) % 2])


@pytest.mark.parametrize("m", [1, 6, 16])
@pytest.mark.parametrize("mode, src", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_local_views_equal_numpy(ops, tmp_path, mode, src, m):
    """Boxes from an input and from a .boxes store (rows differ from the keys): all 2 + M views equal."""
    k = CASES.index((mode, src)) + m
    config = _config(mode, src, m, k)
    recipe = ("mocov2", "byol", ODD)[k % 3]
    n = 120
    sizes, boxes, offsets, index = random_batch(n, seed=100 + k)
    assert (np.diff(offsets) > config.top_k).any() and (np.diff(offsets) == 0).any()
    cw = check_equal(run_op(sizes, boxes, offsets, index, 3 + k, config, recipe, seed=77 + k),
                     sizes, boxes, offsets, index, 3 + k, config, recipe, 77 + k)
    if src != "scene":   # the local views sit in proposals, and several of them where asked
        assert (cw.local_box_index >= 0).any()
        if src == "boxes" and m > 1 and config.top_k > 1:
            assert (cw.local_box_index[:, 0] != cw.local_box_index[:, 1]).any()
    # the same batch from a store, by row
    store = BoxStore.from_arrays([f"im{i}.jpg" for i in range(n)], sizes.astype(np.int32),
                                 [boxes[offsets[i]:offsets[i + 1]] for i in range(n)])
    path = store.save(tmp_path / "b.boxes")
    st = BoxStore.load(path)
    rows = np.random.default_rng(k).permutation(n)
    b, off = st.gather(rows)
    outs = run_op(st.sizes[rows], b, off, index, 3 + k, config, recipe, 77 + k, store=str(path), rows=rows)
    check_equal(outs, st.sizes[rows], b, off, index, 3 + k, config, recipe, 77 + k)


def test_local_views_with_box_scale_from_the_store(ops, tmp_path):
    """box_scale=None with a store: derived from it as the loader does, local views included."""
    n = 100
    sizes, boxes, offsets, index = random_batch(n, seed=41)
    store = BoxStore.from_arrays([f"im{i}.jpg" for i in range(n)], sizes.astype(np.int32),
                                 [boxes[offsets[i]:offsets[i + 1]] for i in range(n)])
    path = store.save(tmp_path / "b.boxes")
    st = BoxStore.load(path)
    config = CropConfig(mode="obj-obj-dilate", box_scale=None, top_k=4, local_crops=8, local_from="boxes")
    spec = dataclasses.replace(config, box_scale=box_scale_from_mean_area(st.mean_area_fraction(4)))
    rows = np.arange(n)[::-1]
    b, off = st.gather(rows)
    outs = run_op(st.sizes[rows], b, off, index, 1, config, "byol", 5, store=str(path), rows=rows)
    check_equal(outs, st.sizes[rows], b, off, index, 1, spec, "byol", 5)


def test_check_local_can_fail(ops):
    """The comparison catches local views out of order, a local flip, and a global view's draws reused."""
    config = CropConfig(mode="obj-obj", box_scale=(0.5, 1.0), local_crops=3, local_from="boxes")
    sizes, boxes, offsets, index = random_batch(60, seed=9)
    outs = run_op(sizes, boxes, offsets, index, 0, config, "byol", 1)
    check_equal(outs, sizes, boxes, offsets, index, 0, config, "byol", 1)
    swapped = [o.copy() if isinstance(o, np.ndarray) else [t.copy() for t in o] for o in outs]
    swapped[1][:, [2, 3]] = swapped[1][:, [3, 2]]
    bad_flip = [o.copy() if isinstance(o, np.ndarray) else o for o in outs]
    bad_flip[2][:, 4] ^= 1
    reused = [o.copy() if isinstance(o, np.ndarray) else o for o in outs]
    reused[3][:, 2] = reused[3][:, 0]
    for bad in (swapped, bad_flip, reused):
        with pytest.raises(AssertionError):
            check_equal(bad, sizes, boxes, offsets, index, 0, config, "byol", 1)


# ---- the raw operator: M = 0 unchanged, the aug text, refusals ------------------------------------------

def run_raw(sizes, boxes, offsets, index, epoch, **kwargs):
    """fn.objcrop.windows with exactly these arguments (boxes input; every optional output)."""
    from nvidia.dali import fn, pipeline_def
    n = len(index)
    per_boxes = [np.ascontiguousarray(boxes[offsets[i]:offsets[i + 1]]).reshape(-1, 4) for i in range(n)]
    shapes = [np.array([h, w, 3], np.int64) for w, h in sizes]
    idx = [np.array(i, np.int64) for i in index]

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        b = fn.external_source(source=lambda: per_boxes, batch=True)
        s = fn.external_source(source=lambda: shapes, batch=True)
        i = fn.external_source(source=lambda: idx, batch=True)
        return tuple(fn.objcrop.windows(b, s, i, epoch=epoch, details=True, resize_rois=True, blur_kernels=True,
                                        image_windows=True, box_check="clip", **kwargs))

    p = pipe()
    p.build()
    return [[np.asarray(t) for t in o] for o in p.run()]


def _two_view_kwargs(config, recipe, seed):
    """windows_arguments without the local-view arguments: the two-view operator's call."""
    kw = plugin.windows_arguments(config, recipe, seed)
    for name in ("local_crops", "local_scale", "local_from"):
        kw.pop(name)
    return kw


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y)
        for s, t in zip(x, y):
            assert s.dtype == t.dtype and s.shape == t.shape
            np.testing.assert_array_equal(s, t)


@pytest.mark.parametrize("mode", MODES)
def test_zero_local_crops_leave_every_output_unchanged(ops, mode):
    """M = 0, whatever local_scale / local_from / a 30-number aug say: the two-view outputs, bit for bit,
    equal to the specification (shapes (2, 4), (2,), (2, 9), (12,), (2, 4), (2, W), (2, 4))."""
    config = CropConfig(mode=mode, box_scale=(0.45, 1.0))
    sizes, boxes, offsets, index = random_batch(80, seed=len(mode))
    base = run_raw(sizes, boxes, offsets, index, 2, **_two_view_kwargs(config, "byol", 3))
    assert [base[k][0].shape for k in (1, 2, 3, 4, 5, 7)] == [(2, 4), (2,), (2, 9), (12,), (2, 4), (2, 4)]
    assert all(t.shape[0] == 2 for t in base[6])
    stacked = [np.stack(o) for o in base[:6]] + [base[6], np.stack(base[7])]
    check_equal(stacked, sizes, boxes, offsets, index, 2, config, "byol", 3)
    assert plugin.windows_arguments(config, "byol", 3)["local_crops"] == 0
    _same(base, run_raw(sizes, boxes, offsets, index, 2, **plugin.windows_arguments(config, "byol", 3)))
    src = "scene" if mode == "scene-scene" else "boxes"
    kw30 = plugin.windows_arguments(dataclasses.replace(config, local_crops=4, local_from=src), "byol", 3)
    kw30.update(local_crops=0, local_scale="0.2, 0.9")
    assert len(kw30["aug"].split(",")) == 30
    _same(base, run_raw(sizes, boxes, offsets, index, 2, **kw30))
    if mode == "scene-scene":   # box / boxes are refused with scene-scene only where there are local views
        _same(base, run_raw(sizes, boxes, offsets, index, 2, **{**kw30, "local_from": "box"}))


def test_windows_arguments_send_the_local_recipe():
    two = plugin.windows_arguments(CropConfig(), "byol", 0)
    assert len(two["aug"].split(",")) == 20 and two["local_crops"] == 0
    args = plugin.windows_arguments(CropConfig(local_crops=5, local_from="scene", local_scale=(0.1, 0.3)), ODD, 0)
    nums = [float(x) for x in args["aug"].split(",")]
    assert len(nums) == 30 and nums[:20] == [float(x) for x in plugin.windows_arguments(CropConfig(), ODD, 0)
                                             ["aug"].split(",")]
    loc = ODD.local
    assert nums[20:] == [loc.jitter_p, loc.brightness, loc.contrast, loc.saturation, loc.hue, loc.gray_p, loc.blur_p,
                         loc.blur_sigma[0], loc.blur_sigma[1], loc.solarize_p]
    assert (args["local_crops"], args["local_from"], args["local_scale"]) == (5, "scene", "0.1, 0.3")


@pytest.mark.parametrize("recipe", ["mocov2", "byol"])
def test_local_recipe_from_the_recipe_name(ops, recipe):
    """With 20 numbers (or none) the local views take the named recipe's local augmentation: the C++ tables
    equal augment.RECIPES (byol's local is DINO's: blur .5, no solarisation, saturation .2)."""
    config = CropConfig(mode="obj-obj-dilate", box_scale=(0.45, 1.0), local_crops=6, local_from="box")
    sizes, boxes, offsets, index = random_batch(200, seed=17)
    kw = plugin.windows_arguments(config, recipe, 4)
    full = run_raw(sizes, boxes, offsets, index, 1, **kw)
    stacked = [np.stack(o) for o in full[:6]] + [full[6], np.stack(full[7])]
    check_equal(stacked, sizes, boxes, offsets, index, 1, config, recipe, 4)
    twenty = {**kw, "aug": ", ".join(kw["aug"].split(", ")[:20]), "recipe": recipe}
    _same(full, run_raw(sizes, boxes, offsets, index, 1, **twenty))
    named = {k: v for k, v in kw.items() if k != "aug"}
    _same(full, run_raw(sizes, boxes, offsets, index, 1, recipe=recipe, **named))
    # the other recipe's local table gives other draws (mocov2's and byol's differ in saturation only)
    other = "byol" if recipe == "mocov2" else "mocov2"
    diff = run_raw(sizes, boxes, offsets, index, 1, **{**twenty, "recipe": other})
    aug, aug_other = np.stack(full[3]), np.stack(diff[3])
    np.testing.assert_array_equal(aug[:, :2], aug_other[:, :2])           # the global views: the 20 numbers
    assert not np.array_equal(aug[:, 2:], aug_other[:, 2:])


@pytest.mark.parametrize("change, match", [
    (dict(local_crops=-1), "local_crops"), (dict(local_crops=17), "local_crops"),
    (dict(local_scale="0.5, 0.2"), "local_scale"), (dict(local_scale="0, 0.3"), "local_scale"),
    (dict(local_scale="0.1, 1.5"), "local_scale"), (dict(local_scale="0.1"), "local_scale"),
    (dict(local_scale="0.1, x"), "local_scale"),
    (dict(local_from="objects"), "local_from"),
    (dict(mode="scene-scene", local_from="box"), "local_from"),
    (dict(mode="scene-scene", local_from="boxes"), "local_from"),
    (dict(aug=", ".join(["0.5"] * 25)), "aug"),
    (dict(aug=", ".join(["0.5"] * 20), recipe="simclr"), "recipe"),
    (dict(aug=", ".join(["0.5"] * 27 + ["0.0", "2.0", "0.0"])), "sigma"),
])
def test_bad_local_arguments_are_refused_by_name(ops, change, match):
    kw = {**plugin.windows_arguments(CropConfig(mode="obj-obj", box_scale=(0.5, 1.0), local_crops=3), "byol", 0),
          **change}
    sizes, boxes, offsets, index = random_batch(4, seed=0)
    with pytest.raises(Exception, match=match):
        run_raw(sizes, boxes, offsets, index, 0, **kw)


def test_core_slot_macros_equal_rng():
    """The local slot table of csrc/objcrop_core.h equals dali_objcrop.rng (the operators' draws depend on it)."""
    import re
    from dali_objcrop import rng
    from test_plugin_windows import REPO
    text = (REPO / "csrc" / "objcrop_core.h").read_text()
    macros = dict(re.findall(r"^#define (OC_[A-Z_]+) (\d+)$", text, re.M))
    for name in ("SLOT_VIEW_BASE", "SLOTS_PER_VIEW", "VIEW_FLIP", "VIEW_POS", "SLOT_AUG_BASE", "SLOTS_PER_AUG",
                 "SLOT_LOCAL_BASE", "SLOTS_PER_LOCAL", "LOCAL_AUG", "MAX_LOCAL_VIEWS"):
        assert int(macros[f"OC_{name}"]) == getattr(rng, name), name
    assert [int(macros[f"OC_LOCAL_FROM_{s.upper()}"]) for s in LOCAL_SOURCES] == [0, 1, 2]
