"""The image index built once and memory-mapped (dali_objcrop.index, dali_objcrop.coco_stream).

Each claim of the module docstrings has a test that fails for the defect it is named after: the index
equals the json's images (and ``ImageIndex``'s scan), the streamed read equals ``load_coco`` however the
file is cut into blocks, bad files get ``load_coco``'s exact errors, a changed source rebuilds, a damaged
index is refused by name and rebuilt, concurrent processes build once and map the same file.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_objcrop import coco_stream
from dali_objcrop.boxstore import BoxStore
from dali_objcrop.dataset import CocoFormatError, ImageIndex, load_coco
from dali_objcrop.header_scan import scan_fast
from dali_objcrop.index import (IndexFileError, IndexRebuiltWarning, MappedIndex, gt_path, gt_store,
                                load_index_file, open_index)

REPO = Path(__file__).resolve().parents[2]


def _jpeg(w: int, h: int, seed: int = 0, **kw) -> bytes:
    a = np.random.default_rng(seed).integers(0, 255, size=(h, w, 3)).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(a).save(b, "JPEG", **kw)
    return b.getvalue()


def _png(w: int, h: int) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (w, h)).save(b, "PNG")
    return b.getvalue()


def _set(root: Path, indent=None, n: int = 6, extra_json: dict | None = None) -> Path:
    """n good JPEGs (one in a subfolder), a PNG, and the rejects every scan must find, plus a json
    whose annotations hold nested objects and strings with '}, {' in them (cut points that are no
    element boundaries)."""
    img = root / "images"
    (img / "sub").mkdir(parents=True, exist_ok=True)
    files = {f"im{i}.jpg": (_jpeg(40 + 8 * i, 32 + 4 * i, i), (40 + 8 * i, 32 + 4 * i)) for i in range(n)}
    files["sub/deep.jpg"] = (_jpeg(50, 30, 9, progressive=True), (50, 30))
    files["pic.png"] = (_png(30, 20), (30, 20))
    files["empty.jpg"] = (b"", (10, 10))
    files["trunc.jpg"] = (_jpeg(64, 48, 3)[:300], (64, 48))
    files["wrongsize.jpg"] = (_jpeg(64, 48, 4), (60, 48))
    files["noise.jpg"] = (bytes(range(256)) * 8, (10, 10))
    ims, anns = [], []
    for i, (name, (data, (w, h))) in enumerate(files.items()):
        (img / name).write_bytes(data)
        ims.append({"id": 100 + i, "file_name": name, "width": w, "height": h, "note": "a}, {b"})
        for j in range(i % 4):
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": 1 + j % 2,
                         "bbox": [1 + j, 2, 5 + 3 * j, 4 + (j == 2) * 6], "iscrowd": int(j == 3),
                         "attributes": [{"k": "}, {"}, {"v": [1, {"x": 2}]}]})
    ims.append({"id": 999, "file_name": "missing.jpg", "width": 10, "height": 10})
    d = {"info": {"x": [{"a": 1}, {"b": 2}]}, "images": ims, "annotations": anns,
         "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    d.update(extra_json or {})
    ann = root / "annotations.json"
    ann.write_text(json.dumps(d, indent=indent))
    return ann


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DALI_OBJCROP_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "index"


def _same(a: ImageIndex, b: ImageIndex) -> None:
    assert list(a.keys) == list(b.keys)
    np.testing.assert_array_equal(np.asarray(a.sizes), np.asarray(b.sizes))
    assert a.bad == b.bad and a.root == b.root and list(a.paths) == list(b.paths)
    assert a.fingerprint == b.fingerprint


def _old_gt(path, top_k=None, include_crowd=True) -> BoxStore:
    """BoxStore.from_coco as it was before the streaming pass (per image, json.load): the reference."""
    coco = load_coco(path)
    boxes = []
    for img in coco.images:
        anns = [a for a in coco.anns_by_image.get(img["id"], []) if include_crowd or not a.get("iscrowd", 0)]
        b = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        b[:, 2:] += b[:, :2]
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        boxes.append(b[np.argsort(-area, kind="stable")])
    return BoxStore.from_arrays([i["file_name"] for i in coco.images], [[i["width"], i["height"]] for i in coco.images],
                                boxes, method="gt", normalized=False, top_k=top_k,
                                params={"annotations": str(path), "top_k": top_k})


def _same_store(a: BoxStore, b: BoxStore) -> None:
    assert list(a.keys) == list(b.keys) and a.meta == b.meta
    for f in ("sizes", "offsets", "boxes"):
        np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))


# ---- the index equals the json's images and ImageIndex's scan -------------------------------------------------
@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("block", [97, 1 << 23])
def test_streamed_read_equals_load_coco_however_the_file_is_cut(tmp_path, monkeypatch, indent, block):
    ann = _set(tmp_path, indent=indent)
    monkeypatch.setattr(coco_stream, "_BLOCK", block)
    monkeypatch.setattr(coco_stream._Reader.__init__, "__defaults__", (block, None))
    arr = coco_stream.read_coco_arrays(ann)
    coco = load_coco(ann)
    assert arr.fast
    assert arr.file_names == [im["file_name"] for im in coco.images]
    np.testing.assert_array_equal(arr.sizes, [[im["width"], im["height"]] for im in coco.images])
    _same_store(BoxStore.from_coco_arrays(arr), _old_gt(ann))


def test_index_equals_imageindex_for_a_json_and_a_folder(tmp_path, cache):
    ann = _set(tmp_path)
    idx = open_index(ann)
    assert isinstance(idx, MappedIndex) and idx.path.parent == cache
    _same(idx, ImageIndex.from_coco(ann))
    assert {"empty.jpg", "trunc.jpg", "wrongsize.jpg", "noise.jpg", "missing.jpg"} == set(idx.bad)
    _same(open_index(tmp_path / "images"), ImageIndex.from_folder(tmp_path / "images"))


def test_index_equals_the_real_coco_json(coco_ann, cache):
    idx = open_index(coco_ann)
    coco = load_coco(coco_ann)
    assert list(idx.keys) == [im["file_name"] for im in coco.images] and not idx.bad
    np.testing.assert_array_equal(idx.sizes, [[im["width"], im["height"]] for im in coco.images])
    _same(idx, ImageIndex.from_coco(coco_ann))
    _same_store(gt_store(coco_ann, idx), _old_gt(coco_ann))


def test_parallel_scan_equals_the_inline_one(tmp_path, cache, monkeypatch):
    from dali_objcrop import header_scan, index as index_mod
    ann = _set(tmp_path)
    inline = index_mod.build_index(ann, workers=1)
    monkeypatch.setattr(header_scan, "PARALLEL_FROM", 1)
    monkeypatch.setattr(header_scan, "SCAN_BLOCK", 3)
    par = index_mod.build_index(ann, workers=2)
    assert par.keys == inline.keys and par.bad == inline.bad
    np.testing.assert_array_equal(par.sizes, inline.sizes)


def test_fast_header_read_agrees_with_pil(tmp_path):
    from dali_objcrop.dataset import scan_image
    _set(tmp_path)
    for p in sorted((tmp_path / "images").rglob("*.*")) + [tmp_path / "images" / "nope.jpg"]:
        st, wh, _ = scan_image(p)
        assert scan_fast(str(p)) == (st, wh if wh is None else tuple(wh)), p


@pytest.mark.parametrize("top_k, crowd", [(None, True), (2, True), (1, False)])
def test_gt_store_from_the_streaming_pass_equals_the_per_image_one(tmp_path, top_k, crowd):
    ann = _set(tmp_path)
    _same_store(BoxStore.from_coco(ann, top_k=top_k, include_crowd=crowd), _old_gt(ann, top_k, crowd))
    arr = coco_stream.read_coco_arrays(ann)          # validation in blocks of a few boxes: same store
    counts = np.diff(_old_gt(ann).offsets)
    small = BoxStore.from_flat(arr.file_names, arr.sizes, np.asarray(_old_gt(ann).boxes), counts, block=2, top_k=top_k)
    big = BoxStore.from_flat(arr.file_names, arr.sizes, np.asarray(_old_gt(ann).boxes), counts, top_k=top_k)
    _same_store(small, big)


# ---- bad json: load_coco's exact errors ---------------------------------------------------------------------
BAD = {
    "not json": "{\"images\": [",
    "dup ids": json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 2, "height": 2},
                                      {"id": 1, "file_name": "b.jpg", "width": 2, "height": 2}], "annotations": []}),
    "bool box": json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 2, "height": 2}],
                            "annotations": [{"id": 3, "image_id": 1, "bbox": [0, 0, True, 1]}]}),
    "nan box": json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 2, "height": 2}],
                           "annotations": [{"id": 3, "image_id": 1, "bbox": [0, 0, float("nan"), 1]}]}),
    "unknown image": json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 2, "height": 2}],
                                 "annotations": [{"id": 3, "image_id": 7, "bbox": [0, 0, 1, 1]}]}),
    "float width": json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 2.5, "height": 2}],
                               "annotations": []}),
    "bad category": json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 2, "height": 2}],
                                "categories": [{"id": 1}],
                                "annotations": [{"id": 3, "image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1]}]}),
    "no annotations": json.dumps({"images": []}),
    "list": "[]",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_json_gets_load_coco_s_exact_error(tmp_path, cache, case):
    (tmp_path / "images").mkdir()
    p = tmp_path / "bad.json"
    p.write_text(BAD[case])
    with pytest.raises(CocoFormatError) as ref:
        load_coco(p)
    for read in (BoxStore.from_coco, coco_stream.read_coco_arrays, open_index):
        with pytest.raises(CocoFormatError) as e:
            read(p)
        assert str(e.value) == str(ref.value)
    assert not list(cache.glob("*.index"))


def test_valid_but_unusual_json_is_still_read(tmp_path):
    p = tmp_path / "odd.json"     # string image ids: valid for load_coco, not for the fast reader
    p.write_text(json.dumps({"images": [{"id": "x", "file_name": "a.jpg", "width": 4, "height": 4}],
                             "annotations": [{"id": 1, "image_id": "x", "bbox": [0, 0, 2, 2]}]}))
    arr = coco_stream.read_coco_arrays(p)
    assert not arr.fast and arr.file_names == ["a.jpg"]
    _same_store(BoxStore.from_coco(p), _old_gt(p))


# ---- built once, mapped after; a changed source rebuilds; a damaged file is refused by name -----------------------
def test_second_open_maps_without_building(tmp_path, cache, monkeypatch):
    from dali_objcrop import index as index_mod
    ann = _set(tmp_path)
    first = open_index(ann)
    monkeypatch.setattr(index_mod, "build_index", lambda *a, **k: pytest.fail("built again"))
    again = open_index(ann)
    _same(first, again)
    assert isinstance(again.sizes, np.memmap)


def test_changed_json_rebuilds(tmp_path, cache):
    ann = _set(tmp_path)
    before = open_index(ann)
    d = json.loads(ann.read_text())
    d["images"] = d["images"][1:]
    ann.write_text(json.dumps(d))
    after = open_index(ann)
    assert list(after.keys) == list(before.keys)[1:]
    assert len(gt_store(ann, after)) == len(d["images"])


def test_files_added_to_a_folder_rebuild(tmp_path, cache):
    _set(tmp_path)
    before = open_index(tmp_path / "images")
    (tmp_path / "images" / "sub" / "new.jpg").write_bytes(_jpeg(20, 20))
    after = open_index(tmp_path / "images")
    assert "sub/new.jpg" in list(after.keys) and len(after) == len(before) + 1


@pytest.mark.parametrize("damage", ["truncate", "flip data", "flip header", "garbage"])
def test_damaged_index_is_refused_by_name_and_rebuilt(tmp_path, cache, damage):
    ann = _set(tmp_path)
    good = open_index(ann)
    path = good.path
    raw = bytearray(path.read_bytes())
    del good
    if damage == "truncate":
        raw = raw[:len(raw) - 7]
    elif damage == "flip data":
        raw[-5] ^= 0xFF
    elif damage == "flip header":
        raw[40] ^= 0x01
    else:
        raw = b"not an index at all"
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexFileError, match=str(path).replace(".", r"\.")):
        load_index_file(path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        again = open_index(ann)
    assert [x for x in w if issubclass(x.category, IndexRebuiltWarning) and str(path) in str(x.message)]
    _same(again, ImageIndex.from_coco(ann))
    load_index_file(path)   # intact again


def test_damaged_gt_store_is_named_and_rewritten(tmp_path, cache):
    ann = _set(tmp_path)
    idx = open_index(ann)
    gp = gt_path(idx.path)
    gp.write_bytes(gp.read_bytes()[:100])
    with pytest.warns(IndexRebuiltWarning, match=str(gp).replace(".", r"\.")):
        store = gt_store(ann, idx)
    _same_store(store, _old_gt(ann))
    BoxStore.load(gp)


# ---- many ranks: one builds, all map the same file ------------------------------------------------------------
def test_concurrent_processes_build_once_and_map_the_same_file(tmp_path, cache):
    ann = _set(tmp_path)
    log = tmp_path / "builds.txt"
    script = (
        "import os, sys\n"
        "from dali_objcrop import index as m\n"
        "orig = m.build_index\n"
        "def build(*a, **k):\n"
        f"    open({str(log)!r}, 'a').write(str(os.getpid()) + '\\n')\n"
        "    import time; time.sleep(1.0)\n"
        "    return orig(*a, **k)\n"
        "m.build_index = build\n"
        f"idx = m.open_index({str(ann)!r})\n"
        "print(idx.path, os.stat(idx.path).st_ino, len(idx), idx.fingerprint)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert len(set(o[0] for o in outs)) == 1          # same file, same inode, same images
    assert len(log.read_text().split()) == 1           # built once
    assert any("waiting for another process" in o[1] for o in outs)


# ---- the loader and the box store use it --------------------------------------------------------------------
def test_rows_for_an_identical_key_list_builds_no_dictionary(tmp_path, cache):
    ann = _set(tmp_path)
    idx = open_index(ann)
    store = BoxStore.from_arrays(list(idx.keys), idx.sizes, [np.zeros((0, 4))] * len(idx))
    store.save(tmp_path / "s.boxes")
    loaded = BoxStore.load(tmp_path / "s.boxes")
    np.testing.assert_array_equal(loaded.rows_for(idx.keys, idx.sizes), np.arange(len(idx)))
    assert loaded._key_to_row is None
    rev = BoxStore.from_arrays(list(idx.keys)[::-1], np.asarray(idx.sizes)[::-1], [np.zeros((0, 4))] * len(idx))
    np.testing.assert_array_equal(rev.rows_for(idx.keys, idx.sizes), np.arange(len(idx))[::-1])


def test_loader_maps_the_index_and_the_gt_store(tmp_path, cache, monkeypatch):
    from dali_objcrop import index as index_mod
    from dali_objcrop.loader import ObjCropLoader
    ann = _set(tmp_path)
    kw = dict(boxes="gt", batch_size=2, size=32, device="cpu", num_threads=1, drop_last=False)
    first = ObjCropLoader(str(ann), **kw)
    monkeypatch.setattr(index_mod, "build_index", lambda *a, **k: pytest.fail("built again"))
    monkeypatch.setattr(BoxStore, "from_coco", classmethod(lambda *a, **k: pytest.fail("json parsed again")))
    ld = ObjCropLoader(str(ann), **kw)
    assert isinstance(ld.index, MappedIndex) and set(ld.stats["bad_images"]) == set(first.stats["bad_images"])
    batch = next(iter(ld))
    assert batch["view1"].shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(ld.store_rows, first.store_rows)


def test_index_command_builds_then_maps(tmp_path):
    ann = _set(tmp_path)
    env = dict(os.environ, DALI_OBJCROP_HOME=str(tmp_path / "home"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = lambda: subprocess.run([sys.executable, "-m", "dali_objcrop", "index", str(ann)], capture_output=True,
                                 text=True, env=env, timeout=120)
    r1, r2 = run(), run()
    assert r1.returncode == 0 and "built in" in r1.stdout and "images/s" in r1.stdout, r1.stderr
    assert "read json" in r1.stderr and "rejected: trunc.jpg" in r1.stderr
    assert r2.returncode == 0 and "already built" in r2.stdout, r2.stdout


def test_paths_as_utf8_arrays_equal_the_paths(tmp_path, cache):
    ann = _set(tmp_path)
    idx = open_index(ann)
    u = idx.paths.utf8()
    assert len(u) == len(idx) and [bytes(u[i]).decode() for i in range(len(u))] == list(idx.paths)
    assert [bytes(x).decode() for x in (u[-1],)] == [idx.paths[-1]]
    from dali_objcrop.index import Utf8Paths
    assert bytes(Utf8Paths("/r", ["/abs/x.jpg", "a/b.jpg"])[0]) == b"/abs/x.jpg"


def test_mean_area_in_blocks_equals_the_exact_mean(monkeypatch):
    from dali_objcrop import boxstore
    rng = np.random.default_rng(0)
    n = 500
    boxes = []
    for i in range(n):
        k = int(rng.integers(0, 15))
        xy = rng.uniform(0, 0.5, (k, 2))
        boxes.append(np.concatenate([xy, xy + rng.uniform(0.05, 0.5, (k, 2))], axis=1))
    store = BoxStore.from_arrays([f"{i}.jpg" for i in range(n)], np.full((n, 2), 500), boxes)
    exact = [store.mean_area_fraction(k) for k in (None, 3)]
    monkeypatch.setattr(boxstore, "_EXACT_MEAN_MAX", 10)
    monkeypatch.setattr(boxstore, "_MEAN_ROWS", 37)
    np.testing.assert_allclose([store.mean_area_fraction(k) for k in (None, 3)], exact, rtol=1e-12)


def test_large_json_builds_in_a_child_process_with_the_same_result_and_errors(tmp_path, cache, monkeypatch):
    from dali_objcrop import index as index_mod
    monkeypatch.setattr(index_mod, "_SUBPROCESS_FROM", 0)
    monkeypatch.setattr(index_mod, "build_index", lambda *a, **k: pytest.fail("built in this process"))
    ann = _set(tmp_path)
    idx = open_index(ann)
    _same(idx, ImageIndex.from_coco(ann))
    _same_store(gt_store(ann, idx), _old_gt(ann))
    p = tmp_path / "bad.json"
    p.write_text(BAD["unknown image"])
    with pytest.raises(CocoFormatError) as ref:
        load_coco(p)
    with pytest.raises(CocoFormatError) as e:
        open_index(p)
    assert str(e.value) == str(ref.value)


def test_unwritable_cache_builds_in_memory_with_one_warning(tmp_path, monkeypatch):
    from dali_objcrop.index import IndexNotCachedWarning
    ann = _set(tmp_path)
    (tmp_path / "home").write_text("a file where the cache folder should be")
    monkeypatch.setenv("DALI_OBJCROP_HOME", str(tmp_path / "home"))
    with pytest.warns(IndexNotCachedWarning, match="building it in memory"):
        idx = open_index(ann)
    _same(idx, ImageIndex.from_coco(ann))
