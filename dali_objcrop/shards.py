"""WebDataset shards of a dataset with its boxes: pack, index, verify, read back.

One module of ~700 lines on purpose: the tar layout, its index, the checks and the reader are one
format, and every rule about what a shard may name or hold is in this one place.

A shard set is a folder::

    shards.json                 the plan: samples per shard, dataset fingerprint, box-store meta
    shard-000000.tar  .idx      plain (ustar) tar files and DALI's index of each (format v1.2)
    ...

Every sample of a shard is a group of tar members sharing one base name, the dataset
position written with ten digits (``0000000042``); WebDataset and ``fn.readers.webdataset``
group components by that name::

    0000000042.jpg         the encoded image, byte for byte as on disk (``.png`` etc. keep
                           their suffix)
    0000000042.boxes.f32   proposals: float32 little-endian, 4 per box, normalised
                           [x1, y1, x2, y2], best-first (0 bytes: no boxes)
    0000000042.scores.f32  float32 per box (only where the store has scores)
    0000000042.pos.i64     the dataset position, int64 little-endian: the random key of the
                           crop windows, so a sample's windows stay recomputable
    0000000042.json        {"key", "position", "width", "height", "boxes"}: readable without code

``tar -tvf shard-000000.tar`` lists a shard and ``tar -xf`` unpacks it; nothing here is
needed to read one.  Samples lie in dataset order and shard ``i`` holds the consecutive
positions ``[first, first + count)`` recorded in ``shards.json``, which is written first (the
plan is fixed by the image file sizes and the limits); each shard is then written to a
temporary name and renamed, its index last, so a killed ``pack`` resumes with the shards it
had not finished and produces the same bytes (tar headers carry no time, owner or mode that
depends on the machine).
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import faults
from .boxstore import BoxStore, fingerprint
from .dataset import ImageIndex

MANIFEST = "shards.json"
FORMAT = "dali_objcrop-webdataset-1"
IDX_VERSION = "v1.2"            # what DALI 2.4's wds2idx writes and fn.readers.webdataset reads
BOXES, SCORES, POS, META = "boxes.f32", "scores.f32", "pos.i64", "json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp")
_BLOCK = 512


class ShardError(ValueError):
    """A shard is damaged (truncated, a component missing, its index disagreeing): names the file."""


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_shard_name(name, where: str = "") -> str:
    """``name`` if it is a plain file name ending in ``.tar`` (no folder, no ``..``), else a
    :class:`ShardError` naming it: everything a manifest names stays inside its folder."""
    if not (isinstance(name, str) and name.endswith(".tar") and _SAFE_NAME.fullmatch(name) and ".." not in name):
        raise ShardError(f"{where or 'shard manifest'}: shard name {name!r} is not a plain file name "
                         f"'<prefix>-NNNNNN.tar' inside the shard folder; refusing to read or delete it")
    return name


def _tar_size(end: int) -> int:
    """Bytes of a tar written by :mod:`tarfile` whose last member's data ends at ``end``: the data
    padded to a block, the two end blocks, the whole padded to a record (``tarfile.RECORDSIZE``)."""
    used = -(-end // _BLOCK) * _BLOCK + 2 * _BLOCK
    return -(-used // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


@dataclass
class PackReport:
    """What :func:`pack` did."""

    shards: int = 0
    written: int = 0
    resumed: int = 0
    samples: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: dict = field(default_factory=dict)   # key -> why (the index scan left it out)
    cleaned: int = 0                              # temporaries of a killed earlier pack removed


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
def _member_bytes(size: int) -> int:
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def plan_shards(file_sizes: Sequence[int], box_counts: Sequence[int], shard_bytes: int,
                max_samples: int | None = None, with_scores: bool = False) -> list[tuple[int, int]]:
    """Cut consecutive samples into shards: ``[(first, count), ...]``.

    A shard closes before the sample that would take it over ``shard_bytes`` (tar bytes,
    headers included) or over ``max_samples``; a single sample larger than the limit gets a
    shard of its own.
    """
    if shard_bytes < 4 * _BLOCK:
        raise ValueError(f"shard_bytes must be >= {4 * _BLOCK}, got {shard_bytes}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    out, first, used = [], 0, 2 * _BLOCK          # the tar end marker
    for i, (fs, k) in enumerate(zip(file_sizes, box_counts)):
        need = (_member_bytes(int(fs)) + _member_bytes(16 * int(k)) + _member_bytes(8) + _member_bytes(200)
                + (_member_bytes(4 * int(k)) if with_scores else 0))
        count = i - first
        if count and (used + need > shard_bytes or (max_samples is not None and count >= max_samples)):
            out.append((first, count))
            first, used = i, 2 * _BLOCK
        used += need
    if len(file_sizes) > first:
        out.append((first, len(file_sizes) - first))
    return out


def shard_name(i: int, prefix: str = "shard") -> str:
    return f"{prefix}-{i:06d}.tar"


def sample_name(position: int) -> str:
    return f"{int(position):010d}"


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _add(tf: tarfile.TarFile, name: str, data: bytes, entries: list) -> None:
    """Add one member with machine-independent metadata; record (ext, data offset, size, name)."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
    header_at = tf.offset
    tf.addfile(ti, io.BytesIO(data))
    ext = name[name.find(".") + 1:]
    entries.append((ext, header_at + _BLOCK, len(data), name))   # ustar: one header block, names < 100


