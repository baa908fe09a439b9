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
