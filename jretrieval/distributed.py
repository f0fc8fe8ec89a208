"""Devices and processes: the one device mesh, data-parallel extraction, multi-host plumbing.

Shape convention: image batches are ``uint8 [B, H, W, 3]`` (NHWC) and are sharded along ``B``
over the mesh's single axis ``"data"``; descriptor sets are ``[N, D]`` rows in the order of the
image list; weights and BN statistics are replicated.

**The mesh.** ``make_mesh()`` builds the 1-D mesh over every device of every process
(``jax.devices()``); callers build it once and pass it down (``mesh=`` arguments here, in
``jretrieval.sharded`` and in ``jretrieval.extract``). ``initialize(multihost=True)`` calls
``jax.distributed.initialize()`` (TPU VM pods and SLURM/Kubernetes GPU clusters are detected
automatically; coordinator, process count and id may be given); with ``multihost=False`` it
does nothing, so on one process it costs nothing.

**Data-parallel steps.** ``make_step`` wraps ``jretrieval.extract.make_step`` so that each batch
is placed with ``NamedSharding(mesh, P("data"))`` and the encoder's variables with a replicated
sharding; ``jax.jit`` then partitions the whole step along the batch (GSPMD). Batches are padded
by ``extract.extract(pad_multiple=mesh size)`` and the padding rows dropped, so descriptors are
those of one device (allclose: XLA may block the convolutions differently). BN recalibration
(``recalibrate_bn``) runs the encoder in training mode on the sharded batch: every BatchNorm's
mean and variance are reductions over the (sharded) batch axis, which XLA computes as per-device
partial sums followed by an all-reduce, i.e. the statistics of the *global* batch, as on one
device. A batch whose size is not a multiple of the device count is replicated instead (every
device computes the whole batch: same numbers, no padding that would bias the statistics).

**Multi-host extraction** (``extract`` with ``jax.process_count() > 1``). Process ``p`` of ``P``
decodes and encodes only the contiguous slice ``process_slice(N)`` of the image list, data-parallel
over its own (local) devices, into its own resumable part store ``<store>.part<p>of<P>``. The
descriptor rows are then all-gathered (``multihost_utils.process_allgather``, in blocks of rows so
the transient buffer stays bounded) so every process returns the full ``[N, D]`` array, and
process 0 writes the single HDF5 store with exactly the settings, ids and row order of a
single-process run (so a later single-process run reuses it). The other processes wait at a
barrier, then every process removes its part file. We chose the all-gather over "every process
writes a part, process 0 merges" because it needs no shared filesystem for the descriptors: only
the final ``store`` path must be visible to every process when it is to be *reused* (whether it
exists is decided by process 0 and broadcast, so all processes take the same branch).
Recalibration across processes (``recalibrate_images``) keeps the single-process batches:
every process computes the same batch plan and decodes only its rows of each batch, which
form one global array sharded over all devices, so the statistics are those of the global
batch (all-reduced across processes) in both ``"exact"`` and ``"pytorch"`` mode. (Merging
per-process population statistics would not do: a BatchNorm's inputs in training mode depend
on the earlier layers' *batch* statistics, so the batches themselves must be the same.)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jretrieval import extract as extract_lib
from jretrieval import mesh as mesh_lib
from jretrieval import store as store_lib
from jretrieval.datasets import images as images_lib
from jretrieval.mesh import (  # re-exported until callers import jretrieval.mesh
    DATA_AXIS,
    allgather_rows,
    initialize,
    is_main_process,
    local_mesh,
    make_mesh,
    mesh_size,
    process_slice,
    replicate,
    shard_batch,
    sync,
    to_host,
)

__all__ = [
    "DATA_AXIS",
    "allgather_rows",
    "extract",
    "initialize",
    "is_main_process",
    "local_mesh",
    "make_mesh",
    "make_step",
    "mesh_size",
    "process_slice",
    "recalibrate_bn",
    "recalibrate_images",
    "replicate",
    "shard_batch",
    "sync",
    "to_host",
]


# ----------------------------------------------------------------------------- data parallel


def make_step(encoder: Any, mesh: Mesh | None = None, **kwargs: Any) -> Callable:
    """``extract.make_step`` over ``mesh``: ``uint8 [B, H, W, 3] -> float32 [B, D]``.

    ``B`` must be a multiple of the mesh size (``extract.extract`` pads with ``pad_multiple``).
    The variables are replicated once here; each call shards the batch along ``B``. With
    ``mesh=None`` (or one device) this is ``extract.make_step`` itself.
    """
    if mesh_size(mesh) == 1 and (mesh is None or mesh_lib.is_local(mesh)):
        return extract_lib.make_step(encoder, **kwargs)
    encoder = _with_variables(encoder, replicate(encoder.variables, mesh))
    step = extract_lib.make_step(encoder, **kwargs)

    def sharded(images: np.ndarray) -> jax.Array:
        if isinstance(images, jax.core.Tracer):  # traced (jax.eval_shape of the step)
            return step(images)
        return step(shard_batch(np.asarray(images), mesh))

    return sharded


def _with_variables(encoder: Any, variables: Any) -> Any:
    if hasattr(encoder, "replace"):
        return encoder.replace(variables=variables)
    return dataclasses.replace(encoder, variables=variables)


def _place_batches(batches: Iterable[Any], mesh: Mesh) -> Iterator[Any]:
    n = mesh_size(mesh)
    for batch in batches:
        images = getattr(batch, "images", batch)
        if len(images) and len(images) % n == 0:
            placed = shard_batch(np.asarray(images), mesh)
        else:  # replicated: identical statistics, no padding rows to bias them
            placed = replicate(np.asarray(images), mesh)
        yield batch._replace(images=placed) if hasattr(batch, "_replace") else placed


def recalibrate_bn(
    encoder: Any,
    batches: Iterable[Any],
    *,
    mesh: Mesh | None = None,
    mode: str = "exact",
    **kwargs: Any,
) -> Any:
    """``extract.recalibrate_bn`` with each batch sharded over ``mesh`` (global batch stats).

    Single process only (the batches are host arrays of this process); with several processes
    use ``recalibrate_images``, which gives every process its rows of each global batch. Other
    keyword arguments go to ``extract.recalibrate_bn``.
    """
    if mesh is None or (mesh_size(mesh) == 1 and mesh_lib.is_local(mesh)):
        return extract_lib.recalibrate_bn(encoder, batches, mode=mode, **kwargs)
    if jax.process_count() > 1:
        raise ValueError(
            "recalibrate_bn(batches) runs on one process; with several processes call "
            "recalibrate_images(encoder, paths, ...) so each decodes its rows of every batch"
        )
    replicated = _with_variables(encoder, replicate(encoder.variables, mesh))
    out = extract_lib.recalibrate_bn(replicated, _place_batches(batches, mesh), mode=mode, **kwargs)
    return _with_variables(out, jax.tree.map(np.asarray, out.variables))


def _process_rows(b: int, mesh: Mesh) -> tuple[int, int]:
    """This process's rows ``[lo, hi)`` of a global batch of ``b`` images."""
    size = mesh_size(mesh)
    if b % size:
        sl = process_slice(b)
        return sl.start, sl.stop
    mine = [j for j, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    if mine != list(range(mine[0], mine[-1] + 1)):
        raise ValueError(f"process {jax.process_index()}'s devices are not contiguous in the mesh")
    per = b // size
    return mine[0] * per, (mine[-1] + 1) * per


def _global_batches(
    paths: Sequence[str], plan: Sequence[tuple[Any, np.ndarray]], mesh: Mesh, **kwargs: Any
) -> Iterator[images_lib.Batch]:
    """The planned batches as global arrays: each process decodes only its rows."""
    axis = mesh_lib.axis_name(mesh)
    bounds = [_process_rows(len(idx), mesh) for _, idx in plan]
    local_plan = [(shape, idx[lo:hi]) for (shape, idx), (lo, hi) in zip(plan, bounds, strict=True)]
    local = images_lib.iterate_batches(paths, plan=local_plan, batch_size=1, **kwargs)
    for (_, idx), (lo, hi), batch in zip(plan, bounds, local, strict=True):
        counts = np.asarray(
            multihost_utils.process_allgather(np.asarray([len(batch.indices), hi - lo], np.int64))
        ).reshape(-1, 2)
        if (counts[:, 0] == counts[:, 1]).all() and len(idx) % mesh_size(mesh) == 0:
            images = multihost_utils.host_local_array_to_global_array(batch.images, mesh, P(axis))
            yield images_lib.Batch(idx, images)
            continue
        # An image failed or the batch does not split evenly: every process gets the whole
        # batch (gathered) and the devices compute it replicated, as on one process.
        indices = allgather_rows(np.asarray(batch.indices, np.int64))
        images = allgather_rows(np.asarray(batch.images))
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
    mesh: Mesh | None = None,
    policy: images_lib.ResizePolicy | Mapping[str, Any],
    batch_size: int = 16,
    bbx: Sequence[Any] | None = None,
    skip_corrupt: bool = False,
    num_threads: int | None = None,
    prefetch: int = 2,
    mode: str = "exact",
    **kwargs: Any,
) -> Any:
    """BN recalibration over the images ``paths``, data-parallel over ``mesh`` and processes.

    Every process computes the same batch plan (``images.plan_batches``: the single-process
    batches) and decodes only its rows of each batch; the batch is one global array sharded
    over all devices, so each BatchNorm's statistics are those of the global batch (all-reduced
    across processes) and the result equals one process's, in ``"exact"`` and ``"pytorch"``
    mode alike. A batch with an unreadable image or a size that is not a multiple of the device
    count is gathered and computed replicated. Other keyword arguments (``momentum``) go to
    ``extract.recalibrate_bn``.
    """
    load_kw = dict(bbx=bbx, policy=policy, skip_corrupt=skip_corrupt, num_threads=num_threads,
                   prefetch=prefetch)  # fmt: skip
    if jax.process_count() == 1:
        batches = images_lib.iterate_batches(paths, batch_size=batch_size, **load_kw)
        return recalibrate_bn(encoder, batches, mesh=mesh, mode=mode, total=len(paths), **kwargs)
    mesh = make_mesh() if mesh is None else mesh
    plan = images_lib.plan_batches(paths, bbx=bbx, policy=policy, batch_size=batch_size)
    variables = multihost_utils.host_local_array_to_global_array(
        jax.tree.map(np.asarray, encoder.variables), mesh, P()
    )
    out = extract_lib.recalibrate_bn(
        _with_variables(encoder, variables),
        _global_batches(paths, plan, mesh, **load_kw),
        mode=mode,
        total=len(paths),
        **kwargs,
    )
    stats = jax.tree.map(to_host, out.variables["batch_stats"])
    return _with_variables(encoder, {**encoder.variables, "batch_stats": stats})


