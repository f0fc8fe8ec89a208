"""bfloat16 inference: the encoder's map and R-MAC descriptors stay close to float32.

Shape convention: images ``uint8 [B, H, W, 3]`` (NHWC); maps ``[B, h, w, C]``; descriptors
``[B, C]``.

Reference: a random torchvision-layout ResNet-50 (``references.torch_resnet``, randomised BN
statistics) run by PyTorch in float64 on the same normalised input, converted with
``weight_conversion`` and run by jretrieval in float32 and bfloat16.

Tolerances. bfloat16 keeps 8 significant bits: round-to-nearest changes a value by at most
``2**-9 ~ 1.95e-3`` of itself. The convs take bfloat16 inputs and weights and round their output
to bfloat16 again, through 53 conv + BN layers and 16 residual additions. Errors are compared
on max-normalised maps (``|bf16 - ref| / max|ref|`` per image, so that near-zero activations do
not dominate). Measured on this setup: maximum 1.0e-2 to 1.2e-2 and mean 4.4e-4 (224 and 320 px);
we allow a maximum of 2.5e-2 (about 13 half-ulps, twice the measurement) and a mean of 2e-3 (one
half-ulp). A lower bound (maximum error above 1e-4) checks that bfloat16 is really used. The
float32 path must match to 1e-5 on the same scale (a whole-network float32 tolerance). R-MAC
descriptors (pooled in float32 after the bfloat16 encoder): cosine similarity to the float64
reference above 0.999 (measured 1 - 2e-6); float32 above 1 - 1e-6.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jretrieval import models
from jretrieval.pooling import rmac_regions
from jretrieval.steps import Pooling, make_step
from references import torch_resnet as tr
from tests.helpers import TinyNet
from weight_conversion import resnet as resnet_conversion

SIZE = 224  # 7x7 layer4 map: R-MAC has 3 levels of regions


@pytest.fixture(scope="module")
def setup():
    """A converted random ResNet-50, two images and the float64 PyTorch map of them."""
    model = tr.torch_resnet(50, seed=3)
    arch, variables, pre = resnet_conversion.convert_torchvision(model.state_dict())
    encoder = models.Encoder(
        module=models.build(arch),
        variables=jax.tree.map(jnp.asarray, variables),
        architecture=arch,
        preprocessing=pre,
    )
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    x = (imgs / 255.0 - np.asarray(pre["mean"])) / np.asarray(pre["std"])
    with torch.inference_mode():
        ref = model.double()(torch.from_numpy(x).permute(0, 3, 1, 2))
    return encoder, imgs, x.astype(np.float32), tr.to_nhwc(ref).astype(np.float64)


def rmac_reference(fmap: np.ndarray, levels: int = 3, eps: float = 1e-6) -> np.ndarray:
    """Plain float64 R-MAC: sum over cirtorch's regions of L2-normalised region maxima."""
    _, h, w, _ = fmap.shape
    out = 0.0
    for top, left, rh, rw in rmac_regions(h, w, levels):
        v = fmap[:, top : top + rh, left : left + rw].max(axis=(1, 2))
        out = out + v / (np.linalg.norm(v, axis=1, keepdims=True) + eps)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def relative_errors(out: jax.Array, ref: np.ndarray) -> np.ndarray:
    """``|out - ref| / max|ref|`` per image, ``[B, h, w, C]``."""
    scale = np.abs(ref).max(axis=(1, 2, 3), keepdims=True)
    return np.abs(np.asarray(out.astype(jnp.float32), np.float64) - ref) / scale


def bf16(encoder: models.Encoder) -> models.Encoder:
    return encoder.with_dtype("bfloat16")


def test_feature_map_bfloat16_close_to_float32(setup):
    encoder, _, x, ref = setup
    assert ref.shape == (2, 7, 7, 2048)
    out32 = encoder.feature_map(x)
    assert out32.dtype == jnp.float32
    assert relative_errors(out32, ref).max() < 1e-5

    enc16 = bf16(encoder)
    out16 = enc16.feature_map(x)
    assert out16.dtype == jnp.bfloat16  # the map is computed in bfloat16 ...
    leaves = jax.tree.leaves(enc16.variables)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)  # ... the weights stay float32
    err = relative_errors(out16, ref)
    assert err.max() < 2.5e-2, err.max()
    assert err.mean() < 2e-3, err.mean()
    assert err.max() > 1e-4, "bfloat16 made no difference: is the dtype ignored?"


