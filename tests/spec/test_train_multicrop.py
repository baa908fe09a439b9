"""Multi-crop (local views) in the trainer: the flags, MoCo-v2 and BYOL with local views as extra queries /
online views (shapes, gradients, which head, never keys or targets, the mean over query/key pairs), the
unchanged two-view loss without them, DenseCL's refusal, and the training loop with synthetic batches
(no DALI needed)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dali_objcrop.train.heads import local_head_key
from dali_objcrop.train.methods.byol import byol_loss, regression_loss
from dali_objcrop.train.methods.common import info_nce, pool
from dali_objcrop.train.methods.mocov2 import mocov2_loss
from dali_objcrop.train.pretrain import Config, build_model, parse_config
from dali_objcrop.windows import CropConfig
from stand_in_loader import RandomBatches


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


TINY = dict(arch="resnet18-w0.125", size=32, batch_size=4, queue_size=64, head_hidden=32, head_out=16,
            pred_hidden=32)
N, M, S, LS = 4, 3, 32, 16


def tiny_model(method: str, **kw):
    torch.manual_seed(0)
    cfg = Config(**{**TINY, "method": method, **kw}).resolved()
    return build_model(cfg), cfg


def views(seed: int = 0, m: int = M):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, 3, S, S, generator=g), torch.randn(N, 3, S, S, generator=g),
            torch.randn(N, m, 3, LS, LS, generator=g))


# ---- flags --------------------------------------------------------------------------------------------------
def test_local_flags_parse_and_are_checked():
    c = parse_config(["--local-crops=6", "--local-size", "48", "--local-from=scene", "--local-scale=0.1,0.3",
                      "--crops=scene-scene", "--boxes=none"]).resolved()
    assert (c.local_crops, c.local_size, c.local_from, c.local_scale) == (6, 48, "scene", (0.1, 0.3))
    d, cc = Config(), CropConfig()   # the trainer's defaults are the crop specification's
    assert (d.local_crops, d.local_size, d.local_scale, d.local_from) == (
        cc.local_crops, cc.local_size, cc.local_scale, cc.local_from)
    for argv, msg in ((["--local-from=image"], "local_from must be one of"),
                      (["--local-crops=17"], "local_crops must be in"),
                      (["--local-crops=2", "--local-size=0"], "local_size must be >= 1"),
                      (["--local-crops=2", "--local-scale=0.5,0.2"], "local_scale must satisfy"),
                      (["--local-crops=2", "--crops=scene-scene"], "local_from='box'.*scene-scene"),
                      (["--local-crops=two"], "--local_crops expects int"),
                      (["--local-scale=0.1"], "--local_scale expects 2 values")):
        with pytest.raises(ValueError, match=msg):
            parse_config(argv).resolved()


def test_densecl_refuses_local_views():
    with pytest.raises(ValueError, match="--local-crops=2 with --method=densecl.*mocov2 or byol"):
        Config(**TINY, method="densecl", local_crops=2).resolved()
    model, _ = tiny_model("densecl")
    v1, v2, loc = views()
    with pytest.raises(ValueError, match="DenseCL takes no local views"):
        model(v1, v2, local=loc)
    model(v1, v2)   # the two-view DenseCL is unchanged


def test_local_head_key():
    assert local_head_key("obj-obj-dilate", "box") == local_head_key("obj-scene", "boxes") == "obj"
    assert local_head_key("obj-obj-dilate", "scene") == "scene"
    assert local_head_key("scene-scene", "scene") == "scene"
    assert local_head_key("obj-obj-dilate", "box", share=True) == "scene"   # one shared head
    with pytest.raises(ValueError, match="local_from"):
        local_head_key("obj-scene", "image")


# ---- the losses ---------------------------------------------------------------------------------------------
def _queries(model, x, key):
    return F.normalize(model.heads[key](pool(model.backbone(x))), dim=1)


def _reference(method, model, v1, v2, loc):
    """The loss from the model's modules, pair by pair (local views in one batch of N*M, as the model)."""
    m = 0 if loc is None else loc.shape[1]
    with torch.no_grad():
        if method == "mocov2":
            k1 = F.normalize(model.heads_k[model.keys[0]](pool(model.backbone_k(v1))), dim=1)
            k2 = F.normalize(model.heads_k[model.keys[1]](pool(model.backbone_k(v2))), dim=1)
        else:
            z1 = model.heads_k[model.keys[0]](pool(model.backbone_k(v1)))
            z2 = model.heads_k[model.keys[1]](pool(model.backbone_k(v2)))
    if method == "mocov2":
        q1, q2 = _queries(model, v1, model.keys[0]), _queries(model, v2, model.keys[1])
        queue, t = model.queue.clone(), model.temperature
        pairs = [info_nce(q1, k2, queue[1], t), info_nce(q2, k1, queue[0], t)]
        if m:
            ql = _queries(model, loc.flatten(0, 1), model.local_key).view(N, m, -1)
            for j in range(m):
                pairs += [info_nce(ql[:, j], k1, queue[0], t), info_nce(ql[:, j], k2, queue[1], t)]
        return sum(pairs) / len(pairs), mocov2_loss(q1, q2, k1, k2, queue, t)
    p = [model.predictor(model.heads[k](pool(model.backbone(v)))) for k, v in zip(model.keys, (v1, v2))]
    pairs = [regression_loss(p[0], z2), regression_loss(p[1], z1)]
    if m:
        pl = model.predictor(model.heads[model.local_key](pool(model.backbone(loc.flatten(0, 1))))).view(N, m, -1)
        for j in range(m):
            pairs += [regression_loss(pl[:, j], z1), regression_loss(pl[:, j], z2)]
    return 2 * sum(pairs) / len(pairs), byol_loss(p[0], p[1], z1, z2)


