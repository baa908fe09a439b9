"""Unit tests of the training suite (dali_objcrop/train/): config, heads per mode, losses, schedules, EMA, queues, LARS,
and a quick overfit check of every method on one fixed batch from the object-aware loader (CPU)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import benchmark_module
from dali_objcrop.train.heads import HEADS, Backbone, head_keys, mlp, preset
from dali_objcrop.train.lars import LARS, param_groups
from dali_objcrop.train.methods.byol import byol_loss, regression_loss
from dali_objcrop.train.methods.common import (cosine_schedule, enqueue, info_nce, lr_at, shuffled_forward,
                                               update_momentum)
from dali_objcrop.train.methods.densecl import dense_info_nce
from dali_objcrop.train.pretrain import Config, build_model, build_optimizer, parse_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


TINY = dict(arch="resnet18", size=32, batch_size=8, queue_size=64, head_hidden=64, head_out=32, pred_hidden=64)


def tiny_cfg(**kw) -> Config:
    return Config(**{**TINY, **kw}).resolved()


# ---- config ---------------------------------------------------------------------------------------------------
def test_parse_config_types_files_and_unknown_keys(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"method": "byol", "batch_size": 32, "lr": 0.1}))
    c = parse_config([f"--config={f}", "--batch-size=16", "--share_heads", "--steps", "7", "--compile=false"])
    assert (c.method, c.batch_size, c.lr, c.share_heads, c.steps, c.compile) == ("byol", 16, 0.1, True, 7, False)
    assert isinstance(c.lr, float) and isinstance(c.steps, int)
    with pytest.raises(ValueError, match="unknown flag --bogus"):
        parse_config(["--bogus=1"])
    with pytest.raises(ValueError, match="--steps expects int"):
        parse_config(["--steps=abc"])
    f.write_text(json.dumps({"nope": 1}))
    with pytest.raises(ValueError, match="unknown config key 'nope'"):
        parse_config([f"--config={f}"])
    with pytest.raises(ValueError, match="method must be one of"):
        Config(method="simclr").resolved()


def test_method_defaults_resolved():
    m, b = Config(method="mocov2").resolved(), Config(method="byol").resolved()
    assert (m.queue_size, m.momentum, m.temperature, m.lr, m.weight_decay) == (65536, 0.999, 0.2, 0.03, 1e-4)
    assert (b.momentum, b.lr, b.weight_decay, b.recipe) == (0.99, 0.2, 1.5e-6, "byol")
    assert Config(method="densecl").resolved().lam == 0.5
    assert HEADS["mocov2"].sizes == (2048, 128) and HEADS["byol_projector"].sizes == (4096, 256)


# ---- heads per mode -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mocov2", "byol", "densecl"])
@pytest.mark.parametrize("mode,share,expect", [("scene-scene", False, {"scene"}), ("obj-scene", False, {"obj", "scene"}),
                                               ("obj-obj-dilate", False, {"obj", "scene"}),
                                               ("obj-obj-dilate", True, {"scene"})])
def test_heads_per_mode(method, mode, share, expect):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(method=method, crops=mode, share_heads=share))
    assert set(model.heads) == expect and set(model.heads_k) == expect
    if method == "densecl":
        assert set(model.dense_heads) == expect
    assert not any(p.requires_grad for p in model.backbone_k.parameters())
    assert not any(p.requires_grad for p in model.heads_k.parameters())


def test_object_view_goes_through_object_head():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(method="mocov2", crops="obj-obj-dilate"))
    seen = {}
    def remember(key):
        def hook(module, inputs, output):
            seen[key] = inputs[0].detach().clone()
        return hook
    for k in ("obj", "scene"):
        model.heads[k].register_forward_hook(remember(k))
    v1, v2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    model(v1, v2)
    with torch.no_grad():
        assert torch.allclose(seen["obj"], model.backbone.pooled(v1), atol=1e-5)
        assert torch.allclose(seen["scene"], model.backbone.pooled(v2), atol=1e-5)


@pytest.mark.parametrize("method", ["mocov2", "byol", "densecl"])
def test_separate_heads_start_from_the_same_weights(method):
    """Separate object and scene heads are two parameter sets with one initialisation (independently
    initialised heads give the positive pair no head start over negatives; they collapsed in
    benchmarks/pretrain_quality.py), unless ``same_head_init=False``."""
    def heads_equal(model):
        groups = [model.heads] + ([model.dense_heads] if method == "densecl" else [])
        return all(all(torch.equal(a, b) for a, b in zip(g["obj"].state_dict().values(), g["scene"].state_dict().values()))
                   for g in groups)
    torch.manual_seed(0)
    model = build_model(tiny_cfg(method=method, crops="obj-obj-dilate"))
    assert heads_equal(model)
    assert model.heads["obj"].state_dict()[next(iter(model.heads["obj"].state_dict()))].data_ptr() != \
        model.heads["scene"].state_dict()[next(iter(model.heads["scene"].state_dict()))].data_ptr()
    torch.manual_seed(0)
    assert not heads_equal(build_model(tiny_cfg(method=method, crops="obj-obj-dilate", same_head_init=False)))
    if method == "mocov2":  # same weights, same input: the positive pair starts aligned
        torch.manual_seed(0)
        x = torch.randn(4, 3, 32, 32)
        model.eval()
        with torch.no_grad():
            z = [F.normalize(model.heads[k](model.backbone.pooled(x)), dim=1) for k in ("obj", "scene")]
        assert torch.allclose((z[0] * z[1]).sum(1), torch.ones(4), atol=1e-5)


def test_backbone_and_head_builders():
    assert Backbone("resnet18").dim == 512 and Backbone("resnet50").dim == 2048
    with pytest.raises(ValueError, match="torchvision ResNet"):
        Backbone("vit_b_16")
    narrow = Backbone("resnet18-w0.25")                  # the trainer's narrow CPU backbone: 16-32-64-128
    assert narrow.dim == 128
    assert narrow(torch.zeros(2, 3, 64, 64)).shape == (2, 128, 2, 2)
    assert narrow.pooled(torch.zeros(2, 3, 64, 64)).shape == (2, 128)
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in Backbone("resnet18").parameters()) / 10
    with pytest.raises(ValueError, match="resnet18-w"):
        Backbone("resnet18-wide")
    torch.manual_seed(0)
    zero = Backbone("resnet18-w0.25", zero_init_residual=True)  # BYOL's option reaches the narrow blocks too
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0 for b in zero.trunk if hasattr(b, "bn2"))
    h = mlp(16, preset("byol_projector", hidden=8, out=4))
    assert [type(m).__name__ for m in h] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert h(torch.randn(3, 16)).shape == (3, 4)
    d = mlp(16, preset("densecl_dense", hidden=8, out=4))
    assert d(torch.randn(2, 16, 3, 3)).shape == (2, 4, 3, 3)
    assert head_keys("obj-scene") == ("obj", "scene") and head_keys("scene-scene") == ("scene", "scene")


# ---- losses ---------------------------------------------------------------------------------------------------
def test_info_nce_prefers_the_positive():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(8, 16), dim=1)
    queue = F.normalize(torch.randn(16, 32), dim=0)
    good, bad = info_nce(q, q, queue, 0.2), info_nce(q, q.roll(1, 0), queue, 0.2)
    assert good < bad and math.isfinite(good.item())
    # equal logits everywhere -> log(K + 1)
    z = torch.zeros(4, 16)
    assert info_nce(z, z, torch.zeros(16, 9), 0.2).item() == pytest.approx(math.log(10))


def test_byol_loss_properties():
    p = torch.randn(5, 8)
    assert regression_loss(p, 3 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert regression_loss(p, -p).item() == pytest.approx(4.0, abs=1e-5)
    assert byol_loss(p, p, p, p).item() == pytest.approx(0.0, abs=1e-6)


def test_dense_positives_follow_backbone_similarity():
    torch.manual_seed(0)
    n, d, c, s = 2, 8, 16, 9
    q = F.normalize(torch.randn(n, d, s), dim=1)
    fq = torch.randn(n, c, s)
    perm = torch.randperm(s)
    # key view = query view with locations permuted: argmax matching must undo the permutation
    k, fk = q[:, :, perm], fq[:, :, perm]
    queue = F.normalize(torch.randn(d, 16), dim=0)
    matched = dense_info_nce(q, k, fq, fk, queue, 0.2)
    unmatched = dense_info_nce(q, k, fq, torch.randn(n, c, s), queue, 0.2)
    assert matched < unmatched
    assert matched.item() == pytest.approx(info_nce(q.transpose(1, 2).reshape(-1, d), q.transpose(1, 2).reshape(-1, d),
                                                    queue, 0.2).item(), rel=1e-5)


# ---- schedules, EMA, queues, LARS -----------------------------------------------------------------------------
def test_schedules():
    assert cosine_schedule(0, 10, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_schedule(10, 10, 0.99, 1.0) == pytest.approx(1.0)
    assert cosine_schedule(5, 10, 0.0, 1.0) == pytest.approx(0.5)
    assert lr_at(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_update_momentum_is_ema():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    wa, wb = a.weight.detach().clone(), b.weight.detach().clone()
    update_momentum(a, b, 0.9)
    assert torch.allclose(b.weight, 0.9 * wb + 0.1 * wa)
    assert torch.equal(a.weight, wa)
    with pytest.raises(ValueError):
        update_momentum(a, b, 1.5)


def test_enqueue_wraps_and_shuffle_is_identity_alone():
    queue, ptr = torch.zeros(2, 3, 5), torch.zeros((), dtype=torch.long)
    keys = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    enqueue(queue, ptr, keys)
    enqueue(queue, ptr, keys + 100)
    assert int(ptr) == 3
    assert torch.equal(queue[:, :, 0], keys[:, 1] + 100) and torch.equal(queue[:, :, 3], keys[:, 3])
    x = torch.randn(4, 2)
    assert torch.equal(shuffled_forward(lambda t: (t * 2,), x, seed=1)[0], x * 2)


def test_lars_trust_ratio_and_groups():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    groups = param_groups(lin.named_parameters(), weight_decay=0.1)
    assert groups[0]["params"][0] is lin.weight and groups[1]["params"][0] is lin.bias
    opt = LARS(groups, lr=1.0, momentum=0.0, eta=0.001)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    lin.weight.grad, lin.bias.grad = torch.ones_like(lin.weight), torch.ones_like(lin.bias)
    opt.step()
    d = torch.ones_like(w0) + 0.1 * w0
    assert torch.allclose(lin.weight, w0 - 0.001 * w0.norm() / d.norm() * d, atol=1e-6)
    assert torch.allclose(lin.bias, b0 - 1.0)  # no trust ratio, no decay on biases
    with pytest.raises(ValueError):
        LARS(lin.parameters(), lr=-1)


# ---- quick overfit on one fixed batch of the object-aware loader ------------------------------------------------
@pytest.fixture(scope="module")
def fixed_batch(synth_set):
    from dali_objcrop.loader import ObjCropLoader
    loader = ObjCropLoader(str(synth_set), boxes="gt", mode="obj-obj-dilate", batch_size=8, size=32, seed=0,
                           num_threads=1, device="cpu", rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["view1"].shape == (8, 3, 32, 32) and not torch.equal(batch["view1"], batch["view2"])
    return batch


@pytest.mark.parametrize("method", ["mocov2", "byol", "densecl"])
def test_loss_falls_on_a_fixed_batch(method, fixed_batch):
    torch.manual_seed(0)
    cfg = tiny_cfg(method=method, crops="obj-obj-dilate", lr={"byol": 20.0}.get(method, 3.0), momentum=0.9)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model, 1)
    v1, v2 = fixed_batch["view1"], fixed_batch["view2"]
    # the loss is compared on the initial (random) queue: filling the queue with real keys raises the loss by
    # itself, and heads that start equal begin with an aligned positive pair
    queues0 = {n: b.clone() for n, b in model.named_buffers() if n.startswith("queue")}

    def loss_on_initial_queue() -> float:
        saved = {n: b.clone() for n, b in model.named_buffers() if n in queues0}
        bufs = dict(model.named_buffers())
        for n, b in queues0.items():
            bufs[n].copy_(b)
        with torch.no_grad():
            out = model(v1, v2, shuffle_seed=0)[0].item()
        for n, b in saved.items():
            bufs[n].copy_(b)
        return out

    before = loss_on_initial_queue()
    losses = []
    for step in range(12):
        loss, aux = model(v1, v2, shuffle_seed=step)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step(aux, cfg.momentum)
        losses.append(loss.item())
    assert loss_on_initial_queue() < 0.9 * before, (before, losses)


def _shuffle_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x = torch.arange(4, dtype=torch.float32).view(4, 1) + 10 * rank   # rank 0: 0..3, rank 1: 10..13
    per_sample = shuffled_forward(lambda t: (t * 2,), x, seed=3)[0]
    # a batch statistic shows which samples shared this rank's batch after the shuffle
    centred = shuffled_forward(lambda t: (t - t.mean(),), x, seed=3)[0]
    off = shuffled_forward(lambda t: (t - t.mean(),), x, seed=3, enabled=False)[0]
    torch.save({"per_sample": per_sample, "centred": centred, "off": off, "x": x}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_shuffle_bn_across_two_ranks(tmp_path):
    """Outputs come back in input order; the key batch mixes both ranks' samples (gloo, 2 processes)."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_shuffle_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(r["per_sample"], r["x"] * 2)
        assert torch.allclose(r["off"], r["x"] - r["x"].mean())
        assert not torch.allclose(r["centred"], r["off"])  # other rank's samples changed the batch mean


