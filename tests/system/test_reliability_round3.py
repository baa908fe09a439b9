"""Bad input and faults, round three: shards, the plugin cache, the trainer's outputs,
loader iteration.  Each test is named after the defect class it pins; docs/reliability.md lists
them all with what the project does."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from dali_objcrop import shards as S
from dali_objcrop.boxstore import BoxStore
from dali_objcrop.dataset import ImageIndex
from stand_in_loader import RandomBatches

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dali_objcrop", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


def _ops():
    pytest.importorskip("torch")
    from dali_objcrop import plugin
    if not plugin.load():
        pytest.skip(f"operators unavailable: {plugin.error()}")


@pytest.fixture(scope="module")
def data(synth_set, tmp_path_factory):
    """The synthetic set (24 images), its ground-truth store with image 3 emptied, the store's path."""
    index = ImageIndex.from_coco(synth_set, synth_set.parent / "images")
    gt = BoxStore.from_coco(synth_set)
    boxes = [np.array(gt.boxes_of(i)) for i in range(len(gt))]
    boxes[3] = np.zeros((0, 4), np.float32)
    store = BoxStore.from_arrays(list(gt.keys), gt.sizes, boxes, method="test")
    path = store.save(tmp_path_factory.mktemp("store") / "s.boxes")
    return index, BoxStore.load(path), path


@pytest.fixture(scope="module")
def packed(data, tmp_path_factory):
    """A pristine shard set of the synthetic set (5 shards); tests copy it."""
    index, store, _ = data
    out = tmp_path_factory.mktemp("packed") / "set"
    S.pack(index, out, store, shard_bytes=100_000, progress=False)
    return out


def _copy(packed: Path, dst: Path) -> S.ShardSet:
    shutil.copytree(packed, dst)
    return S.ShardSet.open(dst)