@pytest.mark.parametrize("method", ["mocov2", "byol"])
def test_without_local_views_the_loss_is_the_two_view_loss(method):
    model, _ = tiny_model(method, local_crops=0)
    v1, v2, _ = views()
    loss, aux = model(v1, v2, shuffle_seed=3)
    _, old = _reference(method, model, v1, v2, None)
    assert torch.equal(loss, old)                                   # bit for bit
    assert not any(k.startswith("loss_") for k in aux)              # the log records are unchanged too
    empty = torch.zeros(N, 0, 3, LS, LS)                            # M = 0 given explicitly: the same
    assert torch.equal(model(v1, v2, shuffle_seed=3, local=empty)[0], old)


@pytest.mark.parametrize("method", ["mocov2", "byol"])
@pytest.mark.parametrize("local_from", ["box", "scene"])
def test_multicrop_loss_is_the_mean_over_query_key_pairs(method, local_from):
    model, _ = tiny_model(method, crops="obj-obj-dilate", local_crops=M, local_size=LS, local_from=local_from)
    v1, v2, loc = views()
    loss, aux = model(v1, v2, local=loc)
    ref, two_view = _reference(method, model, v1, v2, loc)
    assert loss.shape == () and torch.isfinite(loss)
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6), (loss, ref)
    assert torch.allclose(aux["loss_global"], two_view, rtol=1e-5, atol=1e-6)
    # loss = (global + M * local) / (1 + M): every pair weighs the same
    assert torch.allclose(loss, (aux["loss_global"] + M * aux["loss_local"]) / (1 + M), rtol=1e-5)
    assert not torch.allclose(aux["loss_local"], aux["loss_global"])


@pytest.mark.parametrize("method", ["mocov2", "byol"])
def test_gradients_reach_every_local_view(method):
    model, _ = tiny_model(method, local_crops=M, local_size=LS)
    v1, v2, loc = views()
    loc.requires_grad_(True)
    loss, _ = model(v1, v2, local=loc)
    loss.backward()
    per_view = loc.grad.abs().flatten(2).sum(2)                     # (N, M)
    assert per_view.shape == (N, M) and (per_view > 0).all()
    assert all(p.grad is None for p in model.backbone_k.parameters())   # the key / target network: no gradient


@pytest.mark.parametrize("method", ["mocov2", "byol"])
def test_local_views_are_never_keys_or_targets(method):
    model, _ = tiny_model(method, local_crops=M, local_size=LS)
    seen, target_out = [], []
    model.backbone_k.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    for h in model.heads_k.values():
        h.register_forward_hook(lambda mod, inp, out: target_out.append(out.detach().clone()))
    online = []
    model.backbone.register_forward_hook(lambda mod, inp, out: online.append(tuple(inp[0].shape)))
    v1, v2, loc = views(0)
    _, _, other = views(1)
    loss_a, aux_a = model(v1, v2, local=loc)
    targets_a = list(target_out)
    target_out.clear()
    loss_b, aux_b = model(v1, v2, local=other)
    assert set(seen) == {(N, 3, S, S)}                              # only global views reach the key encoder
    assert online == [(N, 3, S, S), (N, 3, S, S), (N * M, 3, LS, LS)] * 2   # all local views in one pass
    assert all(torch.equal(a, b) for a, b in zip(targets_a, target_out))    # other local views: same targets
    assert not torch.equal(loss_a, loss_b)                           # ... and they are used, as queries
    if method == "mocov2":
        assert aux_a["keys"].shape == (2, N, model.queue.shape[1]) and torch.equal(aux_a["keys"], aux_b["keys"])
        model.after_step(aux_a, 0.99)
        assert torch.equal(model.queue[:, :, :N], aux_a["keys"].transpose(1, 2))   # the queue: global keys
        assert int(model.queue_ptr) == N


