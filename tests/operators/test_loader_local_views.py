"""Local (multi-crop) views through the loaders' public surface: ``local_crops`` / ``local_size`` /
``local_scale`` / ``local_from`` reach the CropConfig, are checked by name, are refused where the loader
cannot make them (the NumPy-fed DALI-ops graph; operators built without local views), and -- once the
windows operator takes ``local_crops`` -- every batch carries ``batch["local"]`` (B, M, 3, s, s)."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")
torch = pytest.importorskip("torch")

from dali_objcrop import CropConfig, ObjCropLoader, plugin  # noqa: E402
from dali_objcrop.iteration import LoaderCore, views_to_torch  # noqa: E402
from dali_objcrop.pipelines import local_views_supported, plugin_outputs  # noqa: E402

LOCAL_ARGS = ("local_crops", "local_size", "local_scale", "local_from")


@pytest.fixture(scope="module")
def local_ops():
    """Skips (naming why) until the loaded fn.objcrop.windows makes local views: the operators' change lands
    separately from this wiring."""
    ok, why = local_views_supported()
    if not ok:
        pytest.skip(f"operators without local views: {why}")


def test_local_arguments_default_to_crop_config():
    from dali_objcrop.shard_loader import ShardLoader
    from dali_objcrop.loader import open_loader  # noqa: F401 (passes **kwargs through)
    default = CropConfig()
    for fn in (ObjCropLoader.__init__, ShardLoader.__init__, LoaderCore._crop_config):
        params = inspect.signature(fn).parameters
        for name in LOCAL_ARGS:
            assert params[name].default == getattr(default, name), (fn.__qualname__, name)


def test_crop_config_carries_the_local_arguments():
    c = LoaderCore._crop_config("obj-obj-dilate", (0.3, 1.0), 0.1, (80, 120), 10, 224, local_crops=4,
                                local_size=48, local_scale=[0.1, 0.3], local_from="boxes")
    assert (c.local_crops, c.local_size, c.local_scale, c.local_from) == (4, 48, (0.1, 0.3), "boxes")
    assert c.num_views == 6
    m0 = LoaderCore._crop_config("obj-obj-dilate", (0.3, 1.0), 0.1, (80, 120), 10, 224)
    assert m0 == CropConfig(mode="obj-obj-dilate", box_scale=(0.3, 1.0), shift_range=(80.0, 120.0))


def test_m0_loader_is_unchanged(synth_set):
    """M = 0 (the default): same config as before local views existed, no "local" key."""
    kw = dict(boxes="gt", batch_size=4, size=32, device="cpu", num_threads=1, use_plugin=False)
    ld = ObjCropLoader(str(synth_set), local_size=48, **kw)
    assert ld.config.local_crops == 0 and ld.config.local_size == 48
    batch = next(iter(ld))
    assert set(batch) == {"view1", "view2", "index"}
    assert ld.windows_for([0, 1], 0).num_local == 0


@pytest.mark.parametrize("kw,msg", [(dict(local_crops=-1), "local_crops must be in"),
                                    (dict(local_crops=17), "local_crops must be in"),
                                    (dict(local_crops=2, local_size=0), "local_size must be >= 1"),
                                    (dict(local_crops=2, local_scale=(0.5, 0.2)), "local_scale must satisfy"),
                                    (dict(local_crops=2, local_from="image"), "local_from must be one of"),
                                    (dict(local_crops=2, local_from="box", mode="scene-scene", boxes=None),
                                     "local_from='box'.*scene-scene")])
def test_bad_local_arguments_are_named(synth_set, kw, msg):
    kw = {"boxes": "gt", "batch_size": 4, "size": 32, "device": "cpu", "num_threads": 1, **kw}
    with pytest.raises(ValueError, match=msg):
        ObjCropLoader(str(synth_set), **kw)


@pytest.mark.parametrize("extra,why", [(dict(use_plugin=False), "use_plugin=False"),
                                       (dict(roi_decode=False), "roi_decode=False")])
def test_dali_ops_graph_refuses_local_views(synth_set, extra, why):
    with pytest.raises(ValueError, match=rf"local_crops=3 needs the operators' pipeline.*DALI-ops graph \({why}"):
        ObjCropLoader(str(synth_set), boxes="gt", batch_size=4, size=32, device="cpu", num_threads=1,
                      local_crops=3, **extra)


def test_operators_without_local_views_are_refused_by_name(synth_set, monkeypatch):
    """The operators built from this tree make local views; a loader over operators that do not (as
    local_views_supported would report for a library without the argument) is refused naming local_crops."""
    from dali_objcrop import pipelines
    if not plugin.load():
        pytest.skip(f"operators unavailable: {plugin.error()}")
    assert local_views_supported() == (True, "")
    monkeypatch.setattr(pipelines, "local_views_supported",
                        lambda: (False, "the loaded fn.objcrop.windows has no local_crops argument"))
    with pytest.raises(RuntimeError, match="local_crops=2: the loaded fn.objcrop.windows has no local_crops"):
        ObjCropLoader(str(synth_set), boxes="gt", batch_size=4, size=32, device="cpu", num_threads=1,
                      local_crops=2, local_size=16)


def test_views_to_torch_adds_local_views():
    """The hand-over: a fourth output becomes batch["local"] (B, M, 3, s, s), converted as the views."""
    from nvidia.dali.tensors import TensorListCPU
    rng = np.random.default_rng(0)
    v1, v2 = (TensorListCPU(rng.standard_normal((2, 3, 8, 8)).astype(np.float32)) for _ in range(2))
    idx = TensorListCPU(np.array([[5], [7]], np.int64))
    loc = rng.standard_normal((2, 3, 3, 4, 4)).astype(np.float32)
    b3 = views_to_torch((v1, v2, idx), "cpu", None, "float32", torch.float32)
    assert set(b3) == {"view1", "view2", "index"} and b3["index"].tolist() == [5, 7]
    b4 = views_to_torch((v1, v2, idx, TensorListCPU(loc)), "cpu", None, "float32", torch.bfloat16)
    assert b4["local"].shape == (2, 3, 3, 4, 4) and b4["local"].dtype == torch.bfloat16 == b4["view1"].dtype
    assert torch.equal(b4["local"].float(), torch.from_numpy(loc).bfloat16().float())
    assert torch.equal(b4["view1"], b3["view1"].bfloat16())
    with pytest.raises(ValueError, match=r"\(B, M, 3, s, s\)"):
        one_view = TensorListCPU(np.ascontiguousarray(loc[:, 0]))     # (B, 3, s, s): not (B, M, 3, s, s)
        views_to_torch((v1, v2, idx, one_view), "cpu", None, "float32", torch.float32)


def test_plugin_outputs_order_and_contract():
    m0, m2 = CropConfig(), CropConfig(local_crops=2)
    assert plugin_outputs(("a", "b"), "i", m0) == ("a", "b", "i")
    assert plugin_outputs(("a", "b", "l"), "i", m2) == ("a", "b", "i", "l")
    with pytest.raises(RuntimeError, match="returned 2 outputs for local_crops=2; expected 3"):
        plugin_outputs(("a", "b"), "i", m2)
    with pytest.raises(RuntimeError, match="returned 3 outputs for local_crops=0"):
        plugin_outputs(("a", "b", "l"), "i", m0)


# ---- with operators that make local views -----------------------------------------------------------------
@pytest.mark.usefixtures("local_ops")
@pytest.mark.parametrize("local_from", ["box", "boxes", "scene"])
def test_loader_delivers_local_views(synth_set, local_from):
    kw = dict(boxes="gt", batch_size=4, size=32, device="cpu", num_threads=1, seed=1, use_plugin=True)
    ld = ObjCropLoader(str(synth_set), local_crops=3, local_size=16, local_from=local_from, **kw)
    m0 = ObjCropLoader(str(synth_set), **kw)
    assert ld.config.local_crops == 3 and ld.config.local_from == local_from
    batches, plain = list(ld), list(m0)
    assert len(batches) == len(plain) == len(ld)
    for b, p in zip(batches, plain):
        assert set(b) == {"view1", "view2", "index", "local"} and set(p) == {"view1", "view2", "index"}
        assert b["local"].shape == (4, 3, 3, 16, 16) and b["local"].dtype == torch.float32
        assert b["view1"].shape == (4, 3, 32, 32) and torch.isfinite(b["local"]).all()
        assert torch.equal(b["index"], p["index"])
        assert b["local"].flatten(2).std(2).min() > 0          # real crops, not blank
        assert not torch.equal(b["local"][:, 0], b["local"][:, 1])
    cw, cw0 = ld.windows_for(batches[0]["index"], 0), m0.windows_for(batches[0]["index"], 0)
    assert cw.num_local == 3 and cw0.num_local == 0
    np.testing.assert_array_equal(cw.windows, cw0.windows)    # the global windows do not move


@pytest.mark.usefixtures("local_ops")
def test_local_views_follow_the_loader_dtype(synth_set):
    ld = ObjCropLoader(str(synth_set), boxes="gt", batch_size=4, size=32, device="cpu", num_threads=1,
                       dtype=torch.bfloat16, local_crops=2, local_size=16, use_plugin=True)
    b = next(iter(ld))
    assert b["local"].dtype == torch.bfloat16 and b["local"].shape == (4, 2, 3, 16, 16)


@pytest.mark.usefixtures("local_ops")
def test_shard_loader_delivers_local_views(synth_set, tmp_path):
    from dali_objcrop import shards as S
    from dali_objcrop.boxstore import BoxStore
    from dali_objcrop.dataset import ImageIndex
    index = ImageIndex.from_coco(synth_set, synth_set.parent / "images")
    S.pack(index, tmp_path, BoxStore.from_coco(synth_set), shard_bytes=150_000, progress=False)
    ld = ObjCropLoader.from_shards(tmp_path, batch_size=4, size=32, device="cpu", num_threads=1, shuffle_buffer=8,
                                   local_crops=2, local_size=16, local_from="scene")
    b = next(iter(ld))
    assert b["local"].shape == (4, 2, 3, 16, 16) and ld.config.local_from == "scene"


# ---- the wiring end to end, with a stand-in for the operators' local views ------------------------------------
@pytest.fixture
def stand_in_local_views(monkeypatch):
    """plugin.object_views returning a third output, (M, 3, s, s) per sample -- each "local view" is view 1
    resized to local_size with a per-view offset -- and the operators reported able to make them: the loader's
    and trainer's side of the contract, before the operators make real local views."""
    import dataclasses
    from nvidia.dali import fn
    from dali_objcrop import pipelines
    if not plugin.load():
        pytest.skip(f"operators unavailable: {plugin.error()}")
    real = plugin.object_views

    def object_views(jpegs, index, boxes=None, *, config=None, **kw):
        if not config.local_crops:
            return real(jpegs, index, boxes, config=config, **kw)
        v1, v2 = real(jpegs, index, boxes, config=dataclasses.replace(config, local_crops=0), **kw)
        s = config.local_size
        small = fn.transpose(fn.resize(fn.transpose(v1, perm=[1, 2, 0]), size=[s, s]), perm=[2, 0, 1])
        return v1, v2, fn.stack(*[small + float(j) for j in range(config.local_crops)])

    monkeypatch.setattr(plugin, "object_views", object_views)
    monkeypatch.setattr(pipelines, "local_views_supported", lambda: (True, ""))


