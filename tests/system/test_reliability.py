"""Bad input and faults: each test is named after the defect class it pins
(docs/reliability.md lists them all, with what the project does)."""
from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from dali_objcrop.boxstore import BoxStore
from dali_objcrop.dataset import ImageIndex, load_coco, scan_image

REPO = Path(__file__).resolve().parents[2]


# ---- helpers ------------------------------------------------------------------------------------------------
def _photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth random BGR picture with a white block in its top-left quarter (orientation is visible)."""
    a = np.random.default_rng(seed).integers(40, 200, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
    img = cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR)
    img[h // 10:h // 3, w // 10:w // 3] = 255
    return img


def _jpeg(bgr: np.ndarray, orientation: int | None = None) -> bytes:
    """JPEG bytes of ``bgr``, with an EXIF orientation tag (0x0112) when given."""
    im = Image.fromarray(bgr[:, :, ::-1].copy())
    b = io.BytesIO()
    if orientation is None:
        im.save(b, "JPEG", quality=95)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(b, "JPEG", quality=95, exif=exif.tobytes())
    return b.getvalue()


def _coco_set(root: Path, files: dict[str, tuple[bytes, tuple[int, int], list]], ann_name: str = "annotations.json",
              extra_images: list | None = None, extra_anns: list | None = None) -> Path:
    """Images in ``root/images`` and a COCO json ``root/ann_name``; files: name -> (bytes, (w, h), xywh boxes)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    ims, anns = [], []
    for i, (name, (data, (w, h), boxes)) in enumerate(files.items()):
        if data is not None:
            (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "images" / name).write_bytes(data)
        ims.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for b in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "bbox": list(b), "area": 1.0})
    ann = root / ann_name
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps({"images": ims + (extra_images or []), "annotations": anns + (extra_anns or []),
                               "categories": [{"id": 1, "name": "x"}]}))
    return ann


def _plain_set(root: Path, n: int = 4, w: int = 96, h: int = 80, **kw) -> Path:
    return _coco_set(root, {f"im{i}.jpg": (_jpeg(_photo(w, h, i)), (w, h), [(10, 10, 40, 30)]) for i in range(n)},
                     **kw)


def _run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dali_objcrop", *args], capture_output=True, text=True,
                          timeout=timeout)


# ---- 1 EXIF orientation: stored pixel grid everywhere --------------------------------------------------------
def test_exif_orientation_is_ignored_by_every_decoder(tmp_path):
    from dali_objcrop.proposals.common import decode_bgr, load_for_proposals
    bgr = _photo(160, 96)
    path = tmp_path / "rot6.jpg"
    path.write_bytes(_jpeg(bgr, orientation=6))      # "rotate 90 degrees to display"
    assert Image.open(path).getexif()[0x0112] == 6
    assert scan_image(path)[1] == (160, 96)           # header: the stored grid
    for img in (decode_bgr(path), load_for_proposals(path, (160, 96), max_side=512)):
        assert img.shape[:2] == (96, 160), "decoded rotated: boxes would not match the loader's pixels"
        assert np.abs(img.astype(int) - bgr.astype(int)).mean() < 4
    # DALI (the loader's decoder, adjust_orientation off) sees the same pixels
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def dec():
        enc = fn.external_source(source=lambda: [np.fromfile(path, dtype=np.uint8)], batch=True)
        return fn.decoders.image(enc, device="cpu", output_type=types.RGB, adjust_orientation=False)
    p = dec()
    p.build()
    rgb = np.array(p.run()[0].as_tensor())[0]
    assert rgb.shape[:2] == (96, 160)
    assert np.abs(rgb[:, :, ::-1].astype(int) - decode_bgr(path).astype(int)).mean() < 2


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_exif_orientation_is_ignored_by_the_gpu_decoder(tmp_path):
    """nvJPEG (decoders "mixed", as the loader on a GPU, whole image and ROI) keeps the stored grid too."""
    from nvidia.dali import fn, pipeline_def, types

    from dali_objcrop.proposals.common import decode_bgr
    path = tmp_path / "rot6.jpg"
    path.write_bytes(_jpeg(_photo(160, 96), orientation=6))

    @pipeline_def(batch_size=1, num_threads=1, device_id=0)
    def dec():
        enc = fn.external_source(source=lambda: [np.fromfile(path, dtype=np.uint8)], batch=True)
        whole = fn.decoders.image(enc, device="mixed", output_type=types.RGB, adjust_orientation=False)
        roi = fn.decoders.image_slice(enc, np.array([16.0, 8.0], np.float32), np.array([96.0, 64.0], np.float32),
                                      axis_names="WH", normalized_anchor=False, normalized_shape=False,
                                      device="mixed", output_type=types.RGB, adjust_orientation=False)
        return whole, roi
    p = dec()
    p.build()
    whole, roi = (np.array(o.as_cpu().as_tensor())[0] for o in p.run())
    ref = decode_bgr(path)[:, :, ::-1].astype(int)
    assert whole.shape[:2] == (96, 160) and np.abs(whole.astype(int) - ref).mean() < 3
    assert roi.shape[:2] == (64, 96) and np.abs(roi.astype(int) - ref[8:72, 16:112]).mean() < 3