def test_single_process_epochs_run_scene_scene_and_resume_checks(synth_set, tmp_path):
    """No DDP: one epoch of scene-scene (no boxes) with the real loader, one head; a resume with other
    settings is refused, naming them."""
    from dali_objcrop.train.pretrain import load_backbone, load_checkpoint, train
    cfg = Config(**{**TINY, "method": "mocov2", "crops": "scene-scene", "boxes": "none", "data": str(synth_set),
                    "epochs": 1, "num_threads": 1, "log_every": 1, "progress": False, "loader_device": "cpu",
                    "out": str(tmp_path / "run")})
    summary = train(cfg)
    assert summary["steps"] == 3 and summary["world_size"] == 1  # 24 images // 8
    assert all(math.isfinite(r["loss"]) for r in summary["losses"])
    state = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert {k.split(".")[1] for k in state["model"] if k.startswith("heads.")} == {"scene"}
    backbone, saved = load_backbone(tmp_path / "run" / "ckpt.pt")
    assert saved.crops == "scene-scene" and backbone.dim == 512
    other = Config(**{**TINY, "batch_size": 4, "crops": "scene-scene", "boxes": "none", "data": str(synth_set)})
    with pytest.raises(ValueError, match="batch_size"):
        load_checkpoint(tmp_path / "run" / "ckpt.pt", other.resolved())
    with pytest.raises(ValueError, match="world_size 1"):
        load_checkpoint(tmp_path / "run" / "ckpt.pt", cfg.resolved(), world_size=2)


