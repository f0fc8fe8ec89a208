"""Bottleneck ResNet (torchvision v1.5 / SimCLR ``resnet_wider``) in Flax Linen.

Shape convention: images and maps are NHWC float32, ``x`` of shape ``[B, H, W, 3]`` already
normalised; every stride-2 op maps ``h -> ceil(h / 2)``, so a 724 px input gives a ``[B, 23,
23, 2048 * width]`` ``layer4`` map.

The numerics follow PyTorch exactly: explicit symmetric padding (never ``'SAME'``, which XLA pads
asymmetrically for stride 2 on even sizes), the stride on the 3x3 conv of each bottleneck,
BatchNorm epsilon 1e-5, max-pool padded with -inf (``stem_max_pool``: the same result, computed on
bit patterns). Submodule names mirror the torch keys
(``conv1``, ``bn1``, ``layer3_5/conv2``, ``layer1_0/downsample_conv``) so that conversion is a
regex on the key. ``width`` scales the stem and every stage (SimCLR 2x/4x), unlike torchvision's
``wide_resnet50_2``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jretrieval.models import convdot

#: blocks per stage for each supported depth.
STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGES = ("layer1", "layer2", "layer3", "layer4")
#: torch's BatchNorm epsilon (also Flax's default), used by every BatchNorm and by BN folding.
BN_EPSILON = 1e-5


def batch_norm(train: bool, momentum: float, dtype: Any, name: str) -> nn.BatchNorm:
    """A BatchNorm with torch's epsilon; batch statistics in train mode, running ones otherwise.

    ``use_fast_variance=False`` computes the variance as ``mean((x - mean)^2)`` like torch, not
    ``mean(x^2) - mean^2``, which loses digits on large activations.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=BN_EPSILON,
        dtype=dtype,
        use_fast_variance=False,
        name=name,
    )


def conv(
    features: int,
    kernel: int,
    stride: int,
    dtype: Any,
    name: str,
    *,
    conv_dot: bool = False,
    use_bias: bool = False,
) -> nn.Conv:
    """A conv with torch's symmetric padding ``kernel // 2`` (bias-free unless BN was folded
    into it); ``conv_dot`` computes it as im2col + dot (same parameters, see ``convdot``)."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        conv_general_dilated=convdot.conv_dot if conv_dot else None,
        name=name,
    )


class FoldedConv(nn.Module):
    """``act(conv(x) + bias + residual)`` with ``nn.Conv``'s parameters (``kernel`` HWIO,
    ``bias``) and torch's symmetric padding, computed by ``convdot.fused_conv``: a conv with
    BatchNorm folded into it, as ``conv_dot`` modules run it (one pass with its epilogue)."""

    features: int
    kernel: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, residual: jax.Array | None = None, relu: bool = False
    ) -> jax.Array:
        shape = (self.kernel, self.kernel, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        pad = self.kernel // 2
        return convdot.fused_conv(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            bias,
            (self.stride, self.stride),
            ((pad, pad), (pad, pad)),
            residual=residual,
            relu=relu,
        )


def conv_bn(
    module: nn.Module,
    x: jax.Array,
    train: bool,
    features: int,
    kernel: int,
    stride: int,
    names,
    *,
    residual: jax.Array | None = None,
    relu: bool = False,
) -> jax.Array:
    """``act(bn(conv(x)) + residual)`` (``act``: ReLU if ``relu``) with ``module``'s dtype,
    momentum and ``conv_dot``; when ``module.fold_bn`` the BatchNorm is already folded into the
    conv's kernel and bias (``fold.fold_batch_norm``): one conv with a bias, no BatchNorm
    variables, which ``conv_dot`` modules run with the shortcut and ReLU fused
    (``FoldedConv``). ``names`` = (conv name, BN name)."""
    conv_name, bn_name = names
    if module.fold_bn:
        if train:
            raise ValueError(
                f"{type(module).__name__}: BatchNorm is folded (fold_bn=True), so it cannot run "
                "in training mode; recalibrate BN before fold_batch_norm"
            )
        if module.conv_dot:
            folded = FoldedConv(features, kernel, stride, module.dtype, name=conv_name)
            return folded(x, residual, relu)
        y = conv(features, kernel, stride, module.dtype, conv_name, use_bias=True)(x)
    else:
        y = conv(features, kernel, stride, module.dtype, conv_name, conv_dot=module.conv_dot)(x)
        y = batch_norm(train, module.bn_momentum, module.dtype, bn_name)(y)
    if residual is not None:
        y = y + residual
    return nn.relu(y) if relu else y


def stem_max_pool(x: jax.Array) -> jax.Array:
    """torch's ``MaxPool2d(3, 2, padding=1)`` of a map that went through a ReLU (``x >= 0``).

    The maximum of non-negative floats is the maximum of their bit patterns read as unsigned
    integers (sign bit cleared, so -0.0 reads as +0.0; padding with zeros equals padding with
    -inf, as every window holds an input value), taken over rows then columns as strided
    slices: exact, and on XLA's CPU backend several times faster than ``nn.max_pool``, which
    moves bfloat16 through float32 (ResNet-50 at 724 px: 3 against 31 ms).
    """
    bits = {2: (jnp.uint16, 0x7FFF), 4: (jnp.uint32, 0x7FFFFFFF)}[jnp.dtype(x.dtype).itemsize]
    u = jax.lax.bitcast_convert_type(x, bits[0]) & jnp.asarray(bits[1], bits[0])
    u = jnp.pad(u, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ho, wo = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
    rows = functools.reduce(jnp.maximum, [u[:, i : i + 2 * ho - 1 : 2] for i in range(3)])
    cols = functools.reduce(jnp.maximum, [rows[:, :, j : j + 2 * wo - 1 : 2] for j in range(3)])
    return jax.lax.bitcast_convert_type(cols, x.dtype)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 (x4) with BN/ReLU, projection shortcut when ``downsample``.

    Maps ``[B, H, W, Cin]`` to ``[B, ceil(H / stride), ceil(W / stride), 4 * planes]``.
    """

    planes: int
    stride: int = 1
    downsample: bool = False
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    conv_dot: bool = False
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_features = 4 * self.planes
        shortcut = x
        if self.downsample:
            names = ("downsample_conv", "downsample_bn")
            shortcut = conv_bn(self, x, train, out_features, 1, self.stride, names)
        y = conv_bn(self, x, train, self.planes, 1, 1, ("conv1", "bn1"), relu=True)
        y = conv_bn(self, y, train, self.planes, 3, self.stride, ("conv2", "bn2"), relu=True)
        names = ("conv3", "bn3")
        return conv_bn(self, y, train, out_features, 1, 1, names, residual=shortcut, relu=True)