def test_exif_rotated_jpeg_in_show_matches_the_loader_grid(tmp_path):
    from dali_objcrop.tools import crop_config, load_tool_data, show_rows
    ann = _coco_set(tmp_path, {"rot.jpg": (_jpeg(_photo(160, 96), orientation=6), (160, 96), [(10, 10, 60, 40)]),
                               "rot8.jpg": (_jpeg(_photo(120, 90, 1), orientation=8), (120, 90), [(5, 5, 50, 40)])})
    data = load_tool_data(ann)
    rows = show_rows(data, np.arange(2), crop_config(data.store, "obj-obj-dilate"), size=32)
    assert [r["image"].shape[:2] for r in rows] == [(96, 160), (90, 120)]


def test_exif_rotated_proposals_are_in_the_stored_grid(tmp_path):
    """BING boxes of a rotated JPEG equal those of the same pixels without the tag."""
    from dali_objcrop.proposals.run import ProposalJob, load_index, run_proposals
    bgr = _photo(200, 120, 3)
    plain = _coco_set(tmp_path / "a", {"x.jpg": (_jpeg(bgr), (200, 120), [])})
    rot = _coco_set(tmp_path / "b", {"x.jpg": (_jpeg(bgr, orientation=6), (200, 120), [])})
    job = ProposalJob(method="bing", top_k=5)
    sa, _ = run_proposals(load_index(plain), tmp_path / "a.boxes", job, progress=False)
    sb, _ = run_proposals(load_index(rot), tmp_path / "b.boxes", job, progress=False)
    np.testing.assert_allclose(np.asarray(sa.boxes), np.asarray(sb.boxes), atol=0.02)


# ---- 2 a proposals job owns its output -----------------------------------------------------------------------
def test_second_proposals_job_on_the_same_output_is_refused(tmp_path):
    from dali_objcrop.proposals.run import ProposalJob, load_index, run_proposals
    ann = _plain_set(tmp_path / "set")
    out = tmp_path / "p.boxes"
    lock = tmp_path / "p.boxes.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)       # another job holds the lock
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"pid 4242 on somehost\n")
    try:
        with pytest.raises(RuntimeError, match=r"p\.boxes\.lock.*pid 4242"):
            run_proposals(load_index(ann), out, ProposalJob(method="bing", nms_iou=0.9), progress=False)
        assert not out.exists()
    finally:
        os.close(fd)
    store, _ = run_proposals(load_index(ann), out, ProposalJob(method="bing"), progress=False)
    assert len(store) == 4 and not lock.exists()     # released (and removed) at the end


