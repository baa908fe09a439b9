"""dali_objcrop.fileio: one home for the cache folder, atomic writes and file hashes."""
from __future__ import annotations

import hashlib
import os

import pytest

from dali_objcrop import fileio


def test_cache_home_is_one_definition(monkeypatch, tmp_path):
    from dali_objcrop import constants
    from dali_objcrop.plugin import build
    monkeypatch.setenv("DALI_OBJCROP_HOME", str(tmp_path))
    assert fileio.cache_home() == constants.home_dir() == build.home() == tmp_path


def test_sha256_of_a_file_and_of_a_range(tmp_path):
    data = os.urandom(3_000_000)
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    assert fileio.sha256_file(p) == hashlib.sha256(data).hexdigest()
    assert fileio.sha256_file(p, 1000, 2_000_001, block=4096) == hashlib.sha256(data[1000:2_001_001]).hexdigest()


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    p = tmp_path / "x.json"
    fileio.atomic_write_json(p, {"a": 1})
    assert p.read_text() == '{"a": 1}'

    def broken(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="No space"):
        fileio.atomic_write_text(p, "new")
    assert p.read_text() == '{"a": 1}' and not list(tmp_path.glob("*.tmp"))
