"""Our BING against OpenCV's, piece by piece and end to end; the shipped model; BING training.

Agreement metric (ours vs cv2.saliency.ObjectnessBING, same model files, same input):
``exact`` = fraction of images whose complete best-first box lists are identical (same boxes,
same order); ``top100`` = mean over images of |ours[:100] & opencv[:100]| / 100 (box sets);
``final10`` = the same for the 10 boxes kept after NMS 0.5 (what the store holds).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dali_objcrop.dataset import load_coco
from dali_objcrop.proposals import bing as B
from dali_objcrop.proposals.bing_cv import OpenCVBing
from dali_objcrop.proposals.common import load_for_proposals, nms_top_k, to_normalised
from dali_objcrop.proposals.evaluate import gt_boxes_normalised, random_boxes_recall, recall_table
from dali_objcrop.proposals.methods import default_model_dir
from conftest import skip_without_shared

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
COCO = SHARED / "data" / "coco_val2017_subset"
OPENCV_MODEL = SHARED / "models" / "bing"
SHIPPED = default_model_dir()


def agreement(ref: list[np.ndarray], ours: list[np.ndarray]) -> dict:
    """The three agreement figures described in the module docstring."""
    exact = np.mean([a.shape == b.shape and bool((a == b).all()) for a, b in zip(ref, ours)])
    top = lambda a, n: set(map(tuple, a[:n].tolist()))  # noqa: E731
    top100 = np.mean([len(top(a, 100) & top(b, 100)) / max(1, len(top(a, 100))) for a, b in zip(ref, ours)])
    fin = lambda a: set(map(tuple, a[nms_top_k(a, 0.5, 10)].tolist()))  # noqa: E731
    final10 = np.mean([len(fin(a) & fin(b)) / max(1, len(fin(a))) for a, b in zip(ref, ours)])
    return {"exact": float(exact), "top100": float(top100), "final10": float(final10)}


def _coco_images(n: int, start: int = 0) -> list[np.ndarray]:
    skip_without_shared(COCO)
    files = sorted((COCO / "images").glob("*.jpg"))[start:start + n]
    return [load_for_proposals(f) for f in files]


def _greedy_reference(score: np.ndarray, max_points: int) -> np.ndarray:
    """OpenCV's nonMaxSup, literally (sort everything, suppress 5 x 5 neighbourhoods)."""
    h, w = score.shape
    flat = score.reshape(-1)
    order = np.lexsort((-np.arange(flat.size), -flat))
    free = np.ones((h, w), bool)
    out = []
    for i in order:
        y, x = divmod(int(i), w)
        if free[y, x]:
            out.append(i)
            free[max(0, y - 2):y + 3, max(0, x - 2):x + 3] = False
        if len(out) >= max_points:
            break
    return np.array(out, np.int64)


def test_nms_rounds_equals_greedy_with_ties():
    rng = np.random.default_rng(0)
    for t in range(150):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        score = rng.integers(0, 5, (h, w)).astype(np.float32)  # many ties
        k = int(rng.integers(1, 60))
        for first_k in (1, 7, 4096):
            np.testing.assert_array_equal(B.nms_rounds(score, k, first_k=first_k), _greedy_reference(score, k))