@pytest.mark.parametrize("method", ["mocov2", "byol"])
@pytest.mark.parametrize("local_from,local_head", [("box", "obj"), ("boxes", "obj"), ("scene", "scene")])
def test_local_views_go_through_the_head_of_their_source(method, local_from, local_head):
    model, _ = tiny_model(method, crops="obj-obj-dilate", local_crops=M, local_size=LS, local_from=local_from)
    assert model.local_key == local_head
    sizes = {"obj": [], "scene": []}
    for k in sizes:
        model.heads[k].register_forward_hook(lambda mod, inp, out, k=k: sizes[k].append(len(inp[0])))
    v1, v2, loc = views()
    model(v1, v2, local=loc)
    other = "scene" if local_head == "obj" else "obj"
    assert sorted(sizes[local_head]) == [N, N * M] and sizes[other] == [N]
    assert set(model.heads) == {"obj", "scene"}                      # no third head


# ---- the training loop --------------------------------------------------------------------------------------
def _batches(m: int = M, ls: int = LS) -> RandomBatches:
    """A loader stand-in: two deterministic batches per epoch, with m local views of side ls when m > 0."""
    return RandomBatches(N, S, m, ls)


def _cfg(out, method, **kw):
    return Config(**{**TINY, "method": method, "local_crops": M, "local_size": LS, "steps": 4, "log_every": 1,
                     "progress": False, "device": "cpu", "out": str(out), **kw})


@pytest.mark.parametrize("method", ["mocov2", "byol"])
def test_training_with_local_views_resumes_exactly(method, tmp_path):
    from dali_objcrop.train.pretrain import train
    full = train(_cfg(tmp_path / "full", method, ckpt_every=2, keep_ckpts=True), loader=_batches())
    assert [r["step"] for r in full["losses"]] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["loss_local"], r["loss_global"]])).all()
               for r in full["losses"])
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    assert (saved["local_crops"], saved["local_size"], saved["local_from"]) == (M, LS, "box")
    again = train(_cfg(tmp_path / "full", method, resume=str(tmp_path / "full" / "ckpt_0000002.pt")),
                  loader=_batches())
    assert [r["loss"] for r in again["losses"]] == [r["loss"] for r in full["losses"][2:]]


def test_training_refuses_batches_that_disagree_with_local_crops(tmp_path):
    from dali_objcrop.train.pretrain import train
    with pytest.raises(ValueError, match=r"--local-crops=3 --local-size=16 needs batches with \"local\".*gave none"):
        train(_cfg(tmp_path / "a", "mocov2"), loader=_batches(m=0))
    with pytest.raises(ValueError, match=r"shape \(4, 3, 3, 16, 16\).*gave \(4, 3, 3, 24, 24\)"):
        train(_cfg(tmp_path / "b", "mocov2"), loader=_batches(ls=24))
    with pytest.raises(ValueError, match="the loader yields local views.*--local-crops=0"):
        train(_cfg(tmp_path / "c", "mocov2", local_crops=0), loader=_batches())


def test_resume_checks_the_local_settings(tmp_path):
    """A checkpoint of another local setting is refused by name; one written before the local settings
    existed reads as local_crops=0."""
    from dali_objcrop.train.pretrain import load_checkpoint, train
    train(_cfg(tmp_path / "r", "mocov2", local_crops=0, steps=1), loader=_batches(m=0))
    ckpt = tmp_path / "r" / "ckpt.pt"
    with pytest.raises(ValueError, match="local_crops"):
        load_checkpoint(ckpt, _cfg(tmp_path / "r", "mocov2", steps=1).resolved(), 1)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    for k in ("local_crops", "local_size", "local_scale", "local_from"):
        del state["config"][k]
    torch.save(state, tmp_path / "old.pt")
    load_checkpoint(tmp_path / "old.pt", _cfg(tmp_path / "r", "mocov2", local_crops=0, steps=1).resolved(), 1)
    with pytest.raises(ValueError, match=r"'local_crops': \(0, 3\)"):
        load_checkpoint(tmp_path / "old.pt", _cfg(tmp_path / "r", "mocov2", steps=1).resolved(), 1)


def test_make_loader_passes_the_local_settings(monkeypatch, synth_set):
    import dali_objcrop.loader as loader_mod
    from dali_objcrop.train.pretrain import make_loader
    calls = []
    monkeypatch.setattr(loader_mod, "ObjCropLoader", lambda data, **kw: calls.append(kw))
    make_loader(Config(**TINY, data=str(synth_set)).resolved(), 0, 1)
    make_loader(Config(**TINY, data=str(synth_set), local_crops=6, local_size=24, local_from="boxes",
                       local_scale=(0.1, 0.5)).resolved(), 0, 1)
    assert not any(k.startswith("local_") for k in calls[0])         # M = 0: the call as before
    assert {k: v for k, v in calls[1].items() if k.startswith("local_")} == dict(
        local_crops=6, local_size=24, local_from="boxes", local_scale=(0.1, 0.5))
