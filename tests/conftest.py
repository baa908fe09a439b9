"""Shared fixtures: a small synthetic set (session-scoped) and the real COCO subset in ../shared."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO_DIR = SHARED / "data" / "coco_val2017_subset"
COCO_ANN = COCO_DIR / "annotations" / "instances.json"
COCO_IMAGES = COCO_DIR / "images"
BING_MODELS = SHARED / "models" / "bing"


@pytest.fixture(scope="session")
def synth_set(tmp_path_factory) -> Path:
    """24 synthetic scenes (seed 0); returns the annotations.json path (images in ./images)."""
    from dali_objcrop.synth import make_synthetic
    return make_synthetic(tmp_path_factory.mktemp("synth"), n=24, seed=0)


@pytest.fixture(scope="session")
def coco_ann() -> Path:
    """The real COCO subset's annotations (skips where ../shared is absent)."""
    if not COCO_ANN.exists():
        pytest.skip(f"{COCO_ANN} not present")
    return COCO_ANN