# ------------------------------------------------------------------------- multi-host extraction


def extract(
    encoder: Any,
    paths: Sequence[str],
    *,
    mesh: Mesh | None = None,
    store: str | os.PathLike | None = None,
    **kwargs: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """``extract.extract`` data-parallel over ``mesh`` and, with several processes, split by
    process (see the module docstring). Same arguments and results as ``extract.extract``.

    Returns:
      ``(descriptors float32 [N_kept, D], report)`` equal to a single-device run's, on every
      process.
    """
    if jax.process_count() == 1:
        return extract_lib.extract(encoder, paths, store=store, mesh=mesh, **kwargs)
    return _extract_multihost(encoder, list(paths), mesh=mesh, store=store, **kwargs)


def _extract_multihost(
    encoder: Any,
    paths: list[str],
    *,
    mesh: Mesh | None,
    store: str | os.PathLike | None,
    **kwargs: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    p, count = jax.process_index(), jax.process_count()
    store = None if store is None else os.fspath(store)
    exists = store is not None and os.path.exists(store)
    exists = bool(multihost_utils.broadcast_one_to_all(np.asarray(exists)))
    if exists:
        if not os.path.exists(store):
            raise FileNotFoundError(
                f"process {p}: descriptor store {store} exists on process 0 but not here; a "
                "multi-host run needs the store on a filesystem every process sees"
            )
        return extract_lib.extract(encoder, paths, store=store, **kwargs)

    n = len(paths)
    sl = process_slice(n)
    ids = kwargs.pop("ids", None)
    ids = list(paths) if ids is None else [str(i) for i in ids]
    bbx = kwargs.pop("bbx", None)
    if len(ids) != n or (bbx is not None and len(bbx) != n):
        raise ValueError(f"ids/bbx have {len(ids)}/{None if bbx is None else len(bbx)} entries "
                         f"for {n} paths")  # fmt: skip
    local = local_mesh(mesh)
    part = None if store is None else f"{store}.part{p}of{count}"
    if sl.stop > sl.start:
        rows, rep = extract_lib.extract(
            encoder,
            paths[sl],
            bbx=None if bbx is None else bbx[sl],
            ids=ids[sl],
            store=part,
            mesh=local,
            desc=f"{kwargs.pop('desc', 'extract')} [process {p}/{count}]",
            **kwargs,
        )
        kept = np.asarray(rep["kept"], np.int64) + sl.start
        skipped = [list(s) for s in rep["skipped"]]
        dim = rows.shape[1]
    else:  # more processes than images
        rows, kept, skipped, dim, rep = (
            np.zeros((0, 0), np.float32),
            np.zeros(0, np.int64),
            [],
            0,
            {},
        )
    dim = int(np.asarray(multihost_utils.process_allgather(np.asarray([dim], np.int32))).max())
    if rows.shape[1] != dim:
        rows = np.zeros((len(rows), dim), np.float32)
    all_rows = allgather_rows(np.asarray(rows, np.float32))
    all_kept = allgather_rows(kept)
    all_skipped = [tuple(s) for part_s in mesh_lib.allgather_json(skipped) for s in part_s]
    report = {
        "store": store,
        "reused": False,
        "resumed": int(rep.get("resumed", 0)),
        "skipped": all_skipped,
        "shapes": rep.get("shapes", []),
        "kept": all_kept,
        "seconds": rep.get("seconds", 0.0),
        "images_per_s": rep.get("images_per_s", 0.0),
        "processes": count,
    }
    if store is not None:
        if p == 0:
            _write_store(encoder, paths, ids, bbx, store, all_rows, all_kept, all_skipped, kwargs)
        multihost_utils.sync_global_devices(f"jretrieval store written: {store}")
        if part is not None and os.path.exists(part):
            os.remove(part)
    return all_rows, report


def _write_store(
    encoder: Any,
    paths: list[str],
    ids: list[str],
    bbx: Any,
    store: str,
    rows: np.ndarray,
    kept: np.ndarray,
    skipped: list[tuple[str, str]],
    kwargs: Mapping[str, Any],
) -> None:
    """Process 0: the single-process store (same settings, ids, order) from gathered rows."""
    settings = extract_lib.extraction_settings(
        encoder,
        ids,
        paths=paths,
        bbx=bbx,
        policy=images_lib.as_policy(kwargs["policy"]),
        pooling=kwargs.get("pooling", "rmac"),
        pooling_kwargs=kwargs.get("pooling_kwargs"),
        map_size=kwargs.get("map_size"),
        map_method=kwargs.get("map_method", "linear"),
        settings=kwargs.get("settings"),
    )
    index = {path: i for i, path in enumerate(paths)}
    failed = [(index[path], msg) for path, msg in skipped]
    os.makedirs(os.path.dirname(os.path.abspath(store)), exist_ok=True)
    f = store_lib.create_partial(store, ids=ids, dim=rows.shape[1], settings=settings)
    try:
        for start in range(0, max(len(kept), 1), mesh_lib.GATHER_ROWS):
            sel = slice(start, start + mesh_lib.GATHER_ROWS)
            store_lib.mark_batch(f, kept[sel], rows[sel], failed if start == 0 else ())
        store_lib.finalize(f, store)
    finally:
        if f.id.valid:
            f.close()
    logging.info("wrote %s (%d rows from %d processes)", store, len(kept), jax.process_count())
