"""Multi-scale descriptors against cirtorch's ``extract_ms`` restated in PyTorch.

The reference (``references/cirtorch.py``) resizes with ``torch.nn.functional.interpolate``
and combines the scales itself; only the network (the tiny encoder plus pooling, opaque to
``extract_ms``) is shared. Tolerance: 1e-5 absolute on unit vectors (float32 convolutions at
three input sizes, bilinear resampling in two libraries).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jretrieval import models, multiscale, steps
from jretrieval.pooling import POOLING
from references import cirtorch

ARCH = {"name": "tiny", "features": 32}


def _reference(encoder, images, *, pooling, kwargs, msp):
    mean = np.asarray(encoder.preprocessing["mean"], np.float32)
    std = np.asarray(encoder.preprocessing["std"], np.float32)

    def net(t: torch.Tensor) -> torch.Tensor:  # NCHW normalised -> L2N(pool(features))
        x = t.permute(0, 2, 3, 1).numpy()
        fmap, _ = encoder.module.apply(encoder.variables, x, train=False)
        d = np.array(POOLING[pooling](fmap, **kwargs), np.float32)  # writable copy for torch
        return cirtorch.l2n(torch.from_numpy(d))

    out = []
    for img in images:
        x = (img.astype(np.float32) / 255.0 - mean) / std
        t = torch.from_numpy(x).permute(2, 0, 1)[None]
        out.append(cirtorch.extract_ms(net, t, cirtorch.MS, msp).numpy())
    return np.stack(out)


@pytest.mark.parametrize(
    ("pooling", "kwargs", "shape"),
    [("rmac", {"levels": 3}, (48, 48)), ("gem", {"p": 3.0}, (40, 56)), ("mac", {}, (45, 45))],
)
def test_multiscale_equals_cirtorch_extract_ms(tiny_zoo, pooling, kwargs, shape):
    encoder = models.init_encoder(ARCH, seed=0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, *shape, 3), dtype=np.uint8)
    step = multiscale.make_step(
        encoder, scales=multiscale.CIRTORCH_SCALES, pooling=steps.Pooling.of(pooling, kwargs)
    )
    ours = np.asarray(step(images))
    msp = multiscale.power_for(pooling, kwargs)
    assert msp == (3.0 if pooling == "gem" else 1.0)
    ref = _reference(encoder, images, pooling=pooling, kwargs=kwargs, msp=msp)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    if pooling == "gem":  # the power mean matters: a plain mean is measurably different
        plain = _reference(encoder, images, pooling=pooling, kwargs=kwargs, msp=1.0)
        assert np.abs(plain - ref).max() > 1e-4


def test_single_scale_is_the_plain_step(tiny_zoo):
    encoder = models.init_encoder(ARCH, seed=1)
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    single = multiscale.make_step(encoder, scales=(1,), pooling="rmac")
    plain = steps.make_step(encoder, "rmac")
    np.testing.assert_array_equal(np.asarray(single(images)), np.asarray(plain(images)))


@pytest.mark.parametrize("scale", [1 / np.sqrt(2), 0.5, 0.3])
def test_rescale_matches_torch_interpolate(scale):
    x = np.random.default_rng(2).normal(size=(2, 37, 50, 3)).astype(np.float32)
    ours = np.asarray(multiscale.rescale(x, float(scale)))
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(
        t, scale_factor=float(scale), mode="bilinear", align_corners=False
    )
    ref = ref.permute(0, 2, 3, 1).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("bad", ["0", "1.5", "1,1", "", "x"])
def test_parse_scales_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="scale"):
        multiscale.parse_scales(bad)


def test_parse_scales_names_cirtorch():
    assert multiscale.parse_scales("ms") == multiscale.CIRTORCH_SCALES
    assert multiscale.parse_scales("1, 0.5") == (1.0, 0.5)
