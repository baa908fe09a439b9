"""Small file helpers every part of the package uses, in one place: the cache folder, atomic writes, file
hashes.  Standard library only."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

HOME_ENV = "DALI_OBJCROP_HOME"


def cache_home() -> Path:
    """The package's cache folder: ``$DALI_OBJCROP_HOME``, else ``~/.cache/dali_objcrop``.

    Holds the synthetic default set, fetched model files, image indexes and the operators' builds.
    """
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "dali_objcrop")


def sha256_file(path: str | os.PathLike, start: int = 0, length: int | None = None, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, or of ``length`` bytes of it from ``start``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            chunk = f.read(block if left is None else min(block, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename: a reader sees the
    old file or the whole new one, never a part (a crash or a full disk leaves the old file)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> Path:
    """:func:`atomic_write_bytes` of ``text`` (utf-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync)


def atomic_write_json(path: str | os.PathLike, obj, fsync: bool = True, **dump_kwargs) -> Path:
    """:func:`atomic_write_text` of ``json.dumps(obj)``."""
    return atomic_write_text(path, json.dumps(obj, **dump_kwargs), fsync)


def array_bytes(a) -> memoryview | bytes:
    """The bytes of an array without a copy where it is C-contiguous (``tobytes`` always copies)."""
    import numpy as np
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)) if a.size else b""


def atomic_write_sections(path: str | os.PathLike, head: bytes, sections: list[tuple[int, object]], size: int,
                          what: str, mode: int | None = None, zero_fill: bool = False) -> Path:
    """Write a file of ``head`` followed by its sha256 (32 bytes), then each ``(offset, bytes)`` section at its
    offset, ``size`` bytes in all: through a temporary file in the same folder, fsync and a rename.

    ``mode``: the file's permission bits (default: what ``open()`` would give under the umask).  ``zero_fill``
    writes the gap after the digest explicitly (else it is a hole).  An ``OSError`` names ``what`` and the
    path ("disk full" included); the previous file is left unchanged.  The box store and the image index use it.
    """
    import errno
    import tempfile
    path = Path(path)
    if mode is None:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)   # mkstemp creates 0600
        with os.fdopen(fd, "wb") as f:
            f.write(head)
            f.write(hashlib.sha256(head).digest())
            if zero_fill and sections:
                f.write(b"\0" * (min(o for o, _ in sections) - len(head) - 32))
            for offset, data in sections:
                f.seek(offset)
                f.write(data)
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, f"{'disk full: ' if e.errno == errno.ENOSPC else ''}cannot write {what} "
                                   f"{path}: {e.strerror or e}; the previous file is unchanged") from e
        raise
    return path


def section_layout(arrays: dict, align: int) -> tuple[dict, int, str]:
    """Where each array goes in a file of aligned sections: ``(layout, data_bytes, data_sha256)`` with
    ``layout[name] = {"dtype", "shape", "offset"}`` (offsets from the data start, each a multiple of
    ``align``), the data's total length and the sha256 of the data with its zero padding."""
    layout, pos, data = {}, 0, hashlib.sha256()
    for name, a in arrays.items():
        layout[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": pos}
        padded = -(-a.nbytes // align) * align
        data.update(array_bytes(a))
        data.update(b"\0" * (padded - a.nbytes))
        pos += padded
    return layout, pos, data.hexdigest()
