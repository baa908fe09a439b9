"""Shared fixtures of every tier (spec/, operators/, system/, docs/): a small synthetic set (session-scoped) and the
real COCO subset in ../shared."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO_DIR = SHARED / "data" / "coco_val2017_subset"
COCO_ANN = COCO_DIR / "annotations" / "instances.json"
COCO_IMAGES = COCO_DIR / "images"
BING_MODELS = SHARED / "models" / "bing"
# every skip for want of ../shared starts with this, so that .ci/run can count them apart from the GPU skips
SHARED_SKIP = "needs ../shared"


def skip_without_shared(path: Path) -> None:
    """Skip the calling test, with a reason .ci/run counts, when ``path`` (in ../shared) is absent."""
    if not Path(path).exists():
        pytest.skip(f"{SHARED_SKIP}: {path} not present")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests (tiny models on a shared 2-core machine: OpenMP threads spinning
    against other processes cost 10x); the previous count is restored after the module.  A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def synth_set(tmp_path_factory) -> Path:
    """24 synthetic scenes (seed 0); returns the annotations.json path (images in ./images)."""
    from dali_objcrop.synth import make_synthetic
    return make_synthetic(tmp_path_factory.mktemp("synth"), n=24, seed=0)


@pytest.fixture(scope="session")
def coco_ann() -> Path:
    """The real COCO subset's annotations (skips where ../shared is absent)."""
    skip_without_shared(COCO_ANN)
    return COCO_ANN