def _patch(tar: Path, offset: int, data: bytes) -> None:
    with open(tar, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _member(ss: S.ShardSet, shard: int, rank: int, ext: str) -> tuple[Path, int, int]:
    s = ss.shards[shard]
    off, size = S.read_index(ss.tar(s).with_suffix(".idx"))[rank][ext]
    return ss.tar(s), off, size


def _retar(tar: Path, change) -> None:
    """Rewrite a shard through ``change(name, bytes) -> bytes | None`` (None drops the member, a list of
    (name, bytes) adds members), and its index as wds2idx would."""
    members = []
    with tarfile.open(tar) as tf:
        for m in tf:
            members.append((m.name, tf.extractfile(m).read()))
    groups: dict[str, dict] = {}
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, b in members:
            new = change(name, b)
            items = new if isinstance(new, list) else ([] if new is None else [(name, new)])
            for nm, data in items:
                ti = tarfile.TarInfo(nm)
                ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
                at = tf.offset
                tf.addfile(ti, io.BytesIO(data))
                base, ext = nm.split(".", 1)
                groups.setdefault(base, {})[ext] = (at + 512, len(data), nm)
    tar.with_suffix(".idx").write_text(f"v1.2 {len(groups)}\n" + "".join(
        " ".join(f"{e} {o} {n} {nm}" for e, (o, n, nm) in g.items()) + "\n" for g in groups.values()))


# ---- 1 everything a shard manifest names stays in its folder -----------------------------------------------------
def test_pack_restart_never_deletes_files_outside_the_folder(data, tmp_path):
    index, store, store_path = data
    out = tmp_path / "set"
    S.pack(index, out, store, shard_bytes=100_000, progress=False)
    victim = tmp_path / "precious.tar"
    victim.write_bytes(b"keep me")
    victim.with_suffix(".idx").write_text("keep me too")
    m = json.loads((out / S.MANIFEST).read_text())
    m["shards"][0]["name"] = "../precious.tar"
    (out / S.MANIFEST).write_text(json.dumps(m))
    src = str(index.root.parent / "annotations.json")
    p = _cli("pack", src, "--out", str(out), "--boxes", str(store_path), "--shard-size", "150k", "--restart",
             "--no-progress")
    assert p.returncode != 0 and "'../precious.tar' is not a plain file name" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert victim.read_bytes() == b"keep me" and victim.with_suffix(".idx").exists()
    assert (out / "shard-000001.tar").exists()            # nothing was deleted
    with pytest.raises(ValueError, match="prefix"):      # nor written outside it
        S.pack(index, out, store, prefix="../x", progress=False)


def test_readers_refuse_shard_names_outside_the_folder(data, packed, tmp_path):
    other = tmp_path / "other"
    _copy(packed, other)
    out = tmp_path / "set"
    _copy(packed, out)
    m = json.loads((out / S.MANIFEST).read_text())
    m["shards"][1]["name"] = "../other/shard-000001.tar"
    (out / S.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(S.ShardError, match=r"'\.\./other/shard-000001\.tar' is not a plain file name"):
        S.ShardSet.open(out)
    p = _cli("proposals", str(out), "--out", str(tmp_path / "props"))
    assert p.returncode == 1 and "../other/shard-000001.tar" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
    assert not list(tmp_path.glob("props/*.tar"))             # nothing read from ../other, nothing written
    _ops()
    from dali_objcrop import ObjCropLoader
    with pytest.raises(S.ShardError, match="not a plain file name"):
        ObjCropLoader.from_shards(out, mode="obj-obj-dilate", batch_size=2, size=32, device="cpu")


# ---- 4 one pack job per output folder; --verify sees a manifest of another pack -------------------------------
def test_second_pack_of_the_same_folder_is_refused(data, tmp_path, monkeypatch):
    from dali_objcrop.joblock import OutputLockedError
    index, store, _ = data
    out = tmp_path / "set"
    started, release = threading.Event(), threading.Event()
    write = S.write_shard

    def paused(path, samples):          # fault injection: the first pack stops inside its first shard
        if threading.current_thread().name == "first":
            started.set()
            assert release.wait(60)
        return write(path, samples)

    monkeypatch.setattr(S, "write_shard", paused)
    errors = []
    t = threading.Thread(name="first", target=lambda: errors.append(
        S.pack(index, out, store, shard_bytes=100_000, progress=False)))
    t.start()
    try:
        assert started.wait(60)
        with pytest.raises(OutputLockedError, match=r"\.pack\.lock is locked by another pack job \(pid"):
            S.pack(index, out, None, shard_bytes=100_000, progress=False)    # other --boxes, same folder
    finally:
        release.set()
        t.join(60)
    assert isinstance(errors[0], S.PackReport)
    assert S.ShardSet.open(out).verify(deep=True) == {}


def test_verify_notices_a_manifest_that_does_not_match_its_shards(data, tmp_path):
    index, store, _ = data
    S.pack(index, tmp_path / "a", store, shard_bytes=100_000, progress=False)
    S.pack(index, tmp_path / "b", None, shard_bytes=100_000, progress=False)   # same plan, no boxes
    shutil.copy(tmp_path / "b" / S.MANIFEST, tmp_path / "a" / S.MANIFEST)      # b's manifest over a's shards
    bad = S.ShardSet.open(tmp_path / "a").verify(deep=True)
    assert any("boxes differ from the ones shards.json was planned with" in v for v in bad.values()), bad
    p = _cli("pack", "--out", str(tmp_path / "a"), "--verify")                  # no source argument needed
    assert p.returncode == 1 and "shard-000000.tar" in p.stderr, p.stdout + p.stderr[-2000:]


def test_pack_verify_needs_no_source(packed):
    p = _cli("pack", "--out", str(packed), "--verify")
    assert p.returncode == 0 and "0 damaged" in p.stdout, p.stderr[-2000:]


# ---- 5 the shard index is checked against the tar --------------------------------------------------------------
def test_an_index_that_lies_is_caught(packed, tmp_path):
    ss = _copy(packed, tmp_path / "set")
    idx = ss.tar(ss.shards[1]).with_suffix(".idx")
    lines = idx.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]             # two samples' entries (offsets) swapped
    idx.write_text("\n".join(lines) + "\n")
    assert "index disagrees with the tar" in ss.verify(deep=True)[ss.shards[1]["name"]]
    assert "index disagrees with the tar" in ss.verify(content=True)[ss.shards[1]["name"]]
    usable, bad = S.sound_shards(ss)                     # what the loader uses
    assert set(bad) == {ss.shards[1]["name"]} and len(usable) == len(ss.shards) - 1


def test_a_stale_index_over_a_longer_tar_is_caught(packed, tmp_path):
    ss = _copy(packed, tmp_path / "set")
    tar = ss.tar(ss.shards[0])
    old_idx = tar.with_suffix(".idx").read_text()
    extra = S.sample_name(999)
    _retar(tar, lambda n, b: [(n, b), (f"{extra}.jpg", b)] if n.endswith(".jpg") and n.startswith(
        S.sample_name(0)) else b)                        # the tar grew (another pack's), the index did not
    tar.with_suffix(".idx").write_text(old_idx)
    why = ss.verify()[ss.shards[0]["name"]]
    assert "stale" in why or "disagrees" in why
    assert ss.shards[0]["name"] in ss.verify(deep=True)


# ---- 6 boxes, positions and box lengths inside shards are checked; fallbacks are counted ---------------------------
@pytest.mark.parametrize("bad, why", [
    (np.array([np.nan, 0.1, 0.5, 0.5], "<f4"), "non-finite"),
    (np.array([0.1, 0.1, np.inf, 0.5], "<f4"), "non-finite"),
    (np.array([0.6, 0.1, 0.2, 0.5], "<f4"), "inverted"),
    (np.array([-0.5, 0.1, 0.2, 0.5], "<f4"), "outside [0, 1]"),
])
def test_invalid_boxes_inside_a_shard_are_named_and_the_shard_left_out(packed, tmp_path, bad, why):
    ss = _copy(packed, tmp_path / "set")
    tar, off, size = _member(ss, 1, 1, S.BOXES)
    assert size >= 16
    _patch(tar, off, bad.tobytes())
    got = S.sound_shards(ss)[1]
    assert set(got) == {ss.shards[1]["name"]} and why in got[ss.shards[1]["name"]], got
    assert "sample 1" in got[ss.shards[1]["name"]]


def test_a_tampered_position_is_named(packed, tmp_path):
    ss = _copy(packed, tmp_path / "set")
    tar, off, _ = _member(ss, 1, 0, S.POS)
    _patch(tar, off, np.array([4242], "<i8").tobytes())
    got = S.sound_shards(ss)[1]
    assert "position 4242, the plan says" in got[ss.shards[1]["name"]]
    _ops()
    from dali_objcrop import ObjCropLoader
    ld = ObjCropLoader.from_shards(tmp_path / "set", mode="obj-obj-dilate", batch_size=2, size=32, device="cpu")
    pos = np.concatenate([b["index"].numpy() for b in ld])
    assert pos.max() < ss.num_samples and set(ld.stats["damaged_shards"]) == {ss.shards[1]["name"]}


def test_wrong_length_boxes_skip_that_shard_by_name(packed, tmp_path):
    _ops()
    from dali_objcrop import ObjCropLoader
    ss = _copy(packed, tmp_path / "set")
    tar = ss.tar(ss.shards[3])
    first = ss.shards[3]["first"]
    _retar(tar, lambda n, b: b[:12] if n == f"{S.sample_name(first + 1)}.{S.BOXES}" else b)
    ld = ObjCropLoader.from_shards(tmp_path / "set", mode="obj-obj-dilate", batch_size=2, size=32, device="cpu")
    assert "multiple of 16" in ld.stats["damaged_shards"][ss.shards[3]["name"]]
    batches = list(ld)                                   # the epoch runs on the other shards
    assert len(batches) == len(ld) > 0


def test_shard_loader_counts_and_announces_scene_fallbacks(packed):
    _ops()
    from dali_objcrop import ObjCropLoader
    from dali_objcrop.loader import FallbackWarning
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ld = ObjCropLoader.from_shards(packed, mode="obj-obj-dilate", batch_size=4, size=32, device="cpu", shuffle=False)
    msgs = [str(x.message) for x in w if issubclass(x.category, FallbackWarning)]
    assert len(msgs) == 1 and "1 of 24 samples" in msgs[0]
    pos = np.concatenate([b["index"].numpy() for b in ld])
    assert ld.stats["fallback"] == int((pos == 3).sum()) == 1      # image 3 has no boxes
    ss = ObjCropLoader.from_shards(packed, mode="scene-scene", batch_size=4, size=32, device="cpu")
    next(iter(ss))
    assert ss.stats["fallback"] == 0


# ---- data that changes underneath: shards replaced or truncated after the loader checked them --------------------
def test_shard_truncated_after_the_loader_checked_it_is_named(packed, tmp_path):
    _ops()
    from dali_objcrop import ObjCropLoader
    ss = _copy(packed, tmp_path / "set")
    ld = ObjCropLoader.from_shards(tmp_path / "set", mode="obj-obj-dilate", batch_size=2, size=32, device="cpu")
    list(ld)
    tar = ss.tar(ss.shards[2])
    tar.write_bytes(tar.read_bytes()[:tar.stat().st_size // 2])
    with pytest.raises(S.ShardError, match=r"shard-000002\.tar: truncated"):
        list(ld)


# ---- 10 leftovers and rough edges ---------------------------------------------------------------------------------
def test_temporaries_of_a_killed_pack_are_removed_by_a_rerun(data, packed, tmp_path):
    index, store, _ = data
    out = tmp_path / "set"
    _copy(packed, out)
    dead = subprocess.Popen(["true"])
    dead.wait()                                           # a pid that no longer runs
    leftovers = [out / f"shard-000001.tar.{dead.pid}.tmp", out / f"shard-000001.idx.{dead.pid}.tmp",
                 out / f"{S.MANIFEST}.{dead.pid}.tmp"]
    for p in leftovers:
        p.write_bytes(b"half a shard")
    rep = S.pack(index, out, store, shard_bytes=100_000, progress=False)
    assert rep.cleaned == 3 and not any(p.exists() for p in leftovers)
    assert rep.written == 0 and S.ShardSet.open(out).verify(deep=True) == {}


def test_decode_error_inside_a_shard_names_the_shard_and_sample(packed, tmp_path):
    _ops()
    from dali_objcrop import ObjCropLoader
    ss = _copy(packed, tmp_path / "set")
    tar, off, size = _member(ss, 1, 1, "jpg")
    img = tar.read_bytes()[off:off + size]
    sos = img.find(b"\xff\xda")
    _patch(tar, off + sos, b"\xff\xd9" + b"\0" * (size - sos - 2))   # headers kept, no scan data
    ld = ObjCropLoader.from_shards(tmp_path / "set", mode="obj-obj-dilate", batch_size=2, size=32, device="cpu",
                       shuffle=False)
    with pytest.raises(RuntimeError, match=r"shard-000001\.tar sample 1 \(position \d+, .*\): corrupt or truncated"):
        list(ld)


# ---- 2 the plugin cache is verified before load_library, healed, and failures warn once ---------------------------
def _fake_tool(path: Path) -> str:
    path.write_text("#!/bin/sh\necho 'fake compiler: refusing' >&2\nexit 1\n")
    path.chmod(0o755)
    return str(path)


def _load_in_subprocess(env: dict, extra: str = "") -> subprocess.CompletedProcess:
    code = ("import warnings\n"
            "from dali_objcrop import plugin\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    ok = plugin.load()\n"
            "    plugin.load()\n"
            f"{extra}"
            "msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]\n"
            "print('RESULT', ok, len(msgs))\n"
            "print('\\n'.join(msgs))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


def test_truncated_cached_library_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    import ctypes

    from dali_objcrop.plugin import build
    if build.cxx() is None or build.cuda_include_dir() is None:
        pytest.skip("no C++ compiler or CUDA headers")
    monkeypatch.setenv("DALI_OBJCROP_HOME", str(tmp_path / "home"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "tiny.cc").write_text('extern "C" int objcrop_tiny() { return 42; }\n')
    lib = build.library_path(cuda=False, sources=src)
    assert build.cached_library_ok(lib)
    lib.write_bytes(lib.read_bytes()[:lib.stat().st_size // 2])          # a copy cut short, a full disk
    assert not build.cached_library_ok(lib)
    assert build.library_path(cuda=False, sources=src) == lib             # rebuilt in place
    assert build.cached_library_ok(lib) and ctypes.CDLL(str(lib)).objcrop_tiny() == 42


def test_truncated_cached_plugin_never_reaches_load_library(tmp_path, monkeypatch):
    from dali_objcrop import plugin
    from dali_objcrop.plugin import build
    if not plugin.load():
        pytest.skip(f"operators unavailable: {plugin.error()}")
    real = Path(plugin._state["path"])
    env = dict(ENV, CXX=_fake_tool(tmp_path / "fake-g++"), NVCC=str(tmp_path / "none" / "nvcc"),
               DALI_OBJCROP_HOME=str(tmp_path / "home"))
    for k in ("CXX", "NVCC", "DALI_OBJCROP_HOME"):
        monkeypatch.setenv(k, env[k])
    lib = build.home() / "plugin" / build.build_key(False)[0] / build.LIB_NAME
    lib.parent.mkdir(parents=True)
    shutil.copy(real, lib)
    build._record_library(lib)
    lib.write_bytes(real.read_bytes()[:real.stat().st_size // 3])          # truncated after it was cached
    p = _load_in_subprocess(env)
    assert p.returncode == 0, f"rc {p.returncode}: {p.stderr[-2000:]}"     # was: SIGBUS in load_library
    assert "RESULT False 1" in p.stdout and "fake-g++ exit 1" in p.stdout, p.stdout + p.stderr[-2000:]
    assert not lib.exists()                                                # the bad copy is gone


def test_loadable_library_without_the_operators_is_reported(tmp_path, monkeypatch, synth_set):
    from dali_objcrop.plugin import build
    if build.cxx() is None or build.cuda_include_dir() is None:
        pytest.skip("no C++ compiler or CUDA headers")
    src = tmp_path / "src"
    src.mkdir()
    (src / "tiny.cc").write_text('extern "C" int objcrop_tiny() { return 42; }\n')
    monkeypatch.setenv("DALI_OBJCROP_HOME", str(tmp_path / "tiny-home"))
    tiny = build.library_path(cuda=False, sources=src)
    env = dict(ENV, CXX=_fake_tool(tmp_path / "fake-g++"), NVCC=str(tmp_path / "none" / "nvcc"),
               DALI_OBJCROP_HOME=str(tmp_path / "home"))
    for k in ("CXX", "NVCC", "DALI_OBJCROP_HOME"):
        monkeypatch.setenv(k, env[k])
    lib = build.home() / "plugin" / build.build_key(False)[0] / build.LIB_NAME
    lib.parent.mkdir(parents=True)
    shutil.copy(tiny, lib)
    build._record_library(lib)                      # a sound file, but not our operators
    extra = ("    from dali_objcrop import ObjCropLoader\n"
             f"    ld = ObjCropLoader({str(synth_set)!r}, boxes='gt', batch_size=4, size=32, device='cpu')\n"
             "    print('PIPELINE', ld.stats['pipeline'], len(next(iter(ld))['index']))\n")
    p = _load_in_subprocess(env, extra)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "RESULT False 1" in p.stdout and "registers no objcrop operators" in p.stdout, p.stdout
    assert "PIPELINE dali-ops 4" in p.stdout, p.stdout
    assert not lib.exists()                         # removed: the next run builds the real one


def test_failed_build_with_nvcc_warns_once(tmp_path):
    env = dict(ENV, CXX=_fake_tool(tmp_path / "fake-g++"), NVCC=_fake_tool(tmp_path / "fake-nvcc"),
               DALI_OBJCROP_HOME=str(tmp_path / "home"), DALI_OBJCROP_CUDA_INCLUDE=str(tmp_path))
    p = _load_in_subprocess(env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "RESULT False 1" in p.stdout and "CUDA build failed first" in p.stdout, p.stdout


# ---- 3 the trainer never overwrites a run without --resume / --restart; 9 its settings and checkpoints ----------------
def _batches() -> RandomBatches:
    """A loader stand-in: two deterministic batches of (4, 3, 32, 32) per epoch."""
    return RandomBatches(n=4, size=32)


def _tiny(out: Path, **kw):
    from dali_objcrop.train.pretrain import Config
    return Config(**{**dict(arch="resnet18", head_hidden=32, head_out=16, queue_size=64, size=32, batch_size=4,
                            steps=2, ckpt_every=1, log_every=1, progress=False, device="cpu", out=str(out)), **kw})


def _steps(out: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_rerun_on_an_existing_out_is_refused_without_resume_or_restart(tmp_path):
    import torch
    from dali_objcrop.train.pretrain import OutputExistsError, main, train
    out = tmp_path / "run"
    train(_tiny(out), loader=_batches())
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(OutputExistsError, match=r"holds an earlier run \(ckpt\.pt.*--resume=auto.*--restart"):
        train(_tiny(out, steps=1), loader=_batches())
    assert (out / "ckpt.pt").read_bytes() == before and _steps(out) == [1, 2]      # untouched
    assert main(["--arch=resnet18", "--size=32", "--batch-size=4", "--steps=1", f"--out={out}",
                 "--progress=false", "--device=cpu"]) == 1                         # the CLI: one line, exit 1
    train(_tiny(out, steps=1, restart=True), loader=_batches())                    # said so: replaced
    assert _steps(out) == [1] and torch.load(out / "ckpt.pt", weights_only=True)["step"] == 1
    train(_tiny(out, steps=3, resume="auto"), loader=_batches())                   # continued
    assert _steps(out) == [1, 2, 3]


def test_refused_resume_leaves_config_json_as_it_was(tmp_path):
    from dali_objcrop.train.pretrain import train
    out = tmp_path / "run"
    train(_tiny(out), loader=_batches())
    before = (out / "config.json").read_text()
    with pytest.raises(ValueError, match="settings differ"):
        train(_tiny(out, steps=4, resume="auto", seed=7), loader=_batches())
    assert (out / "config.json").read_text() == before


def test_resume_after_a_torn_log_line(tmp_path):
    from dali_objcrop.train.pretrain import train
    out = tmp_path / "run"
    train(_tiny(out), loader=_batches())
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')                                   # killed in the middle of a write
    train(_tiny(out, steps=3, resume="auto"), loader=_batches())
    assert _steps(out) == [1, 2, 3]


def _exit_code(argv: list[str]) -> int:
    from dali_objcrop.train.pretrain import main
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("flag, says", [("--size=0", "size must be >= 1"), ("--dilate=5", "dilate must be in [0, 1]"),
                                        ("--crops=bogus", "mode must be one of"), ("--lr=nan", "nan"),
                                        ("--lr=inf", "lr must be a finite number"),
                                        ("--temperature=-1", "temperature must be > 0"),
                                        ("--num-threads=0", "num_threads must be >= 1")])
def test_trainer_range_errors_exit_2_with_one_line(tmp_path, capsys, synth_set, flag, says):
    small = ["--arch=resnet18", "--batch-size=4", "--steps=1", "--queue-size=64", "--head-hidden=32",
             "--head-out=16", "--device=cpu", "--num-threads=1", f"--data={synth_set}", "--boxes=gt"]
    rc = _exit_code(small + [flag, f"--out={tmp_path / 'run'}", "--progress=false"])   # a small run if not refused
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("pretrain: error:") and says in err[0], err
    assert not (tmp_path / "run").exists()


def test_truncated_checkpoint_error_names_the_file(tmp_path, capsys):
    from dali_objcrop.train.pretrain import load_checkpoint, train
    out = tmp_path / "run"
    train(_tiny(out), loader=_batches())
    ckpt = out / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:ckpt.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"cannot read checkpoint {ckpt}: damaged or truncated"):
        load_checkpoint(ckpt)
    rc = _exit_code(["--arch=resnet18", "--size=32", "--batch-size=4", "--steps=3", f"--out={out}",
                     "--resume=auto", "--progress=false", "--device=cpu", "--head-hidden=32", "--head-out=16",
                     "--queue-size=64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and str(ckpt) in err[0], err


def test_checkpoint_with_a_flipped_bit_is_refused(tmp_path):
    from dali_objcrop.train.pretrain import load_checkpoint, train
    out = tmp_path / "run"
    train(_tiny(out), loader=_batches())
    ckpt = out / "ckpt.pt"
    b = bytearray(ckpt.read_bytes())
    b[len(b) // 2] ^= 0x10                                  # inside a tensor's bytes: torch.load would not notice
    ckpt.write_bytes(bytes(b))
    with pytest.raises(ValueError, match=rf"cannot read checkpoint {ckpt}: damaged or truncated \(record .* CRC-32"):
        load_checkpoint(ckpt)


# ---- 7 two live iterators of one loader; 8 more ranks than images with drop_last=False --------------------------------
def test_an_older_iterator_is_stopped_by_a_newer_one(synth_set):
    _ops()
    from dali_objcrop import ObjCropLoader
    ld = ObjCropLoader(str(synth_set), boxes="gt", batch_size=4, size=32, device="cpu", num_threads=1)
    old = iter(ld)
    assert next(old)["index"].tolist() == ld.batches(0)[0].tolist()
    ld.set_epoch(1)
    new = iter(ld)
    got = [next(new)["index"].tolist()]
    with pytest.raises(RuntimeError, match=r"iterator of epoch 0 was superseded by a newer iter\(loader\) \(epoch 1\)"):
        next(old)                                          # was: an epoch-1 batch, taken from the newer iterator
    got += [b["index"].tolist() for b in new]
    assert got == [b.tolist() for b in ld.batches(1)]      # the newer one is whole


def test_more_ranks_than_images_still_give_every_rank_equal_batches(synth_set):
    from dali_objcrop.loader import shard_batches
    n, world = 5, 12
    per = [shard_batches(n, 2, 0, 0, r, world, drop_last=False) for r in range(world)]
    assert all(len(b) == 1 and len(b[0]) == 1 for b in per)          # was: ranks 10, 11 empty
    assert sorted({int(b[0][0]) for b in per}) == list(range(n))
    _ops()
    from dali_objcrop import ObjCropLoader
    ld = ObjCropLoader(str(synth_set), boxes="gt", batch_size=2, size=32, device="cpu", num_threads=1,
                       rank=59, world_size=60, drop_last=False)     # 24 images, 60 ranks
    batches = list(ld)
    assert len(batches) == len(ld) == 1 and len(batches[0]["index"]) == 1   # was: a DALI assert (empty batch)


# ---- data that changes underneath: a store or an image replaced after the loader read it ------------------------------
def test_box_store_replaced_after_the_loader_opened_it_is_refused(synth_set, tmp_path):
    _ops()
    from dali_objcrop import ObjCropLoader
    gt = BoxStore.from_coco(synth_set)
    path = gt.save(tmp_path / "s.boxes")
    ld = ObjCropLoader(str(synth_set), boxes=str(path), batch_size=4, size=32, device="cpu", num_threads=1)
    assert ld.uses_plugin
    gt.save(path)                                         # rewritten, same boxes: fine
    next(iter(ld))
    ld2 = ObjCropLoader(str(synth_set), boxes=str(path), batch_size=4, size=32, device="cpu", num_threads=1)
    other = BoxStore.from_arrays(list(gt.keys), gt.sizes, [np.array([[0.0, 0.0, 0.5, 0.5]], np.float32)] * len(gt))
    other.save(path)                                      # another job's store under the same name
    with pytest.raises(RuntimeError, match=r"s\.boxes changed since this loader opened it \(it holds other boxes"):
        next(iter(ld2))


def test_image_replaced_after_indexing_is_named(tmp_path):
    from PIL import Image

    from dali_objcrop import ObjCropLoader
    from dali_objcrop.synth import make_synthetic
    ann = make_synthetic(tmp_path, n=8, seed=0)
    ld = ObjCropLoader(str(ann), boxes="gt", batch_size=4, size=32, device="cpu", num_threads=1, use_plugin=False,
                       shuffle=False)
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(ld.index.paths[1], "JPEG")
    n = sum(len(b["index"]) for b in ld)                  # was: "every file ... decodes alone", naming none
    assert n == 8 and "changed since the loader indexed it (was" in ld.stats["decode_failures"][ld.key_of(1)]


def test_damaged_shard_manifest_is_named(packed, tmp_path):
    out = tmp_path / "set"
    _copy(packed, out)
    text = (out / S.MANIFEST).read_text()
    (out / S.MANIFEST).write_text(text[:len(text) // 2])            # cut short
    with pytest.raises(S.ShardError, match=r"shards\.json: unreadable shard manifest"):
        S.ShardSet.open(out)
    m = json.loads(text)
    m["shards"][0]["count"] = "2"
    (out / S.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(S.ShardError, match="first and count must be integers"):
        S.ShardSet.open(out)
