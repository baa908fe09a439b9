"""Backbones and projection heads, built from a small table of layer sizes.

A head preset is a tuple of layer widths after the backbone's feature width
(``hidden..., out``), plus where batch norm goes.  Presets cite the paper that
defines them; tests and small CPU runs scale them with ``hidden``/``out``
overrides instead of new code.

Object-aware cropping (Mishra et al., TMLR 2022) keeps *separate* projection
heads for the object view and the other view when a crop mode has an object
view; ``scene-scene`` keeps one.  :func:`head_keys` decides which head each view
goes through, :func:`build_heads` builds them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torchvision


@dataclass(frozen=True)
class HeadSpec:
    """Layer widths of an MLP head (``sizes`` = hidden..., out) and its norms.

    Args:
        sizes: widths after the input, e.g. ``(2048, 128)`` for in -> 2048 -> 128.
        hidden_bn: BatchNorm after every hidden linear layer (before ReLU).
        conv: build the head from 1x1 convolutions (dense heads on feature maps).
    """

    sizes: tuple[int, ...]
    hidden_bn: bool = False
    conv: bool = False


HEADS: dict[str, HeadSpec] = {
    # MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning"): 2048-2048-128 MLP
    "mocov2": HeadSpec((2048, 128)),
    # BYOL (Grill et al. 2020): projector and predictor 4096 -> 256 with BN in the hidden layer
    "byol_projector": HeadSpec((4096, 256), hidden_bn=True),
    "byol_predictor": HeadSpec((4096, 256), hidden_bn=True),
    # DenseCL (Wang et al. 2021, "Dense Contrastive Learning for Self-Supervised Visual Pre-Training"):
    # the global head is MoCo v2's MLP, the dense head the same widths as 1x1 convolutions
    "densecl_global": HeadSpec((2048, 128)),
    "densecl_dense": HeadSpec((2048, 128), conv=True),
}


def preset(name: str, hidden: int = 0, out: int = 0) -> HeadSpec:
    """A preset from :data:`HEADS`, with its hidden and/or output width replaced when > 0."""
    if name not in HEADS:
        raise ValueError(f"unknown head preset {name!r}; known: {sorted(HEADS)}")
    spec = HEADS[name]
    sizes = list(spec.sizes)
    if hidden > 0:
        sizes[:-1] = [hidden] * (len(sizes) - 1)
    if out > 0:
        sizes[-1] = out
    return HeadSpec(tuple(sizes), spec.hidden_bn, spec.conv)


def mlp(in_dim: int, spec: HeadSpec) -> nn.Sequential:
    """The head ``in_dim -> spec.sizes`` (Linear, [BN], ReLU between layers; none after the last)."""
    if in_dim < 1 or not spec.sizes or min(spec.sizes) < 1:
        raise ValueError(f"bad head: in_dim={in_dim}, sizes={spec.sizes}")
    lin = (lambda i, o, b: nn.Conv2d(i, o, 1, bias=b)) if spec.conv else (lambda i, o, b: nn.Linear(i, o, bias=b))
    bn = nn.BatchNorm2d if spec.conv else nn.BatchNorm1d
    layers: list[nn.Module] = []
    dims = (in_dim, *spec.sizes)
    for k in range(len(spec.sizes)):
        last = k == len(spec.sizes) - 1
        layers.append(lin(dims[k], dims[k + 1], last or not spec.hidden_bn))
        if not last:
            if spec.hidden_bn:
                layers.append(bn(dims[k + 1]))
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def head_keys(mode: str, share: bool = False) -> tuple[str, str]:
    """Which head each view goes through: ``(view1_key, view2_key)``.

    View 1 is the object view in every mode but ``scene-scene``; it goes through
    the ``obj`` head and view 2 through the ``scene`` head, unless ``share``.
    """
    if not isinstance(mode, str) or not mode:
        raise ValueError(f"crop mode must be a non-empty string, got {mode!r}")
    if mode == "scene-scene" or share:
        return ("scene", "scene")
    return ("obj", "scene")


def local_head_key(mode: str, local_from: str, share: bool = False) -> str:
    """Which head the local (multi-crop) views go through: ``local_from`` ``box`` / ``boxes`` -> view 1's
    head (``obj`` in an object mode), ``scene`` -> view 2's (``scene``).

    Why: the heads are chosen by what a view is cut from.  ``box`` local views are crops inside the
    global object views' region and ``boxes`` ones inside a proposal: object crops, like view 1, so
    they share the object head; ``scene`` local views are crops of the whole image, like a scene
    view, so they go through the scene head.  No third head: a local view's query (MoCo) or
    prediction (BYOL) is compared with keys / targets of the existing heads, and a head of its own
    would start unaligned with them (see :func:`build_heads`).  ``scene-scene`` and ``share`` have
    one head for everything.
    """
    keys = head_keys(mode, share)
    if local_from in ("box", "boxes"):
        return keys[0]
    if local_from == "scene":
        return keys[1]
    raise ValueError(f"local_from must be 'box', 'boxes' or 'scene', got {local_from!r}")


def build_heads(in_dim: int, spec: HeadSpec, keys: tuple[str, str], same_init: bool = True) -> nn.ModuleDict:
    """One head per distinct key in ``keys`` (e.g. ``{"obj", "scene"}`` or ``{"scene"}``).

    With ``same_init`` the heads are separate parameters that start from the same weights.  Why: the
    loss compares view 1 through the ``obj`` head with view 2 through the ``scene`` head; two
    independently initialised heads map the same features to unrelated directions, so at step 0
    the positive pair is no more similar than a negative one and there is no signal to learn from.
    Measured (``benchmarks/pretrain_quality.py``, MoCo-v2, 40 epochs): independently initialised heads
    collapsed to a constant embedding (InfoNCE at its chance value ln(K + 1)) on every seed, heads
    started from the same weights train like one shared head and then specialise.
    """
    names = list(dict.fromkeys(keys))
    first = mlp(in_dim, spec)
    heads = {names[0]: first}
    for k in names[1:]:
        heads[k] = copy.deepcopy(first) if same_init else mlp(in_dim, spec)
    return nn.ModuleDict(heads)


NARROW_PREFIX = "resnet18-w"


def narrow_resnet18(width: float, zero_init_residual: bool = False) -> tuple[nn.Sequential, int]:
    """ResNet-18 with every width scaled by ``width`` (0.25: 16-32-64-128 channels): ``(trunk, dim)``.

    torchvision's BasicBlock ResNets have no width option, hence this small builder (torchvision's
    blocks and initialisation); small CPU studies (``benchmarks/pretrain_quality.py``) train it.
    """
    from torchvision.models.resnet import BasicBlock
    if not 0.0 < width <= 4.0:
        raise ValueError(f"width must be in (0, 4], got {width!r}")
    c = [max(4, int(round(64 * width))) * 2 ** i for i in range(4)]
    layers: list[nn.Module] = [nn.Conv2d(3, c[0], 7, 2, 3, bias=False), nn.BatchNorm2d(c[0]),
                               nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    inp = c[0]
    for i, planes in enumerate(c):
        for b in range(2):
            stride = 2 if i > 0 and b == 0 else 1
            down = None
            if stride != 1 or inp != planes:
                down = nn.Sequential(nn.Conv2d(inp, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            layers.append(BasicBlock(inp, planes, stride, down))
            inp = planes
    trunk = nn.Sequential(*layers)
    for m in trunk.modules():  # torchvision's ResNet initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif zero_init_residual and isinstance(m, BasicBlock):
            nn.init.constant_(m.bn2.weight, 0)
    return trunk, inp


class Backbone(nn.Module):
    """A ResNet trunk that returns the last feature map ``(N, C, h, w)``.

    Args:
        arch: any torchvision ResNet builder name (``resnet18``, ``resnet50``,
            ``wide_resnet50_2``, ...), or ``resnet18-wW``: ResNet-18 with its
            widths scaled by ``W`` (:func:`narrow_resnet18`); randomly initialised.
        zero_init_residual: torchvision's option (used by BYOL-style recipes).

    Attributes:
        dim: channels of the feature map (512 for ResNet-18/34, 2048 for ResNet-50+).
    """

    def __init__(self, arch: str = "resnet50", zero_init_residual: bool = False):
        super().__init__()
        if arch.startswith(NARROW_PREFIX):
            try:
                width = float(arch[len(NARROW_PREFIX):])
            except ValueError:
                raise ValueError(f"arch {arch!r}: expected {NARROW_PREFIX}<width>, e.g. resnet18-w0.25") from None
            self.trunk, self.dim = narrow_resnet18(width, zero_init_residual)
            return
        if "resnet" not in arch or not hasattr(torchvision.models, arch):
            raise ValueError(f"arch must name a torchvision ResNet (resnet18, resnet50, ...) or "
                             f"{NARROW_PREFIX}<width>, got {arch!r}")
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
        self.dim = int(net.fc.in_features)
        self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                   net.layer1, net.layer2, net.layer3, net.layer4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled features ``(N, dim)`` (what linear and kNN evaluation use)."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.trunk(x), 1), 1)