def test_rmac_bfloat16_cosine_to_float32(setup):
    encoder, imgs, _, ref = setup
    want = rmac_reference(ref)
    rmac = Pooling.of("rmac", {"levels": 3})
    d32 = make_step(encoder, rmac)(imgs)
    d16 = make_step(bf16(encoder), rmac)(imgs)
    assert d32.dtype == d16.dtype == jnp.float32 and d16.shape == (2, 2048)
    assert cosine(np.asarray(d32, np.float64), want).min() > 1 - 1e-6
    cos16 = cosine(np.asarray(d16, np.float64), want)
    assert cos16.min() > 0.999, cos16
    assert cosine(np.asarray(d16, np.float64), np.asarray(d32, np.float64)).min() > 0.999


@pytest.mark.parametrize(
    "architecture",
    [
        {"name": "resnet", "depth": 50},
        {"name": "apgem", "depth": 50, "pca_dim": 0},
        {"name": "amdim", "ndf": 8, "n_rkhs": 64, "n_depth": 1},
    ],
)
def test_with_dtype_every_architecture(architecture):
    module = models.build(architecture)
    enc = models.Encoder(module, {}, architecture, dict(models.IMAGENET))
    assert enc.with_dtype("float32") is enc  # float32 modules are left as they are
    enc16 = enc.with_dtype("bfloat16")
    assert enc16.module.dtype == jnp.bfloat16 and enc.module.dtype == jnp.float32
    # on CPU, bfloat16 computes convolutions as im2col + dot (the dot units); float32 does not
    assert enc16.module.conv_dot is (jax.default_backend() == "cpu")
    assert enc.module.conv_dot is False
    assert "dtype = bfloat16" in repr(enc16.module)  # so stores keyed on it never mix dtypes
    assert enc16.with_dtype("float32").module == module
    with pytest.raises(ValueError, match="dtype='float16'; expected one of"):
        enc.with_dtype("float16")


class NoDtypeNet(nn.Module):
    """A module without a ``dtype`` field."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        return nn.Conv(4, (3, 3))(x), {}


def test_with_dtype_needs_a_dtype_field():
    enc = models.Encoder(NoDtypeNet(), {}, {"name": "x"}, dict(models.IMAGENET))
    assert enc.with_dtype("float32") is enc  # float32 is what such a module computes in
    with pytest.raises(ValueError, match="NoDtypeNet has no dtype field"):
        enc.with_dtype("bfloat16")


def test_config_switch_through_the_experiment(tmp_path, monkeypatch):
    """``--config.extraction.dtype=bfloat16`` reaches extraction: its own descriptor stores,
    descriptors close to float32's; a misspelt dtype fails before any work."""
    from jretrieval import experiment
    from tests.helpers import make_config, make_dataset

    monkeypatch.setitem(models.ARCHITECTURES, "tiny16", TinyNet)
    make_dataset(str(tmp_path / "data"), "oxford5k", revisited=False)
    # A saved encoder with NumPy-random variables: nothing to compile before extraction.
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(TinyNet().init, jax.random.key(0), x)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32), shapes)
    models.save(tmp_path / "tiny16.h5", {"name": "tiny16"}, variables, models.IMAGENET, {})
    out = {}
    for dtype in ("float32", "bfloat16"):
        config = make_config(str(tmp_path), "oxford5k")
        config.checkpoint_dir = str(tmp_path)
        config.model_zoo["tiny_a"].file = "tiny16.h5"
        config.model_zoo["tiny_a"].architecture = {"name": "tiny16"}  # what the file must hold
        config.extraction.dtype = dtype
        config.bn.mode = "none"  # recalibration runs in float32 either way
        config.pooling.name = "mac"  # compiles faster than R-MAC (tested above)
        dataset = experiment.load_data(config)
        out[dtype] = experiment.describe(config, "tiny_a", dataset)
    f32, b16 = out["float32"], out["bfloat16"]
    assert set(f32.info["stores"].values()).isdisjoint(b16.info["stores"].values())
    for a, b in ((f32.database, b16.database), (f32.queries, b16.queries)):
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
        assert not np.array_equal(a, b)  # bfloat16 was used ...
        assert cosine(np.asarray(a, np.float64), np.asarray(b, np.float64)).min() > 0.999

    config.extraction.dtype = "float16"
    with pytest.raises(ValueError, match="extraction.dtype='float16'"):
        experiment.run(config)