def test_pretrain_speed_benchmark_smoke(synth_set, tmp_path):
    pretrain_speed = benchmark_module.load("pretrain_speed")
    out = tmp_path / "speed.json"
    pretrain_speed.main(["--data", str(synth_set), "--arch=resnet18", "--size=32", "--batch-size=4", "--steps=4",
                         "--queue-size=64", "--num-threads=1", "--json", str(out)])
    d = json.loads(out.read_text())
    assert [r["feed"] for r in d["runs"]] == ["loader", "resident"]
    s = d["summary"]
    # the summary is the runs' mean; a run's rate counts the steps after the 2 warm-up ones (steps 3 and 4)
    # x 4 images over their step time, which lies inside the run's wall time
    for feed in ("loader", "resident"):
        runs = [r for r in d["runs"] if r["feed"] == feed]
        assert s[f"{feed}_images_per_s"] == pytest.approx(sum(r["images_per_s"] for r in runs) / len(runs))
        assert all(r["images_per_s"] * r["wall_s"] >= 2 * 4 for r in runs), runs
    assert s["loader_over_resident"] == pytest.approx(s["loader_images_per_s"] / s["resident_images_per_s"])
    assert 0 <= s["loader_data_wait_frac"] < 1 and 0 <= s["resident_data_wait_frac"] < 0.01
    assert d["config"]["arch"] == "resnet18" and d["config"]["queue_size"] == 64
