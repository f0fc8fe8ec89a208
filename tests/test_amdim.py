"""AMDIM: the Flax encoder against a PyTorch re-implementation, through the converter.

The reference is ``references/torch_amdim.py`` (amdim-public's class names and key layout),
built at a small width (ndf 8, n_rkhs 64, n_depth 2: 130 keys like the original at that size), BN
statistics and affine parameters randomised, saved the way ``checkpoint.py`` saves and read
back with ``torch.load(weights_only=True)``. Maps are compared as max |flax - torch| / max |torch|
< 1e-4 (float32 through ~20 convolutions), at odd (129) and even (160) input sizes, in inference
mode and in training mode (batch statistics).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from jretrieval import models
from jretrieval.models.amdim import MIN_INPUT_SIZE, AMDIMEncoder, layer_sizes
from references import torch_amdim
from weight_conversion import amdim as convert_amdim
from weight_conversion.__main__ import main as cli_main

SMALL = {"ndf": 8, "n_rkhs": 64, "n_depth": 2}
TOL = 1e-4


def _model(use_bn: bool, seed: int = 0) -> torch_amdim.Model:
    """The small torch model with random BN statistics and affine parameters."""
    torch.manual_seed(seed)
    model = torch_amdim.Model(n_classes=1000, use_bn=use_bn, **SMALL)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return model


def _roundtrip(obj: dict, path) -> dict:
    torch.save(obj, path)
    return torch.load(path, weights_only=True, map_location="cpu")


def _bn_keys(model: nn.Module) -> set[str]:
    return {
        f"{name}.{k}"
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)
        for k in m.state_dict()
    }


def _rel_err(flax_nhwc, torch_nchw: torch.Tensor) -> float:
    ref = torch_nchw.detach().numpy().transpose(0, 2, 3, 1).astype(np.float64)
    got = np.asarray(flax_nhwc, np.float64)
    assert got.shape == ref.shape
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _inputs(size: int, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, jax.Array]:
    x = np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)
    return torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1))


def _flax_eval(arch: dict, variables: dict, x: jax.Array):
    """Inference-mode ``(map, stages)`` of the module ``arch`` describes, jitted."""
    return jax.jit(models.build(arch).apply)(variables, x)


def test_small_state_dict_layout_and_layout_table():
    sd = _model(use_bn=False).state_dict()
    assert len(sd) == 130  # as the original Model at ndf 8, n_rkhs 64, n_depth 2
    encoder = {k: v for k, v in sd.items() if k.startswith("encoder.module.layer_list.")}
    tensors = {k[len("encoder.module.") :]: tuple(v.shape) for k, v in encoder.items()}
    tensors = {k: s for k, s in tensors.items() if not k.endswith("num_batches_tracked")}
    assert len(encoder) == 91  # 78 tensors + 13 num_batches_tracked
    assert len(tensors) == 78
    table = convert_amdim.layout(**SMALL)
    assert list(tensors) == list(table)  # same names in the same order
    assert tensors == {k: e.shape for k, e in table.items()}
    assert tensors["layer_list.0.conv.weight"] == (8, 3, 5, 5)
    assert tensors["layer_list.2.layer_list.0.conv1.weight"] == (16, 8, 4, 4)
    assert tensors["layer_list.2.layer_list.1.conv1.weight"] == (16, 16, 1, 1)
    assert tensors["layer_list.4.layer_list.0.conv1.weight"] == (64, 32, 2, 2)
    assert tensors["layer_list.8.conv1.weight"] == (64, 64, 3, 3)
    assert sd["g2l_loss.masks_r5"].dtype == torch.uint8


def test_flax_tree_matches_layout_and_real_sizes():
    # Real AMDIM-Medium hyperparameters, shapes only: the torch model on the meta device (no
    # memory), the Flax one through jax.eval_shape.
    real = {"ndf": 256, "n_rkhs": 2048, "n_depth": 10}
    with torch.device("meta"):
        sd = torch_amdim.Model(n_classes=1000, **real).state_dict()
    assert len(sd) == 410
    table = convert_amdim.layout(**real)
    assert len(table) == 318  # the 371 layer_list keys less 53 num_batches_tracked
    assert {f"encoder.module.{k}" for k in table} == {
        k for k in sd if k.startswith("encoder.module.layer_list.") and "num_batches" not in k
    }
    module = AMDIMEncoder(**real)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 128, 128, 3)))
    flat = {
        (col, *(p.key for p in path)): leaf.shape
        for col in ("params", "batch_stats")
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes[col])
    }
    expected = {}
    for key, entry in table.items():
        shape = entry.shape
        assert tuple(sd[f"encoder.module.{key}"].shape) == shape
        if len(shape) == 4:
            shape = (shape[2], shape[3], shape[1], shape[0])
        expected[(entry.collection, *entry.path)] = shape
    assert flat == expected
    # The published checkpoint's count (amdim_ndf256_rkhs2048_rd10.pth of
    # Philip-Bachman/amdim-public): every float of the encoder, running statistics included.
    assert sum(np.prod(s) for s in flat.values()) == 401_235_200
    fmap, stages = jax.eval_shape(module.apply, shapes, jnp.zeros((1, 724, 724, 3)))
    assert fmap.shape == (1, 40, 40, 2048)  # the paper's 40x40 map: layer 7, 8 * ndf channels
    assert stages["layer8"].shape == stages["layer9"].shape == (1, 38, 38, 2048)
    sizes = [stages[f"layer{i}"].shape[1] for i in range(10)]
    assert sizes == [362, 360, 179, 88, 44, 44, 42, 40, 38, 38] == layer_sizes(724)


def test_layer_sizes_by_hand():
    assert layer_sizes(128) == [64, 62, 30, 14, 7, 7, 5, 3, 1, 1]
    assert layer_sizes(MIN_INPUT_SIZE)[-1] == 1
    assert layer_sizes(MIN_INPUT_SIZE - 1)[-1] == 0
    module = AMDIMEncoder(**SMALL)
    with pytest.raises(ValueError, match=r"H, W >= 127"):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 126, 200, 3)))
    with pytest.raises(ValueError, match="feature_layer=10"):
        jax.eval_shape(
            AMDIMEncoder(**SMALL, feature_layer=10).init,
            jax.random.key(0),
            jnp.zeros((1, 128, 128, 3)),
        )


@pytest.mark.parametrize("use_bn", [False, True])
@pytest.mark.parametrize("size", [129, 160])
def test_matches_torch_eval_and_train(tmp_path, use_bn, size):
    model = _model(use_bn)
    ckpt = _roundtrip(torch_amdim.checkpoint(model), tmp_path / "amdim.pth")
    arch, variables, prep = convert_amdim.convert(ckpt)
    assert arch == {"name": "amdim", **SMALL, "use_bn": use_bn, "feature_layer": 7}
    assert prep == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert all(a.dtype == np.float32 for a in jax.tree_util.tree_leaves(variables))
    xt, xj = _inputs(size)
    enc = model.encoder.module

    model.eval()
    with torch.no_grad():
        ref = enc._forward_acts(xt)
    fmap, stages = _flax_eval(arch, variables, xj)
    np.testing.assert_array_equal(fmap, stages["layer7"])
    for i in range(10):
        assert _rel_err(stages[f"layer{i}"], ref[i]) < TOL, f"layer{i}"

    model.train()
    with torch.no_grad():
        ref = enc._forward_acts(xt)
    (fmap, stages), updated = models.build({**arch, "bn_momentum": 0.0}).apply(
        variables, xj, train=True, mutable=["batch_stats"]
    )
    for i in range(10):
        assert _rel_err(stages[f"layer{i}"], ref[i]) < TOL, f"train layer{i}"
    # bn_momentum 0 stores the raw batch statistics of the BNs actually applied ...
    stats = updated["batch_stats"]
    h8 = ref[8].double()
    for got, want in [
        (stats["layer_list_9"]["mean"], h8.mean((0, 2, 3))),
        (stats["layer_list_9"]["var"], h8.var((0, 2, 3), unbiased=False)),
    ]:
        want = want.numpy()
        assert np.max(np.abs(np.asarray(got, np.float64) - want)) < TOL * np.max(np.abs(want))
    # ... and leaves the unused ones alone, as torch's MaybeBatchNorm2d does.
    unused = variables["batch_stats"]["layer_list_5"]["mean"]
    changed = not np.allclose(stats["layer_list_5"]["mean"], unused)
    assert changed == use_bn


def test_fp16_checkpoint_is_upcast(tmp_path):
    model = _model(use_bn=True, seed=3)
    ckpt = torch_amdim.checkpoint(model)
    bn = _bn_keys(model)
    ckpt["model"] = {
        k: (v.half() if v.is_floating_point() and k not in bn else v)
        for k, v in ckpt["model"].items()
    }
    ckpt = _roundtrip(ckpt, tmp_path / "amdim16.pth")
    assert ckpt["model"]["encoder.module.layer_list.0.conv.weight"].dtype == torch.float16
    assert ckpt["model"]["encoder.module.layer_list.9.bn.weight"].dtype == torch.float32
    arch, variables, _ = convert_amdim.convert(ckpt)
    assert all(a.dtype == np.float32 for a in jax.tree_util.tree_leaves(variables))
    model.load_state_dict(ckpt["model"])  # the reference runs the same fp16-rounded weights
    model.eval()
    xt, xj = _inputs(129, batch=1)
    with torch.no_grad():
        ref = model.encoder.module._forward_acts(xt)
    _, stages = _flax_eval(arch, variables, xj)
    for i in (7, 8, 9):
        assert _rel_err(stages[f"layer{i}"], ref[i]) < TOL, f"layer{i}"


def _small_ckpt() -> dict:
    return torch_amdim.checkpoint(_model(use_bn=False))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["model"].pop("encoder.module.layer_list.3.layer_list.1.conv2.weight"),
            r"missing \['encoder.module.layer_list.3.layer_list.1.conv2.weight'\]",
        ),
        (
            lambda c: c["model"].update({"encoder.module.layer_list.10.bn.weight": torch.ones(2)}),
            r"unexpected \['encoder.module.layer_list.10.bn.weight'\]",
        ),
        (
            lambda c: c["model"].update({"projection.weight": torch.ones(2)}),
            r"unexpected \['projection.weight'\]",
        ),
        (
            lambda c: c["model"].update(
                {"encoder.module.layer_list.8.conv1.weight": torch.ones(64, 64, 1, 1)}
            ),
            r"layer_list.8.conv1.weight: \(64, 64, 1, 1\) \(expected \(64, 64, 3, 3\)\)",
        ),
        (
            lambda c: c["hyperparams"].update({"n_depth": 3}),
            r"missing \[.*layer_list.2.layer_list.2",
        ),
        (lambda c: c["hyperparams"].pop("ndf"), r"hyperparams lack \['ndf'\]"),
        (lambda c: c["hyperparams"].update({"encoder_size": 64}), "encoder_size=64"),
        (lambda c: c["hyperparams"].update({"n_rkhs": 32}), "n_rkhs >= 8"),
        (lambda c: c.pop("model"), "expected a dict with 'model'"),
        (lambda c: c.pop("hyperparams"), "'hyperparams' is NoneType"),
    ],
)
def test_convert_refuses_with_a_clear_message(edit, message):
    ckpt = _small_ckpt()
    edit(ckpt)
    with pytest.raises(ValueError, match=message):
        convert_amdim.convert(ckpt)


def test_convert_refuses_non_checkpoints():
    with pytest.raises(ValueError, match="got list"):
        convert_amdim.convert([1, 2])
    ckpt = _small_ckpt()
    ckpt["model"]["encoder.module.layer_list.9.bn.running_mean"] = torch.zeros(
        64, dtype=torch.int64
    )
    with pytest.raises(ValueError, match=r"layer_list.9.bn.running_mean.*torch.int64"):
        convert_amdim.convert(ckpt)


def test_cli_and_load(tmp_path):
    model = _model(use_bn=True, seed=5)
    src, out = tmp_path / "amdim_ndf8_rkhs64_rd2.pth", tmp_path / "amdim.h5"
    torch.save(torch_amdim.checkpoint(model), src)
    cmd = [sys.executable, "-m", "weight_conversion", "--src", str(src), "--out", str(out)]
    done = subprocess.run(
        [*cmd, "--format", "auto"], capture_output=True, text=True, cwd=os.getcwd(), check=False
    )
    assert done.returncode == 0, done.stderr
    encoder = models.load(out)
    assert encoder.architecture == {"name": "amdim", **SMALL, "use_bn": True, "feature_layer": 7}
    assert encoder.preprocessing == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert encoder.metadata["format"] == "amdim"
    assert encoder.metadata["source"] == src.name
    model.eval()
    xt, xj = _inputs(160, batch=2, seed=7)
    with torch.no_grad():
        ref = model.encoder.module._forward_acts(xt)
    assert _rel_err(encoder.feature_map(xj), ref[7]) < TOL


def test_cli_refuses_a_broken_amdim_file_and_writes_nothing(tmp_path, capsys):
    ckpt = _small_ckpt()
    del ckpt["model"]["encoder.module.layer_list.9.bn.running_var"]
    src, out = tmp_path / "broken.pth", tmp_path / "broken.h5"
    torch.save(ckpt, src)
    assert cli_main(["--src", str(src), "--out", str(out), "--format", "auto"]) == 1
    assert "missing ['encoder.module.layer_list.9.bn.running_var']" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [src]
