"""docs/plugin.md's pipelines of one's own run as printed, on the CPU (and the README's is the first of them).

Each ``<!-- example:NAME -->`` block runs verbatim in a fresh process, in a folder holding ``coco/images``
(a link to the real COCO subset) and ``coco/ann.json`` (its first 48 images); an ``example:NAME:bash``
block before it runs first (``dali-objcrop`` commands only).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dali_objcrop.plugin import build

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "plugin.md"

pytestmark = pytest.mark.skipif(build.cxx() is None or build.cuda_include_dir() is None,
                                reason="no C++ compiler or CUDA headers to build the operators")


def block(text: str, marker: str) -> str:
    """The first fenced code block after ``<!-- marker -->`` (or ``<!-- marker (comment) -->``)."""
    start = re.search(rf"<!-- {re.escape(marker)}( [^>]*)? ?-->", text)
    assert start, f"no marker {marker}"
    m = re.compile(r"```\w*\n(.*?)```", re.S).search(text, start.end())
    assert m, f"no code block after {marker}"
    return m.group(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, coco_ann):
    from conftest import COCO_IMAGES
    d = tmp_path_factory.mktemp("plugin_docs")
    (d / "coco").mkdir()
    os.symlink(COCO_IMAGES, d / "coco" / "images")
    ann = json.loads(coco_ann.read_text())
    images = ann["images"][:48]
    ids = {im["id"] for im in images}
    ann = {**ann, "images": images, "annotations": [a for a in ann["annotations"] if a["image_id"] in ids]}
    (d / "coco" / "ann.json").write_text(json.dumps(ann))
    return d


def run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def run_example(name: str, cwd: Path) -> str:
    text = DOC.read_text()
    if f"<!-- example:{name}:bash" in text:
        for line in block(text, f"example:{name}:bash").splitlines():
            args = shlex.split(line, comments=True)
            if args:
                assert args[0] == "dali-objcrop", line
                run([sys.executable, "-m", "dali_objcrop", *args[1:]], cwd)
    return run([sys.executable, "-c", block(text, f"example:{name}")], cwd)


def test_readme_example_is_the_first_docs_example():
    readme = (REPO / "README.md").read_text()
    assert block(readme, "example:coco") == block(DOC.read_text(), "example:coco")
    assert "device_id=0" not in block(readme, "example:coco").split("#")[0]      # the CPU form


def test_example_readers_coco(workdir):
    out = run_example("coco", workdir)
    assert out.split() == "epoch 0: views (16, 3, 224, 224) epoch 1: views (16, 3, 224, 224)".split(), out


def test_example_readers_file_with_a_store(workdir):
    out = run_example("files", workdir)
    lines = out.strip().splitlines()
    assert len(lines) == 2 and all("48 samples" in ln for ln in lines), out
    assert lines[0] != lines[1]                    # the reader reshuffles per epoch


def test_example_webdataset_shards(workdir):
    out = run_example("shards", workdir)
    assert out.split() == "epoch 0: 48 samples from 3 shards epoch 1: 48 samples from 3 shards".split(), out


def test_example_multicrop(workdir):
    out = run_example("multicrop", workdir)
    assert out.strip() == "views (16, 3, 224, 224), local (16, 6, 3, 96, 96)", out


def test_example_recipe_mapping(workdir):
    out = run_example("recipe", workdir)
    assert out.strip() == "views [8, 3, 224, 224], recipe solo-byol", out
