"""One iterator contract for both sources (files, shards): written once in iteration.LoaderCore, chosen
explicitly (ObjCropLoader.from_shards / open_loader), crop defaults from CropConfig, layouts defined once."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from dali_objcrop import CropConfig
from dali_objcrop.iteration import LoaderCore

REPO = Path(__file__).resolve().parents[2]


def test_both_loaders_share_one_core():
    from dali_objcrop.loader import ObjCropLoader
    from dali_objcrop.shard_loader import ShardLoader
    assert issubclass(ObjCropLoader, LoaderCore) and issubclass(ShardLoader, LoaderCore)
    for name in ("set_epoch", "epoch", "_to_torch", "_crop_config", "_name_pipeline"):
        for cls in (ObjCropLoader, ShardLoader):
            assert name not in vars(cls), f"{cls.__name__}.{name} copies the core's"


def test_crop_defaults_are_defined_once():
    from dali_objcrop.loader import ObjCropLoader
    from dali_objcrop.shard_loader import ShardLoader
    default = CropConfig()
    for cls in (ObjCropLoader, ShardLoader):
        params = inspect.signature(cls.__init__).parameters
        for name in ("dilate", "shift_range", "top_k", "min_box_size"):
            assert params[name].default == getattr(default, name), (cls.__name__, name)


def test_shard_set_is_chosen_explicitly(tmp_path):
    """ObjCropLoader(shard folder) says how to read it; from_shards refuses file-only arguments by name."""
    pytest.importorskip("nvidia.dali")
    from dali_objcrop.loader import ObjCropLoader, open_loader
    (tmp_path / "shards.json").write_text("{}")
    with pytest.raises(ValueError, match=r"shard set: read it with ObjCropLoader\.from_shards"):
        ObjCropLoader(tmp_path, mode="scene-scene", device="cpu")
    with pytest.raises(TypeError, match="prepare_ahead"):
        ObjCropLoader.from_shards(tmp_path, prepare_ahead=2)
    with pytest.raises(TypeError, match="images_dir"):
        open_loader(tmp_path, images_dir="x")


def test_open_loader_reads_files_and_shards_alike(synth_set):
    pytest.importorskip("nvidia.dali")
    from dali_objcrop.loader import ObjCropLoader, open_loader
    ld = open_loader(synth_set, boxes="gt", batch_size=4, size=32, device="cpu", use_plugin=False)
    assert type(ld) is ObjCropLoader and len(ld) == 6


def test_aug_columns_are_the_cpp_indices():
    """The crop operator's ``aug`` layout is defined once (augment.AUG_COLUMNS) and the C++ OC_AUG_* indices
    match it."""
    from dali_objcrop import augment, plugin
    from dali_objcrop.kernels import reference
    assert plugin.AUG_COLUMNS is augment.AUG_COLUMNS and reference.AUG_COLUMNS is augment.AUG_COLUMNS
    text = (REPO / "csrc" / "dali" / "objcrop_augment.h").read_text()
    cpp = {m.group(1).lower(): int(m.group(2)) for m in re.finditer(r"#define OC_AUG_([A-Z_]+) (\d+)", text)}
    assert cpp.pop("k") == len(augment.AUG_COLUMNS)
    assert cpp == {("colour" if n == "colour" else n): i for i, n in enumerate(augment.AUG_COLUMNS)}
