"""A small PyTorch re-implementation of amdim-public's IN128 ``Model`` for the converter tests.

Written from the description of ``model.py`` (same class names, same registration order, so
``Model(...).state_dict()`` has the released file's keys in its order): ``encoder.module.
layer_list.*`` (DataParallel inside the model), ``encoder.module.rkhs_block_{5,7}.*``,
``g2l_loss.masks_r5`` (uint8) and ``evaluator.*``. Only the encoder computes anything here;
``Encoder._forward_acts(x)`` returns the ten layer outputs, NCHW.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaybeBatchNorm2d(nn.Module):
    def __init__(self, n_ftr: int, affine: bool, use_bn: bool):
        super().__init__()
        self.bn = nn.BatchNorm2d(n_ftr, affine=affine)
        self.use_bn = use_bn

    def forward(self, x):
        return self.bn(x) if self.use_bn else x


class Conv3x3(nn.Module):
    def __init__(self, n_in, n_out, n_kern, n_stride, n_pad, use_bn=True, pad_mode="constant"):
        super().__init__()
        self.n_pad, self.pad_mode = (n_pad,) * 4, pad_mode
        self.conv = nn.Conv2d(n_in, n_out, n_kern, n_stride, 0, bias=not use_bn)
        self.bn = MaybeBatchNorm2d(n_out, True, use_bn) if use_bn else None

    def forward(self, x):
        if self.n_pad[0] > 0:
            x = F.pad(x, self.n_pad, mode=self.pad_mode)
        x = self.conv(x)
        return F.relu(self.bn(x) if self.bn is not None else x)


class ConvResNxN(nn.Module):
    def __init__(self, n_in, n_out, width, stride, pad, use_bn=False):
        super().__init__()
        assert n_out >= n_in
        self.n_in, self.n_out, self.width, self.stride, self.pad = n_in, n_out, width, stride, pad
        self.conv1 = nn.Conv2d(n_in, n_out, width, stride, pad, bias=False)
        self.conv2 = nn.Conv2d(n_out, n_out, 1, 1, 0, bias=False)
        self.bn1 = MaybeBatchNorm2d(n_out, True, use_bn)

    def forward(self, x):
        h2 = self.conv2(F.relu(self.bn1(self.conv1(x))))
        h3 = F.avg_pool2d(x, self.width, self.stride, self.pad)
        if self.n_out > self.n_in:
            h3 = F.pad(h3, (0, 0, 0, 0, 0, self.n_out - self.n_in))
        return h2 + h3


class ConvResBlock(nn.Module):
    def __init__(self, n_in, n_out, width, stride, pad, depth, use_bn):
        super().__init__()
        units = [ConvResNxN(n_in, n_out, width, stride, pad, use_bn)]
        units += [ConvResNxN(n_out, n_out, 1, 1, 0, use_bn) for _ in range(depth - 1)]
        self.layer_list = nn.Sequential(*units)

    def forward(self, x):
        return self.layer_list(x)


class FakeRKHSConvNet(nn.Module):
    """Loss-embedding head; only its keys matter here (conv1, conv2, bn_hid, bn_out, shortcut)."""

    def __init__(self, n_input, n_output, use_bn=False):
        super().__init__()
        self.conv1 = nn.Conv2d(n_input, n_output, 1, bias=False)
        self.conv2 = nn.Conv2d(n_output, n_output, 1, bias=False)
        self.bn_hid = MaybeBatchNorm2d(n_output, True, use_bn)
        self.bn_out = MaybeBatchNorm2d(n_output, True, True)
        self.shortcut = nn.Conv2d(n_input, n_output, 1, bias=True)


class Encoder(nn.Module):
    def __init__(self, ndf, n_rkhs, n_depth, use_bn=False):
        super().__init__()
        d, b = n_depth, use_bn
        self.layer_list = nn.ModuleList(
            [
                Conv3x3(3, ndf, 5, 2, 2, False, pad_mode="reflect"),
                Conv3x3(ndf, ndf, 3, 1, 0, False),
                ConvResBlock(ndf * 1, ndf * 2, 4, 2, 0, d, b),
                ConvResBlock(ndf * 2, ndf * 4, 4, 2, 0, d, b),
                ConvResBlock(ndf * 4, ndf * 8, 2, 2, 0, d, b),
                MaybeBatchNorm2d(ndf * 8, True, b),
                ConvResBlock(ndf * 8, ndf * 8, 3, 1, 0, d, b),
                ConvResBlock(ndf * 8, ndf * 8, 3, 1, 0, d, b),
                ConvResNxN(ndf * 8, n_rkhs, 3, 1, 0, b),
                MaybeBatchNorm2d(n_rkhs, True, True),
            ]
        )
        self.rkhs_block_5 = FakeRKHSConvNet(ndf * 8, n_rkhs, use_bn)
        self.rkhs_block_7 = FakeRKHSConvNet(ndf * 8, n_rkhs, use_bn)

    def _forward_acts(self, x):
        acts = [x]
        for layer in self.layer_list:
            acts.append(layer(acts[-1]))
        return acts[1:]


class _DataParallel(nn.Module):
    """Stands in for ``nn.DataParallel`` (same ``module.`` key prefix, no device handling)."""

    def __init__(self, module):
        super().__init__()
        self.module = module


class LossMultiNCE(nn.Module):
    def __init__(self):
        super().__init__()
        masks = torch.zeros(5, 5, 1, 5, 5, dtype=torch.uint8)
        for i in range(5):
            for j in range(5):
                masks[i, j, 0, i, j] = 1
        self.masks_r5 = nn.Parameter(masks.reshape(-1, 1, 5, 5), requires_grad=False)


def _mlp(n_in, n_classes, n_hidden):
    if n_hidden is None:
        layers = [nn.Flatten(), nn.Dropout(0.0), nn.Linear(n_in, n_classes)]
    else:
        layers = [nn.Flatten(), nn.Dropout(0.2), nn.Linear(n_in, n_hidden, bias=False)]
        layers += [nn.BatchNorm1d(n_hidden), nn.ReLU(), nn.Dropout(0.2)]
        layers += [nn.Linear(n_hidden, n_classes)]
    mlp = nn.Module()
    mlp.block_forward = nn.Sequential(*layers)
    return mlp


class Model(nn.Module):
    def __init__(
        self, ndf, n_classes, n_rkhs, tclip=20.0, n_depth=3, encoder_size=128, use_bn=False
    ):
        super().__init__()
        assert encoder_size == 128
        self.hyperparams = dict(
            ndf=ndf,
            n_classes=n_classes,
            n_rkhs=n_rkhs,
            tclip=tclip,
            n_depth=n_depth,
            encoder_size=encoder_size,
            use_bn=use_bn,
        )
        self.encoder = _DataParallel(Encoder(ndf, n_rkhs, n_depth, use_bn))
        self.g2l_loss = LossMultiNCE()
        self.evaluator = nn.Module()
        self.evaluator.block_glb_mlp = _mlp(n_rkhs, n_classes, 1024)
        self.evaluator.block_glb_lin = _mlp(n_rkhs, n_classes, None)


def checkpoint(model: Model) -> dict:
    """The dict amdim-public's ``checkpoint.py`` saves."""
    cursor = {"info_epoch": 0, "info_step": 0, "classifier_epoch": 0, "classifier_step": 0}
    return {"model": model.state_dict(), "hyperparams": dict(model.hyperparams), "cursor": cursor}
