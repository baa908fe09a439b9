"""Proposals: output format and coordinate convention, NMS, the resumable driver (interrupted +
resumed == uninterrupted, also after a real SIGKILL), corrupt images, recall evaluation,
fetch-model against a local HTTP server."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from dali_objcrop.boxstore import BoxStore
from dali_objcrop.proposals.common import box_iou, load_for_proposals, nms_top_k
from dali_objcrop.proposals.methods import default_model_dir, make_detector, propose_image
from dali_objcrop.proposals.run import ProposalJob, load_index, run_proposals

REPO = Path(__file__).resolve().parents[2]
BING_SHARED = REPO.parent / "shared" / "models" / "bing"
SHIPPED = default_model_dir()


def _stores_equal(a: BoxStore, b: BoxStore) -> None:
    assert list(a.keys) == list(b.keys)
    np.testing.assert_array_equal(a.sizes, b.sizes)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    if a.scores is None:
        assert b.scores is None
    else:
        np.testing.assert_array_equal(a.scores, b.scores)
    assert a.meta == b.meta


# ---- convention ---------------------------------------------------------------------------
def test_opencv_boxes_are_converted_to_0_based_exclusive():
    """Hand-checked: on a 128 x 96 image OpenCV's BING windows are 2^k wide (k >= 4) unless
    cut by the image edge, and start at multiples of width / 8.  After our conversion every
    box must obey exactly that in 0-based exclusive pixels (an off-by-one would give widths
    of 15/17 or starts at 1 + multiples), the whole-image box must be [0, 0, 128, 96], and
    it is stored as exactly [0, 0, 1, 1]."""
    from dali_objcrop.proposals.bing_cv import OpenCVBing
    img = np.zeros((96, 128, 3), np.uint8)
    img[20:60, 40:100] = 200
    boxes = OpenCVBing(SHIPPED)(img)
    assert boxes.dtype == np.int32 and boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 50
    x1, y1, x2, y2 = boxes.T
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 128).all() and (y2 <= 96).all()
    assert ((x2 > x1) & (y2 > y1)).all()
    w, h = x2 - x1, y2 - y1
    pow2 = lambda v: (v >= 16) & ((v & (v - 1)) == 0)  # noqa: E731
    assert (pow2(w) | (x2 == 128) | (w == 128)).all(), np.unique(w)
    assert (pow2(h) | (y2 == 96) | (h == 96)).all(), np.unique(h)
    assert (x1 % np.maximum(np.minimum(w, 128) // 8, 1) == 0).all()
    assert [0, 0, 128, 96] in boxes.tolist()
    det = make_detector("bing-opencv", SHIPPED)
    nb, scores = propose_image(img, det, top_k=300, nms_iou=1.0)
    assert scores is None and nb.dtype == np.float32
    assert [0.0, 0.0, 1.0, 1.0] in nb.tolist()
    np.testing.assert_allclose(nb, boxes[:300] / np.array([128, 96, 128, 96], np.float32), rtol=0, atol=1e-7)


def test_hand_checked_square_is_found():
    """A white 128 px square at [64, 192)^2 on a black 256 x 256 image: the scores come
    best-first and one of the top 10 boxes after NMS covers the square (IoU >= 0.5)."""
    from dali_objcrop.proposals.bing import Bing
    img = np.zeros((256, 256, 3), np.uint8)
    img[64:192, 64:192] = 255
    b, s = Bing.load(SHIPPED)(img)
    assert (np.diff(s) <= 0).all()  # best-first, real scores
    top = b[nms_top_k(b, 0.5, 10)]
    assert np.all((top[:, 2:] > top[:, :2]))
    assert box_iou(np.array([[64, 64, 192, 192]]), top).max() >= 0.5


def test_load_for_proposals_reduced_decode(tmp_path):
    big = np.zeros((1536, 2048, 3), np.uint8)
    big[384:1152, 512:1536] = 255
    cv2.imwrite(str(tmp_path / "big.jpg"), big)
    small = load_for_proposals(tmp_path / "big.jpg", (2048, 1536))
    assert small.shape == (384, 512, 3) and small.dtype == np.uint8
    # the white block keeps its normalised position
    ys, xs = np.nonzero(small[..., 0] > 128)
    assert abs(xs.min() / 512 - 0.25) < 0.01 and abs((xs.max() + 1) / 512 - 0.75) < 0.01
    assert abs(ys.min() / 384 - 0.25) < 0.01 and abs((ys.max() + 1) / 384 - 0.75) < 0.01
    with pytest.raises(ValueError, match="uint8"):
        make_detector("bing", SHIPPED)(np.zeros((64, 64, 3), np.float32))


def test_nms_top_k():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [0, 0, 10, 8], [21, 21, 30, 30]], float)
    np.testing.assert_array_equal(nms_top_k(boxes, 0.5, 10), [0, 2])
    np.testing.assert_array_equal(nms_top_k(boxes, 0.5, 1), [0])
    np.testing.assert_array_equal(nms_top_k(boxes, 1.0, 3), [0, 1, 2])
    many = np.random.default_rng(0).uniform(0, 100, (1000, 2))
    many = np.concatenate([many, many + 5], 1)
    keep = nms_top_k(many, 0.3, 50, block=64)  # crosses blocks
    iou = box_iou(many[keep], many[keep])
    assert len(keep) == 50 and (iou[~np.eye(50, dtype=bool)] <= 0.3).all()
    with pytest.raises(ValueError):
        nms_top_k(boxes, 0.0, 10)


# ---- driver -------------------------------------------------------------------------------
def test_interrupted_and_resumed_equals_uninterrupted(synth_set, tmp_path):
    index = load_index(synth_set)
    job = ProposalJob(method="bing", top_k=10)
    full, rep = run_proposals(index, tmp_path / "full.boxes", job, chunk_size=4, progress=False)
    assert rep.computed == len(index) == len(full) and full.meta["num_failed"] == 0
    assert full.scores is not None and full.num_boxes > 5 * len(index)
    # stop after two chunks (a time-bounded run), then resume with another worker count
    part, rep1 = run_proposals(index, tmp_path / "res.boxes", job, chunk_size=4, progress=False, max_chunks=2)
    assert part is None and rep1.computed == 8
    assert len(list((tmp_path / "res.boxes.parts").glob("chunk_*.npz"))) == 2
    res, rep2 = run_proposals(index, tmp_path / "res.boxes", job, workers=2, chunk_size=4, progress=False)
    assert rep2.resumed == 8 and rep2.computed == len(index) - 8
    assert not (tmp_path / "res.boxes.parts").exists()
    _stores_equal(full, BoxStore.load(tmp_path / "res.boxes"))
    _stores_equal(full, BoxStore.load(tmp_path / "full.boxes"))
    # a finished store is normalised, best-first, at most top_k per image
    counts = np.diff(full.offsets)
    assert counts.max() <= 10
    for r in range(len(full)):
        s = full.scores[full.offsets[r]:full.offsets[r + 1]]
        assert (np.diff(s) <= 0).all()
    assert ((full.boxes >= 0) & (full.boxes <= 1)).all()
    # other parameters may not reuse the partial results
    run_proposals(index, tmp_path / "x.boxes", job, chunk_size=4, progress=False, max_chunks=1)
    with pytest.raises(ValueError, match="another job"):
        run_proposals(index, tmp_path / "x.boxes", ProposalJob(method="bing", top_k=5), chunk_size=4,
                      progress=False)


def test_sigkill_then_resume_equals_uninterrupted(synth_set, tmp_path):
    """kill -9 of the CLI (2 worker processes) at a known point -- right after it counted its second chunk
    (the fault hook ``DALI_OBJCROP_FAULT``) -- then the same command again: it resumes every finished chunk
    and writes the store of an uninterrupted run."""
    cmd = [sys.executable, "-m", "dali_objcrop", "proposals", str(synth_set), "--chunk-size", "2",
           "--workers", "2", "--no-progress"]
    ref = tmp_path / "ref.boxes"
    subprocess.run(cmd + ["--out", str(ref)], check=True, capture_output=True, timeout=300)
    out = tmp_path / "killed.boxes"
    p = subprocess.run(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300,
                       env={**os.environ, "DALI_OBJCROP_FAULT": "proposals.chunk:2:kill"})
    assert p.returncode == -signal.SIGKILL
    chunks = len(list(Path(str(out) + ".parts").glob("chunk_*.npz")))
    assert not out.exists() and 2 <= chunks < 12     # killed mid-run: 24 images in 12 chunks of 2
    r = subprocess.run(cmd + ["--out", str(out)], check=True, capture_output=True, text=True, timeout=300)
    computed, resumed = map(int, re.search(r"(\d+) images computed .*?, (\d+) resumed from earlier chunks",
                                           r.stderr).groups())
    assert (resumed, computed) == (2 * chunks, 24 - 2 * chunks), r.stderr
    _stores_equal(BoxStore.load(ref), BoxStore.load(out))


def _corrupt_copy(synth_set: Path, dst: Path) -> dict:
    shutil.copytree(synth_set.parent, dst)
    imgs = sorted((dst / "images").glob("*.jpg"))
    (imgs[0]).write_bytes(b"")                                  # empty: the scan rejects it
    data = imgs[1].read_bytes()
    imgs[1].write_bytes(data[: len(data) // 2])                  # truncated: the scan rejects it
    d = bytearray(imgs[2].read_bytes())
    i = d.find(b"\xff\xda")
    d[i + 5] = 99                                                # bad component id in SOS: decoding fails
    imgs[2].write_bytes(bytes(d))
    return {"empty": imgs[0].name, "truncated": imgs[1].name, "undecodable": imgs[2].name}


def test_corrupt_images_are_counted_not_fatal(synth_set, tmp_path):
    bad = _corrupt_copy(synth_set, tmp_path / "set")
    index = load_index(tmp_path / "set" / "images")  # a plain folder this time
    store, rep = run_proposals(index, tmp_path / "p.boxes", ProposalJob(method="bing"), chunk_size=8,
                               progress=False)
    assert rep.skipped_by_scan == 2 and set(store.meta["skipped_by_scan"]) == {bad["empty"], bad["truncated"]}
    assert rep.failed == 1 and list(store.meta["failures"]) == [bad["undecodable"]]
    assert "decode" in store.meta["failures"][bad["undecodable"]]
    assert len(store) == 22 and len(store.boxes_of(store.row_of(bad["undecodable"]))) == 0
    assert store.meta["images_without_boxes"] == 1
    # the CLI reports them and still succeeds
    r = subprocess.run([sys.executable, "-m", "dali_objcrop", "proposals", str(tmp_path / "set" / "images"),
                        "--out", str(tmp_path / "q.boxes"), "--workers", "1", "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1 failed" in r.stdout and bad["undecodable"] in r.stderr and bad["empty"] in r.stderr


def test_gt_method_and_eval(synth_set, tmp_path):
    out = tmp_path / "gt.boxes"
    r = subprocess.run([sys.executable, "-m", "dali_objcrop", "proposals", str(synth_set), "--out", str(out),
                        "--method", "gt", "--top-k", "100"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    j = tmp_path / "e.json"
    r = subprocess.run([sys.executable, "-m", "dali_objcrop", "eval-proposals", str(out), "--coco", str(synth_set),
                        "--json", str(j)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(j.read_text())
    assert res["recall@10_iou0.7"] > 0.99 and res["recall@1_iou0.5"] < res["recall@10_iou0.5"]
    for n in (1, 5, 10):
        for t in ("0.5", "0.7"):
            assert f"recall@{n}_iou{t}" in res
    assert 0 < res["mean_area_fraction"] < 1 and res["proposals_per_image"] > 1


def test_recall_table_hand_case():
    from dali_objcrop.proposals.evaluate import recall_table
    gt = {"a": np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]), "b": np.array([[0, 0, 1, 1]])}
    props = {"a": np.array([[0.5, 0.5, 1, 1], [0, 0, 0.5, 0.6]]), "b": np.array([[0, 0, 1, 0.6]])}
    r = recall_table(props, gt, ns=(1, 2), ious=(0.5, 0.7))
    # a: gt0 best IoU 0.833 (2nd proposal), gt1 1.0 (1st); b: 0.6
    assert r["recall@1_iou0.5"] == pytest.approx(2 / 3) and r["recall@1_iou0.7"] == pytest.approx(1 / 3)
    assert r["recall@2_iou0.5"] == pytest.approx(1.0) and r["recall@2_iou0.7"] == pytest.approx(2 / 3)


# ---- fetch-model --------------------------------------------------------------------------
@pytest.fixture()
def local_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving a copy of ../shared/models/bing (one file tampered
    in a second folder); yields (base_url, tampered_url, request_log)."""
    from conftest import skip_without_shared
    skip_without_shared(BING_SHARED)
    root = tmp_path / "www"
    shutil.copytree(BING_SHARED, root / "good")
    shutil.copytree(BING_SHARED, root / "bad")
    (root / "bad" / "ObjNessB2W8MAXBGR.wS1.yml.gz").write_bytes(b"not the model")
    log: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            log.append(self.path)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield f"{base}/good", f"{base}/bad", log
    srv.shutdown()


