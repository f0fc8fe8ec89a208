"""jretrieval.pooling against NumPy float64 and a PyTorch re-statement of cirtorch's ``rmac``.

The PyTorch function below restates cirtorch's ``cirtorch.layers.functional.rmac`` loop (its
float32 torch.Tensor arithmetic for the grid included) and also returns the regions it visits.
Hand grids: worked out on paper from the algorithm (see each comment).
Tolerances: 1e-5 relative (float32 maxima, norms and sums of up to ~20 unit vectors).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jretrieval import pooling


def torch_rmac(x: torch.Tensor, levels: int = 3, eps: float = 1e-6):
    """cirtorch's rmac on an NCHW tensor; returns ([B, C] descriptor, visited regions)."""
    ovr = 0.4
    steps = torch.Tensor([2, 3, 4, 5, 6, 7])
    height, width = x.size(2), x.size(3)
    w = min(width, height)
    b = (max(height, width) - w) / (steps - 1)
    _, idx = torch.min(torch.abs(((w**2 - w * b) / w**2) - ovr), 0)
    wd = idx.item() + 1 if height < width else 0
    hd = idx.item() + 1 if height > width else 0
    v = F.max_pool2d(x, (height, width))
    v = v / (torch.norm(v, p=2, dim=1, keepdim=True) + eps)
    regions = [(0, 0, height, width)]
    for level in range(1, levels + 1):
        wl = math.floor(2 * w / (level + 1))
        wl2 = math.floor(wl / 2 - 1)
        b = 0 if level + wd == 1 else (width - wl) / (level + wd - 1)
        cen_w = torch.floor(wl2 + torch.Tensor(range(level + wd)) * b) - wl2
        b = 0 if level + hd == 1 else (height - wl) / (level + hd - 1)
        cen_h = torch.floor(wl2 + torch.Tensor(range(level + hd)) * b) - wl2
        for i in cen_h.tolist():
            for j in cen_w.tolist():
                if wl == 0:
                    continue
                regions.append((int(i), int(j), wl, wl))
                r = x[:, :, int(i) : int(i) + wl, int(j) : int(j) + wl]
                vt = F.max_pool2d(r, (r.size(-2), r.size(-1)))
                v = v + vt / (torch.norm(vt, p=2, dim=1, keepdim=True) + eps)
    return v[:, :, 0, 0], regions


def _square(level_side, starts):
    return [(t, left, level_side, level_side) for t in starts for left in starts]


# (top, left, height, width); the global region first, then level by level, row-major.
HAND_GRIDS = {
    # w = 23, square (no extra steps). L1: side 23 at 0. L2: side floor(46/3) = 15,
    # wl2 = 6, b = 8 -> starts 0, 8. L3: side floor(46/4) = 11, wl2 = 4, b = 6 -> 0, 6, 12.
    (23, 23): [(0, 0, 23, 23), (0, 0, 23, 23)] + _square(15, [0, 8]) + _square(11, [0, 6, 12]),
    # H = 30 > W = 17: b = 13 / (steps - 1); |0.6 - b / 17| is smallest for 2 steps -> Hd = 1.
    # L1: side 17, rows 0, 13 (b = 13), one column. L2: side 11, wl2 = 4, rows b = 9.5 ->
    # 0, 9, 19; columns b = 6 -> 0, 6. L3: side 8, wl2 = 3, rows b = 22/3 -> 0, 7, 14, 22;
    # columns b = 4.5 -> 0, 4, 9.
    (30, 17): [(0, 0, 30, 17), (0, 0, 17, 17), (13, 0, 17, 17)]
    + [(t, left, 11, 11) for t in (0, 9, 19) for left in (0, 6)]
    + [(t, left, 8, 8) for t in (0, 7, 14, 22) for left in (0, 4, 9)],
    # w = 3. L1: side 3. L2: side 2, wl2 = 0, b = 1 -> 0, 1. L3: side 1, wl2 = -1, b = 1 ->
    # floor(-1 + i) + 1 = 0, 1, 2.
    (3, 3): [(0, 0, 3, 3), (0, 0, 3, 3)] + _square(2, [0, 1]) + _square(1, [0, 1, 2]),
    # w = 1. L1: side 1. L2 and L3: side floor(2/3) = floor(2/4) = 0, skipped.
    (1, 1): [(0, 0, 1, 1), (0, 0, 1, 1)],
}


@pytest.mark.parametrize("shape", sorted(HAND_GRIDS))
def test_hand_computed_grids(shape):
    assert list(pooling.rmac_regions(*shape, 3)) == HAND_GRIDS[shape]
    _, regions = torch_rmac(torch.zeros(1, 1, *shape))
    assert regions == HAND_GRIDS[shape]