def _stopped_at_fault(p: subprocess.Popen) -> None:
    """Wait until ``p`` stops itself at its ``DALI_OBJCROP_FAULT=...:stop`` point (SIGSTOP); fail if it ends."""
    _, status = os.waitpid(p.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the job ended (status {status}) before reaching its fault point"


def test_two_concurrent_cli_jobs_one_fails_clearly(tmp_path):
    """Job A is frozen holding the output's lock (SIGSTOP after its first chunk, the fault hook); job B on the
    same --out fails at once naming the lock and writes nothing; A, continued, finishes: exactly one job
    succeeds and the store holds what its label says (A's parameters)."""
    ann = _plain_set(tmp_path / "set", n=8)
    out = tmp_path / "p.boxes"
    cmd = [sys.executable, "-m", "dali_objcrop", "proposals", str(ann), "--out", str(out), "--workers", "1",
           "--chunk-size", "2", "--no-progress"]
    a = subprocess.Popen(cmd + ["--nms-iou", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "DALI_OBJCROP_FAULT": "proposals.chunk:1:stop"})
    try:
        _stopped_at_fault(a)
        b = subprocess.run(cmd + ["--nms-iou", "0.9"], capture_output=True, text=True, timeout=300)
        assert b.returncode == 1, b.stderr
        assert "locked by another proposals job" in b.stderr and "p.boxes.lock" in b.stderr, b.stderr
        assert not out.exists() and len(list((tmp_path / "p.boxes.parts").glob("chunk_*.npz"))) == 1
        os.kill(a.pid, signal.SIGCONT)
        _, err = a.communicate(timeout=300)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert a.returncode == 0, err
    assert BoxStore.load(out).meta["params"]["nms_iou"] == 0.5
    ref = tmp_path / "ref.boxes"
    assert _run_cli("proposals", str(ann), "--out", str(ref), "--nms-iou", "0.5", "--workers", "1",
                    "--no-progress").returncode == 0
    np.testing.assert_array_equal(np.asarray(BoxStore.load(ref).boxes), np.asarray(BoxStore.load(out).boxes))


def test_chunk_of_another_job_is_refused_on_resume(tmp_path):
    from dali_objcrop.proposals.run import ProposalJob, load_index, run_proposals
    ann = _plain_set(tmp_path / "set", n=8)
    index = load_index(ann)
    out = tmp_path / "p.boxes"
    parts = tmp_path / "p.boxes.parts"
    run_proposals(index, out, ProposalJob(method="bing", nms_iou=0.5), chunk_size=4, max_chunks=1, progress=False)
    foreign = (parts / "chunk_0000000.npz").read_bytes()
    run_proposals(index, out, ProposalJob(method="bing", nms_iou=0.9), chunk_size=4, max_chunks=1, restart=True,
                  progress=False)
    (parts / "chunk_0000000.npz").write_bytes(foreign)   # a chunk of the 0.5 job in the 0.9 job's folder
    with pytest.raises(ValueError, match="does not belong to this job"):
        run_proposals(index, out, ProposalJob(method="bing", nms_iou=0.9), chunk_size=4, progress=False)
    assert not out.exists()


# ---- 3 checkpoints are plain data ----------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))     # runs on unpickling: creates the marker file


def _tiny_model_and_opt():
    import torch
    from dali_objcrop.train.pretrain import Config, build_model, build_optimizer
    cfg = Config(arch="resnet18", head_hidden=32, head_out=16, queue_size=64, size=32, batch_size=4,
                 steps=1).resolved()
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model, 1)
    model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), shuffle_seed=0)[0].backward()
    opt.step()
    return cfg, model, opt


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    import torch
    from dali_objcrop.train.pretrain import load_checkpoint
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "step": 0, "config": {}, "x": _Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_real_checkpoint_loads_with_weights_only(tmp_path):
    import torch
    from dali_objcrop.train.pretrain import load_backbone, load_checkpoint, save_checkpoint
    cfg, model, opt = _tiny_model_and_opt()
    save_checkpoint(tmp_path / "ckpt.pt", model, opt, 1, cfg, 1)
    torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)   # plain data only
    state = load_checkpoint(tmp_path / "ckpt.pt", cfg, 1)
    assert state["step"] == 1 and isinstance(state["config"], dict) and state["optimizer"]["state"]
    backbone, cfg2 = load_backbone(tmp_path / "ckpt.pt")
    assert cfg2.arch == "resnet18"
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone.state_dict()[k])


