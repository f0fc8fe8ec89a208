"""Tests of the native bfloat16 convolution (``native.conv_bf16``), the paths that use it
(``convdot.conv_dot`` / ``fused_conv``, ResNet's ``FoldedConv``) and ``resnet.stem_max_pool``.

The kernel is compared with a float64 NumPy convolution of the same bfloat16 values, written
here as explicit loops over the kernel taps: float32 sums rounded once to bfloat16 stay within
``BF16_TOL`` (one bfloat16 rounding, 2^-8 relative, plus float32 accumulation noise).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from jretrieval import models, native
from jretrieval.models import convdot, fold, resnet

needs_kernel = pytest.mark.skipif(
    not native.available("conv_bf16"),
    reason="the native bfloat16 convolution cannot be built or run here (see its log line)",
)


def bf16_tol(ref: np.ndarray) -> np.ndarray:
    """Per element: one bfloat16 rounding (2^-8 relative) plus float32 accumulation noise."""
    return 2.0**-8 * np.abs(ref) + 1e-5 * np.abs(ref).max()


def ref_conv(x, w, strides, padding, bias=None, residual=None, relu=False) -> np.ndarray:
    """float64 ``act(conv(x, w) + bias + residual)``, NHWC/HWIO, as a sum over the taps."""
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    w = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
    (top, bottom), (left, right) = padding
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw, _, n = w.shape
    sh, sw = strides
    ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    out = np.zeros((x.shape[0], ho, wo, n))
    for i in range(kh):
        for j in range(kw):
            view = xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
            out += view @ w[i, j]
    if bias is not None:
        out += np.asarray(bias, np.float64)
    if residual is not None:
        out += np.asarray(jnp.asarray(residual, jnp.float32), np.float64)
    return np.maximum(out, 0) if relu else out


CASES = [  # (batch, H, W, C, kernel, stride, padding, N)
    (1, 21, 21, 3, 7, 2, ((3, 3), (3, 3)), 64),  # ResNet stem: odd C, 7x7
    (1, 22, 23, 3, 7, 2, ((3, 3), (3, 3)), 16),  # odd rows of values ending at the image's edge
    (2, 9, 8, 5, 3, 1, ((1, 1), (1, 1)), 32),
    (2, 9, 11, 32, 3, 1, ((1, 1), (1, 1)), 48),  # 3x3, N not a multiple of 64
    (3, 10, 10, 16, 3, 2, ((1, 1), (1, 1)), 80),  # strided, even size, rows % 6 != 0
    (1, 8, 8, 64, 1, 2, ((0, 0), (0, 0)), 528),  # downsample: 1x1 stride 2, 8 x 64 + 16
    (2, 7, 5, 130, 1, 1, ((0, 0), (0, 0)), 16),
    (1, 12, 12, 6, 4, 2, ((0, 1), (1, 0)), 32),  # asymmetric pads (XLA's 'SAME' on even sizes)
    (1, 3, 3, 8, 5, 1, ((2, 2), (2, 2)), 16),  # kernel larger than the image: all borders
]


@needs_kernel
@pytest.mark.parametrize("batch,h,w,c,k,s,padding,n", CASES)
def test_kernel_matches_a_float64_convolution(batch, h, w, c, k, s, padding, n):
    rng = np.random.default_rng(k * 100 + c)
    x = jnp.asarray(rng.normal(size=(batch, h, w, c)), jnp.bfloat16)
    kern = jnp.asarray(rng.normal(size=(k, k, c, n)) / np.sqrt(k * k * c), jnp.bfloat16)
    got = jax.jit(lambda x, w: native.conv_bf16(x, w, (s, s), padding))(x, kern)
    ref = ref_conv(x, kern, (s, s), padding)
    assert got.dtype == jnp.bfloat16 and got.shape == ref.shape
    assert np.all(np.abs(np.asarray(got, np.float64) - ref) <= bf16_tol(ref))


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_epilogue_bias_residual_relu(threads):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(2, 13, 9, 24)), jnp.bfloat16)
    kern = jnp.asarray(rng.normal(size=(3, 3, 24, 96)) / 15, jnp.bfloat16)
    bias = jnp.asarray(rng.normal(size=96), jnp.float32)
    res = jnp.asarray(rng.normal(size=(2, 13, 9, 96)), jnp.bfloat16)
    pads = ((1, 1), (1, 1))
    got = native.conv_bf16(
        x, kern, (1, 1), pads, bias=bias, residual=res, relu=True, num_threads=threads
    )
    ref = ref_conv(x, kern, (1, 1), pads, bias, res, relu=True)
    assert (ref == 0).mean() > 0.3  # the ReLU clips a good share
    assert np.all(np.abs(np.asarray(got, np.float64) - ref) <= bf16_tol(ref))


@needs_kernel
def test_kernel_refuses_what_it_does_not_compute():
    x = jnp.zeros((1, 8, 8, 4), jnp.bfloat16)
    pads = ((1, 1), (1, 1))
    with pytest.raises(ValueError, match="N=24 \\(a multiple of 16 expected\\)"):
        native.conv_bf16(x, jnp.zeros((3, 3, 4, 24), jnp.bfloat16), (1, 1), pads)
    w = jnp.zeros((3, 3, 4, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="expected bfloat16"):
        native.conv_bf16(x.astype(jnp.float32), w, (1, 1), pads)
    with pytest.raises(ValueError, match="expected bfloat16 \\[B, H, W, C\\]"):
        native.conv_bf16(x[0], w, (1, 1), pads)  # no batch axis
    with pytest.raises(ValueError, match="bias \\[3\\]; expected \\[16\\]"):
        native.conv_bf16(x, w, (1, 1), pads, bias=jnp.zeros(3))
    with pytest.raises(ValueError, match="residual \\[1, 8, 8, 8\\]; expected"):
        native.conv_bf16(x, w, (1, 1), pads, residual=jnp.zeros((1, 8, 8, 8), jnp.bfloat16))


@needs_kernel
def test_conv_dot_and_fused_conv_take_the_kernel_when_they_can(monkeypatch):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 10, 10, 16)), jnp.bfloat16)
    kern = jnp.asarray(rng.normal(size=(3, 3, 16, 32)) / 12, jnp.bfloat16)
    bias = jnp.asarray(rng.normal(size=32), jnp.float32)
    pads = ((1, 1), (1, 1))
    dn = lax.conv_dimension_numbers(x.shape, kern.shape, convdot.NHWC_HWIO)
    assert convdot.uses_native(x, kern)
    assert not convdot.uses_native(x, kern[..., :24])  # N % 16: im2col + dot
    assert not convdot.uses_native(x.astype(jnp.float32), kern.astype(jnp.float32))

    def both():
        conv = jax.jit(lambda x, w: convdot.conv_dot(x, w, (1, 1), pads, dimension_numbers=dn))
        fused = jax.jit(lambda x, w: convdot.fused_conv(x, w, bias, (1, 1), pads, relu=True))
        return conv(x, kern), fused(x, kern)

    native_conv, native_fused = both()
    monkeypatch.setattr(convdot, "uses_native", lambda *a, **k: False)
    xla_conv, xla_fused = both()
    ref = ref_conv(x, kern, (1, 1), pads)
    ref_fused = ref_conv(x, kern, (1, 1), pads, bias, relu=True)
    for got, want in ((native_conv, ref), (xla_conv, ref), (native_fused, ref_fused)):
        assert np.all(np.abs(np.asarray(got, np.float64) - want) <= bf16_tol(want))
    # the XLA path rounds the conv, then conv + bias: within a rounding of each term
    terms = np.abs(ref) + np.abs(np.asarray(bias, np.float64))
    assert np.all(np.abs(np.asarray(xla_fused, np.float64) - ref_fused) <= 2 * bf16_tol(terms))


@needs_kernel
def test_folded_resnet_with_the_kernel_matches_its_xla_path(monkeypatch):
    enc = models.init_encoder({"name": "resnet", "depth": 50, "width": 1}, seed=0)
    enc = fold.fold_batch_norm(enc).with_dtype("bfloat16", conv_dot=True)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 72, 3)), jnp.float32)
    stages = jax.jit(lambda v, x: enc.module.apply(v, x, train=False)[1])
    got = stages(enc.step_variables(), x)
    monkeypatch.setattr(convdot, "uses_native", lambda *a, **k: False)
    want = jax.jit(lambda v, x: enc.module.apply(v, x, train=False)[1])(enc.step_variables(), x)
    for name in want:
        a = np.asarray(got[name], np.float64)
        b = np.asarray(want[name], np.float64)
        # both round every layer to bfloat16 (in different places): 8-bit agreement per stage
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2, name


def test_without_the_instruction_set_conv_dot_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx512f"})
    native._build.cache_clear()
    native._failure.cache_clear()
    try:
        assert not native.available("conv_bf16")
        with pytest.raises(RuntimeError, match="lacks avx512bw, avx512vl, avx512_bf16"):
            native.require("conv_bf16")
        x = jnp.ones((1, 6, 6, 4), jnp.bfloat16)
        w = jnp.full((3, 3, 4, 16), 0.5, jnp.bfloat16)
        assert not convdot.uses_native(x, w)
        dn = lax.conv_dimension_numbers(x.shape, w.shape, convdot.NHWC_HWIO)
        got = convdot.conv_dot(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
        assert float(got[0, 2, 2, 0]) == 18.0 and float(got[0, 0, 0, 0]) == 8.0  # 9 / 4 taps
    finally:
        native._build.cache_clear()
        native._failure.cache_clear()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("h,w", [(9, 9), (10, 7), (1, 2)])
def test_stem_max_pool_is_torchs_max_pool_after_a_relu(dtype, h, w):
    x = jax.nn.relu(jnp.asarray(np.random.default_rng(h).normal(size=(2, h, w, 5)), dtype))
    x = x.at[0, 0, 0, 0].set(-0.0)  # a ReLU may leave -0.0: it pools as 0
    want = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    got = resnet.stem_max_pool(x)
    assert got.dtype == dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
