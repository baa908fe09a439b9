"""WebDataset shards: pack round trip, resume, damage reports, DALI's index format, the loader."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dali_objcrop import shards as S
from dali_objcrop.boxstore import BoxStore
from dali_objcrop.dataset import ImageIndex

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(synth_set, tmp_path_factory):
    """The synthetic set, and a store in which image 3 has no boxes and boxes carry scores."""
    index = ImageIndex.from_coco(synth_set, synth_set.parent / "images")
    gt = BoxStore.from_coco(synth_set)
    boxes = [np.array(gt.boxes_of(i)) for i in range(len(gt))]
    boxes[3] = np.zeros((0, 4), np.float32)
    scores = [np.linspace(1, 0, len(b), dtype=np.float32) for b in boxes]
    store = BoxStore.from_arrays(list(gt.keys), gt.sizes, boxes, scores, method="test")
    path = store.save(tmp_path_factory.mktemp("store") / "s.boxes")
    return index, BoxStore.load(path), path


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix in (".tar", ".idx", ".json")}


def test_pack_round_trip_every_byte(data, tmp_path):
    index, store, _ = data
    rep = S.pack(index, tmp_path, store, shard_bytes=150_000, progress=False)
    assert rep.shards > 2 and rep.samples == len(index)
    ss = S.ShardSet.open(tmp_path)
    assert ss.verify(deep=True) == {}
    seen = []
    for s in ss.shards:                          # plain tarfile, no index
        for smp in ss.samples(s):
            i = smp["position"]
            seen.append(i)
            assert smp["key"] == index.keys[i]
            assert smp["image"] == Path(index.paths[i]).read_bytes()
            np.testing.assert_array_equal(smp["boxes"], store.boxes_of(i))
            np.testing.assert_array_equal(smp["scores"], store.scores[store.offsets[i]:store.offsets[i + 1]])
            assert (smp["width"], smp["height"]) == tuple(index.sizes[i])
    assert seen == list(range(len(index)))
    # random access through the index gives the same sample
    assert ss.read_sample(7)["image"] == Path(index.paths[7]).read_bytes()
    # unpacking needs only tar
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(ss.tar(ss.shards[0])), "-C", str(out)], check=True)
    assert (out / "0000000000.jpg").read_bytes() == Path(index.paths[0]).read_bytes()
    assert np.fromfile(out / "0000000000.boxes.f32", "<f4").reshape(-1, 4).tolist() == store.boxes_of(0).tolist()


def test_index_is_what_dali_wds2idx_writes(data, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")
    index, store, _ = data
    S.pack(index, tmp_path, store, shard_bytes=150_000, progress=False)
    tar = tmp_path / "shard-000001.tar"
    ref = tmp_path / "ref.idx"
    with wds2idx.IndexCreator(str(tar), str(ref), verbose=False) as ic:
        ic.create_index()
    assert ref.read_text() == tar.with_suffix(".idx").read_text()


def test_killed_pack_resumes_to_the_same_bytes(data, tmp_path):
    index, store, _ = data
    S.pack(index, tmp_path / "a", store, shard_bytes=150_000, progress=False)
    b = tmp_path / "b"
    rep = S.pack(index, b, store, shard_bytes=150_000, progress=False, max_shards=2)   # a bounded first run
    assert rep.written == 2
    # a kill mid-shard leaves only a temporary file (and here also a torn final tar without its index)
    (b / "shard-000002.tar.999.tmp").write_bytes(b"partial")
    (b / "shard-000003.tar").write_bytes((tmp_path / "a" / "shard-000003.tar").read_bytes()[:5000])
    # a real kill: a subprocess packing, killed right after its first shard (the fault hook)
    code = ("from dali_objcrop import shards as S\n"
            "from dali_objcrop.dataset import ImageIndex; from dali_objcrop.boxstore import BoxStore\n"
            "S.pack(ImageIndex.from_coco(%r, %r), %r, BoxStore.load(%r), shard_bytes=150_000, progress=False)\n"
            % (str(index.root.parent / "annotations.json"), str(index.root), str(b), str(data[2])))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "DALI_OBJCROP_FAULT": "pack.shard:1:kill"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    rep = S.pack(index, b, store, shard_bytes=150_000, progress=False)
    assert rep.resumed == 3 and rep.written == rep.shards - 3
    for p in b.glob("*.tmp"):
        p.unlink()   # the kill's leftover temporary files are ignored (never read as shards)
    assert _files(tmp_path / "a") == _files(b)


def test_parts_pack_the_same_set(data, tmp_path):
    """Three processes packing one set (every third shard each) give the one-process bytes."""
    index, store, _ = data
    S.pack(index, tmp_path / "one", store, shard_bytes=150_000, progress=False)
    reps = [S.pack(index, tmp_path / "three", store, shard_bytes=150_000, progress=False, part=p, num_parts=3)
            for p in (2, 0, 1)]
    assert sum(r.written for r in reps) == len(S.ShardSet.open(tmp_path / "one").shards)
    assert _files(tmp_path / "one") == _files(tmp_path / "three")


def test_other_plan_is_refused_unless_restart(data, tmp_path):
    index, store, _ = data
    S.pack(index, tmp_path, store, shard_bytes=150_000, progress=False)
    with pytest.raises(ValueError, match="another pack"):
        S.pack(index, tmp_path, store, shard_bytes=300_000, progress=False)
    rep = S.pack(index, tmp_path, store, shard_bytes=300_000, progress=False, restart=True)
    assert S.ShardSet.open(tmp_path).verify(deep=True) == {} and rep.written == rep.shards


def _rewrite_without_boxes(tar: Path, rank: int) -> None:
    """Rewrite a shard without sample ``rank``'s boxes component; its index as wds2idx would."""
    members = []
    with tarfile.open(tar) as tf:
        for m in tf:
            members.append((m, tf.extractfile(m).read()))
    drop = S.sample_name(int(members[0][0].name.split(".")[0]) + rank) + "." + S.BOXES
    groups: dict[str, dict] = {}
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, b in members:
            if m.name == drop:
                continue
            at = tf.offset
            tf.addfile(m, __import__("io").BytesIO(b))
            base, ext = m.name.split(".", 1)
            groups.setdefault(base, {})[ext] = (at + 512, len(b), m.name)
    tar.with_suffix(".idx").write_text(f"v1.2 {len(groups)}\n" + "".join(
        " ".join(f"{e} {o} {n} {nm}" for e, (o, n, nm) in g.items()) + "\n" for g in groups.values()))