def test_loader_and_trainer_wiring_with_stand_in_local_views(stand_in_local_views, synth_set, tmp_path):
    kw = dict(boxes="gt", batch_size=4, size=32, device="cpu", num_threads=1, use_plugin=True, plugin_crop=False)
    ld = ObjCropLoader(str(synth_set), local_crops=3, local_size=16, **kw)
    plain = ObjCropLoader(str(synth_set), **kw)
    b, p = next(iter(ld)), next(iter(plain))
    assert set(b) == {"view1", "view2", "index", "local"} and b["local"].shape == (4, 3, 3, 16, 16)
    assert torch.equal(b["view1"], p["view1"]) and torch.equal(b["index"], p["index"])
    assert torch.allclose(b["local"][:, 2] - b["local"][:, 0], torch.full((4, 3, 16, 16), 2.0))
    # the trainer's make_loader asks for them and its step consumes them
    from dali_objcrop.train.pretrain import Config, train
    torch.manual_seed(0)
    summary = train(Config(method="mocov2", arch="resnet18-w0.125", size=32, batch_size=4, queue_size=16,
                           head_hidden=16, head_out=8, data=str(synth_set), steps=2, local_crops=3, local_size=16,
                           num_threads=1, log_every=1, progress=False, device="cpu", loader_device="cpu",
                           ckpt_every=-1, out=str(tmp_path / "run")))
    assert [r["step"] for r in summary["losses"]] == [1, 2] and all("loss_local" in r for r in summary["losses"])
