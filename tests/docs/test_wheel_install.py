"""The wheel as a user gets it: built from this checkout, installed (not editable) into a fresh virtual
environment, imported and run from another folder -- the trainer subpackage included, test-only sources left
out.  The fresh environment takes its third-party dependencies (torch, DALI, ...) from the running one
through a path file, so nothing is downloaded."""
from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_and_runs_from_another_folder(tmp_path):
    dist = tmp_path / "dist"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(dist), str(REPO)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    wheel = next(dist.glob("dali_objcrop-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for need in ("dali_objcrop/train/pretrain.py", "dali_objcrop/train/methods/mocov2.py",
                 "dali_objcrop/kernels/csrc/dali/objcrop_crop_kernels.cu", "dali_objcrop/kernels/csrc/objcrop_core.h",
                 "dali_objcrop/models/bing/ObjNessB2W8MAXBGR.idx.yml.gz"):
        assert need in names, need
    leaked = [n for n in names if "/check/" in n or "emulate" in n or n.startswith(("tests/", "train/"))]
    assert not leaked, leaked

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # the dependencies: the running environment's site-packages, after the fresh one's (a plain path line:
    # the editable install's own path files there are not processed, so the checkout is not importable)
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "zz_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    res = subprocess.run([str(py), "-c", "import dali_objcrop, dali_objcrop.train.pretrain as p; "
                          "print(dali_objcrop.__file__); print(p.__file__)"],
                         cwd=elsewhere, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    files = [Path(x) for x in res.stdout.split()]
    assert all(str(f).startswith(str(purelib)) for f in files), files          # the installed copy, not the checkout
    res = subprocess.run([str(venv / "bin" / "dali-objcrop"), "pretrain", "--help"], cwd=elsewhere,
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--method" in res.stdout and "--crops" in res.stdout
