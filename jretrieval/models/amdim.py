"""The AMDIM encoder (Bachman et al., NeurIPS 2019; amdim-public ``model.py``, IN128 layout).

Shape convention: NHWC float32 images ``[B, H, W, 3]`` (ImageNet mean/std normalised, the model
was trained at 128 px), maps ``[B, h, w, C]``. ``layer_sizes`` gives every layer's spatial size:

==========  ==========  ======  ======
layer       channels    128 px  724 px
==========  ==========  ======  ======
0 (stem)    ndf         64      362
1           ndf         62      360
2           2 ndf       30      179
3           4 ndf       14      88
4, 5        8 ndf       7       44
6           8 ndf       5       42
7           8 ndf       3       40
8, 9        n_rkhs      1       38
==========  ==========  ======  ======

The paper's "40x40" AMDIM map at 724 px is layer 7 (``8 * ndf`` channels, the last map before
the n_rkhs block; the default ``feature_layer``), which the pipeline then resizes to 23x23 like
the ResNets' maps; the final n_rkhs map (layer 9) is 38x38. The smallest input is 127 px.

Nothing here is a torchvision ResNet: a reflect-padded (2) 5x5/2 stem conv with bias and ReLU
(layer 0), a 3x3 conv with bias and ReLU (layer 1), then ``ConvResBlock``s whose first unit is a
VALID 4x4/2, 4x4/2, 2x2/2, 3x3/1, 3x3/1 conv (later units 1x1) and whose shortcut is an average
pool with the same window and stride, zero-padded on the channel axis when the width grows; no
ReLU after the add and none before ``conv1``. BatchNorm (eps 1e-5) is applied only where the
original applies it: ``bn1`` inside every ``ConvResNxN`` and layer 5 when ``use_bn``, layer 9
always. The unused BatchNorms still own their variables (the checkpoint has them whatever
``use_bn`` is); in training mode their statistics are left untouched, as in PyTorch.

Submodule names mirror the PyTorch keys with the ``MaybeBatchNorm2d`` wrapper's ``.bn`` dropped:
``encoder.module.layer_list.2.layer_list.0.bn1.bn.weight`` is ``layer_list_2/layer_list_0/bn1``
``scale``; ``layer_list.5.bn.*`` is ``layer_list_5``; ``layer_list.0.conv.*`` is
``layer_list_0/conv``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jretrieval.models import convdot
from jretrieval.models.resnet import batch_norm  # torch eps and variance formula

#: (layer index, input width, output width in units of ndf, kernel, stride) of the ConvResBlocks.
RES_BLOCKS = ((2, 1, 2, 4, 2), (3, 2, 4, 4, 2), (4, 4, 8, 2, 2), (6, 8, 8, 3, 1), (7, 8, 8, 3, 1))
NUM_LAYERS = 10
MIN_INPUT_SIZE = 127


def layer_sizes(size: int) -> list[int]:
    """Spatial size of layers 0..9 for an input side of ``size`` pixels (VALID convs)."""
    sizes = [(size + 2 * 2 - 5) // 2 + 1]  # reflect pad 2, 5x5/2
    sizes.append(sizes[-1] - 2)  # 3x3/1
    for index, _, _, kernel, stride in RES_BLOCKS:
        if index == 6:
            sizes.append(sizes[-1])  # layer 5 is a BatchNorm
        sizes.append((sizes[-1] - kernel) // stride + 1)
    sizes.append(sizes[-1] - 2)  # layer 8: 3x3/1
    sizes.append(sizes[-1])  # layer 9: BatchNorm
    return sizes


def maybe_batch_norm(module: nn.Module, bn: nn.BatchNorm, x: jax.Array, use: bool) -> jax.Array:
    """``MaybeBatchNorm2d``: applies ``bn`` only if ``use``, but creates its variables at init."""
    if use:
        return bn(x)
    if module.is_initializing():
        bn(x)
    return x


class Conv3x3(nn.Module):
    """Optional reflect pad, ``kernel`` x ``kernel`` VALID conv with bias, ReLU (no BN).

    ``[B, H, W, Cin] -> [B, (H + 2 pad - kernel) // stride + 1, ..., features]``.
    """

    features: int
    kernel: int
    stride: int
    pad: int = 0
    dtype: Any = jnp.float32
    conv_dot: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pad:
            p = self.pad
            x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
        k, s = self.kernel, self.stride
        conv = nn.Conv(
            self.features,
            (k, k),
            (s, s),
            "VALID",
            use_bias=True,
            dtype=self.dtype,
            conv_general_dilated=convdot.conv_dot if self.conv_dot else None,
            name="conv",
        )
        return nn.relu(conv(x))


class ConvResNxN(nn.Module):
    """``conv2_1x1(relu(bn1?(conv1_kxk/s(x)))) + zero_pad_channels(avg_pool_kxk/s(x))``.

    ``[B, H, W, Cin] -> [B, (H - kernel) // stride + 1, ..., features]``, ``features >= Cin``.
    With ``fold_bn`` and ``use_bn``, ``bn1`` is folded into ``conv1`` (a bias, no ``bn1``).
    """

    features: int
    kernel: int
    stride: int
    use_bn: bool = False
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    conv_dot: bool = False
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        n_in = x.shape[-1]
        if self.features < n_in:
            raise ValueError(f"ConvResNxN: {n_in} input channels > {self.features} outputs")
        k, s = self.kernel, self.stride
        folded = self.fold_bn and self.use_bn

        def conv(features, kernel, stride, use_bias, name):
            return nn.Conv(
                features,
                kernel,
                stride,
                "VALID",
                use_bias=use_bias,
                dtype=self.dtype,
                conv_general_dilated=convdot.conv_dot if self.conv_dot else None,
                name=name,
            )

        h = conv(self.features, (k, k), (s, s), folded, "conv1")(x)
        if not folded:
            bn = batch_norm(train, self.bn_momentum, self.dtype, "bn1")
            h = maybe_batch_norm(self, bn, h, self.use_bn)
        h = conv(self.features, (1, 1), (1, 1), False, "conv2")(nn.relu(h))
        shortcut = x
        if k > 1 or s > 1:
            shortcut = nn.avg_pool(x, (k, k), strides=(s, s), padding="VALID")
        if self.features > n_in:
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, self.features - n_in)))
        return h + shortcut


class ConvResBlock(nn.Module):
    """One ``ConvResNxN(kernel, stride)`` then ``depth - 1`` ``ConvResNxN(1, 1)``."""

    features: int
    kernel: int
    stride: int
    depth: int
    use_bn: bool = False
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    conv_dot: bool = False
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for j in range(self.depth):
            x = ConvResNxN(
                self.features,
                self.kernel if j == 0 else 1,
                self.stride if j == 0 else 1,
                self.use_bn,
                self.bn_momentum,
                self.dtype,
                self.conv_dot,
                self.fold_bn,
                name=f"layer_list_{j}",
            )(x, train)
        return x


class AMDIMEncoder(nn.Module):
    """AMDIM's 128 px encoder (``layer_list`` 0..9), exposing every layer's map.

    Attributes:
      ndf: base width (256 for AMDIM-Medium, 320 for Large).
      n_rkhs: width of the final embedding layers 8 and 9 (2048 / 2560); at least ``8 * ndf``.
      n_depth: units per ConvResBlock (``rd`` in the file names; 10 for the releases).
      use_bn: the checkpoint's ``hyperparams["use_bn"]``: BN in every ConvResNxN and at layer 5.
      feature_layer: index 0..9 of the map returned first (7: the paper's 40x40 map at 724 px).
      bn_momentum: Flax meaning (weight of the old running average); ``0.0`` makes a
        ``train=True, mutable=["batch_stats"]`` apply return the raw batch statistics.
      dtype: computation dtype (parameters stay float32).
      conv_dot: compute every conv as im2col + dot (``convdot``), same parameters.
      fold_bn: the ConvResNxN BatchNorms (applied only when ``use_bn``) are folded into their
        conv (``fold.fold_batch_norm``); layers 5 and 9 follow a residual sum, not a conv, and
        stay BatchNorms. Inference only.
    """

    ndf: int
    n_rkhs: int
    n_depth: int
    use_bn: bool = False
    feature_layer: int = 7
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    conv_dot: bool = False
    fold_bn: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Maps ``[B, H, W, 3]`` (H, W >= 127) to the ``feature_layer`` map and the dict
        ``{"layer0": [B, h0, w0, ndf], ..., "layer9": [B, h9, w9, n_rkhs]}`` (sizes as in
        ``layer_sizes``)."""
        if not 0 <= self.feature_layer < NUM_LAYERS:
            raise ValueError(f"AMDIMEncoder feature_layer={self.feature_layer}; expected 0..9")
        if self.n_depth < 1 or self.n_rkhs < 8 * self.ndf:
            raise ValueError(
                f"AMDIMEncoder n_depth={self.n_depth}, n_rkhs={self.n_rkhs}, ndf={self.ndf}; "
                "expected n_depth >= 1 and n_rkhs >= 8 * ndf"
            )
        if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"AMDIMEncoder input x has shape {x.shape}; expected [B, H, W, 3] (NHWC) with "
                f"H, W >= {MIN_INPUT_SIZE}"
            )
        if train and self.fold_bn:
            raise ValueError(
                "AMDIMEncoder: BatchNorm is folded (fold_bn=True), so it cannot run in training "
                "mode; recalibrate BN before fold_batch_norm"
            )
        ndf, dtype, momentum, dot = self.ndf, self.dtype, self.bn_momentum, self.conv_dot
        fold = self.fold_bn
        x = x.astype(dtype)
        acts = [Conv3x3(ndf, 5, 2, pad=2, dtype=dtype, conv_dot=dot, name="layer_list_0")(x)]
        acts.append(Conv3x3(ndf, 3, 1, dtype=dtype, conv_dot=dot, name="layer_list_1")(acts[-1]))
        for index, _, width, kernel, stride in RES_BLOCKS:
            if index == 6:
                bn = batch_norm(train, momentum, dtype, "layer_list_5")
                acts.append(maybe_batch_norm(self, bn, acts[-1], self.use_bn))
            block = ConvResBlock(
                width * ndf,
                kernel,
                stride,
                self.n_depth,
                self.use_bn,
                momentum,
                dtype,
                dot,
                fold,
                name=f"layer_list_{index}",
            )
            acts.append(block(acts[-1], train))
        acts.append(
            ConvResNxN(
                self.n_rkhs, 3, 1, self.use_bn, momentum, dtype, dot, fold, name="layer_list_8"
            )(acts[-1], train)
        )
        acts.append(batch_norm(train, momentum, dtype, "layer_list_9")(acts[-1]))
        stages = {f"layer{i}": a for i, a in enumerate(acts)}
        return acts[self.feature_layer], stages