def write_shard(path: Path, samples: Iterator[dict]) -> tuple[int, int]:
    """Write one shard and its index atomically; ``samples`` yields dicts with ``position``,
    ``key``, ``image`` (bytes), ``ext``, ``width``, ``height``, ``boxes`` ((k, 4) float32) and
    optionally ``scores``.  Returns ``(samples, bytes)``."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    groups: list[list] = []
    try:
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for s in samples:
                    base, entries = sample_name(s["position"]), []
                    boxes = np.ascontiguousarray(s["boxes"], dtype="<f4").reshape(-1, 4)
                    meta = {"key": s["key"], "position": int(s["position"]), "width": int(s["width"]),
                            "height": int(s["height"]), "boxes": len(boxes)}
                    _add(tf, f"{base}.{s['ext']}", s["image"], entries)
                    _add(tf, f"{base}.{BOXES}", boxes.tobytes(), entries)
                    if s.get("scores") is not None:
                        _add(tf, f"{base}.{SCORES}", np.ascontiguousarray(s["scores"], "<f4").tobytes(), entries)
                    _add(tf, f"{base}.{POS}", np.array([s["position"]], "<i8").tobytes(), entries)
                    _add(tf, f"{base}.{META}", json.dumps(meta, sort_keys=True).encode("utf-8"), entries)
                    groups.append(entries)
            raw.flush()
            os.fsync(raw.fileno())
        size = tmp.stat().st_size
        idx_text = f"{IDX_VERSION} {len(groups)}\n" + "".join(
            " ".join(f"{e} {o} {n} {nm}" for e, o, n, nm in g) + "\n" for g in groups)
        os.replace(tmp, path)
        _write_text_atomic(path.with_suffix(".idx"), idx_text)   # the index last: it marks the shard done
        return len(groups), size
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _image_ext(key: str) -> str:
    ext = Path(key).suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTS:
        raise ValueError(f"image {key!r}: suffix {ext!r} is not one of {IMAGE_EXTS}")
    return ext


def pack(index: ImageIndex, out: str | os.PathLike, store: BoxStore | None = None, shard_bytes: int = 256 << 20,
         max_samples: int | None = None, prefix: str = "shard", restart: bool = False, progress: bool = True,
         max_shards: int | None = None, verify_existing: bool = True, part: int = 0,
         num_parts: int = 1) -> PackReport:
    """Pack a dataset (and its box store) into WebDataset shards in the folder ``out``.

    Args:
        index: the images, in dataset order (positions = rows of ``index``).
        out: output folder (created).
        store: the proposals; None writes samples with no boxes (``scene-scene`` only).
        shard_bytes: size limit of a shard (tar bytes).
        max_samples: also at most this many samples per shard.
        prefix: shard file names ``<prefix>-NNNNNN.tar``.
        restart: discard a different plan in ``out`` instead of refusing it.
        progress: tqdm bar over samples.
        max_shards: write at most this many shards in this call (a bounded run; rerun to go on).
        verify_existing: check a finished shard against its index before skipping it.
        part, num_parts: write only shards ``part, part + num_parts, ...`` (several processes or
            machines packing one set; every part writes the same ``shards.json``, and the set is
            complete when every part has finished: ``ShardSet.verify()`` says which shards are not).

    Returns:
        a :class:`PackReport`.

    Raises:
        ValueError: ``out`` holds shards of another plan (dataset, store or limits), unless ``restart``;
            ``restart`` while another part packs there, or an old manifest naming a file outside ``out``.
        OutputLockedError: another pack job of the same part (or folder) is running.
    """
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(f"need 0 <= part < num_parts, got part={part}, num_parts={num_parts}")
    check_shard_name(shard_name(0, prefix), "prefix")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from .joblock import JobLock
    # one job per part (num_parts=1: per folder); parts of one pack run side by side
    lock_name = ".pack.lock" if num_parts == 1 else f".pack.part-{part:05d}-of-{num_parts:05d}.lock"
    with JobLock(out / lock_name, "pack job"):
        return _pack(index, out, store, shard_bytes, max_samples, prefix, restart, progress, max_shards,
                     verify_existing, part, num_parts, out / lock_name)


def _pack(index, out: Path, store, shard_bytes, max_samples, prefix, restart, progress, max_shards,
          verify_existing, part, num_parts, my_lock: Path) -> PackReport:
    t0 = time.perf_counter()
    rows = None
    if store is not None:
        rows = store.rows_for(index.keys, index.sizes)
        counts = (store.offsets[rows + 1] - store.offsets[rows]).astype(np.int64)
    else:
        counts = np.zeros(len(index), np.int64)
    paths = index.paths
    exts = [_image_ext(k) for k in index.keys]
    sizes = [os.path.getsize(p) for p in paths]
    with_scores = store is not None and store.scores is not None
    plan = plan_shards(sizes, counts, shard_bytes, max_samples, with_scores)
    manifest = {
        "format": FORMAT, "num_samples": len(index), "fingerprint": fingerprint(index.keys),
        "shard_bytes": int(shard_bytes), "max_samples": max_samples, "with_scores": with_scores,
        "file_sizes_sha": _sha(np.asarray(sizes, np.int64).tobytes()),
        "store": None if store is None else {"fingerprint": store.fingerprint, "method": store.meta.get("method"),
                                             "params": store.meta.get("params", {}),
                                             "boxes_sha": _sha(np.asarray(store.boxes, "<f4").tobytes()),
                                             # the loader derives box_scale from these, as from the store
                                             "mean_area_by_top_k": _mean_areas(store)},
        "skipped_by_scan": dict(index.bad),
        "shards": [{"name": shard_name(i, prefix), "first": f, "count": c,
                    "boxes_sha": _boxes_digest(store, rows, f, c)} for i, (f, c) in enumerate(plan)],
    }
    mpath = out / MANIFEST
    with _folder_lock(out):   # parts starting together: one of them writes the plan, the others compare
        rep_cleaned = _remove_stale_tmp(out, MANIFEST)
        if mpath.exists():
            try:
                old = json.loads(mpath.read_text())
                if not isinstance(old, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as e:
                if not restart:
                    raise ValueError(f"{mpath} is unreadable ({e}); pass restart=True (--restart) to replace it")
                old = {}
            if old != manifest:
                if not restart:
                    diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
                    raise ValueError(f"{out} holds shards of another pack (differs in {', '.join(diff)}); rerun the "
                                     f"same command to resume, or pass restart=True (--restart) to replace them")
                busy = _other_pack_jobs(out, my_lock)
                if busy:
                    raise ValueError(f"cannot restart {out}: another pack job is running there ({', '.join(busy)})")
                old_shards = old.get("shards", [])
                names = [s.get("name") if isinstance(s, dict) else s for s in old_shards] \
                    if isinstance(old_shards, list) else [old_shards]
                for n in names:   # confined: a name that is not a plain file of out is refused, nothing deleted
                    check_shard_name(n, str(mpath))
                for n in names:
                    for p in (out / n, (out / n).with_suffix(".idx")):
                        p.unlink(missing_ok=True)
                _write_text_atomic(mpath, json.dumps(manifest, indent=1))
        else:
            _write_text_atomic(mpath, json.dumps(manifest, indent=1))

    from tqdm import tqdm
    mine = manifest["shards"][part::num_parts]
    rep = PackReport(shards=len(mine), skipped=dict(index.bad), cleaned=rep_cleaned)
    for s in mine:   # temporaries a killed pack of this part left (this part's lock is ours)
        rep.cleaned += _remove_stale_tmp(out, s["name"]) + _remove_stale_tmp(out, Path(s["name"]).stem + ".idx")
    done = []
    for s in mine:
        p = out / s["name"]
        ok = p.exists() and p.with_suffix(".idx").exists()
        if ok and verify_existing:
            ok = not check_shard(p, expect=(s["first"], s["count"]))
        done.append(ok)
    rep.resumed = sum(done)
    bar = tqdm(total=sum(s["count"] for s in mine), initial=sum(s["count"] for s, d in zip(mine, done) if d),
               unit="img", desc="pack" if num_parts == 1 else f"pack {part}/{num_parts}", disable=not progress,
               smoothing=0.1)
    try:
        for s, d in zip(mine, done):
            if d:
                continue
            if max_shards is not None and rep.written >= max_shards:
                break

            def samples(first=s["first"], count=s["count"]):
                for i in range(first, first + count):
                    with open(paths[i], "rb") as f:
                        data = f.read()
                    b = store.boxes_of(rows[i]) if store is not None else np.zeros((0, 4), np.float32)
                    sc = None
                    if with_scores:
                        sc = store.scores[store.offsets[rows[i]]:store.offsets[rows[i] + 1]]
                    yield {"position": i, "key": index.keys[i], "image": data, "ext": exts[i],
                           "width": int(index.sizes[i][0]), "height": int(index.sizes[i][1]), "boxes": b,
                           "scores": sc}
                    bar.update(1)

            n, nbytes = write_shard(out / s["name"], samples())
            rep.written += 1
            rep.samples += n
            rep.bytes += nbytes
            faults.point("pack.shard")
    finally:
        bar.close()
    rep.seconds = time.perf_counter() - t0
    return rep


def _boxes_digest(store: BoxStore | None, rows, first: int, count: int) -> str:
    """sha256 of a shard's boxes as the tar holds them: the per-sample box counts (int64), then every
    box (float32, little-endian) in sample order."""
    import hashlib
    if store is None:
        return hashlib.sha256(np.zeros(count, "<i8").tobytes()).hexdigest()
    r = np.asarray(rows[first:first + count], np.int64)
    starts, ends = store.offsets[r].astype(np.int64), store.offsets[r + 1].astype(np.int64)
    lens = ends - starts
    take = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))   # rows' boxes, in order
    boxes = np.ascontiguousarray(np.asarray(store.boxes)[take], "<f4").reshape(-1, 4)
    return hashlib.sha256(lens.astype("<i8").tobytes() + boxes.tobytes()).hexdigest()


def boxes_digest_of(samples) -> str:
    """:func:`_boxes_digest` of decoded samples (what ``ShardSet.samples`` yields)."""
    import hashlib
    counts, parts = [], []
    for smp in samples:
        b = np.ascontiguousarray(smp["boxes"], "<f4").reshape(-1, 4)
        counts.append(len(b))
        parts.append(b.tobytes())
    return hashlib.sha256(np.asarray(counts, "<i8").tobytes() + b"".join(parts)).hexdigest()


class _folder_lock:
    """A blocking ``flock`` on the folder itself (no file left behind), for the short plan check."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __enter__(self):
        import fcntl
        self.fd = os.open(self.folder, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)   # drops the lock


