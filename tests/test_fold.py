"""BN folding (``models.fold``) and convolutions as im2col + dot (``models.convdot``).

Shape convention: images and maps NHWC, kernels HWIO.

References: ``lax.conv_general_dilated`` at ``Precision.HIGHEST`` (and a float64 NumPy loop for
the im2col order) for ``conv_dot``; the unfolded module, with randomised BN statistics, for the
folded one. Tolerances: float32 maps compared relative to the map's largest magnitude, 1e-5
(a whole-network float32 tolerance: folding only reassociates ``conv * s``); bfloat16 paths
within 2.5e-2 of float32 (``tests/test_bfloat16.py`` explains that bound).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jretrieval import models
from jretrieval.models import convdot, fold, resnet

#: a one-bottleneck-per-stage ResNet (stem, every stage, every downsample) for fast tests.
TINY_DEPTH = 5


@pytest.fixture(autouse=True)
def tiny_depth(monkeypatch):
    monkeypatch.setitem(resnet.STAGE_SIZES, TINY_DEPTH, (1, 1, 1, 1))


def randomise(variables, seed: int):
    """Random weights and BN statistics far from the identity, so that folding is tested:
    scale U(0.5, 1.5), BN bias / mean N(0, 0.2), var U(0.5, 2)."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = jax.tree_util.keystr(path)
        shape = np.shape(x)
        if "batch_stats" in name:
            if name.endswith("['var']"):
                return jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32)
            return jnp.asarray(rng.normal(0, 0.2, shape), jnp.float32)
        if name.endswith("['scale']"):
            return jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)
        if name.endswith("['bias']"):
            return jnp.asarray(rng.normal(0, 0.2, shape), jnp.float32)
        return x

    return jax.tree_util.tree_map_with_path(leaf, variables)


def encoder_for(architecture, seed=0):
    enc = models.init_encoder(architecture, seed=seed)
    return enc.replace(variables=randomise(enc.variables, seed))


def max_rel(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def stages(enc, x):
    return enc.module.apply(enc.variables, x, train=False)[1]


# ----------------------------------------------------------------------------- conv_dot


CONVS = [  # (kernel, stride, padding, input side, cin, cout): every conv the encoders use
    (7, 2, ((3, 3), (3, 3)), 21, 3, 8),  # ResNet stem
    (3, 2, ((1, 1), (1, 1)), 10, 4, 6),  # strided 3x3, even input
    (3, 1, ((1, 1), (1, 1)), 9, 4, 6),
    (1, 2, "VALID", 11, 5, 7),  # downsample
    (1, 1, "VALID", 6, 5, 7),
    (4, 2, "VALID", 13, 3, 5),  # AMDIM
    (2, 2, "VALID", 9, 3, 5),
    (5, 2, "SAME", 12, 3, 4),
]


@pytest.mark.parametrize("kernel,stride,padding,size,cin,cout", CONVS)
def test_conv_dot_matches_lax_conv(kernel, stride, padding, size, cin, cout):
    rng = np.random.default_rng(kernel * 100 + size)
    x = jnp.asarray(rng.normal(size=(2, size, size + 1, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)), jnp.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, convdot.NHWC_HWIO)
    args = ((stride, stride), padding)
    kw = {"dimension_numbers": dn, "precision": lax.Precision.HIGHEST}
    want = lax.conv_general_dilated(x, w, *args, **kw)
    got = jax.jit(lambda x, w: convdot.conv_dot(x, w, *args, **kw))(x, w)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert max_rel(got, want) < 1e-6
    got16 = convdot.conv_dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), *args, **kw)
    assert got16.dtype == jnp.bfloat16
    assert 1e-4 < max_rel(got16, want) < 2e-2  # bfloat16 inputs (8 bits), not float32


