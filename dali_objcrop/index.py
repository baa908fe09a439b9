"""The image index of a dataset, built once, saved with a checksum, memory-mapped by every later run.

:class:`~dali_objcrop.dataset.ImageIndex` built from a COCO json parses the whole file into Python
objects and scans every file's header in one thread: at 1M images ~110 s and 6.6 GB, on every rank.
:func:`open_index` does that work once per source:

* **Build** (:func:`build_index`): a COCO json is read in one streaming pass into arrays
  (:mod:`dali_objcrop.coco_stream`); the header scan runs in worker processes across all cores, started
  as soon as the ``images`` array is read, while the main process reads the annotations.  The ground-truth
  boxes of the same pass become a box store (what ``boxes="gt"``, ``BoxStore.from_coco`` and
  ``proposals --method gt`` use), so the json is parsed once.
  (the scan itself: :mod:`dali_objcrop.header_scan`)
* **Save**: an ``.index`` file in the cache (``$DALI_OBJCROP_HOME/index/``; a source folder may be
  read-only): magic, a JSON header (the source's fingerprint, the scan's rejects, counts), a sha256 of
  the header and one of the arrays (utf-8 keys and their offsets, (N, 2) int32 sizes), written to a
  temporary file and renamed.  Beside it ``<name>.gt.boxes`` for a json.
* **Map**: later runs and every rank memory-map the arrays (the page cache holds one copy per machine),
  after checking both checksums (~50 ms at 1M images).  Keys are decoded on demand; a store whose key
  fingerprint equals the index's needs no key dictionary (:meth:`BoxStore.rows_for`).
* **Many ranks**: whoever comes first takes an exclusive ``flock`` on ``<index>.lock`` and builds; the
  others block on the lock, then find the index built and map it.  A builder that dies releases the lock
  (the kernel drops it), and the next waiter builds.
* **A changed source rebuilds**: the fingerprint is the json's size, mtime and inode (a folder source:
  every directory's mtime, so files added, removed or renamed show), the image folders' mtimes and the
  build settings (``check``, ``allow_outside_root``).  A file replaced in place under the same name with
  an unchanged folder is not seen (the loader still names it if it fails to decode).
* **A damaged index is refused by name** (:class:`IndexFileError`: truncated, bad magic, a checksum
  mismatch, arrays that break the format) and :func:`open_index` rebuilds it, saying so once.

The result is an :class:`~dali_objcrop.dataset.ImageIndex` (a :class:`MappedIndex`), so everything that
takes one (the loader, ``pack``, the proposals driver) takes it unchanged.  (Over 500 lines because the
mapped index, its file format, the build and the cache protocol are one idea; the json reader and the
header scan live in their own modules.)
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .dataset import (IMAGE_SUFFIXES, OK, ImageIndex, PackedKeys,
                       check_found, check_keys, coco_images_dir, fingerprint, _some)
from .fileio import array_bytes as _raw, atomic_write_sections, section_layout
from .header_scan import Scan as _Scan

MAGIC = b"OBJCROPIDX\x00\x01"
FORMAT_VERSION = 1
_ALIGN = 64
_DIGEST = 32
_SUBPROCESS_FROM = 64 << 20  # json bytes from which the build runs in a child process (see _build_in_child)


class IndexFileError(ValueError):
    """An index file that cannot be trusted (truncated, damaged, foreign); the message names the file."""


class IndexRebuiltWarning(UserWarning):
    """A damaged index file was found and rebuilt (the warning names it and why)."""


class IndexNotCachedWarning(UserWarning):
    """The cache folder cannot be written: the index is built in memory for this process only."""


# ---------------------------------------------------------------------------------------------------
# the mapped index
# ---------------------------------------------------------------------------------------------------
class KeyTable(PackedKeys):
    """Image keys decoded on demand from a utf-8 blob and (N + 1,) offsets (memory-mapped or not).

    ``fingerprint`` (the sha256 of :func:`~dali_objcrop.dataset.fingerprint`) is stored with the table,
    so comparing an index with a box store costs nothing.
    """

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, fingerprint: str) -> None:
        super().__init__(blob, offsets)
        self.fingerprint = fingerprint

    def __contains__(self, key) -> bool:
        return any(k == key for k in self)

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


class PathTable(Sequence):
    """``root/key`` for every key, made on demand (no list of a million paths is kept)."""

    def __init__(self, root: Path, keys: Sequence[str]) -> None:
        self._root, self._keys = str(root), keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return os.path.join(self._root, self._keys[i])

    def __iter__(self):
        root = self._root
        for k in self._keys:
            yield os.path.join(root, k)

    def utf8(self) -> "Utf8Paths":
        """The paths as utf-8 uint8 arrays (what ``fn.io.file.read`` takes), made per access."""
        return Utf8Paths(self._root, self._keys)


class Utf8Paths(Sequence):
    """``root/key`` as a uint8 array per access, cut from the mapped key blob (a list of a million
    small arrays would cost ~190 MB and ~2 s per rank)."""

    def __init__(self, root: str, keys: Sequence[str]) -> None:
        self._root = os.path.join(root, "").encode("utf-8")
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i) -> np.ndarray:
        k = self._keys
        key = k.raw(i) if isinstance(k, PackedKeys) else k[i].encode("utf-8")
        return np.frombuffer(key if key.startswith(b"/") else self._root + key, dtype=np.uint8)


class MappedIndex(ImageIndex):
    """An :class:`~dali_objcrop.dataset.ImageIndex` whose keys and sizes live in a memory-mapped file.

    Attributes (beyond ImageIndex's): ``path`` (the ``.index`` file), ``meta`` (its header).
    """

    def __init__(self, root: Path, keys: KeyTable, sizes: np.ndarray, bad: dict, path: Path | None = None,
                 meta: dict | None = None) -> None:
        super().__init__(root=Path(root), keys=keys, sizes=sizes, bad=bad)
        self.path, self.meta = path, meta or {}

    @property
    def paths(self) -> PathTable:
        return PathTable(self.root, self.keys)

    @property
    def fingerprint(self) -> str:
        return self.keys.fingerprint

    def __repr__(self) -> str:
        return f"MappedIndex({len(self)} images under {self.root}, {len(self.bad)} rejected, file {self.path})"


# ---------------------------------------------------------------------------------------------------
# the file
# ---------------------------------------------------------------------------------------------------
def _key_arrays(keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    blobs = [k.encode("utf-8") for k in keys]
    offsets = np.zeros(len(blobs) + 1, np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    return np.frombuffer(b"".join(blobs), np.uint8), offsets


def save_index(path: str | os.PathLike, root: Path, keys: Sequence[str], sizes: np.ndarray, bad: dict,
               meta: dict) -> Path:
    """Write an index file atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob, offsets = _key_arrays(keys)
    arrays = {"key_bytes": blob, "key_offsets": offsets,
              "sizes": np.ascontiguousarray(sizes, np.int32).reshape(-1, 2)}
    layout, pos, data_sha256 = section_layout(arrays, _ALIGN)
    header = json.dumps({"meta": dict(meta, root=str(root), num_images=len(keys), num_bad=len(bad),
                                      key_fingerprint=fingerprint(keys), format_version=FORMAT_VERSION),
                         "bad": bad, "arrays": layout, "data_bytes": pos,
                         "data_sha256": data_sha256}).encode("utf-8")
    head = MAGIC + np.uint64(len(header)).tobytes() + header
    start = -(-(len(head) + _DIGEST) // _ALIGN) * _ALIGN
    return atomic_write_sections(path, head, [(start + layout[name]["offset"], _raw(a)) for name, a in arrays.items()],
                                 start + pos, "image index", 0o644)


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The checked header of an index file and the byte offset of its arrays.

    Raises:
        IndexFileError: not an index file, truncated, or a header checksum mismatch.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                raise IndexFileError(f"{path} is not a dali_objcrop image index (bad magic {magic[:12]!r})")
            raw_n = f.read(8)
            if len(raw_n) < 8:
                raise IndexFileError(f"{path} is truncated ({size} bytes, no header)")
            n = int(np.frombuffer(raw_n, np.uint64)[0])
            if n > size:
                raise IndexFileError(f"{path}: damaged header (length {n} > file size {size})")
            header = f.read(n)
            digest = f.read(_DIGEST)
    except OSError as e:
        raise IndexFileError(f"cannot read image index {path}: {e}") from e
    if len(digest) < _DIGEST or hashlib.sha256(magic + raw_n + header).digest() != digest:
        raise IndexFileError(f"{path}: header checksum mismatch (damaged or truncated file)")
    try:
        h = json.loads(header.decode("utf-8"))
        h["arrays"], h["meta"], h["data_bytes"], h["data_sha256"]
    except Exception as e:
        raise IndexFileError(f"{path}: damaged header ({type(e).__name__}: {e})") from None
    return h, -(-(len(MAGIC) + 8 + n + _DIGEST) // _ALIGN) * _ALIGN


def load_index_file(path: str | os.PathLike, verify: bool = True) -> MappedIndex:
    """Map an index file, checking its length, both checksums and the arrays' structure.

    Raises:
        IndexFileError: naming the file and what is wrong.
    """
    path = Path(path)
    h, start = read_header(path)
    size = path.stat().st_size
    if size < start + int(h["data_bytes"]):
        raise IndexFileError(f"{path} is truncated: {size} bytes, the header describes {start + int(h['data_bytes'])}")
    if verify:
        d = hashlib.sha256()
        with open(path, "rb") as f:
            f.seek(start)
            left = int(h["data_bytes"])
            while left > 0:
                chunk = f.read(min(1 << 24, left))
                if not chunk:
                    break
                d.update(chunk)
                left -= len(chunk)
        if d.hexdigest() != h["data_sha256"]:
            raise IndexFileError(f"{path}: data checksum mismatch (the arrays were changed or damaged)")
    a = {}
    try:
        for name in ("key_bytes", "key_offsets", "sizes"):
            sp = h["arrays"][name]
            dt, shape = np.dtype(sp["dtype"]), tuple(int(x) for x in sp["shape"])
            a[name] = (np.zeros(shape, dt) if int(np.prod(shape)) == 0 else
                       np.memmap(path, dtype=dt, mode="r", offset=start + int(sp["offset"]), shape=shape))
    except (KeyError, TypeError, ValueError) as e:
        raise IndexFileError(f"{path}: damaged array table ({type(e).__name__}: {e})") from None
    n = int(h["meta"].get("num_images", -1))
    ko, sizes = a["key_offsets"], a["sizes"]
    if (sizes.ndim != 2 or sizes.shape != (n, 2) or ko.shape != (n + 1,) or (n and (ko[0] != 0 or
            ko[-1] != len(a["key_bytes"]) or (np.diff(ko) <= 0).any() or sizes.min() < 1))):
        raise IndexFileError(f"{path}: arrays that break the format (sizes {sizes.shape}, offsets {ko.shape}, "
                             f"{n} images)")
    keys = KeyTable(a["key_bytes"], ko, h["meta"]["key_fingerprint"])
    return MappedIndex(Path(h["meta"]["root"]), keys, sizes, dict(h["bad"]), path, h["meta"])


# ---------------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------------
def _safe_keys(keys: list[str], root: Path, allow_outside_root: bool) -> None:
    """:func:`check_keys` on the keys that could fail it (the rest cannot: no leading slash, no '..')."""
    if allow_outside_root:
        return
    odd = [k for k in keys if not k or ".." in k or k[0] in "/\\" or os.path.isabs(k)]
    if odd:
        check_keys(odd, root, allow_outside_root)


def _probe(keys: list[str], root: Path, source) -> None:
    """Without a scan: do (evenly spaced) files exist at all? (ImageIndex.from_coco's rule.)"""
    probe = sorted(set(np.linspace(0, len(keys) - 1, min(len(keys), 64)).astype(int).tolist()))
    absent = [keys[i] for i in probe if not (root / keys[i]).is_file()]
    if len(absent) > len(probe) // 2:
        raise FileNotFoundError(f"{len(absent)} of {len(probe)} sampled images listed by {source} "
                                f"are not in {root} (e.g. {_some(absent, 3)}): is the image folder right?")


class Built:
    """What one build pass yields: the usable images, the rejects and (for a json) the gt box store."""

    def __init__(self, root, keys, sizes, bad, gt=None, seconds=None):
        self.root, self.keys, self.sizes, self.bad, self.gt, self.seconds = root, keys, sizes, bad, gt, seconds


def build_index(source: str | os.PathLike, images_dir: str | os.PathLike | None = None, check: bool = True,
                allow_outside_root: bool = False, workers: int | None = None, progress: bool = False,
                with_gt: bool = True) -> Built:
    """Build the image index of a folder or COCO json in one pass (nothing is saved).

    Returns the same images, order, sizes and rejects as ``ImageIndex.from_coco`` / ``from_folder``
    (and, for a json with ``with_gt``, the store ``BoxStore.from_coco`` gives), with the same errors.
    """
    source = Path(source)
    t0 = time.perf_counter()
    bar = _Bar(progress)
    if source.is_dir():
        files = sorted(str(p.relative_to(source)) for p in source.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {source}")
        bar.start("scan", len(files), "img")
        status, sizes = _Scan(source, files, None, workers, bar.update).result()
        keys, sizes, bad = _split(files, status, sizes)
        bar.close()
        return Built(source, keys, sizes, bad, None, time.perf_counter() - t0)
    from .boxstore import BoxStore
    from .coco_stream import read_coco_arrays
    root = coco_images_dir(source, images_dir)
    state: dict = {}

    def on_images(arr) -> None:           # the scan starts while the annotations are still being read
        if "scan" in state:               # a second call (the exact reader after the fast one gave up)
            state.pop("scan").close()
        _safe_keys(arr.file_names, root, allow_outside_root)
        if not check and arr.file_names:
            _probe(arr.file_names, root, source)
        if check:
            state["scan"] = _Scan(root, arr.file_names, arr.sizes, workers, None)

    bar.start("read json", os.path.getsize(source), "B")
    try:
        arr = read_coco_arrays(source, on_images, bar.update)
    except BaseException:
        if "scan" in state:
            state["scan"].close()
        raise
    scan = state.get("scan")
    if check and scan is None:            # no images array before the annotations: scan now
        scan = _Scan(root, arr.file_names, arr.sizes, workers, None)
    bar.start("scan", len(arr.file_names), "img")
    if check:
        scan.progress = bar.update
        status, _ = scan.result()
        keys, sizes, bad = _split(arr.file_names, status, arr.sizes)
    else:
        keys, sizes, bad = arr.file_names, arr.sizes, {}
    bar.close()
    gt = BoxStore.from_coco_arrays(arr) if with_gt else None
    arr.ann_bbox = arr.ann_row = arr.ann_crowd = None     # free them before the files are written
    built = Built(root, keys, sizes, bad, gt, time.perf_counter() - t0)
    check_found(ImageIndex(root, built.keys, built.sizes, built.bad), source)
    return built


def _split(keys: list[str], status: list[str], sizes: np.ndarray) -> tuple[list[str], np.ndarray, dict]:
    if all(s == OK for s in status):
        return keys, np.asarray(sizes, np.int32).reshape(-1, 2), {}
    good = np.array([s == OK for s in status])
    bad = {k: s for k, s in zip(keys, status) if s != OK}
    return [k for k, g in zip(keys, good) if g], np.asarray(sizes, np.int32).reshape(-1, 2)[good], bad


class _Bar:
    """A tqdm bar with a rate, or nothing."""

    def __init__(self, on: bool) -> None:
        self.on, self.bar = on, None

    def start(self, desc: str, total: int, unit: str) -> None:
        self.close()
        if self.on:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, mininterval=0.5)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------------------------------
# the cache: fingerprint, lock, open
# ---------------------------------------------------------------------------------------------------
def index_dir() -> Path:
    """Where index files live: ``$DALI_OBJCROP_HOME/index``."""
    from .constants import home_dir
    return home_dir() / "index"


def index_path(source: str | os.PathLike, images_dir=None, check: bool = True, allow_outside_root: bool = False,
               cache_dir: str | os.PathLike | None = None) -> Path:
    """The index file of a source and build settings (one per absolute source path, image folder and
    settings: the loader, ``pack`` and ``proposals`` given the same json share one file)."""
    src = Path(source).resolve()
    imgs = None if src.is_dir() else str(coco_images_dir(source, images_dir).resolve())
    tag = hashlib.sha256(json.dumps([str(src), imgs, bool(check), bool(allow_outside_root)]).encode()).hexdigest()
    return Path(cache_dir or index_dir()) / f"{src.name}-{tag[:16]}.index"


def gt_path(index_file: Path) -> Path:
    return index_file.with_suffix(".gt.boxes")


def _source_state(source: Path, root: Path, dirs: list[str]) -> dict:
    """What a changed source changes: the json's size/mtime/inode, and each listed folder's mtime."""
    st = {}
    if source.is_file():
        s = source.stat()
        st["json"] = [s.st_size, s.st_mtime_ns, s.st_ino]
    m = {}
    for d in dirs:
        try:
            m[d] = (root / d).stat().st_mtime_ns if d else root.stat().st_mtime_ns
        except OSError:
            m[d] = None
    st["dirs"] = m
    return st


def _dirs_of(keys: Sequence[str], source: Path) -> list[str]:
    """The folders whose mtimes fingerprint a source: the key folders (json) or every folder (folder)."""
    if source.is_dir():
        return sorted({""} | {str(p.relative_to(source)) for p in source.rglob("*") if p.is_dir()})
    return sorted({os.path.dirname(k) for k in keys} | {""})


def _current(idx: MappedIndex, source: Path) -> bool:
    m = idx.meta
    return m.get("source_state") == _source_state(source, Path(m["root"]), m.get("dirs", []))


def open_index(source: str | os.PathLike, images_dir: str | os.PathLike | None = None, check: bool = True,
               allow_outside_root: bool = False, cache_dir: str | os.PathLike | None = None,
               workers: int | None = None, progress: bool = False, rebuild: bool = False) -> MappedIndex:
    """The memory-mapped index of a folder or COCO json, built first if it is missing, stale or damaged.

    Args:
        source: an image folder or a COCO json.
        images_dir: the json's image folder (default: :func:`~dali_objcrop.dataset.coco_images_dir`).
        check: scan every file's header (sizes, truncation); False: only sample that files exist.
        allow_outside_root: accept ``file_name`` entries outside the image folder.
        cache_dir: where index files live (default :func:`index_dir`).
        workers: header-scan processes (default: all cores).
        progress: progress bars with rates on stderr while building.
        rebuild: build even if a current index exists.

    Raises:
        CocoFormatError, ValueError, FileNotFoundError: as ``ImageIndex.from_coco`` / ``from_folder``.
    """
    source = Path(source)
    if not (source.is_dir() or source.is_file()):
        raise FileNotFoundError(f"{source} is neither an image folder nor a COCO .json file")
    if not source.is_dir():
        coco_images_dir(source, images_dir)   # no image folder: the same error as before, before any build
    path = index_path(source, images_dir, check, allow_outside_root, cache_dir)
    if not rebuild:
        idx = _try_open(path, source)
        if idx is not None:
            return idx
    lock = _Lock(path.with_name(path.name + ".lock"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.__enter__()
    except OSError as e:   # no writable cache: this process builds its own index in memory (as before)
        warnings.warn(f"cannot keep the image index in {path.parent} ({e}); building it in memory for this "
                      f"process only (set DALI_OBJCROP_HOME to a writable folder)", IndexNotCachedWarning,
                      stacklevel=2)
        built = build_index(source, images_dir, check, allow_outside_root, workers, progress, with_gt=False)
        return ImageIndex(root=Path(built.root), keys=list(built.keys), sizes=built.sizes, bad=built.bad)
    with lock:
        if not rebuild:                   # another process may have built it while we waited
            idx = _try_open(path, source)
            if idx is not None:
                return idx
        args = (str(source), None if images_dir is None else str(images_dir), check, allow_outside_root, workers,
                progress, str(path))
        if source.is_file() and source.stat().st_size >= _SUBPROCESS_FROM:
            _build_in_child(args)
        else:
            _build_and_save(*args)
    return load_index_file(path)


def _build_and_save(source: str, images_dir: str | None, check: bool, allow_outside_root: bool,
                    workers: int | None, progress: bool, path: str) -> None:
    source, path = Path(source), Path(path)
    root = source if source.is_dir() else coco_images_dir(source, images_dir)
    built = build_index(source, images_dir, check, allow_outside_root, workers, progress)
    dirs = _dirs_of(built.keys + list(built.bad), source)
    meta = {"source": str(source.resolve()), "images_dir": images_dir,
            "check": check, "allow_outside_root": allow_outside_root, "dirs": dirs,
            "source_state": _source_state(source, root, dirs), "build_seconds": round(built.seconds, 3),
            "kind": "folder" if source.is_dir() else "coco"}
    if built.gt is not None:
        built.gt.save(gt_path(path))
    save_index(path, root, built.keys, built.sizes, built.bad, meta)


def _build_in_child(args: tuple) -> None:
    """Build in a fresh interpreter: the caller (a training process holding torch and DALI) never holds
    the parse's arrays, and their memory goes back to the system when the child exits.  The child's
    error is raised here with its type and message."""
    import subprocess
    from .dataset import CocoFormatError
    # the child imports this very package: its folder's parent goes first on the child's PYTHONPATH
    here = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    code = "from dali_objcrop.index import _child_main; _child_main()"
    with tempfile.NamedTemporaryFile("r", suffix=".json") as res:
        p = subprocess.run([sys.executable, "-c", code, json.dumps(list(args)), res.name], env=env)
        if p.returncode == 0:
            return
        try:
            err = json.loads(Path(res.name).read_text())
        except (OSError, ValueError):
            err = {"type": "RuntimeError", "message": f"the image index build of {args[0]} died "
                                                      f"(exit status {p.returncode})"}
    kinds = {"CocoFormatError": CocoFormatError, "ValueError": ValueError, "FileNotFoundError": FileNotFoundError,
             "IndexFileError": IndexFileError}
    raise kinds.get(err["type"], RuntimeError)(err["message"])


def _child_main() -> None:
    args, res = json.loads(sys.argv[1]), sys.argv[2]
    try:
        _build_and_save(*args)
    except Exception as e:
        Path(res).write_text(json.dumps({"type": type(e).__name__, "message": str(e)}))
        sys.exit(1)


def _try_open(path: Path, source: Path) -> MappedIndex | None:
    """The index at ``path`` if present, intact and current; None to (re)build.  A damaged file is
    named in an :class:`IndexRebuiltWarning`."""
    if not path.exists():
        return None
    try:
        idx = load_index_file(path)
    except IndexFileError as e:
        warnings.warn(f"rebuilding the image index: {e}", IndexRebuiltWarning, stacklevel=3)
        return None
    return idx if _current(idx, source) else None


class _Lock:
    """A blocking exclusive ``flock``: one builder per index; the others wait, then map its file."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path, None

    def __enter__(self) -> "_Lock":
        if self.fd is not None:      # already taken (open_index takes it before its with-block)
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"dali_objcrop: waiting for another process to build {self.path.with_suffix('')}",
                  file=sys.stderr)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def gt_store(annotations: str | os.PathLike, index: ImageIndex | None = None):
    """The ground-truth box store of a COCO json: memory-mapped from the pass that built ``index`` where
    that is a :class:`MappedIndex` of this json (``boxes="gt"`` without a second parse), else
    ``BoxStore.from_coco`` (one streaming pass).  A damaged cached store is named in a warning and
    rewritten."""
    from .boxstore import BoxStore, BoxStoreError
    if isinstance(index, MappedIndex) and index.path is not None and index.meta.get("kind") == "coco" \
            and Path(index.meta.get("source", "")) == Path(annotations).resolve():
        path = gt_path(index.path)
        try:
            return BoxStore.load(path)
        except (BoxStoreError, OSError) as e:
            warnings.warn(f"rebuilding the ground-truth store of the image index: {e}", IndexRebuiltWarning,
                          stacklevel=2)
            store = BoxStore.from_coco(annotations)
            with _Lock(index.path.with_name(index.path.name + ".lock")):
                store.save(path)
            return BoxStore.load(path)
    return BoxStore.from_coco(annotations)


def index_of(data, images_dir: str | os.PathLike | None = None, allow_outside_root: bool = False,
             check: bool = True, max_images: int | None = None):
    """The one way every entry point turns ``data`` into an image index: ``(index, coco_json or None)``.

    Args:
        data: a COCO json (its images where :func:`~dali_objcrop.dataset.coco_images_dir` finds them), an
            image folder (both built once, then memory-mapped: :func:`open_index`), or an ``ImageIndex``.
        images_dir: the json's image folder.
        allow_outside_root: accept ``file_name`` entries outside the image folder.
        check: scan every file's header.
        max_images: only the first N images.

    Raises:
        ValueError: ``data`` is none of these.
    """
    from .dataset import ImageIndex, coco_images_dir
    coco = None
    if isinstance(data, ImageIndex):
        index = data
    else:
        p = Path(data)
        if p.is_dir():
            index = open_index(p, check=check)
        elif p.suffix.lower() == ".json" and p.is_file():
            index = open_index(p, coco_images_dir(p, images_dir), check=check, allow_outside_root=allow_outside_root)
            coco = str(p)
        else:
            raise ValueError(f"data must be a COCO json, an image folder or an ImageIndex, got {str(data)[:200]!r}")
    if max_images:
        index = ImageIndex(root=index.root, keys=list(index.keys[:max_images]), sizes=index.sizes[:max_images],
                           bad=index.bad)
    return index, coco

