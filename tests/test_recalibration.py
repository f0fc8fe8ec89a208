"""Tests for jretrieval.recalibration.recalibrate_bn against PyTorch's BatchNorm behaviour.

A small CNN is written twice, in Flax (with the ``bn_momentum`` field the models carry) and in
PyTorch, with the same weights. PyTorch in ``model.train()`` is the reference for ``"pytorch"``
mode (running averages, momentum 0.1, unbiased variance; and ``momentum=None``); forward
pre-hooks on torch's BN layers collect every input each layer receives in training mode, and their
float64 population mean/variance is the reference for ``"exact"`` mode. Tolerances: rtol 1e-5
on statistics (float32 networks), 1e-4 on the network outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jretrieval.models import Encoder
from jretrieval.recalibration import recalibrate_bn

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _bn(train: bool, momentum: float, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=1e-5,
        use_fast_variance=False,
        name=name,
    )


class Block(nn.Module):
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.Conv(6, (1, 1), use_bias=False, name="conv")(x)
        return nn.relu(_bn(train, self.bn_momentum, "bn")(y) + x)


class TinyNet(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3/2 -> BN -> ReLU -> residual block (conv1x1 -> BN)."""

    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict]:
        pad = ((1, 1), (1, 1))
        x = nn.Conv(4, (3, 3), padding=pad, use_bias=False, name="conv1")(x)
        x = nn.relu(_bn(train, self.bn_momentum, "bn1")(x))
        x = nn.Conv(6, (3, 3), strides=(2, 2), padding=pad, use_bias=False, name="conv2")(x)
        x = nn.relu(_bn(train, self.bn_momentum, "bn2")(x))
        x = Block(bn_momentum=self.bn_momentum, name="block")(x, train)
        return x, {}


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 6, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


class TorchTiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(6)
        self.block = TorchBlock()

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.block(x)


BN_LAYERS = {("bn1",): "bn1", ("bn2",): "bn2", ("block", "bn"): "block.bn"}


def _pair(seed: int = 0) -> tuple[TorchTiny, Encoder]:
    """A torch model with random weights and BN statistics, and the same weights in Flax."""
    torch.manual_seed(seed)
    net = TorchTiny()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=gen))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in net.state_dict().items()}
    params: dict[str, Any] = {"block": {}}
    stats: dict[str, Any] = {"block": {}}
    for key, tkey in [("conv1", "conv1"), ("conv2", "conv2"), ("block/conv", "block.conv")]:
        dest = params["block"] if key.startswith("block") else params
        dest[key.split("/")[-1]] = {
            "kernel": jnp.asarray(sd[f"{tkey}.weight"].transpose(2, 3, 1, 0))
        }
    for path, tkey in BN_LAYERS.items():
        p = params["block"] if len(path) == 2 else params
        s = stats["block"] if len(path) == 2 else stats
        p[path[-1]] = {
            "scale": jnp.asarray(sd[f"{tkey}.weight"]),
            "bias": jnp.asarray(sd[f"{tkey}.bias"]),
        }
        s[path[-1]] = {
            "mean": jnp.asarray(sd[f"{tkey}.running_mean"]),
            "var": jnp.asarray(sd[f"{tkey}.running_var"]),
        }
    variables = {"params": params, "batch_stats": stats}
    module = TinyNet()
    expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    assert jax.tree.structure(expected) == jax.tree.structure(variables)
    encoder = Encoder(module, variables, {"name": "tiny"}, {"mean": MEAN, "std": STD}, {})
    return net, encoder


def _batches(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(*s, 3), dtype=np.uint8) for s in shapes]


def _to_torch(images: np.ndarray) -> torch.Tensor:
    x = (images.astype(np.float32) / 255.0 - np.float32(MEAN)) / np.float32(STD)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _torch_train(net: TorchTiny, batches, momentum) -> dict[str, list]:
    """Runs ``model.train()`` forward passes; returns every BN layer's inputs (float64)."""
    inputs: dict[str, list] = {name: [] for name in BN_LAYERS.values()}
    hooks = []
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = momentum
            hooks.append(
                module.register_forward_pre_hook(
                    lambda m, args, name=name: inputs[name].append(args[0].double().numpy())
                )
            )
    net.train()
    with torch.no_grad():
        for b in batches:
            net(_to_torch(b))
    for h in hooks:
        h.remove()
    return inputs


def _stats(encoder: Encoder, path: tuple) -> dict[str, np.ndarray]:
    node = encoder.variables["batch_stats"]
    for key in path:
        node = node[key]
    return {k: np.asarray(v) for k, v in node.items()}


def _torch_bn(net: TorchTiny, name: str) -> torch.nn.BatchNorm2d:
    return dict(net.named_modules())[name]


SHAPES = [(4, 10, 10), (4, 10, 10), (3, 10, 10), (2, 14, 12)]  # uneven sizes and shapes


