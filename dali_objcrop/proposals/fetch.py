"""``fetch-model``: download OpenCV's pretrained BING files, pinned and checked.

The files come from opencv_contrib (Apache-2.0) at a fixed tag; each is checked against a
pinned sha256 before it is moved (atomically) into the cache folder, so a partial or
tampered download never lands there.  The package itself ships its own model (trained by
``train-bing``), so this is only needed to compare with OpenCV's.
"""
from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from ..constants import home_dir
from ..fileio import sha256_file

OPENCV_CONTRIB_TAG = "5.0.0"
BASE_URL = (f"https://raw.githubusercontent.com/opencv/opencv_contrib/{OPENCV_CONTRIB_TAG}/"
            "modules/saliency/samples/ObjectnessTrainedModel")
# sha256 of the files at that tag
SHA256 = {
    "ObjNessB2W8HSV.idx.yml.gz": "371eca212f3453bea69dd725339d83a733290d081ff1e0a3b127bd41bec40173",
    "ObjNessB2W8HSV.wS1.yml.gz": "e9c2856a4569400871eac10c4b8f8646221cbcf003e993c3b3f6464ed7f8c5a8",
    "ObjNessB2W8HSV.wS2.yml.gz": "504b1549771a471c01157a620580855399d13da502e2a847dd31308f03913f82",
    "ObjNessB2W8I.idx.yml.gz": "20619776b70b102b28dffc8f8a428701199f08382357444939f15bad8a8e188b",
    "ObjNessB2W8I.wS1.yml.gz": "dfa805f962a921c62278ff214bdf67fa97d41d6c0b87b1243481c8f69b32b57f",
    "ObjNessB2W8I.wS2.yml.gz": "a235c9c487cf3cfcb0434ab2ee5a747c8656ae2c60ea6a7fc47b089e7e93cf11",
    "ObjNessB2W8MAXBGR.idx.yml.gz": "c7951b18070a58a34416bb0849735d8bf51562be921b45f343a4e6f9f4250974",
    "ObjNessB2W8MAXBGR.wS1.yml.gz": "a71b5c719cd32ef8169f790c47153720e3008bdfb2c7405f97b84ab19e48f7d3",
    "ObjNessB2W8MAXBGR.wS2.yml.gz": "3974d58a5be3df7ae65158be488ca7f87393eaaa045cf4724566d92d1ff30920",
}


class FetchError(RuntimeError):
    """A model file could not be downloaded or failed its checksum."""


def default_cache_dir() -> Path:
    """``$DALI_OBJCROP_HOME/models/bing-opencv`` (default home: ``~/.cache/dali_objcrop``)."""
    return home_dir() / "models" / "bing-opencv"


def _sha256(path: Path) -> str:
    return sha256_file(path)


def fetch_bing(cache_dir: str | os.PathLike | None = None, colors=("MAXBGR", "HSV", "I"),
               base_url: str | None = None, timeout: float = 30.0) -> Path:
    """Make OpenCV's BING model files present in ``cache_dir``; returns the folder.

    Files already there with the right sha256 are not downloaded again.

    Args:
        cache_dir: destination (default :func:`default_cache_dir`).
        colors: which colour models to fetch.
        base_url: where the files are (default: opencv_contrib at the pinned tag; tests point
            it at a local server). ``$DALI_OBJCROP_BING_URL`` overrides the default too.
        timeout: seconds per request.

    Raises:
        FetchError: offline / HTTP error (with what to do instead) or a checksum mismatch.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    base = (base_url or os.environ.get("DALI_OBJCROP_BING_URL") or BASE_URL).rstrip("/")
    names = [n for n in SHA256 if n.split(".")[0].removeprefix("ObjNessB2W8") in colors]
    if len(names) != 3 * len(colors):
        raise ValueError(f"colors must be among MAXBGR, HSV, I; got {colors}")
    cache.mkdir(parents=True, exist_ok=True)
    for name in names:
        dest = cache / name
        if dest.is_file() and _sha256(dest) == SHA256[name]:
            continue
        url = f"{base}/{name}"
        fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=cache)
        try:
            with os.fdopen(fd, "wb") as f:
                try:
                    with urllib.request.urlopen(url, timeout=timeout) as r:
                        f.write(r.read())
                except (urllib.error.URLError, OSError) as e:
                    raise FetchError(
                        f"could not download {url} ({e}). Offline? Copy the nine ObjNessB2W8*.yml.gz files "
                        f"from opencv_contrib/modules/saliency/samples/ObjectnessTrainedModel (tag "
                        f"{OPENCV_CONTRIB_TAG}) into {cache}, or use the packaged model (no --model-dir)") from e
            got = _sha256(Path(tmp))
            if got != SHA256[name]:
                raise FetchError(f"{url}: sha256 {got} differs from the pinned {SHA256[name]}; not installed")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return cache
