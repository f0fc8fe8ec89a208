"""Multi-scale descriptors: the image at several scales, each pooled, combined by a power mean.

Shape convention: image batches ``uint8 [B, H, W, 3]`` (as decoded by
``jretrieval.datasets.images``) in, descriptors float32 ``[B, D]`` out, as
``jretrieval.steps.make_step``, which this module's step replaces when ``scales != (1,)``;
``extract_at_scales`` is ``jretrieval.extract.extract`` with that step (one device, one process).

The formula is cirtorch's ``extract_ms`` (Radenovic et al., "Fine-tuning CNN image retrieval
with no human annotation", TPAMI 2018; filipradenovic/cnnimageretrieval-pytorch), with its
usual ``ms = [1, 1/sqrt(2), 1/2]`` (``CIRTORCH_SCALES``):

1. the normalised image ``x`` is resized by each scale ``s`` with bilinear interpolation,
   ``align_corners=False`` and no antialiasing, to ``floor(H s) x floor(W s)``, sampling at
   ``(i + 0.5) / s - 0.5`` (PyTorch's ``interpolate(scale_factor=s)`` uses ``s`` itself, not
   the rounded size ratio; ``jax.image.scale_and_translate`` with ``scale=s`` does the same);
   ``s = 1`` is the image itself;
2. each scale's map is pooled and L2-normalised (cirtorch's network ends in ``L2N``);
3. ``v = (mean_s d_s ** p) ** (1 / p)`` with ``p`` the GeM exponent when the pooling is GeM
   (cirtorch's ``msp``), ``p = 1`` otherwise (a plain average);
4. ``v / ||v||``.

``scales == (1,)`` is exactly the single-scale step (``steps.make_step``): the stored
descriptors are then the unnormalised pooled vectors, as everywhere else (the pipeline
L2-normalises them first).

A ``map_size`` (AMDIM's map resized to 23x23 at 724 px) is scaled with the image:
``round(map_size * s)``, so every scale keeps the map's ratio to the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jretrieval import extract as extract_lib
from jretrieval import steps, xla_cpu
from jretrieval.pooling import POOLING

__all__ = [
    "CIRTORCH_SCALES",
    "extract_at_scales",
    "make_step",
    "parse_scales",
    "power_for",
    "rescale",
]

#: cirtorch's multi-scale setting ``ms = [1, 1/sqrt(2), 1/2]``.
CIRTORCH_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)
_EPS = 1e-6  # cirtorch's L2N epsilon


def parse_scales(scales: Any) -> tuple[float, ...]:
    """Scales from a tuple or a comma-separated string (``"1,0.7071,0.5"``); each in (0, 1].

    ``"ms"`` (or ``"cirtorch"``) names ``CIRTORCH_SCALES``.
    """
    if isinstance(scales, str):
        if scales.strip().lower() in ("ms", "cirtorch"):
            return CIRTORCH_SCALES
        scales = [s for s in scales.split(",") if s.strip()]
    if isinstance(scales, (int, float)):
        scales = [scales]
    out = []
    for s in scales:
        try:
            value = float(s)
        except (TypeError, ValueError):
            value = math.nan
        if not 0.0 < value <= 1.0:
            raise ValueError(f"scales entry {s!r}; expected a number in (0, 1] (1 = full size)")
        out.append(value)
    if not out:
        raise ValueError("scales is empty; expected at least one scale, e.g. 1")
    if len(set(out)) != len(out):
        raise ValueError(f"scales={tuple(out)} repeats a scale")
    return tuple(out)


def power_for(pooling: str, pooling_kwargs: Mapping[str, Any] | None) -> float:
    """cirtorch's ``msp``: the GeM exponent for GeM pooling, 1 (plain mean) otherwise."""
    if pooling == "gem":
        return float((pooling_kwargs or {}).get("p", 3.0))
    return 1.0


def rescale(x: ArrayLike, scale: float) -> jax.Array:
    """``[B, H, W, C]`` resized by ``scale`` as PyTorch's bilinear ``interpolate``.

    Output ``floor(H scale) x floor(W scale)``; source coordinate ``(i + 0.5) / scale - 0.5``
    clamped to the image (``align_corners=False``, no antialiasing).
    """
    x = jnp.asarray(x)
    b, h, w, c = x.shape
    out_h, out_w = math.floor(h * scale), math.floor(w * scale)
    if min(out_h, out_w) < 1:
        raise ValueError(f"scale {scale} of a {h}x{w} image leaves no pixel")
    return jax.image.scale_and_translate(
        x,
        (b, out_h, out_w, c),
        (1, 2),
        jnp.asarray([scale, scale], jnp.float32),
        jnp.zeros(2, jnp.float32),
        method="linear",
        antialias=False,
    )


