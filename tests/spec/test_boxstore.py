"""Box store: round trip, validation counts, lookups, mismatch errors, atomic saves."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dali_objcrop.boxstore import BoxStore, BoxStoreMismatchError, fingerprint, validate_boxes


def small_store(method: str = "arrays") -> BoxStore:
    keys = ["a.jpg", "sub/b.jpg", "c.png", "d.jpg"]
    sizes = np.array([[640, 480], [300, 200], [100, 100], [50, 60]])
    boxes = [
        np.array([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.4, 0.9]]),
        np.array([[-0.2, 0.0, 0.5, 1.3]]),                       # clipped
        np.zeros((0, 4)),                                         # no boxes
        np.array([[np.nan, 0, 1, 1], [0.5, 0.5, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]]),  # NaN, degenerate, ok
    ]
    scores = [np.array([0.9, 0.8]), np.array([0.7]), np.zeros(0), np.array([0.3, 0.2, 0.1])]
    return BoxStore.from_arrays(keys, sizes, boxes, scores, method=method, params={"k": 1})


def test_validation_counts_and_clipping():
    s = small_store()
    v = s.meta["validation"]
    assert v == {"total": 6, "kept": 4, "clipped": 1, "dropped_nonfinite": 1, "dropped_degenerate": 1}
    np.testing.assert_allclose(s.boxes_of(1), [[0.0, 0.0, 0.5, 1.0]])
    assert len(s.boxes_of(2)) == 0 and s.meta["images_without_boxes"] == 1
    np.testing.assert_allclose(s.boxes_of(3), [[0, 0, 1, 1]])
    np.testing.assert_allclose(s.scores, [0.9, 0.8, 0.7, 0.1])
    assert "1 clipped" in s.summary()


def test_validate_boxes_min_pixels():
    keep, clipped, rep = validate_boxes(np.array([[0, 0, 0.001, 0.5], [0, 0, 0.5, 0.5]]),
                                        sizes=np.array([[640, 480], [640, 480]]))
    assert keep.tolist() == [False, True] and rep.dropped_degenerate == 1


def test_round_trip_memory_mapped(tmp_path):
    s = small_store()
    path = s.save(tmp_path / "props.boxes")
    assert [p.name for p in tmp_path.iterdir()] == ["props.boxes"]   # no temporary left behind
    t = BoxStore.load(path)
    assert isinstance(t.boxes, np.memmap)
    assert list(t.keys) == list(s.keys) and t.keys[1] == "sub/b.jpg" and t.keys[-1] == "d.jpg"
    for name in ("sizes", "offsets", "boxes", "scores"):
        np.testing.assert_array_equal(np.asarray(getattr(t, name)), np.asarray(getattr(s, name)))
    assert t.meta["method"] == "arrays" and t.meta["params"] == {"k": 1}
    assert t.fingerprint == fingerprint(list(s.keys))
    assert t.row_of("c.png") == 2
    with pytest.raises(KeyError, match="zzz"):
        t.row_of("zzz.jpg")
    np.testing.assert_array_equal(t.boxes_of(0), s.boxes_of(0))


def test_empty_store_round_trip(tmp_path):
    s = BoxStore.from_arrays(["x.jpg"], [[10, 10]], [np.zeros((0, 4))])
    t = BoxStore.load(s.save(tmp_path / "e.boxes"))
    assert len(t) == 1 and t.num_boxes == 0 and t.scores is None
    with pytest.raises(ValueError, match="no boxes"):
        t.mean_area_fraction()


def test_failed_save_leaves_old_file(tmp_path, monkeypatch):
    path = small_store("first").save(tmp_path / "p.boxes")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        small_store("second").save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.boxes"]


def test_load_rejects_other_files(tmp_path):
    p = tmp_path / "x.boxes"
    p.write_bytes(b"not a store at all")
    with pytest.raises(ValueError, match="not a dali_objcrop box store"):
        BoxStore.load(p)


def test_gather_matches_rows_and_top_k():
    s = small_store()
    rows = np.array([3, 0, 2, 0])
    b, off = s.gather(rows)
    for j, r in enumerate(rows):
        np.testing.assert_array_equal(b[off[j]:off[j + 1]], s.boxes_of(r))
    b, off = s.gather(rows, top_k=1)
    assert np.diff(off).tolist() == [1, 1, 0, 1]


def test_mean_area_fraction():
    s = small_store()
    areas = [(0.4 * 0.4), (0.2 * 0.6), 0.5 * 1.0, 1.0]
    assert s.mean_area_fraction() == pytest.approx(np.mean(areas), rel=1e-5)
    assert s.mean_area_fraction(top_k=1) == pytest.approx(np.mean([0.16, 0.5, 1.0]), rel=1e-5)


def test_top_k_at_build_keeps_best_first():
    s = BoxStore.from_arrays(["a"], [[100, 100]], [np.array([[0, 0, .5, .5], [0, 0, .2, .2], [0, 0, .9, .9]])],
                             top_k=2)
    np.testing.assert_allclose(s.boxes_of(0), [[0, 0, .5, .5], [0, 0, .2, .2]])


def test_mismatch_errors_name_the_problem():
    s = small_store()
    rows = s.rows_for(["d.jpg", "a.jpg"])
    assert rows.tolist() == [3, 0]
    with pytest.raises(BoxStoreMismatchError, match=r"1 of 2 dataset images are not in the box store.*new\.jpg"):
        s.rows_for(["a.jpg", "new.jpg"])
    with pytest.raises(BoxStoreMismatchError, match="another image list"):
        s.rows_for(["a.jpg"], strict=True)
    with pytest.raises(BoxStoreMismatchError, match=r"a\.jpg: store \(640, 480\), dataset \(641, 480\)"):
        s.rows_for(["a.jpg"], sizes=[[641, 480]])
    s.rows_for(list(s.keys), sizes=s.sizes, strict=True)


def test_from_arrays_rejects_inconsistent_input():
    with pytest.raises(ValueError, match="differ in length"):
        BoxStore.from_arrays(["a", "b"], [[1, 1]], [np.zeros((0, 4))])
    with pytest.raises(ValueError, match="unique"):
        BoxStore.from_arrays(["a", "a"], [[1, 1], [1, 1]], [np.zeros((0, 4))] * 2)


def test_from_coco_ground_truth(synth_set):
    coco = json.loads(synth_set.read_text())
    s = BoxStore.from_coco(synth_set)
    assert len(s) == len(coco["images"]) and s.meta["method"] == "gt"
    assert s.num_boxes + s.meta["validation"]["dropped_degenerate"] == len(coco["annotations"])
    # largest first, normalised
    for i in range(len(s)):
        b = np.asarray(s.boxes_of(i), np.float64)
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        assert (np.diff(area) <= 1e-7).all() and (b >= 0).all() and (b <= 1).all()
    im = coco["images"][0]
    a = max((a for a in coco["annotations"] if a["image_id"] == im["id"]), key=lambda a: a["area"])
    x, y, w, h = a["bbox"]
    np.testing.assert_allclose(s.boxes_of(0)[0], [x / im["width"], y / im["height"], (x + w) / im["width"],
                                                  (y + h) / im["height"]], rtol=1e-5)
