"""The budgeted GPU run's plan (benchmarks/gpu_run.sh, docs/gpu_run.md), checked on the CPU as a dry run."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _plan(verb: str, tmp_path: Path) -> list[tuple[str, int, str]]:
    env = {**os.environ, "GPU_RUN_DRY": "1", "OUT": str(tmp_path / "out"), "GPU_RUN_WORK": str(tmp_path / "work")}
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_run.sh"), verb], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    return [(m.group(1), int(m.group(2)), m.group(3)) for m in
            re.finditer(r"^\[plan\] (\w+): deadline (\d+)s -> \S+: (.*)$", res.stdout, re.M)]


def test_kernels_verb_is_the_dali_free_check(tmp_path):
    steps = _plan("kernels", tmp_path)
    assert [s[0] for s in steps] == ["kernel_check"]
    assert "csrc/check/run.sh --sanitize" in steps[0][2] and steps[0][1] <= 120


def test_main_verb_order_and_budget(tmp_path):
    """Most important first: build + self-test, the gpu tests, the loader profile, the fused-op bench, then
    data wait + quality; the fixed steps leave the quality step time and every deadline fits the total."""
    steps = _plan("main", tmp_path)
    names = [s[0] for s in steps]
    assert names == ["build_selftest", "pytest_gpu", "gpu_profile", "kernel_bench", "gpu_quality", "gpu_quality_mc"]
    fixed = sum(s[1] for s in steps[:-2])
    assert fixed <= 400 and steps[-2][1] <= 420 and steps[-1][1] <= 420
    assert "--settings=scene-mc,obj-mc" in steps[-1][2]
    prof = dict((s[0], s[2]) for s in steps)["gpu_profile"]
    for flag in ("--batch 256", "--size 224", "--hw-decoder-load 0.9,0.65,0", "speed/instances.json"):
        assert flag in prof
    assert "-m gpu" in dict((s[0], s[2]) for s in steps)["pytest_gpu"]


def test_docs_budget_table_matches_the_script():
    doc = (REPO / "docs" / "gpu_run.md").read_text()
    script = (REPO / "benchmarks" / "gpu_run.sh").read_text()
    for name in ("build_selftest", "pytest_gpu", "gpu_profile", "kernel_bench", "gpu_quality", "gpu_quality_mc",
                 "kernel_check"):
        assert name in doc and name in script, name
