"""jretrieval.models: build, shapes, parameter counts, Encoder, HDF5 save/load and its checks.

Shape convention: NHWC inputs ``[B, H, W, 3]``, maps ``[B, h, w, C]``.

Golden parameter counts are the published checkpoints' (torchvision, SimCLR, dirtorch), minus the
classifier ``fc`` where the encoder drops it. Numeric references are NumPy/PyTorch float64;
tolerances are stated at each assert. The full-network parity with PyTorch is in
``test_convert.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jretrieval import models
from jretrieval.models import apgem, io
from jretrieval.models.resnet import ResNet


def n_params(architecture: dict) -> int:
    module = models.build(architecture)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    return sum(math.prod(a.shape) for a in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize(
    "architecture, expected",
    [
        # torchvision ResNet-50: 25,557,032 minus fc (2048 * 1000 + 1000).
        ({"name": "resnet", "depth": 50}, 25_557_032 - 2_049_000),
        # SimCLR 4x (resnet_wider): 383,571,176 minus fc (8192 * 1000 + 1000) = "375M".
        ({"name": "resnet", "depth": 50, "width": 4}, 383_571_176 - 8_193_000),
        # dirtorch resnet101_rmac: 46,696,513 (trunk + adpool.p + 2048x2048 fc with bias).
        ({"name": "apgem", "depth": 101}, 46_696_513),
    ],
)
def test_parameter_counts(architecture, expected):
    assert n_params(architecture) == expected


@pytest.mark.parametrize("size, spatial", [(33, (17, 9, 9, 5, 3, 2)), (32, (16, 8, 8, 4, 2, 1))])
@pytest.mark.parametrize("width", [1, 2])
def test_stage_shapes(size, spatial, width):
    """Every stride-2 op maps h -> ceil(h / 2); channels scale with width."""
    module = ResNet(depth=50, width=width)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    (fmap, stages), _ = jax.eval_shape(module.init_with_output, jax.random.key(0), x)
    stem, _, l1, l2, l3, l4 = spatial
    expected = {
        "stem": (2, stem, stem, 64 * width),
        "layer1": (2, l1, l1, 256 * width),
        "layer2": (2, l2, l2, 512 * width),
        "layer3": (2, l3, l3, 1024 * width),
        "layer4": (2, l4, l4, 2048 * width),
    }
    assert {k: v.shape for k, v in stages.items()} == expected
    assert fmap.shape == expected["layer4"]


def test_build_errors():
    with pytest.raises(ValueError, match="unknown architecture name 'vgg'.*resnet"):
        models.build({"name": "vgg"})
    with pytest.raises(ValueError, match="has no 'name'"):
        models.build({"depth": 50})
    with pytest.raises(ValueError, match="accepts.*depth"):
        models.build({"name": "resnet", "layers": 50})
    with pytest.raises(ValueError, match="depth=34"):
        n_params({"name": "resnet", "depth": 34})
    assert set(models.ARCHITECTURES) >= {"resnet", "amdim", "apgem"}


@pytest.fixture(scope="module")
def encoder():
    return models.init_encoder({"name": "resnet", "depth": 50}, seed=1)


@pytest.fixture(scope="module")
def saved(encoder, tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "r50.h5"
    models.save(path, encoder.architecture, encoder.variables, encoder.preprocessing, {"k": 1})
    return path


def test_init_and_round_trip(encoder, saved):
    assert encoder.preprocessing == models.IMAGENET
    loaded = models.load(saved)
    assert loaded.architecture == encoder.architecture
    digest = hashlib.sha256(saved.read_bytes()).hexdigest()
    assert loaded.metadata == {"k": 1, "file": str(saved), "file_sha256": digest}
    assert loaded.preprocessing == encoder.preprocessing
    flat_a, flat_b = io.flatten(encoder.variables), io.flatten(loaded.variables)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key])
    x = np.random.default_rng(0).standard_normal((1, 33, 33, 3)).astype(np.float32)
    fmap = loaded.feature_map(x)
    direct, _ = encoder.module.apply(encoder.variables, x)
    np.testing.assert_array_equal(fmap, direct)
    assert fmap.shape == (1, 2, 2, 2048)
    assert loaded.global_descriptor(x) is None
    with pytest.raises(ValueError, match=r"expected \[B, H, W, 3\]"):
        loaded.feature_map(x[0])


def test_bn_momentum_zero_returns_batch_statistics(encoder):
    """``bn_momentum=0`` + ``train=True`` gives the raw batch mean and biased variance (what BN
    recalibration reads); checked on the stem against a float64 torch conv."""
    x = np.random.default_rng(1).standard_normal((3, 33, 33, 3)).astype(np.float32)
    module = encoder.module.clone(bn_momentum=0.0)
    _, updates = module.apply(encoder.variables, x, train=True, mutable=["batch_stats"])
    kernel = np.asarray(encoder.variables["params"]["conv1"]["kernel"], np.float64)
    y = F.conv2d(
        torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2),
        torch.from_numpy(kernel).permute(3, 2, 0, 1),
        stride=2,
        padding=3,
    ).numpy()
    stats = updates["batch_stats"]["bn1"]
    np.testing.assert_allclose(stats["mean"], y.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], y.var(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)


def test_replace(encoder):
    zeros = jax.tree.map(jnp.zeros_like, encoder.variables)
    other = encoder.replace(variables=zeros)
    assert other.variables is zeros and encoder.variables is not zeros
    assert other.module is encoder.module


def test_load_refuses_bad_files(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        models.load(tmp_path / "nope.h5")
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(ValueError, match="text.h5.*not a readable HDF5"):
        models.load(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="not a jretrieval-encoder file"):
        models.load(other)

    broken = tmp_path / "broken.h5"
    broken.write_bytes(saved.read_bytes())
    with h5py.File(broken, "a") as f:
        del f["variables/params/conv1/kernel"]
        del f["variables/batch_stats/layer2_0/bn2/mean"]
        f["variables/batch_stats/layer2_0/bn2/mean"] = np.zeros(7, np.float32)
        f["variables/params/layer9_0/conv1/kernel"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as err:
        models.load(broken)
    msg = str(err.value)
    assert "broken.h5" in msg
    assert "missing: ['params/conv1/kernel']" in msg
    assert "unexpected: ['params/layer9_0/conv1/kernel']" in msg
    assert "batch_stats/layer2_0/bn2/mean: got (7,), expected (128,)" in msg


def test_save_is_atomic(encoder, tmp_path, monkeypatch):
    calls = []
    original = h5py.Group.create_dataset

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(OSError, match="disk full"):
        models.save(tmp_path / "x.h5", encoder.architecture, encoder.variables, {}, {})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.save(tmp_path / "no" / "x.h5", {"name": "resnet"}, {}, {}, {})


def test_file_attributes(saved):
    with h5py.File(saved, "r") as f:
        assert f.attrs["format"] == "jretrieval-encoder"
        assert json.loads(f.attrs["architecture"]) == {"name": "resnet", "depth": 50}
        assert f.attrs["depth"] == 50
        assert f["variables/params/layer1_0/conv2/kernel"].shape == (3, 3, 64, 64)


def test_gem_and_apply_pca_against_numpy():
    rng = np.random.default_rng(2)
    x = rng.uniform(0.0, 2.0, (2, 5, 7, 16))
    x[0, 0, 0, 0] = -1.0  # clamped to eps
    p = 3.3
    ref = (np.maximum(x, 1e-6) ** p).mean(axis=(1, 2)) ** (1 / p)
    got = apgem.gem(jnp.asarray(x, jnp.float32), jnp.float32(p))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    # Hand case: GeM of a constant map is the constant, for any p.
    np.testing.assert_allclose(apgem.gem(jnp.full((1, 3, 3, 2), 0.5), jnp.float32(7.0)), 0.5, 1e-6)

    d, k = 16, 8
    pca = {
        "mean": rng.standard_normal(d) * 0.1,
        "components": np.linalg.qr(rng.standard_normal((d, k)))[0].T,
        "explained_variance": rng.uniform(0.1, 1.0, k),
    }
    desc = rng.standard_normal((4, d))
    for whiten, power in [(True, 0.25), (True, 0.5), (False, 0.25)]:
        ref = (desc - pca["mean"]) @ pca["components"].T
        if whiten:
            ref = ref / pca["explained_variance"] ** power
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        got = apgem.apply_pca(pca, desc, power=power, whiten=whiten)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected \[N, 16\]"):
        apgem.apply_pca(pca, desc[:, :5])


def test_apgem_pca_collection_shapes_and_errors():
    module = models.build({"name": "apgem", "depth": 50, "pca_dim": 32})
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    (fmap, stages), variables = jax.eval_shape(module.init_with_output, jax.random.key(0), x)
    assert jax.tree.map(lambda a: a.shape, variables["pca"]) == {
        "mean": (2048,),
        "components": (32, 2048),
        "explained_variance": (32,),
    }
    assert stages["descriptor"].shape == (1, 2048) and fmap.shape == (1, 2, 2, 2048)
    enc = models.Encoder(module, {}, {"name": "apgem"}, models.IMAGENET)
    with pytest.raises(ValueError, match="no 'pca' variables"):
        enc.global_descriptor(np.zeros((1, 64, 64, 3), np.float32), pca_power=0.25)


# ----------------------------------------------------------------------------- zoo entries

RESNET50 = {"name": "resnet", "depth": 50, "width": 1}
AMDIM = {"name": "amdim", "ndf": 256, "n_rkhs": 2048, "n_depth": 10}


def _stub(path, architecture):
    """An encoder file whose metadata states ``architecture`` (no weights: never read)."""
    models.save(path, architecture, {}, dict(models.IMAGENET), {"source": "x.pth"})
    return path


@pytest.mark.parametrize(
    "held,expected,names",
    [  # issue 9 item 5: both ran to exit 0 under the wrong label
        ({"name": "resnet", "depth": 101}, RESNET50, ("resnet-101", "resnet-50", "depth=101")),
        (RESNET50, AMDIM, ("resnet-50", "amdim ndf256", "name='resnet'")),
        ({"name": "resnet", "depth": 50, "width": 4}, RESNET50, ("resnet-50 x4", "width=4")),
    ],
)
def test_zoo_architecture_mismatch_refused_with_both_names(tmp_path, held, expected, names):
    path = _stub(tmp_path / "baseline.h5", held)
    assert models.read_architecture(path) == held
    with pytest.raises(models.ArchitectureMismatchError) as info:
        models.load(path, expected=expected)  # refused from the metadata: no weight is read
    assert "baseline.h5" in str(info.value)
    for name in names:
        assert name in str(info.value)


def test_zoo_architecture_match_uses_defaults_and_json_types(saved):
    # the file states no width: the ResNet default (1) matches the zoo's explicit width 1
    models.check_architecture(models.read_architecture(saved), RESNET50, where="x")
    models.check_architecture({"name": "apgem", "out_dim": 2048}, {"name": "apgem"}, where="x")
    models.check_architecture({"name": "t", "size": [23, 23]}, {"size": (23, 23)}, where="x")
    models.check_architecture({"name": "resnet"}, None, where="x")  # nothing stated
    with pytest.raises(models.ArchitectureMismatchError, match="pca_dim=0"):
        models.check_architecture({"name": "apgem"}, {"name": "apgem", "pca_dim": 512}, where="x")


def test_provenance_records_architecture_and_digests(encoder, saved):
    info = models.provenance(models.load(saved))
    assert info["architecture"] == {"name": "resnet", "depth": 50}
    assert info["architecture_name"] == "resnet-50"
    assert info["weights_sha256"] == hashlib.sha256(saved.read_bytes()).hexdigest()
    assert info["weights_file"] == str(saved) and info["seed"] is None
    random = models.provenance(encoder)
    assert random["weights_sha256"] is None and random["seed"] == 1
    assert random["checkpoint"] is None


def test_saved_files_follow_the_umask(encoder, tmp_path):
    """issue 9 item 10: converted and BN files were created 0600 (``mkstemp``)."""
    for umask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            path = _stub(tmp_path / f"u{umask:o}.h5", RESNET50)
        finally:
            os.umask(old)
        assert os.stat(path).st_mode & 0o777 == mode
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