@pytest.mark.parametrize("kernel,stride,padding,size,cin,cout", CONVS)
def test_conv_dot_bfloat16_moves_bit_patterns_exactly(kernel, stride, padding, size, cin, cout):
    """bfloat16 im2col runs on the bit patterns (XLA's CPU backend would round-trip values
    through float32): the result is bitwise the im2col of the values, written here plainly."""
    rng = np.random.default_rng(kernel * 10 + size)
    x = jnp.asarray(rng.normal(size=(2, size, size + 1, cin)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)), jnp.bfloat16)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, convdot.NHWC_HWIO)
    pads = padding
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(x.shape[1:3], (kernel, kernel), (stride, stride), padding)
    xp = np.pad(np.asarray(x, np.float32), ((0, 0), *pads, (0, 0)))
    ho, wo = (xp.shape[1] - kernel) // stride + 1, (xp.shape[2] - kernel) // stride + 1
    cols = np.concatenate(
        [
            xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
            for i in range(kernel)
            for j in range(kernel)
        ],
        axis=-1,
    )
    f32 = jnp.float32
    flat_w = w.reshape(-1, cout)
    want = jnp.dot(jnp.asarray(cols, jnp.bfloat16), flat_w, preferred_element_type=f32)
    conv = jax.jit(lambda x, w: convdot.conv_dot(x, w, (stride, stride), padding, None, None, dn))
    got = conv(x, w)
    assert got.dtype == jnp.bfloat16 and got.shape == want.shape
    np.testing.assert_array_equal(
        np.asarray(got, np.float32), np.asarray(want.astype(x.dtype), f32)
    )


def test_im2col_order_matches_the_flattened_kernel():
    x = np.arange(2 * 5 * 5 * 2, dtype=np.float32).reshape(2, 5, 5, 2)
    patches = np.asarray(convdot.im2col(jnp.asarray(x), (2, 3), (2, 1)))
    assert patches.shape == (2, 2, 3, 12)
    b, i, j = 1, 1, 2  # the patch at output (1, 2) starts at input (2, 2)
    want = x[b, 2:4, 2:5, :].reshape(-1)  # (row, column, channel): HWIO's reshape order
    np.testing.assert_array_equal(patches[b, i, j], want)


def test_conv_dot_refuses_what_it_does_not_compute():
    x, w = jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 3, 4))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, convdot.NHWC_HWIO)
    with pytest.raises(ValueError, match="dilation"):
        convdot.conv_dot(x, w, (1, 1), "VALID", rhs_dilation=(2, 2), dimension_numbers=dn)
    with pytest.raises(ValueError, match="feature_group_count"):
        convdot.conv_dot(x, w, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=3)
    with pytest.raises(ValueError, match="NHWC/HWIO"):
        convdot.conv_dot(x, w, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))


@pytest.mark.parametrize(
    "architecture",
    [
        {"name": "resnet", "depth": TINY_DEPTH},
        {"name": "amdim", "ndf": 8, "n_rkhs": 64, "n_depth": 2, "use_bn": True},
    ],
)
def test_conv_dot_encoder_matches_lax_encoder(architecture):
    enc = encoder_for(architecture)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 130, 128, 3)), jnp.float32)
    dot = enc.with_dtype("float32", conv_dot=True)
    assert dot.module.conv_dot and dot.variables is enc.variables  # same parameters
    want, got = stages(enc, x), stages(dot, x)
    for name in want:
        assert max_rel(got[name], want[name]) < 1e-5, name


def test_with_dtype_picks_conv_dot_for_bfloat16_on_cpu():
    enc = models.init_encoder({"name": "resnet", "depth": TINY_DEPTH})
    on_cpu = jax.default_backend() == "cpu"
    assert enc.with_dtype("bfloat16").module.conv_dot is on_cpu
    assert enc.with_dtype("bfloat16", conv_dot=False).module.conv_dot is False
    assert enc.with_dtype("float32") is enc  # float32 keeps lax convolutions by default
    assert enc.with_dtype("float32", conv_dot=True).module.conv_dot is True


def test_step_variables_cast_kernels_once_and_lose_nothing():
    enc = fold.fold_batch_norm(encoder_for({"name": "resnet", "depth": TINY_DEPTH}))
    assert enc.step_variables() is enc.variables  # float32: as stored
    enc16 = enc.with_dtype("bfloat16")
    cast = enc16.step_variables()
    leaves = jax.tree_util.tree_leaves_with_path(cast["params"])
    kinds = {(getattr(p[-1], "key", None), jnp.dtype(leaf.dtype).name) for p, leaf in leaves}
    assert kinds == {("kernel", "bfloat16"), ("bias", "float32")}
    # the stored variables stay float32: back to float32 is the encoder it was
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(enc16.variables))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 70, 66, 3)), jnp.float32)
    back = enc16.with_dtype("float32")
    np.testing.assert_array_equal(back.feature_map(x), enc.feature_map(x))
    # each conv casts its kernel to bfloat16 anyway: casting once first changes no bit
    want, got = enc16.feature_map(x), enc16.replace(variables=cast).feature_map(x)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


# ----------------------------------------------------------------------------- folding


