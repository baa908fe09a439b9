"""ObjCropLoader on bad input: every case is skipped-and-reported or raised with the file's name."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from dali_objcrop.constants import IMAGENET_MEAN, IMAGENET_STD
from dali_objcrop.loader import ObjCropLoader


def _jpeg(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", **kw)
    return b.getvalue()


def _photo(w: int, h: int, seed: int) -> Image.Image:
    a = np.random.default_rng(seed).integers(0, 255, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
    return Image.fromarray(cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR))


def make_set(root: Path, extra: dict[str, tuple[bytes, tuple[int, int], list]], n_good: int = 6) -> Path:
    """``n_good`` plain JPEGs with a box each, plus ``extra``: name -> (file bytes, (w, h), [xywh boxes])."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    files = {f"good{i}.jpg": (_jpeg(_photo(96, 80, i)), (96, 80), [(10, 10, 40, 30)]) for i in range(n_good)}
    files.update(extra)
    ims, anns = [], []
    for i, (name, (data, (w, h), boxes)) in enumerate(files.items()):
        (root / "images" / name).write_bytes(data)
        ims.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for b in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "bbox": list(b), "area": 1.0})
    ann = root / "annotations.json"
    ann.write_text(json.dumps({"images": ims, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    return ann


def run_all(ann, **kw) -> tuple[ObjCropLoader, list[dict]]:
    args = dict(boxes="gt", mode="obj-obj-dilate", batch_size=2, size=32, device="cpu", num_threads=1,
                drop_last=False)
    args.update(kw)
    ld = ObjCropLoader(str(ann), **args)
    return ld, list(ld)


def good_bytes() -> bytes:
    return _jpeg(_photo(96, 80, 99))


CASES_AT_INDEX = {
    "empty.jpg": (b"", (96, 80), [(1, 1, 5, 5)]),
    "noise.jpg": (np.random.default_rng(1).integers(0, 255, 5000).astype(np.uint8).tobytes(), (96, 80), []),
    "truncated.jpg": (good_bytes()[:400], (96, 80), []),
}


@pytest.mark.parametrize("name", sorted(CASES_AT_INDEX))
def test_unreadable_files_are_skipped_and_reported(tmp_path, name):
    ann = make_set(tmp_path, {name: CASES_AT_INDEX[name]})
    ld, batches = run_all(ann)
    assert name in ld.stats["bad_images"] and ld.stats["skipped"] == 1
    assert sum(len(b["index"]) for b in batches) == 6
    assert all(ld.key_of(i) != name for b in batches for i in b["index"])


@pytest.mark.parametrize("name", sorted(CASES_AT_INDEX))
def test_unreadable_files_raise_with_their_name(tmp_path, name):
    ann = make_set(tmp_path, {name: CASES_AT_INDEX[name]})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        ObjCropLoader(str(ann), boxes="gt", batch_size=2, device="cpu", on_bad_image="raise")


def test_odd_but_valid_images_load(tmp_path):
    """CMYK and grayscale JPEGs, PNG (RGB and RGBA), a tiny image, no boxes, out-of-range boxes."""
    cmyk = _jpeg(_photo(64, 48, 1).convert("CMYK"))
    gray = _jpeg(_photo(70, 50, 2).convert("L"))
    png, rgba = io.BytesIO(), io.BytesIO()
    _photo(90, 60, 3).save(png, "PNG")
    _photo(50, 40, 4).convert("RGBA").save(rgba, "PNG")
    extra = {
        "cmyk.jpg": (cmyk, (64, 48), [(5, 5, 20, 20)]),
        "gray.jpg": (gray, (70, 50), [(0, 0, 30, 30)]),
        "rgb.png": (png.getvalue(), (90, 60), [(10, 10, 10, 10)]),
        "rgba.png": (rgba.getvalue(), (50, 40), [(3, 3, 10, 10)]),
        "tiny.jpg": (_jpeg(_photo(9, 7, 5)), (9, 7), [(1, 1, 3, 3)]),
        "nobox.jpg": (_jpeg(_photo(96, 80, 6)), (96, 80), []),
        "outside.jpg": (_jpeg(_photo(96, 80, 7)), (96, 80), [(-50, -20, 500, 400), (90, 70, 40, 40)]),
    }
    ann = make_set(tmp_path, extra)
    for mode in ("obj-obj-dilate", "obj-obj-shift", "scene-scene"):
        ld, batches = run_all(ann, mode=mode)
        seen = torch.cat([b["index"] for b in batches]).tolist()
        assert sorted(seen) == list(range(len(ld.index))) and ld.stats["skipped"] == 0
        for b in batches:
            assert b["view1"].shape[1:] == (3, 32, 32) and torch.isfinite(b["view1"]).all()
        assert ld.stats["images_without_boxes"] == 1
        assert ld.stats["fallback"] == (0 if mode == "scene-scene" else 1)
        cw = ld.windows_for(np.arange(len(ld.index)), 0)
        sizes = ld.index.sizes
        assert (cw.windows[..., :2] >= 0).all()
        assert (cw.windows[..., 2] <= sizes[:, None, 0]).all() and (cw.windows[..., 3] <= sizes[:, None, 1]).all()


def test_grayscale_jpeg_gives_equal_channels(tmp_path):
    from dali_objcrop.augment import Recipe, ViewAug
    ann = make_set(tmp_path, {"gray.jpg": (_jpeg(_photo(70, 50, 2).convert("L")), (70, 50), [(0, 0, 30, 30)])},
                   n_good=1)
    none = Recipe("none", (ViewAug(jitter_p=0, gray_p=0, blur_p=0),) * 2)
    ld, batches = run_all(ann, recipe=none, shuffle=False)
    b = batches[0]
    row = int((b["index"] == 1).nonzero()[0])
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    px = b["view1"][row] * std + mean
    assert (px[0] - px[1]).abs().max() < 0.01 and (px[1] - px[2]).abs().max() < 0.01


def _undecodable() -> dict:
    """Files that pass the header scan but that DALI cannot decode."""
    d = good_bytes()
    gif = io.BytesIO()
    _photo(96, 80, 8).save(gif, "GIF")
    return {"noscan.jpg": (d[:d.find(b"\xff\xda")] + b"\xff\xd9", (96, 80), [(5, 5, 30, 30)]),
            "gif.jpg": (gif.getvalue(), (96, 80), [(5, 5, 30, 30)])}


def test_decoder_failures_are_skipped_named_and_batches_kept(tmp_path):
    ann = make_set(tmp_path, _undecodable())
    ld, batches = run_all(ann)
    assert set(ld.stats["decode_failures"]) == {"noscan.jpg", "gif.jpg"}
    assert len(batches) == len(ld) == 4, "equal batch counts: culprits are replaced, not dropped"
    assert all(len(b["index"]) == 2 for b in batches)
    assert all(ld.key_of(i) not in ("noscan.jpg", "gif.jpg") for b in batches for i in b["index"])
    again = list(ld)                                # next epoch: excluded up front, no failure
    assert len(again) == 4 and ld.stats["skipped"] == 2


def test_decoder_failures_raise_with_the_file_name(tmp_path):
    ann = make_set(tmp_path, {"gif.jpg": _undecodable()["gif.jpg"]})
    ld = ObjCropLoader(str(ann), boxes="gt", batch_size=7, size=32, device="cpu", on_bad_image="raise",
                       drop_last=False)
    with pytest.raises(RuntimeError, match=r"gif\.jpg"):
        list(ld)


def test_file_deleted_after_indexing_is_named(tmp_path):
    ann = make_set(tmp_path, {})
    ld = ObjCropLoader(str(ann), boxes="gt", batch_size=6, size=32, device="cpu", on_bad_image="raise")
    os.remove(tmp_path / "images" / "good3.jpg")
    with pytest.raises(RuntimeError, match=r"good3\.jpg"):
        list(ld)


def test_box_store_of_other_images_is_refused(tmp_path):
    from dali_objcrop.boxstore import BoxStore, BoxStoreMismatchError
    ann = make_set(tmp_path, {})
    other = BoxStore.from_arrays(["x.jpg"], np.array([[10, 10]]), [np.array([[0, 0, 1, 1]])])
    with pytest.raises(BoxStoreMismatchError, match="good"):
        ObjCropLoader(str(ann), boxes=other, batch_size=2, device="cpu")