def test_checkpoint_write_on_a_full_disk_names_the_path(tmp_path, monkeypatch):
    import builtins

    import dali_objcrop.train.pretrain as pt
    cfg, model, opt = _tiny_model_and_opt()
    path = tmp_path / "ckpt.pt"
    pt.save_checkpoint(path, model, opt, 1, cfg, 1)
    before = path.read_bytes()

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(pt, "open", lambda p, mode="r", *a, **k: Full(builtins.open(p, mode, *a, **k)),
                        raising=False)
    with pytest.raises(OSError, match=r"disk full.*ckpt\.pt") as e:
        pt.save_checkpoint(path, model, opt, 2, cfg, 1)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == before and not (tmp_path / "ckpt.pt.tmp").exists()


# ---- 4 COCO json validation ----------------------------------------------------------------------------------
def _raw_coco(tmp_path: Path, images: list, anns: list) -> Path:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    return p


def _im(i, name, w=64, h=48):
    return {"id": i, "file_name": name, "width": w, "height": h}


def test_duplicate_coco_image_ids_are_refused(tmp_path):
    p = _raw_coco(tmp_path, [_im(1, "a.jpg"), _im(1, "b.jpg"), _im(2, "c.jpg")],
                  [{"id": 1, "image_id": 1, "bbox": [1, 1, 5, 5]}])
    for f in (load_coco, BoxStore.from_coco):
        with pytest.raises(ValueError, match=r"bad\.json.*id 1: 'a\.jpg', 'b\.jpg'"):
            f(p)


def test_duplicate_file_names_and_unknown_image_ids_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"'a\.jpg' \(ids 1, 2\)"):
        load_coco(_raw_coco(tmp_path, [_im(1, "a.jpg"), _im(2, "a.jpg")], []))
    with pytest.raises(ValueError, match=r"image id 7 \(annotation ids 3\)"):
        load_coco(_raw_coco(tmp_path, [_im(1, "a.jpg")], [{"id": 3, "image_id": 7, "bbox": [1, 1, 5, 5]}]))


@pytest.mark.parametrize("image, ann, pattern", [
    ({"id": 5, "file_name": "a.jpg", "height": 48}, None, r"image id 5 \('a\.jpg'\) has no 'width'"),
    ({"id": 5, "file_name": "a.jpg", "width": "64", "height": 48}, None, r"image id 5 .*width='64'"),
    (_im(5, "a.jpg"), {"id": 9, "image_id": 5, "bbox": [1, 2, 3]}, r"annotation id 9 \(image id 5\)"),
    (_im(5, "a.jpg"), {"id": 9, "image_id": 5, "bbox": [1, 2, float("nan"), 4]}, r"annotation id 9"),
    (_im(5, "a.jpg"), {"id": 9, "image_id": 5}, r"annotation id 9 .*bbox None"),
])
def test_malformed_coco_entries_are_named(tmp_path, image, ann, pattern):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"images": [image], "annotations": [ann] if ann else []}).replace("NaN", "NaN"))
    with pytest.raises(ValueError, match=pattern):
        BoxStore.from_coco(p)