def test_fast_gradient_equals_reference():
    rng = np.random.default_rng(1)
    for h, w in [(8, 8), (8, 43), (21, 8), (170, 256), (9, 300)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img[:, : w // 3] = 0  # saturated, flat and wrapped (>= 128 differences) regions
        img[:, w // 3: w // 2] = 255
        ref = B.normed_gradient(img, reference=True)
        np.testing.assert_array_equal(B.normed_gradient(img), ref)
        # the doubling of border differences must not wrap around in uint8
        assert ref[:, 0].max() <= 255 and ref.dtype == np.uint8


def test_stage1_is_the_binarised_filter_exactly():
    m = B.BingModel.load(SHIPPED)
    det = B.Bing(m)
    mag = np.random.default_rng(2).integers(0, 256, (20, 23), dtype=np.uint8)
    coeffs, signs = B.binarize_filter(m.filter)
    q = (mag >> 4).astype(np.int64)
    ref = np.zeros((13, 16), np.float32)
    for y in range(13):
        for x in range(16):
            s0, s1 = (int((sg * q[y:y + 8, x:x + 8]).sum()) for sg in signs)
            ref[y, x] = np.float32(coeffs[0]) * np.float32(s0) + np.float32(coeffs[1]) * np.float32(s1)
    np.testing.assert_array_equal(det.stage1(mag), ref)


@pytest.mark.parametrize("model", ["opencv", "shipped"])
def test_ours_returns_opencvs_boxes_on_real_photos(model):
    """Same model files, same 12 COCO photos: identical box lists (and real, sorted scores)."""
    mdir = OPENCV_MODEL if model == "opencv" else SHIPPED
    skip_without_shared(mdir)
    imgs = _coco_images(12, start=600)
    cvb, ours, fast = OpenCVBing(mdir), B.Bing.load(mdir), B.Bing.load(mdir, nms_rounds=5)
    ref, got, got_fast = [], [], []
    for img in imgs:
        ref.append(cvb(img))
        b, s = ours(img)
        assert (np.diff(s) <= 0).all() and np.isfinite(s).all()
        got.append(b)
        got_fast.append(fast(img)[0])
    a = agreement(ref, got)
    assert a["exact"] >= 11 / 12 and a["top100"] >= 0.99 and a["final10"] >= 0.99, a
    f = agreement(ref, got_fast)
    assert f["top100"] >= 0.98 and f["final10"] >= 0.98, f


def test_ours_returns_opencvs_boxes_on_synthetic_scenes(synth_set):
    """The same without ../shared (CI): the shipped model on synthetic scenes of odd sizes,
    including images under 224 px; and the driver's default (5 NMS rounds) stays close."""
    coco = load_coco(synth_set)
    imgs = [load_for_proposals(synth_set.parent / "images" / im["file_name"]) for im in coco.images[:12]]
    cvb, ours, fast = OpenCVBing(SHIPPED), B.Bing.load(SHIPPED), B.Bing.load(SHIPPED, nms_rounds=5)
    ref = [cvb(i) for i in imgs]
    a = agreement(ref, [ours(i)[0] for i in imgs])
    assert a["exact"] >= 11 / 12 and a["top100"] >= 0.99, a
    f = agreement(ref, [fast(i)[0] for i in imgs])
    assert f["final10"] >= 0.9, f


def test_shipped_model_loads_in_opencv_and_beats_random_boxes(coco_ann):
    """OpenCV's own BING with the shipped model, on 60 held-out COCO photos (never trained on)."""
    coco = load_coco(coco_ann)
    test = coco.images[1140:1200]
    gt = gt_boxes_normalised(coco)
    cvb = OpenCVBing(SHIPPED)
    props = {}
    for im in test:
        img = load_for_proposals(COCO / "images" / im["file_name"], (im["width"], im["height"]))
        b = cvb(img)
        props[im["file_name"]] = to_normalised(b[nms_top_k(b, 0.5, 10)], img.shape[1], img.shape[0])
    sub = {im["file_name"]: gt[im["file_name"]] for im in test}
    ours = recall_table(props, sub)
    rand = np.mean([random_boxes_recall_subset(sub, seed)["recall@10_iou0.5"] for seed in range(3)])
    assert ours["recall@10_iou0.5"] >= 2 * rand and ours["recall@10_iou0.5"] > 0.05, (ours, rand)


def random_boxes_recall_subset(gt: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    props = {}
    for key in gt:
        xy = np.sort(rng.uniform(0, 1, size=(10, 2, 2)), axis=1)
        props[key] = np.stack([xy[:, 0, 0], xy[:, 0, 1], xy[:, 1, 0], xy[:, 1, 1]], 1)
    return recall_table(props, gt)


def test_training_writes_a_model_opencv_loads_and_that_beats_random(synth_set, tmp_path):
    """train-bing end to end on 24 synthetic scenes (small min_size_count): the files load in
    cv2.saliency.ObjectnessBING, our BING gives the same boxes with them, and recall beats
    random boxes on the training scenes."""
    from dali_objcrop.proposals.train_bing import TrainConfig, train_bing
    out = tmp_path / "model"
    model = train_bing(synth_set, None, out, TrainConfig(min_size_count=5, negatives_per_image=60), log=lambda s: None)
    assert sorted(p.name for p in out.glob("*.yml.gz")) == [
        "ObjNessB2W8MAXBGR.idx.yml.gz", "ObjNessB2W8MAXBGR.wS1.yml.gz", "ObjNessB2W8MAXBGR.wS2.yml.gz"]
    back = B.BingModel.load(out)
    np.testing.assert_array_equal(back.filter, model.filter)
    np.testing.assert_array_equal(back.size_idx, model.size_idx)
    np.testing.assert_array_equal(back.calib, model.calib)
    coco = load_coco(synth_set)
    gt = gt_boxes_normalised(coco)
    cvb, ours = OpenCVBing(out), B.Bing(model)
    props, ref, got = {}, [], []
    for im in coco.images:
        img = load_for_proposals(synth_set.parent / "images" / im["file_name"])
        b = cvb(img)
        ref.append(b)
        got.append(ours(img)[0])
        props[im["file_name"]] = to_normalised(b[nms_top_k(b, 0.5, 10)], img.shape[1], img.shape[0])
    assert agreement(ref, got)["top100"] >= 0.99
    r = recall_table(props, gt)["recall@10_iou0.5"]
    rand = random_boxes_recall(synth_set, k=10, seed=0)["recall@10_iou0.5"]
    assert r > 1.5 * rand, (r, rand)


def test_model_validation():
    with pytest.raises(ValueError, match="color"):
        B.BingModel("RGB", np.zeros((8, 8)), [0, 1], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="calibration"):
        B.BingModel("MAXBGR", np.zeros((8, 8)), [0, 1, 2], np.zeros((2, 2)))
    with pytest.raises(FileNotFoundError):
        B.BingModel.load("/nonexistent")
    with pytest.raises(ValueError, match="nms_rounds"):
        B.Bing.load(SHIPPED, nms_rounds=0)


@pytest.mark.parametrize("top_k,nms_iou,first_c", [(10, 0.5, 64), (10, 0.5, 2), (1, 0.5, 64), (50, 0.7, 8),
                                                   (30, 1.0, 16), (5, 0.3, 64)])
def test_lazy_top_k_equals_nms_of_the_full_list(synth_set, top_k, nms_iou, first_c):
    """Bing.top (what the driver runs) == greedy NMS over the complete list, boxes and
    scores, including tiny candidate budgets that force the lazy extension and no NMS."""
    coco = load_coco(synth_set)
    det = B.Bing.load(SHIPPED)
    for im in coco.images[:8]:
        img = load_for_proposals(synth_set.parent / "images" / im["file_name"])
        boxes, scores = det(img)
        keep = nms_top_k(boxes, nms_iou, top_k)
        tb, ts = det.top(img, top_k, nms_iou, first_c=first_c)
        np.testing.assert_array_equal(tb, boxes[keep])
        np.testing.assert_array_equal(ts, scores[keep])


def test_lazy_top_k_equals_opencv_on_real_photos():
    skip_without_shared(OPENCV_MODEL)
    imgs = _coco_images(15, start=900)
    cvb, det = OpenCVBing(OPENCV_MODEL), B.Bing.load(OPENCV_MODEL)
    for img in imgs:
        a = cvb(img)
        np.testing.assert_array_equal(det.top(img, 10, 0.5)[0], a[nms_top_k(a, 0.5, 10)])


@pytest.mark.parametrize("color", ["HSV", "I"])
def test_other_colour_models_match_opencv(color):
    """OpenCV's HSV and intensity models (their own gradient definitions) on 3 photos."""
    skip_without_shared(OPENCV_MODEL / f"ObjNessB2W8{color}.wS1.yml.gz")
    imgs = _coco_images(3, start=50)
    cvb, ours = OpenCVBing(OPENCV_MODEL, color), B.Bing.load(OPENCV_MODEL, color)
    a = agreement([cvb(i) for i in imgs], [ours(i)[0] for i in imgs])
    assert a["exact"] == 1.0, a
