"""Convolution as im2col + one matrix product, for CPUs whose matrix units XLA reaches via dots.

Shape convention: ``lhs`` is NHWC ``[B, H, W, Cin]``, ``rhs`` is HWIO ``[kh, kw, Cin, Cout]``,
the result NHWC ``[B, Ho, Wo, Cout]`` with ``Ho = (H + pad_top + pad_bottom - kh) // stride + 1``.

Why: XLA's CPU backend runs convolutions through Eigen (or YNNPACK's convolution fusions), which
on this jax (0.10) never use the processor's bfloat16 dot-product instructions (AVX512-BF16,
AMX): a bfloat16 ResNet-50 runs no faster than float32. Its *dot* path does (YNNPACK's bf16
GEMM with ``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``). So a
``k x k`` convolution is written as the ``k * k`` shifted (strided) views of the padded input
concatenated on the channel axis (``[B, Ho, Wo, k*k*Cin]``, "im2col") times the kernel reshaped
to ``[k*k*Cin, Cout]``; a 1x1 convolution is a plain dot. The sum runs in the same order
(``(i, j, c)``) as the flattened kernel, so only rounding of the accumulation differs from
``lax.conv_general_dilated``.

``conv_dot`` has ``lax.conv_general_dilated``'s signature so that it plugs into
``flax.linen.Conv(conv_general_dilated=conv_dot)``: parameters, their names and initialisation
stay exactly those of ``nn.Conv``, only the computation changes. ``fused_conv`` adds a folded
conv's bias, shortcut and ReLU (ResNet's ``FoldedConv``).

Where it can (``uses_native``: bfloat16, a CPU backend, a processor with AVX512-BF16 and a C++
compiler), both run ``jretrieval.native.conv_bf16`` instead: the same sums read in place
(no im2col written out) with ``vdpbf16ps``, the epilogue fused, one rounding to bfloat16. At
724 px that makes a bfloat16 ResNet-50 faster than PyTorch's bfloat16 on the same cores, where
im2col + dot reached about two thirds of it (``docs/bench_extract.md``). Elsewhere im2col +
dot runs in XLA, moving bfloat16 data as bit patterns (see ``conv_dot``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jretrieval import native

#: dimension numbers ``conv_dot`` accepts (what ``nn.Conv`` passes for a 4-d NHWC input).
NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers: Any) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        # nn.Conv passes ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), ...)
        return dimension_numbers == lax.conv_dimension_numbers(
            (1, 1, 1, 1), (1, 1, 1, 1), NHWC_HWIO
        )
    return tuple(dimension_numbers) == NHWC_HWIO


def im2col(x: jax.Array, kernel: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
    """``[B, H, W, C]`` (already padded) -> ``[B, Ho, Wo, kh * kw * C]``: patch ``(i, j, c)`` at
    channel ``(i * kw + j) * C + c``, the order of ``kernel.reshape(kh * kw * C, -1)``."""
    kh, kw = kernel
    sh, sw = strides
    _, h, w, _ = x.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"im2col: input {x.shape} smaller than the kernel {kernel}")
    views = [
        lax.slice(
            x,
            (0, i, j, 0),
            (x.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, x.shape[3]),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)


def uses_native(lhs: jax.Array, rhs: jax.Array, preferred_element_type: Any = None) -> bool:
    """Whether ``conv_dot`` runs ``native.conv_bf16`` (same sums, read in place, float32
    accumulation): bfloat16 operands and result, a multiple of 16 output channels, a CPU
    backend and a processor and compiler the kernel builds for."""
    return (
        lhs.dtype == jnp.bfloat16
        and rhs.dtype == jnp.bfloat16
        and preferred_element_type is None
        and rhs.shape[3] % 16 == 0
        and jax.default_backend() == "cpu"
        and native.available("conv_bf16")
    )


def conv_dot(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` for NHWC/HWIO 2-d convolutions, computed as im2col + dot.

    Supports what the encoders use: explicit pads or ``'VALID'``/``'SAME'``, any strides, no
    dilation, one feature group. Anything else raises ``ValueError`` (rather than silently
    computing something else). Returns ``[B, Ho, Wo, Cout]`` in the inputs' dtype.
    """
    if lhs.ndim != 4 or rhs.ndim != 4:
        raise ValueError(f"conv_dot: lhs {lhs.shape}, rhs {rhs.shape}; expected 4-d NHWC, HWIO")
    if not _is_nhwc(dimension_numbers):
        raise ValueError(f"conv_dot: dimension_numbers {dimension_numbers}; expected NHWC/HWIO")
    if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        raise ValueError("conv_dot: dilation is not supported")
    if feature_group_count != 1:
        raise ValueError(f"conv_dot: feature_group_count={feature_group_count}; expected 1")
    kh, kw, cin, cout = rhs.shape
    if lhs.shape[-1] != cin:
        raise ValueError(f"conv_dot: lhs has {lhs.shape[-1]} channels, the kernel {cin}")
    strides = tuple(window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), strides, padding)
    (top, bottom), (left, right) = padding
    if uses_native(lhs, rhs, preferred_element_type):
        return native.conv_bf16(lhs, rhs, strides, ((top, bottom), (left, right)))
    # XLA's CPU backend moves bfloat16 data as float32 (pad, views and concatenate each
    # converted there and back: three passes over up to k*k times the map); on the bit
    # patterns the same moves are integer copies (docs/bench_extract.md: with kernels cast
    # once, 0.74x instead of 0.55x PyTorch's bfloat16). Zero bits are +0.0: padding is unchanged.
    moves_bits = jnp.dtype(lhs.dtype).itemsize == 2 and (kh, kw, *strides) != (1, 1, 1, 1)
    x = lax.bitcast_convert_type(lhs, jnp.uint16) if moves_bits else lhs
    if top or bottom or left or right:
        x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    patches = im2col(x, (kh, kw), strides)
    if moves_bits:
        patches = lax.bitcast_convert_type(patches, lhs.dtype)
    # Low-precision products accumulate and come out in float32, then round once: XLA CPU maps
    # only this form (bfloat16 x bfloat16 -> float32) to YNNPACK's bfloat16 GEMM, about twice
    # as fast here as the bfloat16-output dot (docs/bench_extract.md).
    accumulate = preferred_element_type
    if accumulate is None and jnp.dtype(lhs.dtype).itemsize < 4:
        accumulate = jnp.float32
    y = jnp.dot(
        patches,
        rhs.reshape(kh * kw * cin, cout),
        precision=precision,
        preferred_element_type=accumulate,
    )
    return y.astype(lhs.dtype) if preferred_element_type is None else y


def fused_conv(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    strides: tuple[int, int],
    padding: Sequence[tuple[int, int]],
    *,
    residual: jax.Array | None = None,
    relu: bool = False,
) -> jax.Array:
    """``act(conv(x, kernel) + bias + residual)`` (``act``: ReLU if ``relu``), NHWC/HWIO, in
    ``x``'s dtype: a conv with BatchNorm folded into it, its shortcut and its activation.

    With ``native.conv_bf16`` (``uses_native``) the epilogue runs on the float32 sums and the
    result is rounded once; otherwise it is ``conv_dot`` then ``nn.Conv``'s bias add and the
    same elementwise ops, in ``x``'s dtype.
    """
    padding = tuple(tuple(p) for p in padding)
    if uses_native(x, kernel):
        return native.conv_bf16(
            x, kernel, strides, padding, bias=bias, residual=residual, relu=relu
        )
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, NHWC_HWIO)
    y = conv_dot(x, kernel, strides, padding, dimension_numbers=dn) + bias.astype(x.dtype)
    if residual is not None:
        y = y + residual
    return jax.nn.relu(y) if relu else y