# ---- 5 one rule for where a COCO json's images are; finding none is an error -----------------------------------
def test_proposals_find_images_beside_the_annotations_folder(tmp_path):
    ann = _plain_set(tmp_path, ann_name="annotations/instances.json")   # root/annotations/x.json + root/images
    r = _run_cli("proposals", str(ann), "--out", str(tmp_path / "p.boxes"), "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert len(BoxStore.load(tmp_path / "p.boxes")) == 4


def test_proposals_that_find_no_images_fail(tmp_path):
    ann = _plain_set(tmp_path / "set")
    shutil.move(str(tmp_path / "set" / "images"), str(tmp_path / "elsewhere"))
    (tmp_path / "set" / "images").mkdir()                            # an image folder without the images
    for extra in ([], ["--no-check"]):
        r = _run_cli("proposals", str(ann), "--out", str(tmp_path / "p.boxes"), "--workers", "1", "--no-progress",
                     *extra)
        assert r.returncode != 0 and "is the image folder right" in r.stderr, r.stderr
        assert not (tmp_path / "p.boxes").exists()


def test_loader_and_proposals_use_the_same_image_folder(tmp_path):
    from dali_objcrop.loader import resolve_data
    from dali_objcrop.proposals.run import load_index
    ann = _plain_set(tmp_path, ann_name="annotations/instances.json")
    assert load_index(ann).root == resolve_data(str(ann))[0].root == tmp_path / "images"


# ---- 6 file_name entries outside the image folder --------------------------------------------------------------
def _escaping_set(root: Path, name: str) -> Path:
    ann = _plain_set(root / "set", n=3)
    (root / "secret.jpg").write_bytes(_jpeg(_photo(96, 80, 9)))
    d = json.loads(ann.read_text())
    d["images"].append({"id": 99, "file_name": name, "width": 96, "height": 80})
    ann.write_text(json.dumps(d))
    return ann


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_file_names_outside_the_image_folder_are_refused(tmp_path, kind):
    from dali_objcrop.loader import ObjCropLoader
    from dali_objcrop.proposals.run import load_index
    from dali_objcrop.tools import load_tool_data
    name = "../../secret.jpg" if kind == "dotdot" else str(tmp_path / "secret.jpg")
    ann = _escaping_set(tmp_path, name)
    readers = [lambda **k: load_index(ann, **k), lambda **k: ImageIndex.from_coco(ann, **k),
               lambda **k: load_tool_data(ann, **k),
               lambda **k: ObjCropLoader(str(ann), boxes="gt", batch_size=2, device="cpu", **k)]
    for read in readers:
        with pytest.raises(ValueError, match=r"outside the image folder.*secret\.jpg"):
            read()
    assert len(load_index(ann, allow_outside_root=True)) == 4                 # the explicit opt-in
    ld = ObjCropLoader(str(ann), boxes="gt", batch_size=2, device="cpu", allow_outside_root=True)
    assert name in ld.index.keys
    r = _run_cli("proposals", str(ann), "--out", str(tmp_path / "p.boxes"), "--workers", "1", "--no-progress")
    assert r.returncode != 0 and "secret.jpg" in r.stderr


def test_train_bing_and_linear_eval_refuse_escaping_file_names(tmp_path):
    from dali_objcrop.proposals.train_bing import TrainConfig, train_bing
    from dali_objcrop.train.linear_eval import coco_image_labels
    ann = _escaping_set(tmp_path, "../secret.jpg")
    with pytest.raises(ValueError, match=r"secret\.jpg"):
        train_bing(ann, None, tmp_path / "m", TrainConfig(), log=lambda *a: None)
    with pytest.raises(ValueError, match=r"secret\.jpg"):
        coco_image_labels(ann)


# ---- 7 box stores: checksums, validation on load, umask --------------------------------------------------------
def _store() -> BoxStore:
    return BoxStore.from_arrays(["a.jpg", "b.jpg", "c.jpg"], [[64, 48], [32, 32], [100, 80]],
                                [np.array([[0.1, 0.1, 0.5, 0.6]]), np.array([[0.0, 0.2, 0.9, 1.0]] * 2),
                                 np.zeros((0, 4))])


def test_truncated_store_names_the_file(tmp_path):
    path = _store().save(tmp_path / "s.boxes")
    data = path.read_bytes()
    for cut in (len(data) - 8, 40, 14):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"s\.boxes"):
            BoxStore.load(path)