def _other_pack_jobs(out: Path, mine: Path) -> list[str]:
    """Lock files of other pack jobs in ``out`` that a live process holds."""
    import fcntl
    busy = []
    for p in sorted(out.glob(".pack*.lock")):
        if p.name == mine.name:
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            busy.append(p.name)
        finally:
            os.close(fd)
    return busy


def _remove_stale_tmp(out: Path, name: str) -> int:
    """Remove ``out/<name>.<pid>.tmp`` files whose writer is gone; returns how many."""
    n = 0
    for p in out.glob(_glob_escape(name) + ".*.tmp"):
        pid = p.name[len(name) + 1:-4]
        if not pid.isdigit():
            continue
        if int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue   # another live job on this machine is writing it
        p.unlink(missing_ok=True)
        n += 1
    return n


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _glob_escape(name: str) -> str:
    import glob
    return glob.escape(name)


def _mean_areas(store: BoxStore, max_k: int = 32) -> dict[str, float] | None:
    """``store.mean_area_fraction(k)`` for k = 1..max_k and ``"all"`` (None without boxes)."""
    if store.num_boxes == 0:
        return None
    out = {str(k): store.mean_area_fraction(k) for k in range(1, max_k + 1)}
    out["all"] = store.mean_area_fraction(None)
    return out