def test_grid_matches_cirtorch_for_all_small_shapes():
    # Every H, W in 1..32 (non-square both ways, maps too small for some levels).
    for height in range(1, 33):
        for width in range(1, 33):
            _, regions = torch_rmac(torch.zeros(1, 1, height, width))
            assert list(pooling.rmac_regions(height, width, 3)) == regions, (height, width)
    _, regions = torch_rmac(torch.zeros(1, 1, 9, 31), levels=5)
    assert list(pooling.rmac_regions(9, 31, 5)) == regions


def _numpy_rmac(x, regions, eps=1e-6):
    """float64 sum of eps-normalised region maxima, regions given explicitly."""
    x = x.astype(np.float64)
    out = np.zeros((x.shape[0], x.shape[3]))
    for t, left, h, w in regions:
        v = x[:, t : t + h, left : left + w, :].max(axis=(1, 2))
        out += v / (np.linalg.norm(v, axis=1, keepdims=True) + eps)
    return out


@pytest.mark.parametrize("shape", [(23, 23), (30, 17), (17, 30), (3, 3), (1, 1), (2, 9), (7, 5)])
def test_rmac_matches_cirtorch(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((2, *shape, 6)).astype(np.float32)
    got = np.asarray(pooling.rmac(x))
    ref, _ = torch_rmac(torch.from_numpy(x).permute(0, 3, 1, 2))
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, _numpy_rmac(x, pooling.rmac_regions(*shape)), rtol=1e-5)


def test_rmac_hand_computed_1x1_and_levels():
    # A 1x1 map: the global region and the single L1 region, both the unit vector of x.
    x = np.array([[[[3.0, 4.0]]]], np.float32)
    np.testing.assert_allclose(np.asarray(pooling.rmac(x)), [[1.2, 1.6]], rtol=1e-6)
    # levels=0 leaves only the global region: the eps-normalised MAC vector.
    x = np.random.default_rng(0).standard_normal((3, 5, 4, 7)).astype(np.float32)
    mac = x.max(axis=(1, 2))
    np.testing.assert_allclose(
        np.asarray(pooling.rmac(x, levels=0)),
        mac / (np.linalg.norm(mac, axis=1, keepdims=True) + 1e-6),
        rtol=1e-6,
    )


def test_simple_poolings_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 7, 4)).astype(np.float32)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(np.asarray(pooling.mac(x)), x64.max(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(pooling.spoc(x)), x64.mean(axis=(1, 2)), rtol=1e-5)
    for p in (3.0, 1.0, 2.5):
        ref = (np.maximum(x64, 1e-6) ** p).mean(axis=(1, 2)) ** (1 / p)
        np.testing.assert_allclose(np.asarray(pooling.gem(x, p=p)), ref, rtol=2e-5)
    # large p tends to MAC, p = 1 on non-negative maps is SPoC.
    xp = np.abs(x)
    np.testing.assert_allclose(
        np.asarray(pooling.gem(xp, p=1.0)), xp.astype(np.float64).mean(axis=(1, 2)), rtol=1e-5
    )
    # gem's p may be traced (a learned parameter).
    g = jax.jit(pooling.gem)(x, jnp.float32(3.0))
    np.testing.assert_allclose(np.asarray(g), np.asarray(pooling.gem(x, p=3.0)), rtol=1e-6)


def test_bfloat16_and_jit():
    rng = np.random.default_rng(2)
    xb = jnp.asarray(rng.standard_normal((2, 6, 9, 4)), jnp.bfloat16)
    x32 = np.asarray(xb, np.float32)
    for name, fn in pooling.POOLING.items():
        got = fn(xb)
        assert got.dtype == jnp.float32 and got.shape == (2, 4), name
        np.testing.assert_allclose(np.asarray(got), np.asarray(fn(x32)), rtol=1e-6, err_msg=name)
    # rmac inside a caller's jit: the grid is built while tracing.
    f = jax.jit(lambda x: pooling.rmac(x * 2.0, levels=2))
    np.testing.assert_allclose(
        np.asarray(f(x32)), np.asarray(pooling.rmac(x32 * 2.0, levels=2)), rtol=1e-6
    )


def test_bad_input_and_lookup():
    with pytest.raises(ValueError, match=r"x must be a \[B, H, W, C\].*\(5, 5, 3\)"):
        pooling.rmac(np.zeros((5, 5, 3), np.float32))
    with pytest.raises(ValueError, match=r"empty dimension.*\(1, 0, 5, 3\)"):
        pooling.mac(np.zeros((1, 0, 5, 3), np.float32))
    with pytest.raises(ValueError, match="float array"):
        pooling.gem(np.zeros((1, 2, 2, 3), np.int32))
    assert set(pooling.POOLING) == {"mac", "spoc", "gem", "rmac"}
    assert pooling.get("rmac") is pooling.rmac
    with pytest.raises(ValueError, match=r"unknown pooling 'max'.*'gem', 'mac', 'rmac', 'spoc'"):
        pooling.get("max")
