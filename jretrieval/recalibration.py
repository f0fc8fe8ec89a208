"""BatchNorm recalibration: training-mode passes re-estimate every BN layer's statistics.

Shape convention: image batches are ``uint8 [B, H, W, 3]`` RGB (normalised on the device by
``steps.normalise``); statistics are float32 ``[C]`` per layer, combined on the host in float64.

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

**Devices.** With ``mesh=`` each batch is sharded over the mesh's devices (``_place_batches``):
every BatchNorm's mean and variance are reductions over the sharded batch axis, which XLA computes
as per-device partial sums followed by an all-reduce, i.e. the statistics of the *global* batch,
as on one device. A batch whose size is not a multiple of the device count is replicated instead
(every device computes the whole batch: same numbers, no padding rows to bias the statistics).
Across processes (``recalibrate_images``) every process computes the same batch plan and decodes
only its rows of each batch, which form one global array sharded over all devices, so the
statistics are those of the global batch in both modes. (Merging per-process population
statistics would not do: a BatchNorm's inputs in training mode depend on the earlier layers'
*batch* statistics, so the batches themselves must be the same.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jretrieval import mesh as mesh_lib
from jretrieval import steps, xla_cpu
from jretrieval.datasets import images as images_lib
from jretrieval.progress import track

__all__ = ["MODES", "recalibrate_bn", "recalibrate_images"]

MODES = ("exact", "pytorch")


def _with_variables(encoder: Any, variables: Any) -> Any:
    if hasattr(encoder, "replace"):
        return encoder.replace(variables=variables)
    return dataclasses.replace(encoder, variables=variables)


def _place_batches(batches: Iterable[Any], mesh: Mesh) -> Iterator[Any]:
    n = mesh_lib.mesh_size(mesh)
    for batch in batches:
        images = getattr(batch, "images", batch)
        if len(images) and len(images) % n == 0:
            placed = mesh_lib.shard_batch(np.asarray(images), mesh)
        else:  # replicated: identical statistics, no padding rows to bias them
            placed = mesh_lib.replicate(np.asarray(images), mesh)
        yield batch._replace(images=placed) if hasattr(batch, "_replace") else placed


def _raw_batch_stats_fn(
    module: nn.Module, variables: Any, images: jax.Array, mean: jax.Array, std: jax.Array
) -> Any:
    """Each BN layer's batch mean and biased variance (``module.bn_momentum`` must be 0)."""
    x = steps.normalise(images, mean, std)
    _, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return updates["batch_stats"]