def _l2(v: jax.Array) -> jax.Array:
    return v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + _EPS)


def _describe_ms(
    module: Any,
    variables: Any,
    images: jax.Array,
    mean: jax.Array,
    std: jax.Array,
    *,
    scales: tuple[float, ...],
    pooling: steps.Pooling,
) -> jax.Array:
    x = steps.normalise(images, mean, std)
    kwargs = dict(pooling.kwargs)
    power = power_for(pooling.name, kwargs)
    map_size = pooling.map_size
    total = None
    for s in scales:
        xs = x if s == 1.0 else rescale(x, s)
        fmap, stages = module.apply(variables, xs, train=False)
        if pooling.name == steps.MODEL_POOLING:
            d = stages["descriptor"].astype(jnp.float32)
        else:
            fmap = fmap.astype(jnp.float32)
            if map_size is not None:
                size = (max(1, round(map_size[0] * s)), max(1, round(map_size[1] * s)))
                if tuple(fmap.shape[1:3]) != size:
                    b, _, _, c = fmap.shape
                    shape = (b, *size, c)
                    fmap = jax.image.resize(fmap, shape, method=pooling.map_method, antialias=True)
            d = POOLING[pooling.name](fmap, **kwargs).astype(jnp.float32)
        term = _l2(d) ** power
        total = term if total is None else total + term
    return _l2((total / len(scales)) ** (1.0 / power))


_describe = xla_cpu.jit_pair(_describe_ms, ("module", "scales", "pooling"))


def make_step(
    encoder: Any, *, scales: Sequence[float], pooling: steps.Pooling | str = "rmac"
) -> Callable[[ArrayLike], jax.Array]:
    """The extraction step ``uint8 [B, H, W, 3] -> float32 [B, D]`` at ``scales`` (one device).

    ``scales == (1,)`` returns ``steps.make_step(encoder, pooling)`` itself; other scales the
    multi-scale descriptor of the module docstring (unit rows), one jitted call per batch shape
    (compiled with ``xla_cpu``'s CPU options, as the single-scale step).
    """
    scales = parse_scales(scales)
    pooling = steps.Pooling.of(pooling) if isinstance(pooling, str) else steps.Pooling.of(*pooling)
    single = steps.make_step(encoder, pooling)  # also validates pooling and preprocessing
    if scales == (1.0,):
        return single
    mean, std = steps.mean_std(encoder)
    module, variables = encoder.module, encoder.step_variables()

    def step(images: ArrayLike) -> jax.Array:
        fn = xla_cpu.pick(_describe, images, module)
        return fn(module, variables, images, mean, std, scales=scales, pooling=pooling)

    return step


def extract_at_scales(
    encoder: Any,
    paths: Sequence[str],
    *,
    scales: Sequence[float] = (1.0,),
    loading: steps.Loading | None = None,
    pooling: steps.Pooling | str = "rmac",
    bbx: Sequence[Any] | None = None,
    ids: Sequence[str] | None = None,
    store: str | None = None,
    key: Mapping[str, Any] | None = None,
    mesh: Any = None,
    desc: str = "extract",
) -> tuple[np.ndarray, dict[str, Any]]:
    """``jretrieval.extract.extract`` at ``scales`` (same arguments and results).

    A single scale is ``extract.extract`` itself (data parallel over ``mesh``, split between
    processes). Several scales run this module's step on the default device of one process
    (the store's ``key`` must name the scales: the caller puts them in its user settings).
    """
    scales = parse_scales(scales)
    common = dict(loading=loading, pooling=pooling, bbx=bbx, ids=ids, store=store, key=key)
    if scales == (1.0,):
        return extract_lib.extract(encoder, paths, mesh=mesh, desc=desc, **common)
    if jax.process_count() > 1:
        raise ValueError(f"scales={scales}: multi-scale extraction runs in one process only")
    pooling = steps.Pooling.of(pooling) if isinstance(pooling, str) else steps.Pooling.of(*pooling)
    step = make_step(encoder, scales=scales, pooling=pooling)
    return extract_lib.extract(encoder, paths, desc=desc, step=step, **common)
