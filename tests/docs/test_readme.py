"""The README's promises: its quickstart runs as written, its set-up commands are the CI's, it stays short."""
from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def fenced_block_after(text: str, marker: str) -> str:
    """The first fenced code block after the HTML comment ``<!-- marker ...-->``."""
    i = text.index(f"<!-- {marker}")
    m = re.compile(r"```\w*\n(.*?)```", re.S).search(text, i)
    assert m, f"no code block after {marker}"
    return m.group(1)


@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path):
    """Both quickstart blocks, verbatim, in a fresh folder: synthetic set, BING proposals, two epochs of MoCo-v2."""
    text = README.read_text()
    env = {**os.environ, "PYTHONPATH": str(REPO), "DALI_OBJCROP_HOME": str(tmp_path / "home"),
           "OMP_NUM_THREADS": "1"}
    for line in fenced_block_after(text, "quickstart:bash").splitlines():
        args = shlex.split(line, comments=True)
        if not args or args[0] == ".":  # `. .venv/bin/activate`: this interpreter stands for the venv
            continue
        assert args[0] == "dali-objcrop", f"the quickstart runs only dali-objcrop commands: {line!r}"
        r = subprocess.run([sys.executable, "-m", "dali_objcrop", *args[1:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert (tmp_path / "out/synth/bing.boxes").exists()
    code = fenced_block_after(text, "quickstart:python")
    assert len(code.strip().splitlines()) <= 20, "the quickstart is meant to stay short"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    losses = [float(v) for v in re.findall(r"epoch \d+: InfoNCE ([-\d.naif]+)", r.stdout)]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses), r.stdout


def test_setup_commands_match_ci():
    """The two set-up commands the README promises are the ones CI (.ci/run) runs on a fresh machine."""
    text = README.read_text()
    block = text[text.index("## Set-up"):]
    block = re.search(r"```bash\n(.*?)```", block, re.S).group(1)
    cmds = [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert cmds == ['python3 -m venv .venv && .venv/bin/pip install torch==2.14.1 torchvision==0.29.1 -e ".[test]" '
                    "&& .venv/bin/python -m dali_objcrop demo",
                    ".venv/bin/python -m pytest -q"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install -q torch==2.14.1 torchvision==0.29.1" in ci and '-e ".[test]"' in ci
    assert ".venv/bin/python -m pytest -q" in ci


def test_readme_is_the_front_door_not_the_notebook():
    """About 12 KB at most (depth lives in docs/), and the picture it shows is in the repository."""
    text = README.read_text()
    assert len(text.encode()) <= 12_500, f"README.md is {len(text.encode())} bytes"
    assert (REPO / "docs" / "img" / "demo_grid.jpg").exists()


def test_every_result_file_is_referenced_from_docs():
    """benchmarks/results/ holds current results only, each one cited by a page in docs/."""
    docs = "\n".join(p.read_text() for p in (REPO / "docs").glob("*.md"))
    results = sorted(p.name for p in (REPO / "benchmarks" / "results").iterdir() if p.is_file())
    assert results, "benchmarks/results/ is empty"
    missing = [name for name in results if name not in docs]
    assert not missing, f"result files no page in docs/ cites: {missing}"
