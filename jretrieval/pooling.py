"""Global pooling of convolutional feature maps into descriptors: MAC, SPoC, GeM and R-MAC.

Shape convention: feature maps are NHWC, ``x`` of shape ``[B, H, W, C]``; every pooling returns
``[B, C]`` float32 descriptors (bfloat16/float16 maps are accepted and pooled in float32). The
outputs are *not* L2-normalised (as cirtorch's ``cirtorch.layers.functional``); the pipeline
normalises afterwards.

R-MAC follows cirtorch's ``rmac`` (Tolias et al., ICLR 2016) exactly:

* ``w = min(H, W)``; for a non-square map the number of extra region positions along the long
  side is chosen among steps 2..7 so that neighbouring regions overlap by about 0.4, with the
  same float32 arithmetic as cirtorch (``Wd`` or ``Hd`` below);
* level ``l = 1..levels`` has square regions of side ``wl = floor(2w / (l + 1))`` (skipped when
  0), ``l + Wd`` positions across and ``l + Hd`` down, with top-left corners
  ``floor(wl2 + i * b) - wl2``, ``wl2 = floor(wl / 2 - 1)``, ``b = (W - wl) / (l + Wd - 1)``;
* the global region (the whole map, i.e. MAC) is added; each region's max vector is divided by
  ``norm + eps`` (eps 1e-6) and the region vectors are summed. Duplicate regions count twice,
  as in cirtorch.

The grid depends only on ``(H, W, levels)``: it is computed once in Python (cached) when
tracing. The max over all regions is vectorised and separable: every region is a pair (row
interval, column interval); a masked max over the W axis gives all distinct column intervals at
once (``[B, H, Jc, C]``), a masked max over the H axis then all distinct row intervals
(``[B, Ir, Jc, C]``), and one gather picks each region's pair. The masked max is an elementwise
max chain over the map's columns (rows), fused by XLA into one pass; no Python loop over
regions reaches the traced code.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

__all__ = ["POOLING", "gem", "get", "mac", "rmac", "rmac_regions", "spoc"]


def _check_maps(x: ArrayLike, name: str = "x") -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{name} must be a [B, H, W, C] feature map (NHWC), got shape {x.shape}")
    if 0 in x.shape:
        raise ValueError(f"{name} has an empty dimension: got shape {x.shape}, expected [B,H,W,C]")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array, got dtype {x.dtype} shape {x.shape}")
    return x.astype(jnp.float32)


@jax.jit
def mac(x: ArrayLike) -> jax.Array:
    """Maximum activation of convolutions: ``[B, H, W, C] -> [B, C]``, max over H and W."""
    return jnp.max(_check_maps(x), axis=(1, 2))


@jax.jit
def spoc(x: ArrayLike) -> jax.Array:
    """Sum-pooled convolutional features (as cirtorch, the mean): ``[B, H, W, C] -> [B, C]``."""
    return jnp.mean(_check_maps(x), axis=(1, 2))


@jax.jit
def gem(x: ArrayLike, p: ArrayLike = 3.0, eps: float = 1e-6) -> jax.Array:
    """Generalised mean pooling: ``mean(max(x, eps) ** p) ** (1 / p)``, ``[B,H,W,C] -> [B,C]``.

    Args:
      x: ``[B, H, W, C]`` map.
      p: the power, a scalar (may be a learned parameter; not static).
      eps: activations are clamped from below at ``eps`` first (cirtorch's ``gem``).
    """
    x = jnp.maximum(_check_maps(x), eps)
    p = jnp.asarray(p, jnp.float32)
    return jnp.mean(x**p, axis=(1, 2)) ** (1.0 / p)


@functools.lru_cache(maxsize=256)
def rmac_regions(height: int, width: int, levels: int = 3) -> tuple[tuple[int, int, int, int], ...]:
    """The R-MAC regions of cirtorch's ``rmac`` for an ``height x width`` map.

    Returns:
      ``(top, left, region_height, region_width)`` tuples; the first is the global region
      ``(0, 0, height, width)``, then the square regions level by level, row-major within a
      level (cirtorch's order).
    """
    if height < 1 or width < 1 or levels < 0:
        raise ValueError(
            f"rmac_regions needs height, width >= 1 and levels >= 0, got {(height, width, levels)}"
        )
    f32 = np.float32
    ovr = f32(0.4)
    steps = np.arange(2, 8, dtype=f32)
    w = min(width, height)
    # cirtorch computes this in float32 (torch.Tensor); ties resolve to the first step.
    b = f32(max(height, width) - w) / (steps - f32(1))
    err = np.abs((f32(w * w) - f32(w) * b) / f32(w * w) - ovr)
    idx = int(np.argmin(err))
    wd = idx + 1 if height < width else 0
    hd = idx + 1 if height > width else 0

    def starts(size: int, wl: int, wl2: int, count: int) -> list[int]:
        step = 0.0 if count == 1 else (size - wl) / (count - 1)
        pos = np.floor(f32(wl2) + np.arange(count, dtype=f32) * f32(step)) - f32(wl2)
        return [int(v) for v in pos]

    regions = [(0, 0, height, width)]
    for level in range(1, levels + 1):
        wl = math.floor(2 * w / (level + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        for top in starts(height, wl, wl2, level + hd):
            for left in starts(width, wl, wl2, level + wd):
                regions.append((top, left, wl, wl))
    return tuple(regions)


@functools.lru_cache(maxsize=256)
def _region_masks(height: int, width: int, levels: int):
    """Separable masks: distinct row/column intervals and each region's pair of ids."""
    regions = rmac_regions(height, width, levels)
    rows = sorted({(t, h) for t, _, h, _ in regions})
    cols = sorted({(left, w) for _, left, _, w in regions})
    row_mask = np.zeros((len(rows), height), bool)
    for i, (t, h) in enumerate(rows):
        row_mask[i, t : t + h] = True
    col_mask = np.zeros((len(cols), width), bool)
    for j, (left, w) in enumerate(cols):
        col_mask[j, left : left + w] = True
    row_id = np.array([rows.index((t, h)) for t, _, h, _ in regions], np.int32)
    col_id = np.array([cols.index((left, w)) for _, left, _, w in regions], np.int32)
    return row_mask, col_mask, row_id, col_id


def _masked_max(x: jax.Array, axis: int, mask: np.ndarray) -> jax.Array:
    """``max`` over the positions ``mask[j]`` of ``axis``, for every row ``j`` of ``mask``.

    ``x`` has ``n`` entries along ``axis`` and ``mask`` is a static ``[J, n]`` boolean array;
    the result has ``J`` entries along ``axis``. Written as one elementwise max chain over the
    ``n`` positions (each step covers all ``J`` intervals at once), which XLA fuses into a
    single pass; a ``reduce`` over a masked broadcast was ~10x slower on CPU.
    """
    shape = [1] * x.ndim
    shape[axis] = mask.shape[0]
    neg = jnp.array(-jnp.inf, x.dtype)
    out = None
    for j in range(mask.shape[1]):
        term = jnp.where(mask[:, j].reshape(shape), lax.slice_in_dim(x, j, j + 1, axis=axis), neg)
        out = term if out is None else jnp.maximum(out, term)
    return out


@functools.partial(jax.jit, static_argnames=("levels",))
def rmac(x: ArrayLike, levels: int = 3, eps: float = 1e-6) -> jax.Array:
    """Regional MAC exactly as cirtorch's ``rmac``: ``[B, H, W, C] -> [B, C]``.

    Args:
      x: ``[B, H, W, C]`` map (any H, W >= 1; bfloat16 accepted, pooled in float32).
      levels: number of region scales ``L`` (static).
      eps: added to each region vector's L2 norm before dividing.

    Returns:
      ``[B, C]`` float32: the sum over regions (global region included) of L2-normalised
      region max vectors; not normalised itself.
    """
    x = _check_maps(x)
    _, height, width, _ = x.shape
    row_mask, col_mask, row_id, col_id = _region_masks(height, width, levels)
    cm = _masked_max(x, 2, col_mask)  # [B, H, Jc, C]: max over each distinct column interval
    rm = _masked_max(cm, 1, row_mask)  # [B, Ir, Jc, C]: then over each distinct row interval
    v = rm[:, row_id, col_id, :]  # [B, R, C]: every region is a (row, column) interval pair
    v = v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + eps)
    return jnp.sum(v, axis=1)


#: Pooling by name (configs choose with these keys).
POOLING: dict[str, Callable[..., jax.Array]] = {"mac": mac, "spoc": spoc, "gem": gem, "rmac": rmac}


def get(name: str) -> Callable[..., jax.Array]:
    """The pooling function called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return POOLING[name]
    except KeyError:
        raise ValueError(f"unknown pooling {name!r}; expected one of {sorted(POOLING)}") from None