def test_pytorch_mode_equals_torch_train():
    net, encoder = _pair()
    batches = _batches(SHAPES)
    got = recalibrate_bn(encoder, batches, mode="pytorch", momentum=0.1)
    _torch_train(net, batches, momentum=0.1)
    for path, name in BN_LAYERS.items():
        bn = _torch_bn(net, name)
        stats = _stats(got, path)
        np.testing.assert_allclose(stats["mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["var"], bn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    # parameters untouched, tree and dtypes unchanged
    assert jax.tree.structure(got.variables) == jax.tree.structure(encoder.variables)
    for a, b in zip(
        jax.tree.leaves(got.variables["params"]),
        jax.tree.leaves(encoder.variables["params"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got.variables["batch_stats"]))
    # inference afterwards equals torch.eval() with the re-estimated statistics
    test = _batches([(2, 12, 12)], seed=5)[0]
    net.eval()
    with torch.no_grad():
        ref = net(_to_torch(test)).numpy().transpose(0, 2, 3, 1)
    x = (test.astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
    out = got.module.apply(got.variables, jnp.asarray(x), train=False)[0]
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)


def test_pytorch_mode_cumulative_average():
    net, encoder = _pair(seed=1)
    batches = _batches(SHAPES, seed=1)
    got = recalibrate_bn(encoder, batches, mode="pytorch", momentum=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
    _torch_train(net, batches, momentum=None)
    for path, name in BN_LAYERS.items():
        bn = _torch_bn(net, name)
        stats = _stats(got, path)
        np.testing.assert_allclose(stats["mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["var"], bn.running_var.numpy(), rtol=1e-5, atol=1e-6)


def test_exact_mode_is_the_population_statistics():
    net, encoder = _pair(seed=2)
    batches = _batches(SHAPES, seed=2)
    got = recalibrate_bn(encoder, batches, mode="exact")
    inputs = _torch_train(net, batches, momentum=0.1)
    for path, name in BN_LAYERS.items():
        allx = np.concatenate(
            [x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1]) for x in inputs[name]]
        )
        stats = _stats(got, path)
        np.testing.assert_allclose(stats["mean"], allx.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["var"], allx.var(0), rtol=1e-5, atol=1e-6)


def test_exact_mean_equals_torch_cumulative_and_the_variance_relation():
    net, encoder = _pair(seed=3)
    batches = _batches([(4, 10, 10)] * 3, seed=3)  # equal batch sizes
    got = recalibrate_bn(encoder, batches, mode="exact")
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
    inputs = _torch_train(net, batches, momentum=None)
    for path, name in BN_LAYERS.items():
        bn = _torch_bn(net, name)
        stats = _stats(got, path)
        np.testing.assert_allclose(stats["mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        # exact var = mean_b(biased v_b) + mean_b((m_b - mean)^2); torch's is mean_b(unbiased v_b)
        x0 = inputs[name][0]
        n = x0.shape[0] * x0.shape[2] * x0.shape[3]
        batch_means = np.stack([x.mean(axis=(0, 2, 3)) for x in inputs[name]])
        between = ((batch_means - batch_means.mean(0)) ** 2).mean(0)
        relation = bn.running_var.double().numpy() * (n - 1) / n + between
        np.testing.assert_allclose(stats["var"], relation, rtol=1e-5, atol=1e-6)
        assert np.all(between > 0)  # the two definitions genuinely differ


class BNOnly(nn.Module):
    """A BatchNorm straight on the normalised input: statistics computable by hand."""

    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict]:
        return _bn(train, self.bn_momentum, "bn")(x), {}


def test_hand_computed_constant_batches():
    stats = {"mean": jnp.zeros(3), "var": jnp.ones(3)}
    params = {"scale": jnp.ones(3), "bias": jnp.zeros(3)}
    identity = {"mean": [0.0] * 3, "std": [1.0] * 3}
    encoder = Encoder(
        BNOnly(), {"params": {"bn": params}, "batch_stats": {"bn": stats}}, {}, identity
    )
    a, b = 51, 153  # batch 1 all 51/255 = 0.2, batch 2 all 153/255 = 0.6
    batches = [np.full((2, 3, 3, 3), a, np.uint8), np.full((2, 3, 3, 3), b, np.uint8)]
    exact = recalibrate_bn(encoder, batches, mode="exact").variables["batch_stats"]["bn"]
    np.testing.assert_allclose(exact["mean"], [0.4] * 3, rtol=1e-6)
    np.testing.assert_allclose(exact["var"], [0.04] * 3, rtol=1e-5)  # ((0.6 - 0.2) / 2)^2
    torchlike = recalibrate_bn(encoder, batches, mode="pytorch").variables["batch_stats"]["bn"]
    np.testing.assert_allclose(torchlike["mean"], [0.9 * 0.02 + 0.06] * 3, rtol=1e-6)
    np.testing.assert_allclose(torchlike["var"], [0.81] * 3, rtol=1e-6)  # batch variances are 0


def test_bad_input():
    _, encoder = _pair()
    batches = _batches([(2, 8, 8)])
    with pytest.raises(ValueError, match="mode"):
        recalibrate_bn(encoder, batches, mode="running")
    with pytest.raises(ValueError, match="no images"):
        recalibrate_bn(encoder, [np.zeros((0, 8, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        recalibrate_bn(encoder, [np.zeros((2, 8, 8, 3), np.float32)])

    class NoField(nn.Module):
        @nn.compact
        def __call__(self, x, *, train=False):
            return x, {}

    with pytest.raises(ValueError, match="bn_momentum"):
        recalibrate_bn(dataclasses.replace(encoder, module=NoField()), batches)
    one_pixel = [np.zeros((1, 1, 1, 3), np.uint8)]
    enc = Encoder(
        BNOnly(),
        {
            "params": {"bn": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}},
            "batch_stats": {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3)}},
        },
        {},
        {"mean": MEAN, "std": STD},
    )
    with pytest.raises(ValueError, match="at least 2"):
        recalibrate_bn(enc, one_pixel, mode="pytorch")


def _torch_key(path: tuple) -> str:
    """Flax ``("layer1_0", "downsample_bn")`` -> torch ``"layer1.0.downsample.1"``."""
    parts = [p.replace("_", ".") if p.startswith("layer") else p for p in path]
    return ".".join(parts).replace("downsample_bn", "downsample.1")


def test_resnet50_pytorch_mode_equals_torch_train():
    """The real model (converted from a torchvision-layout torch ResNet-50), small input."""
    from flax import traverse_util

    from jretrieval.models import build
    from references.torch_resnet import torch_resnet
    from weight_conversion.resnet import convert_torchvision

    net = torch_resnet(50, seed=4)
    arch, variables, pre = convert_torchvision(net.state_dict())
    encoder = Encoder(build(arch), jax.tree.map(jnp.asarray, variables), arch, pre, {})
    batches = _batches([(4, 64, 64), (4, 64, 64)], seed=4)  # layer4: 16 values per channel
    got = recalibrate_bn(encoder, batches, mode="pytorch", momentum=0.1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    net.train()
    mean, std = np.float32(pre["mean"]), np.float32(pre["std"])
    with torch.no_grad():
        for b in batches:
            x = (b.astype(np.float32) / 255 - mean) / std
            net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    sd = net.state_dict()
    flat = traverse_util.flatten_dict(got.variables["batch_stats"])
    assert len(flat) == 2 * 53
    for (*path, stat), value in flat.items():
        name = _torch_key(tuple(path))
        ref = sd[f"{name}.running_{stat}"].double().numpy()
        var = sd[f"{name}.running_var"].double().numpy()
        # Errors measured in units of the layer's scale (std for means, var for variances):
        # 1e-4, as for a whole float32 network (train-mode BN over few values per channel in
        # layer4 amplifies the conv implementations' rounding differences).
        scale = np.sqrt(var) if stat == "mean" else var
        err = np.max(np.abs(np.asarray(value, np.float64) - ref) / scale)
        assert err < 1e-4, (name, stat, err)


def test_switched_off_batchnorms_keep_their_statistics():
    """AMDIM as released (use_bn=False) owns BNs it never applies: only layer 9's BN sees data."""
    from flax import traverse_util

    from jretrieval.models import init_encoder
    from jretrieval.steps import normalise

    arch = {"name": "amdim", "ndf": 8, "n_rkhs": 64, "n_depth": 2, "use_bn": False}
    encoder = init_encoder({**arch, "feature_layer": 9}, seed=1)
    # Stored statistics that differ from Flax's init, so "kept" and "reset" can be told apart.
    stats = jax.tree.map(lambda v: v + 0.5, encoder.variables["batch_stats"])
    encoder = dataclasses.replace(encoder, variables={**encoder.variables, "batch_stats": stats})
    batch = _batches([(2, 129, 129)], seed=2)[0]
    got = recalibrate_bn(encoder, [batch], mode="exact")

    # Reference: one training-mode pass reading the raw batch statistics of the one batch.
    x = normalise(jnp.asarray(batch), jnp.float32(MEAN), jnp.float32(STD))
    zeroed = {**encoder.variables, "batch_stats": jax.tree.map(jnp.zeros_like, stats)}
    _, upd = encoder.module.clone(bn_momentum=0.0).apply(
        zeroed, x, train=True, mutable=["batch_stats"]
    )
    before = traverse_util.flatten_dict(stats)
    after = traverse_util.flatten_dict(got.variables["batch_stats"])
    expected = traverse_util.flatten_dict(upd["batch_stats"])
    applied = {k for k in after if k[0] == "layer_list_9"}
    assert len(applied) == 2 and len(after) > 2
    for key, value in after.items():
        want = expected[key] if key in applied else before[key]
        np.testing.assert_allclose(np.asarray(value), np.asarray(want), rtol=1e-5, atol=1e-6)
