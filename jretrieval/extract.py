"""BatchNorm recalibration and batched descriptor extraction.

Shape convention: image batches are ``uint8 [B, H, W, 3]`` RGB as decoded by
``jretrieval.datasets.images``; they are normalised on the device (``normalise``: ``/255``, minus
the encoder's ``preprocessing["mean"]``, divided by ``std``) inside the jitted step; feature maps
are ``[B, h, w, C]``; descriptors ``[N, D]`` float32 rows in the order of the path list.

**Recalibration** (``recalibrate_bn``) runs the encoder in training mode over batches and
re-estimates every BatchNorm layer's ``batch_stats``. Each step applies a clone of the module with
``bn_momentum=0.0`` (Flax meaning) in ``train=True, mutable=["batch_stats"]`` mode, which returns
the layer's raw batch mean ``m_b`` and biased variance ``v_b`` over its ``n_b = B * h * w``
inputs, *the inputs the layer receives in training mode* (earlier layers normalised with their own
batch statistics, as in PyTorch's ``model.train()``). Two ways to combine them, host-side in
float64:

- ``"pytorch"``: ``model.train()`` semantics, starting from the checkpoint's statistics:
  ``mean <- (1 - m) mean + m m_b``, ``var <- (1 - m) var + m v_b n_b / (n_b - 1)``
  (unbiased), ``m = momentum`` (torch meaning, 0.1). ``momentum=None`` is torch's cumulative
  average (``num_batches_tracked`` reset to 0): the plain average over batches of ``m_b`` and
  of the unbiased ``v_b``, the checkpoint's statistics discarded.
- ``"exact"``: the population statistics of all ``N = sum n_b`` inputs of the pass:
  ``mean = sum n_b m_b / N`` (the count-weighted mean of batch means) and the biased population
  variance by the law of total variance, ``var = (sum n_b v_b + sum n_b (m_b - mean)^2) / N``
  (merged batch by batch with Chan et al.'s update). With equal batch sizes the mean equals
  torch's cumulative average (``momentum=None``); torch's variance is instead the average of the
  within-batch unbiased variances, which leaves out the between-batch term
  ``sum n_b (m_b - mean)^2 / N`` and rescales by ``n_b / (n_b - 1)``.

**Extraction** (``extract``) decodes images in a thread pool ahead of the device
(``iterate_batches``), pads each batch to a fixed size (``padded_batch_size``: ``batch_size``, or
the next power of two for a group's last batch) so every image shape compiles at most
``1 + log2(batch_size)`` times, runs one jitted step (normalise, encoder in inference mode,
optional map resize, pooling) and writes the rows into the resumable HDF5 store of
``jretrieval.store``. The step is a plain function of a ``uint8`` batch, so a data-parallel
(sharded) step can be passed in its place (``step=``, ``pad_multiple=`` the device count).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util
from jax.typing import ArrayLike

from jretrieval import store as store_lib
from jretrieval.datasets import images as images_lib
from jretrieval.progress import track

__all__ = [
    "MODES",
    "extract",
    "extraction_settings",
    "files_digest",
    "make_step",
    "normalise",
    "padded_batch_size",
    "recalibrate_bn",
    "variables_digest",
]

MODES = ("exact", "pytorch")
MODEL_POOLING = "model"
#: XLA options of the jitted extraction and recalibration steps when the backend is CPU. jax
#: 0.10's XLA CPU lowers convolutions to YNNPACK by default; its Eigen convolutions are about
#: 25% faster for ResNet-50 at 724 px on AVX-512 (``docs/bench_extract.md``). Other backends
#: compile with their defaults.
CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _cpu_tuned() -> bool:
    """Whether the default backend is CPU and its XLA accepts ``CPU_COMPILER_OPTIONS``."""
    if jax.default_backend() != "cpu":
        return False
    try:
        probe = jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS)
        probe.lower(np.zeros(1, np.float32)).compile()
    except jax.errors.JaxRuntimeError as err:  # an XLA without these options: its defaults
        logging.warning("XLA CPU rejects %s (%s); default options", CPU_COMPILER_OPTIONS, err)
        return False
    return True


def _jit_pair(fun: Callable, static_argnames: tuple[str, ...]) -> tuple[Callable, Callable]:
    """``fun`` jitted with ``CPU_COMPILER_OPTIONS`` and without. JAX accepts compiler options
    only on a top-level jit: the first is for concrete calls on CPU, the second for other
    backends and for calls under a trace (``jax.eval_shape``, a caller's ``jax.jit``)."""
    cpu = jax.jit(fun, static_argnames=static_argnames, compiler_options=CPU_COMPILER_OPTIONS)
    return cpu, jax.jit(fun, static_argnames=static_argnames)


def _pick(pair: tuple[Callable, Callable], x: Any) -> Callable:
    """The member of a ``_jit_pair`` to call on ``x``."""
    return pair[0] if _cpu_tuned() and not isinstance(x, jax.core.Tracer) else pair[1]


def normalise(images: ArrayLike, mean: ArrayLike, std: ArrayLike) -> jax.Array:
    """``uint8 [B, H, W, 3]`` -> float32 ``(images / 255 - mean) / std``; mean, std ``[3]``."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _mean_std(encoder: Any) -> tuple[jax.Array, jax.Array]:
    pre = getattr(encoder, "preprocessing", None) or {}
    if "mean" not in pre or "std" not in pre:
        raise ValueError(f"encoder.preprocessing={pre!r}; expected {{'mean': [3], 'std': [3]}}")
    mean, std = jnp.asarray(pre["mean"], jnp.float32), jnp.asarray(pre["std"], jnp.float32)
    if mean.shape != (3,) or std.shape != (3,):
        raise ValueError(f"preprocessing mean/std have shapes {mean.shape}/{std.shape}; want (3,)")
    return mean, std


def _as_images(batch: Any) -> np.ndarray:
    images = getattr(batch, "images", batch)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"batch images have shape {images.shape} dtype {images.dtype}; "
            "expected uint8 [B, H, W, 3] RGB (a jretrieval.datasets.images.Batch or an array)"
        )
    return images


def _replace_variables(encoder: Any, variables: dict[str, Any]) -> Any:
    if hasattr(encoder, "replace"):
        return encoder.replace(variables=variables)
    return dataclasses.replace(encoder, variables=variables)


# ----------------------------------------------------------------------------- recalibration


def _raw_batch_stats_fn(
    module: nn.Module, variables: Any, images: jax.Array, mean: jax.Array, std: jax.Array
) -> Any:
    """Each BN layer's batch mean and biased variance (``module.bn_momentum`` must be 0)."""
    x = normalise(images, mean, std)
    _, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return updates["batch_stats"]


_raw_batch_stats, _raw_batch_stats_other = _jit_pair(_raw_batch_stats_fn, ("module",))


def _bn_counts(module: nn.Module, variables: Any, shape: tuple[int, ...]) -> dict[tuple, int]:
    """Number of values each BN layer normalises per channel for an input batch of ``shape``."""

    def intermediates(v: Any, x: jax.Array) -> Any:
        _, state = module.apply(
            v,
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda mdl, _: isinstance(mdl, nn.BatchNorm),
        )
        return state["intermediates"]

    out = jax.eval_shape(intermediates, variables, jax.ShapeDtypeStruct(shape, jnp.float32))
    counts = {}
    for path, outputs in traverse_util.flatten_dict(out).items():
        if len(outputs) != 1:
            raise ValueError(f"BatchNorm {'/'.join(path[:-1])} is called {len(outputs)} times")
        counts[path[:-1]] = int(np.prod(outputs[0].shape[:-1]))
    return counts


def _layers(batch_stats: Any) -> dict[tuple, dict[str, np.ndarray]]:
    """``{layer path: {"mean": [C], "var": [C]}}`` as float64 NumPy."""
    layers: dict[tuple, dict[str, np.ndarray]] = {}
    for path, value in traverse_util.flatten_dict(batch_stats).items():
        layers.setdefault(path[:-1], {})[path[-1]] = np.asarray(value, np.float64)
    return layers


def _called(pending: tuple) -> tuple[dict, dict[tuple, int]]:
    """The batch statistics of the BN layers that were applied, with their value counts."""
    stats, counts = pending
    return {p: v for p, v in _layers(stats).items() if p in counts}, counts


class _Exact:
    """Population mean and biased variance over all inputs (Chan et al.'s pairwise merge)."""

    def __init__(self) -> None:
        self.state: dict[tuple, list] = {}

    def update(self, layers: dict, counts: dict[tuple, int]) -> None:
        for path, stats in layers.items():
            n_b, mean_b, m2_b = counts[path], stats["mean"], stats["var"] * counts[path]
            if path not in self.state:
                self.state[path] = [n_b, mean_b, m2_b]
                continue
            n, mean, m2 = self.state[path]
            total = n + n_b
            delta = mean_b - mean
            self.state[path] = [
                total,
                mean + delta * (n_b / total),
                m2 + m2_b + delta**2 * (n * n_b / total),
            ]

    def result(self) -> dict[tuple, dict[str, np.ndarray]]:
        return {p: {"mean": m, "var": m2 / n} for p, (n, m, m2) in self.state.items()}


class _Torch:
    """PyTorch ``model.train()`` running averages (momentum in torch's meaning)."""

    def __init__(self, start: dict, momentum: float | None) -> None:
        self.momentum = momentum
        self.batches = 0
        self.state = {p: dict(v) for p, v in start.items()}

    def update(self, layers: dict, counts: dict[tuple, int]) -> None:
        self.batches += 1
        m = 1.0 / self.batches if self.momentum is None else self.momentum
        for path, stats in layers.items():
            n = counts[path]
            if n < 2:
                raise ValueError(
                    f"BatchNorm {'/'.join(path)} sees {n} value per channel in a batch; "
                    "the unbiased variance (pytorch mode) needs at least 2"
                )
            unbiased = stats["var"] * (n / (n - 1))
            old = self.state[path]
            old["mean"] = (1 - m) * old["mean"] + m * stats["mean"]
            old["var"] = (1 - m) * old["var"] + m * unbiased

    def result(self) -> dict[tuple, dict[str, np.ndarray]]:
        return self.state


def recalibrate_bn(
    encoder: Any,
    batches: Iterable[Any],
    *,
    mode: str = "exact",
    momentum: float | None = 0.1,
    total: int | None = None,
    desc: str = "recalibrate BN",
    mesh: Any = None,
) -> Any:
    """Re-estimates every BatchNorm's statistics with training-mode passes over ``batches``.

    Args:
      encoder: a ``jretrieval.models.Encoder`` (its module has a ``bn_momentum`` field and
        ``__call__(x, *, train)``; its variables hold ``batch_stats``).
      batches: iterable of ``uint8 [B, H, W, 3]`` arrays or ``images.Batch`` (e.g.
        ``iterate_batches(...)``); empty batches are ignored. Shapes may differ between batches.
      mode: ``"exact"`` (population statistics) or ``"pytorch"`` (running averages); see the
        module docstring for the formulas.
      momentum: torch-meaning momentum of ``"pytorch"`` mode (0.1, PyTorch's default); ``None``
        for torch's cumulative average. Ignored by ``"exact"``.
      total: number of images expected, for the progress log.
      desc: progress label.
      mesh: a ``jax.sharding.Mesh`` (``jretrieval.distributed.make_mesh``): each batch is
        sharded over its devices and the statistics are those of the whole batch (all-reduced),
        as on one device; ``None``: the default device.

    Returns:
      The encoder with its ``batch_stats`` replaced (same tree, float32); params unchanged.
    """
    if mesh is not None:
        from jretrieval import distributed

        return distributed.recalibrate_bn(
            encoder, batches, mesh=mesh, mode=mode, momentum=momentum, total=total, desc=desc
        )
    if mode not in MODES:
        raise ValueError(f"recalibration mode={mode!r}; expected one of {MODES}")
    if momentum is not None and not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum={momentum}; expected in (0, 1] or None (torch meaning)")
    module = encoder.module
    if "bn_momentum" not in getattr(module, "__dataclass_fields__", {}):
        raise ValueError(f"{type(module).__name__} has no bn_momentum field; cannot recalibrate")
    old = encoder.variables.get("batch_stats")
    if not old:
        raise ValueError("encoder.variables has no 'batch_stats': nothing to recalibrate")
    stats_module = module.clone(bn_momentum=0.0)
    # Zero running stats: 0 * old + 1 * batch is then the batch statistic even if old is not finite.
    variables = {**encoder.variables, "batch_stats": jax.tree.map(jnp.zeros_like, old)}
    mean, std = _mean_std(encoder)
    old_layers = _layers(old)
    acc = _Exact() if mode == "exact" else _Torch(old_layers, momentum)
    counts_by_shape: dict[tuple, dict[tuple, int]] = {}
    pending = None
    seen = 0
    failed: list[tuple[int, str]] = []
    for batch in track(batches, total=total, desc=desc, count=lambda b: len(_as_images(b))):
        imgs = _as_images(batch)
        failed.extend(getattr(batch, "failed", ()))
        if len(imgs) == 0:
            continue
        if imgs.shape not in counts_by_shape:
            counts_by_shape[imgs.shape] = _bn_counts(stats_module, variables, imgs.shape)
        raw_stats = _pick((_raw_batch_stats, _raw_batch_stats_other), imgs)
        stats = raw_stats(stats_module, variables, imgs, mean, std)  # async dispatch
        if pending is not None:  # fetch the previous batch while this one runs
            acc.update(*_called(pending))
        pending = (stats, counts_by_shape[imgs.shape])
        seen += len(imgs)
    if pending is None:
        raise ValueError("recalibrate_bn: batches held no images")
    acc.update(*_called(pending))
    called = acc.result()
    if not set(called) <= set(old_layers):
        raise ValueError(
            f"batch statistics came back for layers {sorted(set(called) - set(old_layers))} "
            "that are not in encoder.variables['batch_stats']"
        )
    # A BatchNorm the module owns but never applies (AMDIM's switched-off ones, as in
    # PyTorch) sees no data: it keeps its stored statistics.
    new_layers = {**old_layers, **called}
    flat = {}
    for path, stats in new_layers.items():
        for key, value in stats.items():
            flat[(*path, key)] = jnp.asarray(value, jnp.float32)
    new_stats = traverse_util.unflatten_dict(flat)
    logging.info("recalibrated %d BN layers on %d images (%s)", len(called), seen, mode)
    if failed:
        logging.warning("recalibration skipped %d unreadable images: %s", len(failed), failed)
    return _replace_variables(encoder, {**encoder.variables, "batch_stats": new_stats})


# ----------------------------------------------------------------------------- extraction


def _describe_fn(
    module: nn.Module,
    variables: Any,
    images: jax.Array,
    mean: jax.Array,
    std: jax.Array,
    *,
    pooling: str,
    pooling_kwargs: tuple,
    map_size: tuple[int, int] | None,
    map_method: str,
) -> jax.Array:
    x = normalise(images, mean, std)
    fmap, stages = module.apply(variables, x, train=False)
    if pooling == MODEL_POOLING:
        return stages["descriptor"].astype(jnp.float32)
    fmap = fmap.astype(jnp.float32)
    if map_size is not None and tuple(fmap.shape[1:3]) != map_size:
        b, _, _, c = fmap.shape
        fmap = jax.image.resize(fmap, (b, *map_size, c), method=map_method, antialias=True)
    from jretrieval.pooling import POOLING

    return POOLING[pooling](fmap, **dict(pooling_kwargs)).astype(jnp.float32)


_describe, _describe_other = _jit_pair(
    _describe_fn, ("module", "pooling", "pooling_kwargs", "map_size", "map_method")
)


def _check_pooling(encoder: Any, pooling: str, map_size: Any) -> None:
    if pooling == MODEL_POOLING:
        if not getattr(encoder.module, "has_descriptor", False):
            raise ValueError(
                f"pooling='model' but {type(encoder.module).__name__} has no global descriptor"
            )
        if map_size is not None:
            raise ValueError("map_size applies to pooled maps, not to pooling='model'")
        return
    from jretrieval.pooling import POOLING

    if pooling not in POOLING:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {[*POOLING, 'model']}")


def make_step(
    encoder: Any,
    *,
    pooling: str = "rmac",
    pooling_kwargs: Mapping[str, Any] | None = None,
    map_size: tuple[int, int] | None = None,
    map_method: str = "linear",
) -> Callable[[ArrayLike], jax.Array]:
    """The single-device extraction step ``uint8 [B, H, W, 3] -> float32 [B, D]``.

    Normalisation, the encoder in inference mode, an optional resize of the map to ``map_size``
    ``(h, w)`` with ``jax.image.resize(method=map_method, antialias=True)`` (for downsampling a
    triangle filter widened by the scale factor, i.e. Pillow-style antialiased bilinear with
    half-pixel centres; AMDIM's 40x40 -> 23x23 in the paper), then ``POOLING[pooling]`` (or the
    model's own descriptor for ``"model"``), all in one jitted call cached across calls
    (compiled with ``CPU_COMPILER_OPTIONS`` on CPU).
    """
    _check_pooling(encoder, pooling, map_size)
    mean, std = _mean_std(encoder)
    if map_size is not None:
        if len(map_size) != 2 or min(int(s) for s in map_size) < 1:
            raise ValueError(f"map_size={map_size!r}; expected (h, w) positive")
        map_size = (int(map_size[0]), int(map_size[1]))
    fixed = dict(
        mean=mean,
        std=std,
        pooling=pooling,
        pooling_kwargs=tuple(sorted((pooling_kwargs or {}).items())),
        map_size=map_size,
        map_method=map_method,
    )
    module, variables = encoder.module, encoder.variables

    def step(images: ArrayLike) -> jax.Array:
        fn = _pick((_describe, _describe_other), images)
        return fn(module, variables, images, **fixed)

    return step


def padded_batch_size(b: int, batch_size: int, multiple: int = 1) -> int:
    """``batch_size`` for full batches, else the next power of two (at most ``batch_size``),
    rounded up to a multiple of ``multiple`` (the device count of a sharded step)."""
    size = batch_size if b >= batch_size else min(batch_size, 1 << max(b - 1, 0).bit_length())
    return -(-size // multiple) * multiple


def variables_digest(variables: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes (identifies the weights and stats)."""
    h = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(variables).items()):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{'/'.join(map(str, path))}:{arr.dtype}:{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def files_digest(paths: Sequence[str]) -> str:
    """SHA-256 over every file's path, size and modification time (``-1`` if missing): a file
    rewritten in place makes a stored extraction stale, so it is part of the settings."""
    h = hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(path)
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(f"{path}:-1;".encode())
    return h.hexdigest()


def extraction_settings(
    encoder: Any,
    ids: Sequence[str],
    *,
    paths: Sequence[str],
    bbx: Sequence[Any] | None,
    policy: images_lib.ResizePolicy,
    pooling: str,
    pooling_kwargs: Mapping[str, Any] | None,
    map_size: Sequence[int] | None,
    map_method: str,
    settings: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Everything the stored numbers depend on (stored as the HDF5 ``settings`` attribute)."""
    boxes = None if bbx is None else [None if b is None else [float(v) for v in b] for b in bbx]
    return {
        "user": dict(settings or {}),
        "architecture": dict(getattr(encoder, "architecture", {}) or {}),
        "module": repr(encoder.module),
        "preprocessing": {k: list(map(float, v)) for k, v in encoder.preprocessing.items()},
        "variables_sha256": variables_digest(encoder.variables),
        "policy": images_lib.as_policy(policy).to_dict(),
        "pooling": pooling,
        "pooling_kwargs": dict(pooling_kwargs or {}),
        "map_size": None if map_size is None else [int(s) for s in map_size],
        "map_method": map_method if map_size is not None else None,
        "n_images": len(ids),
        "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "files_sha256": files_digest(paths),
        "bbx_sha256": store_lib.settings_digest({"bbx": boxes}),
    }


def extract(
    encoder: Any,
    paths: Sequence[str],
    *,
    bbx: Sequence[Any] | None = None,
    policy: images_lib.ResizePolicy | Mapping[str, Any],
    pooling: str = "rmac",
    pooling_kwargs: Mapping[str, Any] | None = None,
    map_size: tuple[int, int] | None = None,
    map_method: str = "linear",
    batch_size: int = 16,
    store: str | os.PathLike | None = None,
    settings: Mapping[str, Any] | None = None,
    skip_corrupt: bool = False,
    ids: Sequence[str] | None = None,
    num_threads: int | None = None,
    prefetch: int = 2,
    step: Callable[[np.ndarray], jax.Array] | None = None,
    pad_multiple: int = 1,
    loader: Callable[..., np.ndarray] | None = None,
    desc: str = "extract",
    mesh: Any = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Descriptors of ``paths``, through the resumable HDF5 store when ``store`` is given.

    Args:
      encoder: a ``jretrieval.models.Encoder`` (BN statistics already recalibrated if wanted).
      paths: ``N`` image paths.
      bbx: ``None`` or ``N`` crop boxes ``(x1, y1, x2, y2)`` (queries).
      policy: ``ResizePolicy`` or ``{"mode": "fixed"|"max_side", "size": int}``.
      pooling: a key of ``jretrieval.pooling.POOLING`` or ``"model"`` (the encoder's own
        ``global_descriptor``, AP-GeM).
      pooling_kwargs: keyword arguments of the pooling (e.g. ``{"levels": 3}``); static.
      map_size: resize the map to ``(h, w)`` before pooling (see ``make_step``).
      map_method: ``jax.image.resize`` method for ``map_size``.
      batch_size: images per device step.
      store: HDF5 file for these descriptors (``jretrieval.store.store_path`` names one per
        model, dataset and settings). An existing complete file with the same settings is
        reused; with other settings it raises ``StoreMismatchError``. An interrupted run
        resumes from ``<store>.partial``.
      settings: caller's settings to record (model name, dataset, recalibration...); merged with
        everything the numbers depend on (``extraction_settings``).
      skip_corrupt: skip unreadable images (listed in ``report["skipped"]``, their rows left
        out) instead of raising ``CorruptImageError``.
      ids: ``N`` image ids stored beside the descriptors (default: ``paths``).
      num_threads, prefetch: decoding threads and batches decoded ahead.
      step: replacement for ``make_step(...)`` (e.g. a sharded step over a device mesh).
      pad_multiple: padded batch sizes are multiples of this (the mesh's batch axis size).
      loader: replacement for ``images.load_image`` (tests, other storage).
      desc: progress label.
      mesh: a ``jax.sharding.Mesh`` (``jretrieval.distributed.make_mesh``): data-parallel
        extraction, each batch padded to a multiple of the device count and sharded over them,
        weights replicated (``distributed.make_step``); ``None``: the default device. (Several
        processes: ``jretrieval.distributed.extract`` splits the image list between them.)

    Returns:
      ``(descriptors float32 [N_kept, D], report)``: ``report`` has ``kept`` (int64 indices of
      the rows into ``paths``; all of them unless images were skipped), ``skipped``
      (``[(path, message)]``), ``store``, ``reused`` (bool), ``resumed`` (rows found done),
      ``shapes`` (the padded batch shapes run), ``seconds`` and ``images_per_s``.
    """
    start = time.perf_counter()
    paths = [os.fspath(p) for p in paths]
    ids = list(paths) if ids is None else [str(i) for i in ids]
    policy = images_lib.as_policy(policy)
    if len(ids) != len(paths):
        raise ValueError(f"ids has {len(ids)} entries for {len(paths)} paths")
    if bbx is not None and len(bbx) != len(paths):
        raise ValueError(f"bbx has {len(bbx)} boxes for {len(paths)} paths")
    if batch_size < 1 or pad_multiple < 1:
        raise ValueError(f"batch_size={batch_size}, pad_multiple={pad_multiple}; expected >= 1")
    if step is None and mesh is not None:
        from jretrieval import distributed

        mesh = distributed.local_mesh(mesh)  # this process's devices (its own image list)
    if step is None and mesh is not None and mesh.devices.size > 1:
        step = distributed.make_step(
            encoder,
            mesh,
            pooling=pooling,
            pooling_kwargs=pooling_kwargs,
            map_size=map_size,
            map_method=map_method,
        )
        pad_multiple = math.lcm(pad_multiple, mesh.devices.size)
    if step is None:
        step = make_step(
            encoder,
            pooling=pooling,
            pooling_kwargs=pooling_kwargs,
            map_size=map_size,
            map_method=map_method,
        )
    report: dict[str, Any] = {
        "store": None if store is None else os.fspath(store),
        "reused": False,
        "resumed": 0,
        "skipped": [],
        "shapes": [],
    }
    full_settings = None
    if store is not None:
        store = os.fspath(store)
        full_settings = extraction_settings(
            encoder,
            ids,
            paths=paths,
            bbx=bbx,
            policy=policy,
            pooling=pooling,
            pooling_kwargs=pooling_kwargs,
            map_size=map_size,
            map_method=map_method,
            settings=settings,
        )
        if os.path.exists(store):
            desc_arr, _, info = store_lib.read_store(store, settings=full_settings)
            logging.info("reusing descriptor store %s (%d rows)", store, len(desc_arr))
            report.update(
                reused=True,
                kept=info["kept"],
                skipped=[(paths[i], m) for i, m in sorted(info["failed"].items())],
            )
            return desc_arr, _finish(report, start, 0)

    plan = images_lib.plan_batches(paths, bbx=bbx, policy=policy, batch_size=batch_size)
    dim = _descriptor_dim(step, plan, batch_size, pad_multiple)
    out_file = None
    done = np.zeros(len(paths), bool)
    result = None
    if store is not None:
        os.makedirs(os.path.dirname(os.path.abspath(store)), exist_ok=True)
        out_file = store_lib.open_partial(store, ids=ids, dim=dim, settings=full_settings)
        if out_file is None:
            out_file = store_lib.create_partial(store, ids=ids, dim=dim, settings=full_settings)
        done = np.asarray(out_file["done"][...], bool)
        report["resumed"] = int(done.sum())
        if report["resumed"]:
            logging.info("resuming %s: %d of %d rows done", store, report["resumed"], len(paths))
    else:
        result = np.full((len(paths), dim), np.nan, np.float32)
    failed_all: dict[int, str] = {}
    todo = [(shape, idx) for shape, idx in plan if not done[idx].all()]
    shapes: set[tuple[int, ...]] = set()

    def commit(batch: images_lib.Batch, out: jax.Array | None) -> None:
        rows = np.zeros((0, dim), np.float32)
        if out is not None:
            rows = np.asarray(out, np.float32)[: len(batch.indices)]
            bad = ~np.isfinite(rows).all(axis=1)
            if bad.any():
                names = [paths[i] for i in batch.indices[bad]]
                raise FloatingPointError(f"non-finite descriptors for images {names}")
        failed_all.update(dict(batch.failed))
        if out_file is not None:
            store_lib.mark_batch(out_file, batch.indices, rows, batch.failed)
        else:
            result[batch.indices] = rows

    batches = images_lib.iterate_batches(
        paths,
        bbx=bbx,
        policy=policy,
        batch_size=batch_size,
        plan=todo,
        num_threads=num_threads,
        prefetch=prefetch,
        skip_corrupt=skip_corrupt,
        loader=loader,
    )
    remaining = sum(len(idx) for _, idx in todo)
    inflight = None
    try:
        count = lambda b: len(b.indices) + len(b.failed)
        for batch in track(batches, total=remaining, desc=desc, count=count):
            out = None
            if len(batch.indices):
                b = len(batch.indices)
                padded = batch.images
                size = padded_batch_size(b, batch_size, pad_multiple)
                if size != b:
                    padded = np.zeros((size, *batch.images.shape[1:]), np.uint8)
                    padded[:b] = batch.images
                shapes.add(padded.shape)
                out = step(padded)  # dispatched asynchronously
            if inflight is not None:
                commit(*inflight)  # host work on the previous batch overlaps this one
            inflight = (batch, out)
        if inflight is not None:
            commit(*inflight)
            inflight = None
    except BaseException:
        batches.close()  # cancel the decoding queued ahead
        if inflight is not None:  # keep the last finished batch for the resumed run
            try:
                commit(*inflight)
            except Exception as err:  # the original error is the one to raise
                logging.warning("could not save the last batch before stopping: %s", err)
        if out_file is not None:
            out_file.close()  # the .partial file stays for the next run to resume
        raise
    report["shapes"] = sorted(shapes)
    if out_file is not None:
        try:
            store_lib.finalize(out_file, store)
        finally:
            if out_file.id.valid:
                out_file.close()
        desc_arr, _, info = store_lib.read_store(store, settings=full_settings)
        report.update(
            kept=info["kept"],
            skipped=[(paths[i], m) for i, m in sorted(info["failed"].items())],
        )
        return desc_arr, _finish(report, start, remaining)
    kept = np.asarray([i for i in range(len(paths)) if i not in failed_all], np.int64)
    report.update(kept=kept, skipped=[(paths[i], m) for i, m in sorted(failed_all.items())])
    if report["skipped"]:
        logging.warning("skipped %d unreadable images: %s", len(failed_all), report["skipped"])
    return result[kept], _finish(report, start, remaining)


def _descriptor_dim(step: Callable, plan: Sequence, batch_size: int, multiple: int) -> int:
    """``D`` from ``jax.eval_shape`` of the step on the first planned shape (no compute)."""
    for (height, width), idx in plan:
        if height > 0:
            size = padded_batch_size(len(idx), batch_size, multiple)
            spec = jax.ShapeDtypeStruct((size, height, width, 3), jnp.uint8)
            out = jax.eval_shape(step, spec)
            if len(out.shape) != 2:
                raise ValueError(f"extraction step returned shape {out.shape}; expected [B, D]")
            return int(out.shape[1])
    return 0


def _finish(report: dict[str, Any], start: float, n: int) -> dict[str, Any]:
    seconds = time.perf_counter() - start
    report.update(seconds=seconds, images_per_s=n / seconds if seconds > 0 else 0.0)
    return report
