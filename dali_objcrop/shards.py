"""WebDataset shards of a dataset with its boxes: pack, index, verify, read back.

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
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

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
        ValueError: ``out`` holds shards of another plan (dataset, store or limits), unless ``restart``.
    """
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(f"need 0 <= part < num_parts, got part={part}, num_parts={num_parts}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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
        "shards": [{"name": shard_name(i, prefix), "first": f, "count": c} for i, (f, c) in enumerate(plan)],
    }
    mpath = out / MANIFEST
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if old != manifest:
            if not restart:
                diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
                raise ValueError(f"{out} holds shards of another pack (differs in {', '.join(diff)}); rerun the "
                                 f"same command to resume, or pass restart=True (--restart) to replace them")
            for s in old.get("shards", []):
                for p in (out / s["name"], (out / s["name"]).with_suffix(".idx")):
                    p.unlink(missing_ok=True)
            _write_text_atomic(mpath, json.dumps(manifest, indent=1))
    else:
        _write_text_atomic(mpath, json.dumps(manifest, indent=1))

    from tqdm import tqdm
    mine = manifest["shards"][part::num_parts]
    rep = PackReport(shards=len(mine), skipped=dict(index.bad))
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
    finally:
        bar.close()
    rep.seconds = time.perf_counter() - t0
    return rep


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
        manifest = json.loads(m.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{m}: unknown shard format {manifest.get('format')!r} (expected {FORMAT})")
        return cls(m.parent, manifest)

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    def tar(self, s: dict) -> Path:
        return self.root / s["name"]

    def verify(self, deep: bool = False) -> dict[str, str]:
        """``{shard file: problem}`` for every damaged or missing shard (empty when all are sound)."""
        bad = {}
        for s in self.shards:
            msg = check_shard(self.tar(s), expect=(s["first"], s["count"]), deep=deep)
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


def check_shard(tar: Path, expect: tuple[int, int] | None = None, deep: bool = False) -> str | None:
    """None if the shard looks sound, else what is wrong (the caller names the file).

    Cheap checks (index and file size only): both files exist, the index parses, holds
    ``expect[1]`` samples, every sample has an image, boxes, position and metadata, and the
    tar is long enough for every member the index lists.  ``deep`` also reads the tar
    with ``tarfile`` and compares each sample's position with the plan.
    """
    tar = Path(tar)
    if not tar.exists():
        return "missing"
    idx = tar.with_suffix(".idx")
    if not idx.exists():
        return "no index (.idx)"
    try:
        samples = read_index(idx)
    except (ShardError, ValueError) as e:
        return str(e)
    if expect is not None and len(samples) != expect[1]:
        return f"holds {len(samples)} samples, the plan says {expect[1]}"
    size = tar.stat().st_size
    end = 0
    for r, comps in enumerate(samples):
        if not any(e in IMAGE_EXTS for e in comps):
            return f"sample {r}: no image component"
        for c in (BOXES, POS, META):
            if c not in comps:
                return f"sample {r}: missing component {c}"
        end = max(end, max(o + n for o, n in comps.values()))
    if size < end:
        return f"truncated: {size} bytes, the index needs {end}"
    if deep:
        try:
            s = {"name": tar.name, "first": expect[0] if expect else 0}
            for r, smp in enumerate(ShardSet(tar.parent, {}).samples(s)):
                if expect is not None and smp["position"] != expect[0] + r:
                    return f"sample {r}: position {smp['position']}, expected {expect[0] + r}"
        except (tarfile.TarError, ShardError, ValueError, OSError) as e:
            return f"unreadable: {e}"
    return None


def sound_shards(shards: ShardSet, on_bad: str = "skip") -> tuple[list[dict], dict[str, str]]:
    """The shards a reader can use and ``{name: problem}`` of the others (``on_bad="raise"``: a
    :class:`ShardError` naming every damaged shard instead)."""
    bad = shards.verify()
    if bad and on_bad == "raise":
        raise ShardError("damaged shard(s) in " + str(shards.root) + ": "
                         + "; ".join(f"{k}: {v}" for k, v in bad.items()))
    return [s for s in shards.shards if s["name"] not in bad], bad