_raw_batch_stats = xla_cpu.jit_pair(_raw_batch_stats_fn, ("module",))


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
      mesh: a ``jax.sharding.Mesh`` (``jretrieval.mesh.make_mesh``): each batch is
        sharded over its devices and the statistics are those of the whole batch (all-reduced),
        as on one device; ``None``: the default device.

    Returns:
      The encoder with its ``batch_stats`` replaced (same tree, float32); params unchanged.
    """
    if mesh is not None and not (mesh_lib.mesh_size(mesh) == 1 and mesh_lib.is_local(mesh)):
        if jax.process_count() > 1:
            raise ValueError(
                "recalibrate_bn(batches) runs on one process; with several processes call "
                "recalibrate_images(encoder, paths, ...) so each decodes its rows of every batch"
            )
        replicated = _with_variables(encoder, mesh_lib.replicate(encoder.variables, mesh))
        out = recalibrate_bn(
            replicated, _place_batches(batches, mesh), mode=mode, momentum=momentum,
            total=total, desc=desc,
        )  # fmt: skip
        return _with_variables(out, jax.tree.map(np.asarray, out.variables))
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
    mean, std = steps.mean_std(encoder)
    old_layers = _layers(old)
    acc = _Exact() if mode == "exact" else _Torch(old_layers, momentum)
    counts_by_shape: dict[tuple, dict[tuple, int]] = {}
    pending = None
    seen = 0
    failed: list[tuple[int, str]] = []
    for batch in track(batches, total=total, desc=desc, count=lambda b: len(steps.as_images(b))):
        imgs = steps.as_images(batch)
        failed.extend(getattr(batch, "failed", ()))
        if len(imgs) == 0:
            continue
        if imgs.shape not in counts_by_shape:
            counts_by_shape[imgs.shape] = _bn_counts(stats_module, variables, imgs.shape)
        raw_stats = xla_cpu.pick(_raw_batch_stats, imgs, stats_module)
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
    return _with_variables(encoder, {**encoder.variables, "batch_stats": new_stats})


def _process_rows(b: int, mesh: Mesh) -> tuple[int, int]:
    """This process's rows ``[lo, hi)`` of a global batch of ``b`` images."""
    size = mesh_lib.mesh_size(mesh)
    if b % size:
        sl = mesh_lib.process_slice(b)
        return sl.start, sl.stop
    mine = [j for j, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    if mine != list(range(mine[0], mine[-1] + 1)):
        raise ValueError(f"process {jax.process_index()}'s devices are not contiguous in the mesh")
    per = b // size
    return mine[0] * per, (mine[-1] + 1) * per


def _global_batches(
    paths: Sequence[str],
    plan: Sequence[tuple[Any, np.ndarray]],
    mesh: Mesh,
    loading: steps.Loading,
    bbx: Sequence[Any] | None,
) -> Iterator[images_lib.Batch]:
    """The planned batches as global arrays: each process decodes only its rows."""
    axis = mesh_lib.axis_name(mesh)
    bounds = [_process_rows(len(idx), mesh) for _, idx in plan]
    local_plan = [(shape, idx[lo:hi]) for (shape, idx), (lo, hi) in zip(plan, bounds, strict=True)]
    local = loading.iterate(paths, bbx=bbx, plan=local_plan)
    for (_, idx), (lo, hi), batch in zip(plan, bounds, local, strict=True):
        counts = np.asarray(
            multihost_utils.process_allgather(np.asarray([len(batch.indices), hi - lo], np.int64))
        ).reshape(-1, 2)
        if (counts[:, 0] == counts[:, 1]).all() and len(idx) % mesh_lib.mesh_size(mesh) == 0:
            images = multihost_utils.host_local_array_to_global_array(batch.images, mesh, P(axis))
            yield images_lib.Batch(idx, images)
            continue
        # An image failed or the batch does not split evenly: every process gets the whole
        # batch (gathered) and the devices compute it replicated, as on one process.
        indices = mesh_lib.allgather_rows(np.asarray(batch.indices, np.int64))
        images = mesh_lib.allgather_rows(np.asarray(batch.images))
        failed = [tuple(f) for part in mesh_lib.allgather_json([list(f) for f in batch.failed])
                  for f in part]  # fmt: skip
        order = np.argsort(indices, kind="stable")
        indices, images = indices[order], images[order]
        if len(indices):
            images = multihost_utils.host_local_array_to_global_array(images, mesh, P())
        yield images_lib.Batch(indices, images, tuple(sorted(failed)))


def recalibrate_images(
    encoder: Any,
    paths: Sequence[str],
    *,
    loading: steps.Loading,
    bbx: Sequence[Any] | None = None,
    mesh: Mesh | None = None,
    mode: str = "exact",
    momentum: float | None = 0.1,
    desc: str = "recalibrate BN",
) -> Any:
    """BN recalibration over the images ``paths``, data-parallel over ``mesh`` and processes.

    Args:
      encoder, mode, momentum, desc: as for ``recalibrate_bn``.
      paths: ``N`` image paths; bbx: ``None`` or ``N`` crop boxes.
      loading: decoding and batching (``steps.Loading``; its ``batch_size`` is the BN batch).
      mesh: ``None`` or a device mesh (``jretrieval.mesh.make_mesh``).

    Every process computes the same batch plan (``images.plan_batches``: the single-process
    batches) and decodes only its rows of each batch; the batch is one global array sharded
    over all devices, so each BatchNorm's statistics are those of the global batch (all-reduced
    across processes) and the result equals one process's, in ``"exact"`` and ``"pytorch"``
    mode alike. A batch with an unreadable image or a size that is not a multiple of the device
    count is gathered and computed replicated.
    """
    kw = dict(mode=mode, momentum=momentum, total=len(paths), desc=desc)
    if jax.process_count() == 1:
        return recalibrate_bn(encoder, loading.iterate(paths, bbx=bbx), mesh=mesh, **kw)
    mesh = mesh_lib.make_mesh() if mesh is None else mesh
    plan = images_lib.plan_batches(
        paths, bbx=bbx, policy=loading.policy, batch_size=loading.batch_size
    )
    variables = multihost_utils.host_local_array_to_global_array(
        jax.tree.map(np.asarray, encoder.variables), mesh, P()
    )
    out = recalibrate_bn(
        _with_variables(encoder, variables), _global_batches(paths, plan, mesh, loading, bbx), **kw
    )
    stats = jax.tree.map(mesh_lib.to_host, out.variables["batch_stats"])
    return _with_variables(encoder, {**encoder.variables, "batch_stats": stats})