@pytest.mark.parametrize(
    "architecture,size",
    [
        ({"name": "resnet", "depth": TINY_DEPTH}, 67),
        ({"name": "resnet", "depth": TINY_DEPTH, "width": 2}, 64),  # SimCLR-width
        ({"name": "apgem", "depth": TINY_DEPTH, "pca_dim": 4}, 64),  # + GeM, fc, PCA
        ({"name": "amdim", "ndf": 8, "n_rkhs": 64, "n_depth": 2, "use_bn": True}, 131),
        ({"name": "amdim", "ndf": 8, "n_rkhs": 64, "n_depth": 2, "use_bn": False}, 128),
    ],
)
def test_folded_equals_unfolded(architecture, size):
    enc = encoder_for(architecture, seed=2)
    folded = fold.fold_batch_norm(enc)
    assert folded.module.fold_bn and folded.architecture["fold_bn"] is True
    assert folded.metadata["bn_folded"] is True
    assert fold.fold_batch_norm(folded) is folded
    models.check_variables(folded.architecture, folded.variables, where="folded")
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, size, size, 3)), jnp.float32)
    want, got = stages(enc, x), stages(folded, x)
    assert set(got) == set(want)
    for name in want:
        assert max_rel(got[name], want[name]) < 1e-5, name
    # What was folded disappears; what follows a sum (AMDIM layers 5, 9) stays a BatchNorm.
    flat = models.io.flatten(folded.variables)
    if architecture["name"] in ("resnet", "apgem"):
        assert "batch_stats" not in folded.variables
        assert "params/layer2_0/downsample_conv/bias" in flat
        assert "params/conv1/bias" in flat and "params/bn1/scale" not in flat
    elif architecture["use_bn"]:
        assert "params/layer_list_3/layer_list_1/conv1/bias" in flat
        assert "batch_stats/layer_list_3/layer_list_1/bn1/mean" not in flat
        assert "batch_stats/layer_list_9/mean" in flat and "batch_stats/layer_list_5/var" in flat
    else:  # no BatchNorm is applied inside the blocks: nothing to fold there
        assert "batch_stats/layer_list_3/layer_list_1/bn1/mean" in flat
        assert "params/layer_list_3/layer_list_1/conv1/bias" not in flat


def test_fold_conv_bn_by_hand():
    kernel = np.array([[[[1.0, 2.0]]]], np.float32)  # 1x1, one input, two outputs
    k, b = fold.fold_conv_bn(
        kernel,
        np.array([0.5, 0.0]),
        scale=[2.0, 1.0],
        bias=[1.0, -1.0],
        mean=[1.5, 2.0],
        var=[4.0 - 1e-5, 1.0 - 1e-5],
    )
    np.testing.assert_allclose(k, [[[[1.0, 2.0]]]], rtol=1e-6)  # s = (2/2, 1/1)
    np.testing.assert_allclose(b, [1.0 + (0.5 - 1.5), -1.0 - 2.0], rtol=1e-6)


def test_folded_encoder_refuses_training_mode():
    """Folding freezes the statistics: recalibration must come first."""
    folded = fold.fold_batch_norm(encoder_for({"name": "resnet", "depth": TINY_DEPTH}))
    x = jnp.zeros((1, 64, 64, 3))
    with pytest.raises(ValueError, match="recalibrate BN before fold_batch_norm"):
        folded.module.apply(folded.variables, x, train=True, mutable=["batch_stats"])
    amdim = {"name": "amdim", "ndf": 8, "n_rkhs": 64, "n_depth": 1, "use_bn": True}
    folded = fold.fold_batch_norm(encoder_for(amdim))
    with pytest.raises(ValueError, match="recalibrate BN before fold_batch_norm"):
        folded.module.apply(folded.variables, jnp.zeros((1, 128, 128, 3)), train=True)


def test_fold_reports_missing_statistics():
    enc = encoder_for({"name": "resnet", "depth": TINY_DEPTH})
    broken = {**enc.variables, "batch_stats": {}}
    with pytest.raises(ValueError, match="conv 'conv1' has no"):
        fold.fold_batch_norm(enc.replace(variables=broken))


def test_folded_bfloat16_close_to_float32():
    enc = encoder_for({"name": "resnet", "depth": TINY_DEPTH}, seed=4)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 96, 96, 3)), jnp.float32)
    want = enc.feature_map(x)
    got = fold.fold_batch_norm(enc).with_dtype("bfloat16").feature_map(x)
    assert got.dtype == jnp.bfloat16
    assert 1e-4 < max_rel(got, want) < 2.5e-2