def test_fetch_model_from_local_server(local_server, tmp_path):
    from dali_objcrop.proposals.fetch import SHA256, FetchError, fetch_bing
    good, bad, log = local_server
    cache = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-m", "dali_objcrop", "fetch-model", "bing", "--cache-dir", str(cache),
                        "--base-url", good], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name, digest in SHA256.items():
        assert hashlib.sha256((cache / name).read_bytes()).hexdigest() == digest
    n = len(log)
    assert n == 9
    fetch_bing(cache, base_url=good)  # cached: no request
    assert len(log) == n
    # the fetched model works with both implementations
    from dali_objcrop.proposals.bing import Bing
    img = np.random.default_rng(0).integers(0, 255, (64, 96, 3), np.uint8)
    assert len(Bing.load(cache)(img)[0]) > 0
    with pytest.raises(FetchError, match="sha256"):
        fetch_bing(tmp_path / "c2", colors=("MAXBGR",), base_url=bad)
    assert not any((tmp_path / "c2").glob("ObjNessB2W8MAXBGR.wS1*"))  # nothing half-installed
    with pytest.raises(FetchError, match="Offline"):
        fetch_bing(tmp_path / "c3", colors=("I",), base_url="http://127.0.0.1:9/none", timeout=2)
    r = subprocess.run([sys.executable, "-m", "dali_objcrop", "fetch-model", "bing", "--cache-dir",
                        str(tmp_path / "c4"), "--base-url", "http://127.0.0.1:9/none"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Offline?" in r.stderr


def test_selective_search_boxes_are_in_range_and_reproducible():
    from dali_objcrop.proposals.selective_search import selective_search
    img = np.full((120, 160, 3), 40, np.uint8)
    img[30:90, 40:120] = (0, 200, 255)
    a = selective_search(img, max_boxes=500)
    b = selective_search(img, max_boxes=500)
    np.testing.assert_array_equal(a, b)
    assert len(a) > 0 and a.dtype == np.int32
    assert (a[:, :2] >= 0).all() and (a[:, 2] <= 160).all() and (a[:, 3] <= 120).all()
    assert ((a[:, 2:] > a[:, :2])).all()
    assert box_iou(np.array([[40, 30, 120, 90]]), a).max() > 0.7
    with pytest.raises(ValueError, match="mode"):
        selective_search(img, mode="slow")