class ResNet(nn.Module):
    """Bottleneck ResNet without its classifier.

    Attributes:
      depth: 50, 101 or 152 (see ``STAGE_SIZES``).
      width: width multiplier of the stem and every stage (1, 2, 4 for SimCLR 1x/2x/4x).
      bn_momentum: Flax meaning (weight of the old running average); ``0.0`` makes a
        ``train=True, mutable=["batch_stats"]`` apply return the raw batch statistics.
      dtype: computation dtype (parameters stay float32).
      conv_dot: compute every conv as im2col + dot (``convdot``; reaches the bfloat16 dot
        units of XLA's CPU backend); same parameters and, up to rounding, the same maps.
      fold_bn: every BatchNorm is folded into the conv before it (``fold.fold_batch_norm``:
        convs with a bias, no BN variables); inference only.
    """

    depth: int = 50
    width: int = 1
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    conv_dot: bool = False
    fold_bn: bool = False

    def backbone(self, x: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The convolutional trunk; call it from a compact method (``__call__``, subclasses).

        Returns the ``layer4`` map ``[B, h, w, 2048 * width]`` and the dict of stage outputs
        ``{"stem": [B, H/2, W/2, 64w], "layer1": ..., "layer4": ...}``.
        """
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"ResNet depth={self.depth}; expected one of {sorted(STAGE_SIZES)}")
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"ResNet input x has shape {x.shape}; expected [B, H, W, 3] (NHWC)")
        x = x.astype(self.dtype)
        x = conv_bn(self, x, train, 64 * self.width, 7, 2, ("conv1", "bn1"), relu=True)
        stages = {"stem": x}
        x = stem_max_pool(x)
        for i, (stage, blocks) in enumerate(zip(STAGES, STAGE_SIZES[self.depth], strict=True)):
            for j in range(blocks):
                x = Bottleneck(
                    planes=64 * self.width * 2**i,
                    stride=2 if (i > 0 and j == 0) else 1,
                    downsample=j == 0,
                    bn_momentum=self.bn_momentum,
                    dtype=self.dtype,
                    conv_dot=self.conv_dot,
                    fold_bn=self.fold_bn,
                    name=f"{stage}_{j}",
                )(x, train)
            stages[stage] = x
        return x, stages

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Maps ``[B, H, W, 3]`` to the ``layer4`` map and the dict of stage outputs."""
        return self.backbone(x, train)


ResNet50 = functools.partial(ResNet, depth=50)
ResNet101 = functools.partial(ResNet, depth=101)
SimCLR1x = functools.partial(ResNet, depth=50, width=1)
SimCLR2x = functools.partial(ResNet, depth=50, width=2)
SimCLR4x = functools.partial(ResNet, depth=50, width=4)