def test_damaged_store_header_or_data_is_detected(tmp_path):
    path = _store().save(tmp_path / "s.boxes")
    data = path.read_bytes()
    n = int(np.frombuffer(data[12:20], np.uint64)[0])
    header = data[20:20 + n]
    # a shifted array offset that still parses: the boxes would be read from the wrong place
    bad_header = header.replace(b'"offset": 64', b'"offset": 72', 1)     # the box offsets array, moved 8 bytes
    assert bad_header != header and len(bad_header) == len(header)
    path.write_bytes(data[:20] + bad_header + data[20 + n:])
    with pytest.raises(ValueError, match=r"s\.boxes.*checksum"):
        BoxStore.load(path)
    flipped = bytearray(data)
    flipped[-200] ^= 0x10                                   # one bit of the arrays
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"s\.boxes.*checksum"):
        BoxStore.load(path)


def test_invalid_boxes_of_a_store_written_elsewhere_are_refused(tmp_path):
    good = _store()
    for bad_box in ([np.nan, 0.1, 0.5, 0.5], [0.6, 0.1, 0.2, 0.5], [0.1, 0.1, 1.7, 0.5]):
        boxes = np.array(good.boxes).copy()
        boxes[1] = bad_box
        raw = BoxStore(keys=list(good.keys), sizes=good.sizes, offsets=good.offsets, boxes=boxes, meta={})
        path = raw.save(tmp_path / "x.boxes")                  # bypasses from_arrays' validation
        with pytest.raises(ValueError, match=r"x\.boxes.*invalid.*'b\.jpg'"):
            BoxStore.load(path)


def test_store_file_mode_honours_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = _store().save(tmp_path / "s.boxes")
        assert (path.stat().st_mode & 0o777) == 0o644
        os.umask(0o077)
        assert (_store().save(tmp_path / "t.boxes").stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)