def test_damaged_shards_are_named_and_the_others_still_read(data, tmp_path):
    index, store, _ = data
    S.pack(index, tmp_path, store, shard_bytes=150_000, progress=False)
    ss = S.ShardSet.open(tmp_path)
    t1, t2 = ss.tar(ss.shards[1]), ss.tar(ss.shards[2])
    t1.write_bytes(t1.read_bytes()[: t1.stat().st_size // 2])           # truncated
    _rewrite_without_boxes(t2, 1)                                        # a sample without boxes component
    bad = ss.verify()
    assert set(bad) == {t1.name, t2.name}
    assert "truncated" in bad[t1.name] and "boxes.f32" in bad[t2.name]
    usable, named = S.sound_shards(ss)
    assert len(usable) == len(ss.shards) - 2 and named == bad
    with pytest.raises(S.ShardError, match=t1.name):
        S.sound_shards(ss, on_bad="raise")
    # the loader leaves them out and reads the rest
    pytest.importorskip("torch")
    from dali_objcrop import ObjCropLoader, plugin
    if not plugin.load():
        pytest.skip(f"operators unavailable: {plugin.error()}")
    ld = ObjCropLoader.from_shards(tmp_path, mode="obj-obj-dilate", batch_size=2, size=32, shuffle=False, device="cpu")
    assert set(ld.stats["damaged_shards"]) == {t1.name, t2.name}
    pos = np.concatenate([b["index"].numpy() for b in ld])
    damaged = {p for s in ss.shards[1:3] for p in range(s["first"], s["first"] + s["count"])}
    assert len(pos) == 2 * len(ld) and not damaged & set(pos.tolist())


def test_loader_from_shards_equals_loader_from_files(data, tmp_path):
    """Same positions, same windows, same pixels (compared per position: the two read in other orders)."""
    pytest.importorskip("torch")
    from dali_objcrop import ObjCropLoader, plugin
    if not plugin.load():
        pytest.skip(f"operators unavailable: {plugin.error()}")
    index, store, store_path = data
    S.pack(index, tmp_path, store, shard_bytes=150_000, progress=False)
    kw = dict(mode="obj-obj-dilate", batch_size=4, size=48, seed=3, device="cpu", num_threads=2)
    files = ObjCropLoader(index, boxes=str(store_path), use_plugin=True, **kw)
    shards = ObjCropLoader.from_shards(tmp_path, shuffle_buffer=8, **kw)
    assert type(shards).__name__ == "ShardLoader" and len(shards) == len(files) == 6
    for epoch in (0, 2):
        files.set_epoch(epoch)
        shards.set_epoch(epoch)
        a = {int(i): (b["view1"][j], b["view2"][j]) for b in files for j, i in enumerate(b["index"])}
        b_ = {int(i): (b["view1"][j], b["view2"][j]) for b in shards for j, i in enumerate(b["index"])}
        assert sorted(b_) == list(range(len(index)))          # one rank: every sample once
        for i in range(len(index)):
            assert np.array_equal(a[i][0].numpy(), b_[i][0].numpy()) and np.array_equal(a[i][1].numpy(),
                                                                                        b_[i][1].numpy()), i
        cw_f, cw_s = files.windows_for([1, 3, 5], epoch), shards.windows_for([1, 3, 5], epoch)
        np.testing.assert_array_equal(cw_f.windows, cw_s.windows)
        assert cw_s.fallback[1]                                # image 3 has no boxes: scene fallback
    # the shuffle differs between epochs and is keyed by (seed, epoch)
    o0 = [b["index"].tolist() for b in (shards.set_epoch(0) or shards)]
    o1 = [b["index"].tolist() for b in (shards.set_epoch(1) or shards)]
    o0b = [b["index"].tolist() for b in (shards.set_epoch(0) or shards)]
    assert o0 == o0b and o0 != o1


def test_ranks_get_disjoint_slices_and_equal_batch_counts(data, tmp_path):
    pytest.importorskip("torch")
    from dali_objcrop import ObjCropLoader, plugin
    if not plugin.load():
        pytest.skip(f"operators unavailable: {plugin.error()}")
    index, store, _ = data
    S.pack(index, tmp_path, store, shard_bytes=100_000, progress=False)
    for world in (2, 3):
        got = []
        for r in range(world):
            ld = ObjCropLoader.from_shards(tmp_path, mode="obj-scene", batch_size=3, size=32, device="cpu", rank=r,
                               world_size=world, seed=1)
            ld.set_epoch(1)
            batches = [b["index"].tolist() for b in ld]
            assert len(batches) == len(ld) == len(index) // (world * 3)
            flat = [i for b in batches for i in b]
            assert set(flat) <= set(ld.rank_positions(1).tolist())
            got.append(set(flat))
        for r in range(world):
            for q in range(r):
                assert not got[r] & got[q]


def test_cli_pack_and_verify(data, tmp_path):
    index, _, store_path = data
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    src = str(index.root.parent / "annotations.json")
    cmd = [sys.executable, "-m", "dali_objcrop", "pack", src, "--out", str(tmp_path), "--boxes", str(store_path),
           "--shard-size", "150k", "--no-progress"]
    p = subprocess.run(cmd + ["--max-shards", "1"], env=env, capture_output=True, text=True)
    assert p.returncode == 3 and "rerun" in p.stderr, p.stderr[-2000:]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert p.returncode == 0 and "1 already there" in p.stdout, p.stderr[-2000:]
    p = subprocess.run([sys.executable, "-m", "dali_objcrop", "pack", src, "--out", str(tmp_path), "--verify"],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0 and "0 damaged" in p.stdout
    tar = tmp_path / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    p = subprocess.run([sys.executable, "-m", "dali_objcrop", "pack", src, "--out", str(tmp_path), "--verify"],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 1 and "shard-000000.tar" in p.stderr
