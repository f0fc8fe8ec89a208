"""Small self-contained PyTorch references in the published checkpoints' exact key layouts.

Shape convention: torch modules take NCHW float32; the helpers here return NCHW maps, and
``to_nhwc`` converts them for comparison with Flax (NHWC).

- ``torch_resnet(depth=50, width=1, simclr_order=False)``: torchvision's bottleneck ResNet
  (stride on the 3x3 conv, ``conv1``/``bn1``/``layer1.0.downsample.0``...), with SimCLR's
  ``width_mult`` scaling the stem and every stage, and optionally SimCLR's key order
  (``downsample`` registered before ``conv1``). ``forward`` returns the ``layer4`` map.
- ``torch_apgem(depth=101)``: dirtorch ``resnet101_rmac`` (trunk, ``adpool.p``, ``fc``, L2).
- ``randomize_(module, seed)``: random BN affine parameters and running statistics.
- ``save_*``: write a module the way the original code saves it (torchvision, tonylins SimCLR,
  MoCo training and released layouts, dirtorch AP-GeM with a pickled sklearn-like PCA).

No torchvision: PyPI torchvision may not import beside this CPU torch build.
"""

from __future__ import annotations

import copy
import os
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class Bottleneck(nn.Module):
    """torchvision v1.5 bottleneck; ``simclr_order`` registers ``downsample`` first."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        simclr_order: bool = False,
    ):
        super().__init__()
        if simclr_order:
            self.downsample = downsample
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        if not simclr_order:
            self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision/SimCLR ``resnet_wider`` ResNet; ``num_classes=None`` omits ``fc``."""

    def __init__(
        self,
        depth: int = 50,
        width: int = 1,
        num_classes: int | None = 1000,
        simclr_order: bool = False,
    ):
        super().__init__()
        self.depth, self.width = depth, width
        self.inplanes = 64 * width
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        for i, blocks in enumerate(STAGE_SIZES[depth]):
            planes, stride = 64 * width * 2**i, 1 if i == 0 else 2
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )
            layers = [Bottleneck(self.inplanes, planes, stride, downsample, simclr_order)]
            self.inplanes = planes * 4
            layers += [
                Bottleneck(self.inplanes, planes, simclr_order=simclr_order)
                for _ in range(1, blocks)
            ]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        if num_classes is not None:
            self.fc = nn.Linear(2048 * width, num_classes)

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"stem", "layer1", ..., "layer4"}`` NCHW maps."""
        out = {"stem": self.relu(self.bn1(self.conv1(x)))}
        x = self.maxpool(out["stem"])
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = out[name] = getattr(self, name)(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ``layer4`` map ``[B, 2048w, h, w]``."""
        return self.stages(x)["layer4"]


class GeM(nn.Module):
    """dirtorch ``GeneralizedMeanPooling`` with a learned ``p`` of shape ``[1]``."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(min=self.eps).pow(self.p)
        return F.adaptive_avg_pool2d(x, 1).pow(1.0 / self.p)


class APGeM(ResNet):
    """dirtorch ``ResNet_RMAC`` with GeM: keys ``conv1..layer4.*``, ``adpool.p``, ``fc.*``."""

    def __init__(self, depth: int = 101, out_dim: int = 2048, p: float = 3.0):
        super().__init__(depth=depth, num_classes=None)
        self.adpool = GeM(p)
        self.fc = nn.Linear(2048, out_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(layer4 map [B,2048,h,w], descriptor [B,out_dim])``."""
        fmap = self.stages(x)["layer4"]
        desc = self.fc(self.adpool(fmap).flatten(1))
        return fmap, F.normalize(desc, dim=-1)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN weight/bias/running stats (mean ~ N(0, 0.1), var ~ U(0.5, 2)); in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.num_batches_tracked.fill_(123)
    return module


def torch_resnet(
    depth: int = 50, width: int = 1, simclr_order: bool = False, *, seed: int = 0
) -> ResNet:
    """A random ResNet in eval mode with randomised BN (torchvision or SimCLR layout)."""
    torch.manual_seed(seed)
    return randomize_(ResNet(depth, width, simclr_order=simclr_order), seed).eval()