def _sha(b: bytes) -> str:
    import hashlib
    return hashlib.sha256(b).hexdigest()


# ---------------------------------------------------------------------------------------------
# reading: manifest, index, verification, samples
# ---------------------------------------------------------------------------------------------
@dataclass
class ShardSet:
    """A packed shard set (its folder and manifest)."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | os.PathLike) -> "ShardSet":
        root = Path(root)
        m = root / MANIFEST if root.is_dir() else root
        if not m.is_file():
            raise FileNotFoundError(f"{root} is not a shard set: no {MANIFEST}")
        try:
            manifest = json.loads(m.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ShardError(f"{m}: unreadable shard manifest ({e}); repack, or rerun pack to rewrite it") from None
        if not isinstance(manifest, dict):
            raise ShardError(f"{m}: a shard manifest is a JSON object")
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{m}: unknown shard format {manifest.get('format')!r} (expected {FORMAT})")
        shards = manifest.get("shards")
        if not isinstance(shards, list) or not all(isinstance(x, dict) and {"name", "first", "count"} <= set(x)
                                                   for x in shards):
            raise ShardError(f"{m}: 'shards' must be a list of {{name, first, count}} entries")
        for x in shards:
            check_shard_name(x["name"], str(m))
            if not all(isinstance(x[k], int) and not isinstance(x[k], bool) and x[k] >= 0 for k in ("first", "count")):
                raise ShardError(f"{m}: shard {x['name']}: first and count must be integers >= 0")
        return cls(m.parent, manifest)

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    def tar(self, s: dict) -> Path:
        return self.root / s["name"]

    def verify(self, deep: bool = False, content: bool = False) -> dict[str, str]:
        """``{shard file: problem}`` for every damaged or missing shard (empty when all are sound).

        Levels as :func:`check_shard`: the index only (default), ``content`` (also every member's
        tar header, the positions, boxes and metadata the index points at), ``deep`` (also the
        whole tar read in order against the index, and the manifest's box digest)."""
        bad = {}
        for s in self.shards:
            msg = check_shard(self.tar(s), expect=(s["first"], s["count"]), deep=deep, content=content,
                              boxes_sha=s.get("boxes_sha"))
            if msg:
                bad[s["name"]] = msg
        return bad

    def locate(self, position: int) -> tuple[dict, int]:
        """The shard holding a dataset position, and the sample's rank within it."""
        firsts = [s["first"] for s in self.shards]
        j = int(np.searchsorted(firsts, position, side="right")) - 1
        if j < 0 or not 0 <= position - self.shards[j]["first"] < self.shards[j]["count"]:
            raise IndexError(f"position {position} is in no shard of {self.root}")
        return self.shards[j], position - self.shards[j]["first"]

    def read_sample(self, position: int) -> dict:
        """One sample's components by position (via the shard's index; bytes, and decoded boxes/meta)."""
        s, r = self.locate(int(position))
        idx = read_index(self.tar(s).with_suffix(".idx"))
        comps = idx[r]
        out = {}
        with open(self.tar(s), "rb") as f:
            for ext, (off, size) in comps.items():
                f.seek(off)
                out[ext] = f.read(size)
        return decode_sample(out, where=f"{s['name']} sample {r}")

    def samples(self, s: dict) -> Iterator[dict]:
        """Every sample of a shard in order, read with the standard ``tarfile`` module (no index)."""
        cur, base = {}, None
        with tarfile.open(self.tar(s), "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                b, ext = m.name.split(".", 1)
                if base is not None and b != base:
                    yield decode_sample(cur, where=f"{s['name']}:{base}")
                    cur = {}
                base = b
                cur[ext] = tf.extractfile(m).read()
        if cur:
            yield decode_sample(cur, where=f"{s['name']}:{base}")


def decode_sample(comps: dict[str, bytes], where: str = "") -> dict:
    """Components (bytes by extension) -> ``{image, ext, boxes, scores, position, key, width, height}``."""
    img_ext = [e for e in comps if e in IMAGE_EXTS]
    missing = [c for c in (BOXES, POS, META) if c not in comps] + ([] if img_ext else ["image"])
    if missing:
        raise ShardError(f"{where}: missing component(s) {', '.join(missing)}")
    meta = json.loads(comps[META].decode("utf-8"))
    boxes = np.frombuffer(comps[BOXES], dtype="<f4").reshape(-1, 4)
    return {"image": comps[img_ext[0]], "ext": img_ext[0], "boxes": boxes,
            "scores": np.frombuffer(comps[SCORES], "<f4") if SCORES in comps else None,
            "position": int(np.frombuffer(comps[POS], "<i8")[0]), "key": meta["key"],
            "width": meta["width"], "height": meta["height"]}


def read_index(path: Path) -> list[dict[str, tuple[int, int]]]:
    """A v1.2 WebDataset index: per sample ``{ext: (data offset, size)}``."""
    lines = Path(path).read_text().splitlines()
    if not lines:
        raise ShardError(f"{path}: empty index")
    head = lines[0].split()
    if len(head) != 2 or head[0] != IDX_VERSION:
        raise ShardError(f"{path}: not a {IDX_VERSION} WebDataset index (first line {lines[0][:40]!r})")
    out = []
    for ln in lines[1:1 + int(head[1])]:
        t = ln.split()
        if len(t) % 4:
            raise ShardError(f"{path}: malformed index line {ln[:80]!r}")
        out.append({t[i]: (int(t[i + 1]), int(t[i + 2])) for i in range(0, len(t), 4)})
    if len(out) != int(head[1]):
        raise ShardError(f"{path}: index announces {head[1]} samples, lists {len(out)}")
    return out


def _octal(field: bytes) -> int:
    t = field.rstrip(b"\0 ").strip()
    return int(t, 8) if t else 0


def _valid_boxes(b: np.ndarray) -> str | None:
    """None if every box is finite, inside [0, 1] and not inverted/empty, else what is wrong."""
    if not len(b):
        return None
    if not np.isfinite(b).all():
        return "non-finite box values"
    if (b < 0).any() or (b > 1).any():
        return "box values outside [0, 1]"
    if not ((b[:, 0] < b[:, 2]) & (b[:, 1] < b[:, 3])).all():
        return "inverted or empty boxes (x1 >= x2 or y1 >= y2)"
    return None


def _check_members(f, samples: list[dict], first: int) -> str | None:
    """Every member's tar header agrees with the index (name, size); positions, boxes, scores and
    metadata are what the plan says and valid."""
    for r, comps in enumerate(samples):
        base = sample_name(first + r)
        data = {}
        for ext, (off, size) in comps.items():
            if off < _BLOCK:
                return f"sample {r} ({base}): index offset {off} of {ext} is before any tar header"
            f.seek(off - _BLOCK)
            head = f.read(_BLOCK)
            if len(head) < _BLOCK:
                return f"sample {r} ({base}): truncated at the header of {ext}"
            name = head[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            prefix = head[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            name = f"{prefix}/{name}" if prefix else name
            try:
                hsize = _octal(head[124:136])
            except ValueError:
                return f"sample {r} ({base}): no tar header at offset {off - _BLOCK} (index disagrees with the tar)"
            if name != f"{base}.{ext}" or hsize != size:
                return (f"sample {r} ({base}): the index points {ext} at offset {off}, where the tar holds "
                        f"{name!r} ({hsize} bytes): the index disagrees with the tar")
            if ext in (BOXES, POS, META, SCORES):
                data[ext] = f.read(size)
                if len(data[ext]) != size:
                    return f"sample {r} ({base}): truncated in {ext}"
        pos = int(np.frombuffer(data[POS], "<i8")[0])
        if pos != first + r:
            return f"sample {r} ({base}): {POS} holds position {pos}, the plan says {first + r}"
        boxes = np.frombuffer(data[BOXES], "<f4").reshape(-1, 4)
        why = _valid_boxes(boxes)
        if why:
            return f"sample {r} ({base}): {why} in {BOXES}"
        if SCORES in data and len(data[SCORES]) != 4 * len(boxes):
            return f"sample {r} ({base}): {len(data[SCORES])} bytes of {SCORES} for {len(boxes)} boxes"
        try:
            meta = json.loads(data[META].decode("utf-8"))
            ok = isinstance(meta, dict) and meta.get("position") == pos and meta.get("boxes") == len(boxes)
        except (ValueError, UnicodeDecodeError):
            ok = False
        if not ok:
            return f"sample {r} ({base}): {META} is unreadable or disagrees with the sample"
    return None


def check_shard(tar: Path, expect: tuple[int, int] | None = None, deep: bool = False, content: bool = False,
                boxes_sha: str | None = None) -> str | None:
    """None if the shard looks sound, else what is wrong (the caller names the file).

    Index checks (the index and the file size; what DALI's reader will read): both files exist,
    the index parses, holds ``expect[1]`` samples named by the plan's positions, every sample has
    an image, boxes (a multiple of 16 bytes), position (8 bytes) and metadata, and the tar is as
    long as the index says (shorter: truncated; longer: a stale index).  ``content`` also reads,
    through the index, every member's tar header (its name and size must be what the index
    says) and the small members: positions as planned, boxes finite, inside [0, 1] and not
    inverted, scores one per box.  ``deep`` adds reading the whole tar with ``tarfile``: the
    members, their offsets and sizes must be exactly the index's, and the boxes must match the
    manifest's digest (``boxes_sha``) where it has one.
    """
    tar = Path(tar)
    if not tar.exists():
        return "missing"
    idx = tar.with_suffix(".idx")
    if not idx.exists():
        return "no index (.idx)"
    try:
        samples = read_index(idx)
    except (ShardError, ValueError, UnicodeDecodeError) as e:
        return str(e)
    if expect is not None and len(samples) != expect[1]:
        return f"holds {len(samples)} samples, the plan says {expect[1]}"
    first = expect[0] if expect is not None else None
    size = tar.stat().st_size
    end = 0
    for r, comps in enumerate(samples):
        if not any(e in IMAGE_EXTS for e in comps):
            return f"sample {r}: no image component"
        for c in (BOXES, POS, META):
            if c not in comps:
                return f"sample {r}: missing component {c}"
        if comps[BOXES][1] % 16 or comps[POS][1] != 8:
            return (f"sample {r}: {BOXES} of {comps[BOXES][1]} bytes (a multiple of 16 expected) or {POS} of "
                    f"{comps[POS][1]} bytes (8 expected)")
        if any(o < 0 or n < 0 for o, n in comps.values()):
            return f"sample {r}: negative offset or size in the index"
        end = max(end, max(o + n for o, n in comps.values()))
    if size < end:
        return f"truncated: {size} bytes, the index needs {end}"
    if samples and size != _tar_size(end):
        return (f"{size} bytes, its index accounts for {_tar_size(end)}: the tar was replaced or the index is "
                f"stale; repack this shard")
    if first is None and (content or deep):
        first = _first_position(tar, samples)
        if first is None:
            return "unreadable: no position"
    if content or deep:
        try:
            with open(tar, "rb") as f:
                why = _check_members(f, samples, first)
        except (OSError, ValueError) as e:
            return f"unreadable: {e}"
        if why:
            return why
    if deep:
        try:
            got = []
            with tarfile.open(tar, "r:") as tf:
                for m in tf:
                    got.append((m.name, m.offset_data, m.size))
            want = sorted((f"{sample_name(first + r)}.{e}", o, n) for r, comps in enumerate(samples)
                          for e, (o, n) in comps.items())
            if sorted(got) != want:
                extra = sorted(set(got) - set(want))[:3]
                lost = sorted(set(want) - set(got))[:3]
                return (f"the index disagrees with the tar ({len(got)} members in the tar, {len(want)} in the "
                        f"index; tar only: {extra}, index only: {lost})")
            if boxes_sha is not None:
                ss = ShardSet(tar.parent, {})
                if boxes_digest_of(ss.samples({"name": tar.name, "first": first})) != boxes_sha:
                    return "its boxes differ from the ones shards.json was planned with (another pack's?)"
        except (tarfile.TarError, ShardError, ValueError, OSError) as e:
            return f"unreadable: {e}"
    return None


def _first_position(tar: Path, samples: list[dict]) -> int | None:
    try:
        with open(tar, "rb") as f:
            off, _ = samples[0][POS]
            f.seek(off)
            return int(np.frombuffer(f.read(8), "<i8")[0])
    except (OSError, ValueError, IndexError):
        return None


def sound_shards(shards: ShardSet, on_bad: str = "skip", content: bool = True) -> tuple[list[dict], dict[str, str]]:
    """The shards a reader can use and ``{name: problem}`` of the others (``on_bad="raise"``: a
    :class:`ShardError` naming every damaged shard instead).  ``content`` (default): the
    :func:`check_shard` content level (index against the tar headers, positions, box values)."""
    bad = shards.verify(content=content)
    if bad and on_bad == "raise":
        raise ShardError("damaged shard(s) in " + str(shards.root) + ": "
                         + "; ".join(f"{k}: {v}" for k, v in bad.items()))
    return [s for s in shards.shards if s["name"] not in bad], bad
