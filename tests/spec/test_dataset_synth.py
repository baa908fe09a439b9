"""Image index, header checks and the synthetic set (incl. DALI's COCO reader reading it)."""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from dali_objcrop.dataset import ImageIndex, scan_image
from dali_objcrop.synth import make_scene, make_synthetic


def test_synthetic_set_is_deterministic_and_varied(tmp_path, synth_set):
    coco = json.loads(synth_set.read_text())
    again = make_synthetic(tmp_path / "again", n=24, seed=0)
    assert json.loads(again.read_text()) == coco
    for im in coco["images"][:5]:
        assert (synth_set.parent / "images" / im["file_name"]).read_bytes() == \
            (again.parent / "images" / im["file_name"]).read_bytes()
    other = make_scene(1, 0)[0]
    assert other.shape != make_scene(0, 0)[0].shape or (other != make_scene(0, 0)[0]).any()
    sizes = np.array([[im["width"], im["height"]] for im in coco["images"]])
    assert (sizes < 224).any(axis=1).any(), "some images must be smaller than a 224 crop"
    assert ((sizes % 8) != 0).any()
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=len(sizes) + 1)[1:]
    assert per_image.mean() >= 3
    for a in coco["annotations"]:
        im = coco["images"][a["image_id"] - 1]
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= im["width"] + 1e-6 and y + h <= im["height"] + 1e-6
        assert 1 <= a["category_id"] <= len(coco["categories"])
    # real JPEG files with the annotated sizes
    im = coco["images"][3]
    img = cv2.imread(str(synth_set.parent / "images" / im["file_name"]))
    assert img.shape == (im["height"], im["width"], 3)


def test_synthetic_set_readable_by_dali_coco_reader(synth_set):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    coco = json.loads(synth_set.read_text())

    @pipeline_def(batch_size=8, num_threads=2, device_id=None, seed=0)
    def pipe():
        jpegs, boxes, labels = fn.readers.coco(file_root=str(synth_set.parent / "images"),
                                               annotations_file=str(synth_set), ltrb=True, ratio=True,
                                               random_shuffle=False, name="r")
        return fn.decoders.image(jpegs, device="cpu"), boxes, labels

    p = pipe()
    p.build()
    images, boxes, labels = p.run()
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for i in range(8):
        im = coco["images"][i]
        assert images.at(i).shape == (im["height"], im["width"], 3)
        b = np.asarray(boxes.at(i))
        assert len(b) == len(by_image[im["id"]]) and ((b >= 0) & (b <= 1)).all()


def test_scan_image_statuses(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    good = tmp_path / "good.jpg"
    cv2.imwrite(str(good), img)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image" * 10)
    (tmp_path / "trunc.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    cv2.imwrite(str(tmp_path / "gray.png"), img[..., 0])
    assert scan_image(good) == ("ok", (50, 40), "JPEG")
    assert scan_image(tmp_path / "empty.jpg")[0] == "empty"
    assert scan_image(tmp_path / "junk.jpg")[0] == "unreadable"
    assert scan_image(tmp_path / "trunc.jpg")[0] == "truncated"
    assert scan_image(tmp_path / "gray.png") == ("ok", (50, 40), "PNG")
    assert scan_image(tmp_path / "nope.jpg")[0] == "missing"
    idx = ImageIndex.from_folder(tmp_path)
    assert idx.keys == ["good.jpg", "gray.png"]
    assert idx.bad == {"empty.jpg": "empty", "junk.jpg": "unreadable", "trunc.jpg": "truncated"}
    assert idx.sizes.tolist() == [[50, 40], [50, 40]]


def test_index_from_coco_checks_sizes(synth_set, tmp_path):
    idx = ImageIndex.from_coco(synth_set, synth_set.parent / "images")
    assert len(idx) == 24 and not idx.bad
    coco = json.loads(synth_set.read_text())
    coco["images"][0]["width"] += 1
    bad = tmp_path / "ann.json"
    bad.write_text(json.dumps(coco))
    idx = ImageIndex.from_coco(bad, synth_set.parent / "images")
    assert len(idx) == 23 and "differs from annotation" in idx.bad[coco["images"][0]["file_name"]]
    with pytest.raises(FileNotFoundError):
        ImageIndex.from_folder(tmp_path / "nothing")


def test_synth_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dali_objcrop", "synth", "--out", str(tmp_path / "s"), "-n", "5",
                          "--seed", "3"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "images/s" in out.stdout
    assert len(list((tmp_path / "s" / "images").glob("*.jpg"))) == 5
    assert json.loads((tmp_path / "s" / "annotations.json").read_text())["info"]["seed"] == 3