def test_version_1_store_still_loads_and_is_validated(tmp_path):
    from dali_objcrop.boxstore import MAGIC_V1
    s = _store()
    keys = "".join(s.keys).encode()
    arrays = {"sizes": np.asarray(s.sizes, np.int32), "offsets": np.asarray(s.offsets, np.int64),
              "boxes": np.asarray(s.boxes, np.float32), "key_bytes": np.frombuffer(keys, np.uint8),
              "key_offsets": np.array([0, 5, 10, 15], np.int64)}
    layout, pos = {}, 0
    for k, a in arrays.items():
        layout[k] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": pos}
        pos += -(-a.nbytes // 64) * 64
    header = json.dumps({"meta": {"method": "old"}, "arrays": layout}).encode()
    start = -(-(12 + 8 + len(header)) // 64) * 64
    buf = bytearray(start + pos)
    buf[:12], buf[12:20], buf[20:20 + len(header)] = MAGIC_V1, np.uint64(len(header)).tobytes(), header
    for k, a in arrays.items():
        buf[start + layout[k]["offset"]:start + layout[k]["offset"] + a.nbytes] = a.tobytes()
    (tmp_path / "v1.boxes").write_bytes(bytes(buf))
    t = BoxStore.load(tmp_path / "v1.boxes")
    assert list(t.keys) == ["a.jpg", "b.jpg", "c.jpg"] and t.meta["format_version"] == 1
    np.testing.assert_array_equal(np.asarray(t.boxes), np.asarray(s.boxes))
    (tmp_path / "v1.boxes").write_bytes(bytes(buf[:-70]))
    with pytest.raises(ValueError, match=r"v1\.boxes is truncated"):
        BoxStore.load(tmp_path / "v1.boxes")


# ---- 8 workers exit with their parent --------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_parent_stops_its_workers(tmp_path, sig):
    """The job is frozen after its first chunk (SIGSTOP, the fault hook) with both workers alive; then it gets
    ``sig`` (and SIGCONT, so that a SIGTERM is delivered): no worker outlives it."""
    ann = _plain_set(tmp_path / "set", n=8)
    p = subprocess.Popen([sys.executable, "-m", "dali_objcrop", "proposals", str(ann), "--out",
                          str(tmp_path / "p.boxes"), "--workers", "2", "--chunk-size", "1", "--no-progress"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "DALI_OBJCROP_FAULT": "proposals.chunk:1:stop"})
    kids = []
    try:
        _stopped_at_fault(p)
        kids = _children(p.pid)
        assert len(kids) >= 2 and all(_alive(k) for k in kids), kids
        os.kill(p.pid, sig)
        os.kill(p.pid, signal.SIGCONT)
        assert p.wait(timeout=30) == -sig
        t0 = time.monotonic()   # the kernel (PR_SET_PDEATHSIG) or the watchdog (1 s) ends them: allow 10 s
        while time.monotonic() - t0 < 10 and any(_alive(k) for k in kids):
            time.sleep(0.1)
        left = [k for k in kids if _alive(k)]
        assert not left, f"worker processes {left} outlived their parent"
    finally:
        for k in kids + ([] if p.poll() is not None else [p.pid]):
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- 9 errors name what they are about -------------------------------------------------------------------------
def test_train_bing_on_tiny_images_names_them(tmp_path):
    from dali_objcrop.proposals.train_bing import TrainConfig, train_bing
    ann = _coco_set(tmp_path, {f"tiny{i}.jpg": (_jpeg(_photo(8, 6, i)), (8, 6), [(1, 1, 4, 3)]) for i in range(3)})
    with pytest.raises(ValueError, match=r"tiny0\.jpg: too small"):
        train_bing(ann, None, tmp_path / "m", TrainConfig(), log=lambda *a: None)


def test_pretrain_help_prints_the_settings():
    r = subprocess.run([sys.executable, str(REPO / "dali_objcrop" / "train" / "pretrain.py"), "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--batch-size=256  (int)" in r.stdout and "--crops=obj-obj-dilate  (str)" in r.stdout
    r = subprocess.run([sys.executable, str(REPO / "dali_objcrop" / "train" / "pretrain.py"), "--bogus=1"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "unknown flag --bogus" in r.stderr and "Traceback" not in r.stderr


def test_repeated_image_keys_are_named():
    with pytest.raises(ValueError, match=r"repeated: 'b\.jpg'"):
        BoxStore.from_arrays(["a.jpg", "b.jpg", "b.jpg"], [[8, 8]] * 3, [np.zeros((0, 4))] * 3)


def test_decoder_failures_say_why():
    from dali_objcrop.loader import _readable_decode_error
    assert _readable_decode_error("nvImageCodec failure: '#3'").startswith("corrupt or truncated image data")
    assert "unsupported" in _readable_decode_error("nvImageCodec failure: '#4'")
    assert _readable_decode_error("something else") == "something else"


def test_undecodable_file_is_named_with_a_reason(tmp_path):
    from dali_objcrop.loader import ObjCropLoader
    good = _jpeg(_photo(96, 80))
    noscan = good[:good.find(b"\xff\xda")] + b"\xff\xd9"                     # headers, no scan data
    ann = _coco_set(tmp_path, {"ok.jpg": (good, (96, 80), [(5, 5, 30, 30)]),
                               "noscan.jpg": (noscan, (96, 80), [(5, 5, 30, 30)])})
    ld = ObjCropLoader(str(ann), boxes="gt", batch_size=2, size=32, device="cpu", num_threads=1,
                       on_bad_image="raise")
    with pytest.raises(RuntimeError, match=r"noscan\.jpg: corrupt or truncated image data"):
        list(ld)


# ---- 10 loader: empty epochs and scene fallbacks are announced -------------------------------------------------
def test_empty_epoch_is_an_error_with_the_counts(tmp_path):
    from dali_objcrop.loader import ObjCropLoader
    ann = _plain_set(tmp_path, n=5)
    with pytest.raises(ValueError, match=r"5 images < 2 ranks x batch size 4"):
        ObjCropLoader(str(ann), boxes="gt", batch_size=4, rank=0, world_size=2, device="cpu", drop_last=True)
    ld = ObjCropLoader(str(ann), boxes="gt", batch_size=4, rank=0, world_size=2, device="cpu", drop_last=False)
    assert len(ld) == 1


def test_images_whose_boxes_were_all_dropped_fall_back_with_one_warning(tmp_path):
    import warnings

    from dali_objcrop.loader import FallbackWarning, ObjCropLoader
    ann = _plain_set(tmp_path, n=4)
    keys = [f"im{i}.jpg" for i in range(4)]
    store = BoxStore.from_arrays(keys, [[96, 80]] * 4,
                                 [np.array([[0.1, 0.1, 0.5, 0.5]]), np.array([[np.nan, 0, 1, 1]]),
                                  np.array([[0.5, 0.5, 0.5, 0.9]]), np.array([[0.2, 0.2, 0.9, 0.9]])])
    assert store.meta["images_emptied_by_validation"] == 2
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ObjCropLoader(str(ann), boxes=store, batch_size=2, device="cpu")
    msgs = [str(x.message) for x in w if issubclass(x.category, FallbackWarning)]
    assert len(msgs) == 1 and "2 of 4 images have no boxes" in msgs[0] and "im1.jpg" in msgs[0]


def test_coco_categories_are_checked(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"images": [_im(1, "a.jpg")], "categories": [{"id": 1}, {"id": 1}],
                             "annotations": []}))
    with pytest.raises(ValueError, match="category ids used more than once: 1"):
        load_coco(p)
    p.write_text(json.dumps({"images": [_im(1, "a.jpg")], "categories": [{"id": 1, "name": "x"}],
                             "annotations": [{"id": 4, "image_id": 1, "category_id": 9, "bbox": [0, 0, 2, 2]}]}))
    with pytest.raises(ValueError, match=r"annotation id 4 \(category 9\)"):
        load_coco(p)


def test_second_training_run_on_the_same_out_is_refused(tmp_path):
    from dali_objcrop.joblock import JobLock
    from dali_objcrop.train.pretrain import Config, train
    cfg = Config(arch="resnet18", size=32, batch_size=4, steps=1, out=str(tmp_path / "run"), progress=False)
    with JobLock(tmp_path / "run" / "run.lock", "training run"):          # another run holds the folder
        with pytest.raises(RuntimeError, match=r"run\.lock is locked by another training run \(pid"):
            train(cfg, loader=[])
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_damaged_bing_model_file_is_named(tmp_path):
    from dali_objcrop.proposals.bing import BingModel
    src = REPO / "dali_objcrop" / "models" / "bing"
    for f in src.glob("*.yml.gz"):
        shutil.copy(f, tmp_path / f.name)
    damaged = tmp_path / "ObjNessB2W8MAXBGR.wS1.yml.gz"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"ObjNessB2W8MAXBGR\.wS1\.yml\.gz is damaged"):
        BingModel.load(tmp_path)


def test_store_and_chunk_writes_on_a_full_disk_name_the_file(tmp_path, monkeypatch):
    import builtins

    import dali_objcrop.proposals.run as run
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match=r"disk full: cannot write box store .*s\.boxes"):
        _store().save(tmp_path / "s.boxes")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(run, "open", lambda p, mode="r", *a, **k: Full(builtins.open(p, mode, *a, **k)),
                        raising=False)
    with pytest.raises(OSError, match=r"disk full: cannot write .*chunk_0000003\.npz"):
        run._write_atomic(tmp_path / "chunk_0000003.npz", b"x" * 100)
    assert list(tmp_path.iterdir()) == []