def torch_apgem(depth: int = 101, p: float = 3.3, *, seed: int = 0) -> APGeM:
    """A random AP-GeM in eval mode, ``p`` not 3 so that its conversion is tested."""
    torch.manual_seed(seed)
    return randomize_(APGeM(depth, p=p), seed).eval()


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    """NCHW tensor -> NHWC float64 NumPy array."""
    return x.detach().permute(0, 2, 3, 1).double().numpy()


def save_torchvision(model: ResNet, path: str | os.PathLike) -> None:
    """``torch.save(model.state_dict(), path)``: the bare torchvision state dict."""
    torch.save(model.state_dict(), path)


def save_simclr(model: ResNet, path: str | os.PathLike) -> None:
    """tonylins ``convert.py``: ``{"state_dict": model.state_dict()}``."""
    torch.save({"state_dict": model.state_dict()}, path)


def moco_encoder(model: ResNet, version: int) -> ResNet:
    """``model`` with MoCo's head on ``fc``: v1 Linear(2048, 128), v2 the 2-layer MLP."""
    q = copy.deepcopy(model)
    q.fc = (
        nn.Linear(2048, 128)
        if version == 1
        else nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))
    )
    return q


def save_moco(
    model: ResNet, path: str | os.PathLike, *, version: int = 2, layout: str = "training"
) -> dict[str, torch.Tensor]:
    """MoCo ``main_moco.py`` (``layout="training"``: DDP ``module.`` prefix, encoder_q/k, queue,
    optimizer) or the released, cleaned file (``layout="released"``: only encoder_q)."""
    q = moco_encoder(model, version)
    sd = {f"module.encoder_q.{k}": v for k, v in q.state_dict().items()}
    if layout == "training":
        sd.update({f"module.encoder_k.{k}": v.clone() for k, v in q.state_dict().items()})
        sd["module.queue"] = F.normalize(torch.randn(128, 65536), dim=0)
        sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
        obj = {"epoch": 200, "arch": "resnet50", "state_dict": sd, "optimizer": {}}
    elif layout == "released":
        obj = {"state_dict": sd}
    else:
        raise ValueError(f"layout {layout!r}; expected 'training' or 'released'")
    torch.save(obj, path)
    return sd


def pca_arrays(dim: int, n_components: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Random sklearn-like PCA attributes (float64, as sklearn stores them)."""
    rng = np.random.default_rng(seed)
    components = np.linalg.qr(rng.standard_normal((dim, n_components)))[0].T
    return {
        "mean_": rng.standard_normal(dim) * 0.01,
        "components_": components,
        "explained_variance_": np.sort(rng.uniform(1e-3, 1e-1, n_components))[::-1].copy(),
    }


def save_apgem(
    model: APGeM, path: str | os.PathLike, pca: dict[str, np.ndarray], *, arch: str | None = None
) -> None:
    """dirtorch ``save_checkpoint``: ``module.``-prefixed state dict, model_options, and a PCA
    pickled as ``sklearn.decomposition.pca.PCA`` (a throwaway module, removed after saving)."""
    fake = types.ModuleType("sklearn.decomposition.pca")

    class PCA:  # the class name and module are what the pickle records
        pass

    PCA.__module__, PCA.__qualname__ = fake.__name__, "PCA"
    fake.PCA = PCA
    obj = PCA()
    obj.__dict__.update(
        {
            "n_components": None,
            "copy": True,
            "whiten": True,
            "svd_solver": "full",
            "n_components_": np.int64(len(pca["components_"])),
            "noise_variance_": np.float64(0.0),
            **pca,
        }
    )
    names = ["sklearn", "sklearn.decomposition", "sklearn.decomposition.pca"]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names[:2]:
        sys.modules.setdefault(n, types.ModuleType(n))
    sys.modules[names[2]] = fake
    try:
        torch.save(
            {
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "model_options": {
                    "arch": arch or f"resnet{model.depth}_rmac",
                    "out_dim": 2048,
                    "pooling": "gem",
                    "gemp": 3,
                },
                "pca": {"Landmarks_clean": obj},
                "current_iter": 296,
            },
            path,
        )
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
