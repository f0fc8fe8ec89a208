"""Descriptor extraction: a batch loop over a step function, writing to a sink.

Shape convention: image batches are ``uint8 [B, H, W, 3]`` RGB as decoded by
``jretrieval.datasets.images``; descriptors are ``float32 [N, D]`` rows in the order of the path
list.

``extract`` plans batches of one image shape each (``images.plan_batches``), decodes them in a
thread pool ahead of the device (``steps.Loading.iterate``), pads each batch to a fixed size
(``steps.padded_batch_size``, a multiple of the step's device count) so every image shape
compiles at most ``1 + log2(batch_size)`` times, runs the step (``steps.make_step``: normalise,
encoder, pooling; data parallel when given a mesh) and writes the rows to a sink: an in-memory
array, or the resumable HDF5 store of ``jretrieval.store``. The host work on one batch (checks,
the store write) overlaps the device work on the next.

**The store** is keyed on its content (``jretrieval.keys.extraction_key``: the image files'
fingerprint, the weights' digest and every setting), computed once by the caller and passed as
``key``. A complete store with that key is reused; one with another key raises
``StoreMismatchError``. Only the holder of ``files.writer_lock(store)`` writes it: a second run on
the same workdir waits, then reuses the store the first one finished. A killed run leaves
``<store>.partial``, which the next run resumes; a corrupt store or partial is moved aside and
rebuilt (``store.reuse``, ``store.open_for_writing``).

**Several processes** (``jax.process_count() > 1``). Process ``p`` of ``P`` extracts the contiguous
slice ``mesh.process_slice(N)`` of the image list, data-parallel over its own devices, into its
own resumable part store ``<store>.part<p>of<P>``; the rows are all-gathered
(``mesh.allgather_rows``) so every process returns the full ``[N, D]`` array, and process 0 writes
the single store with exactly the key, ids and row order of a single-process run (so a later
single-process run reuses it). This needs no shared filesystem for the descriptors: only the final
store must be visible to every process when it is to be *reused* (whether it exists is decided by
process 0 and broadcast, so all processes take the same branch).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jretrieval import files, keys, steps
from jretrieval import mesh as mesh_lib
from jretrieval import store as store_lib
from jretrieval.datasets import images as images_lib
from jretrieval.progress import track
from jretrieval.steps import Loading, Pooling

__all__ = ["Loading", "Pooling", "extract", "store_key"]


def store_key(
    encoder: Any,
    paths: Sequence[str],
    *,
    ids: Sequence[str],
    bbx: Sequence[Any] | None,
    loading: Loading,
    pooling: Pooling,
    user: Mapping[str, Any] | None = None,
    weights: str | None = None,
) -> dict[str, Any]:
    """``keys.extraction_key`` of an extraction (``weights``: the digest, if already known)."""
    return keys.extraction_key(
        encoder,
        weights=weights or keys.variables_digest(encoder.variables),
        files=keys.files_digest(paths),
        ids=ids,
        bbx=bbx,
        policy=loading.policy.to_dict(),
        pooling=pooling.to_dict(),
        user=user,
    )


class _ArraySink:
    """Rows kept in memory (no store)."""

    def __init__(self, n: int, dim: int) -> None:
        self.rows = np.full((n, dim), np.nan, np.float32)
        self.done = np.zeros(n, bool)
        self.failed: dict[int, str] = {}

    def write(self, indices: np.ndarray, rows: np.ndarray, failed: Sequence) -> None:
        self.rows[indices] = rows
        self.failed.update(dict(failed))


class _StoreSink:
    """Rows written batch by batch to ``<store>.partial`` (the caller holds the writer lock)."""

    def __init__(self, path: str, ids: Sequence[str], dim: int, key: Mapping[str, Any]) -> None:
        self.path = path
        self.file: h5py.File = store_lib.open_for_writing(path, ids=ids, dim=dim, settings=key)
        self.done = np.asarray(self.file["done"][...], bool)

    def write(self, indices: np.ndarray, rows: np.ndarray, failed: Sequence) -> None:
        store_lib.mark_batch(self.file, indices, rows, failed)

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def extract(
    encoder: Any,
    paths: Sequence[str],
    *,
    loading: Loading | None = None,
    pooling: Pooling | str = "rmac",
    bbx: Sequence[Any] | None = None,
    ids: Sequence[str] | None = None,
    store: str | os.PathLike | None = None,
    key: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    mesh: Mesh | None = None,
    desc: str = "extract",
    step: Callable[[np.ndarray], jax.Array] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Descriptors of ``paths``, through the resumable HDF5 store when ``store`` is given.

    Args:
      encoder: a ``jretrieval.models.Encoder`` (BN statistics already recalibrated if wanted).
      paths: ``N`` image paths.
      loading: decoding and batching (``steps.Loading``: policy, batch size, skip_corrupt...);
        ``None``: ``Loading()``.
      pooling: ``steps.Pooling`` (or a pooling name with its default arguments).
      bbx: ``None`` or ``N`` crop boxes ``(x1, y1, x2, y2)`` (queries).
      ids: ``N`` image ids stored beside the descriptors (default: ``paths``).
      store: HDF5 file for these descriptors (``store.store_path(..., settings=key)`` names one
        per key); see the module docstring.
      key: the store's ``keys.extraction_key`` (computed once by the caller); ``None``: computed
        here from the arguments and ``settings``.
      settings: the caller's labels stored in the key (only when ``key`` is ``None``).
      mesh: a ``jax.sharding.Mesh`` (``jretrieval.mesh.make_mesh``): data parallel over this
        process's devices; with several processes the image list is split between them.
      desc: progress label.
      step: an extraction step to run instead of ``steps.make_step(encoder, pooling)`` (e.g.
        ``jretrieval.multiscale.make_step``), on the default device of one process; a store
        ``key`` must then name what the step adds.

    Returns:
      ``(descriptors float32 [N_kept, D], report)``: ``report`` has ``kept`` (int64 indices of
      the rows into ``paths``), ``skipped`` (``[(path, message)]``), ``store``, ``reused``
      (bool), ``resumed`` (rows found done), ``shapes`` (the padded batch shapes run),
      ``seconds`` and ``images_per_s``.

    Raises:
      store.StoreMismatchError: ``store`` holds another key.
      store.StoreWriteError: writing ``store`` failed (the rows written so far stay resumable).
    """
    paths = [os.fspath(p) for p in paths]
    ids = list(paths) if ids is None else [str(i) for i in ids]
    pooling = Pooling.of(pooling) if isinstance(pooling, str) else Pooling.of(*pooling)
    loading = Loading() if loading is None else loading
    if not isinstance(loading, Loading):
        raise ValueError(f"loading={loading!r}; expected a jretrieval.steps.Loading")
    if len(ids) != len(paths):
        raise ValueError(f"ids has {len(ids)} entries for {len(paths)} paths")
    if bbx is not None and len(bbx) != len(paths):
        raise ValueError(f"bbx has {len(bbx)} boxes for {len(paths)} paths")
    store = None if store is None else os.fspath(store)
    if store is not None and key is None:
        key = store_key(encoder, paths, ids=ids, bbx=bbx, loading=loading, pooling=pooling,
                        user=settings)  # fmt: skip
    job = dict(loading=loading, bbx=bbx, ids=ids, desc=desc)
    if step is not None:
        if jax.process_count() > 1 or (mesh is not None and mesh_lib.mesh_size(mesh) > 1):
            raise ValueError("extract(step=...) runs on one device of one process; got a mesh")
        if store is not None and key is None:
            raise ValueError("extract(step=...) with a store needs its key (naming the step)")
        return _extract(step, 1, paths, store=store, key=key, **job)
    if jax.process_count() > 1:
        return _extract_multihost(encoder, paths, pooling, store=store, key=key, mesh=mesh, **job)
    local = None if mesh is None else mesh_lib.local_mesh(mesh)
    step = steps.make_step(encoder, pooling, mesh=local)
    return _extract(step, mesh_lib.mesh_size(local), paths, store=store, key=key, **job)


def _extract(
    step: Callable[[np.ndarray], jax.Array],
    devices: int,
    paths: list[str],
    *,
    loading: Loading,
    bbx: Sequence[Any] | None,
    ids: list[str],
    store: str | None,
    key: Mapping[str, Any] | None,
    desc: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The loop of one process, into an array or (under its writer lock) a store."""
    start = time.perf_counter()
    report = {"store": store, "reused": False, "resumed": 0, "skipped": [], "shapes": []}
    if store is None:
        return _loop(step, devices, paths, None, ids=ids, loading=loading, bbx=bbx,
                     report=report, start=start, desc=desc)  # fmt: skip
    found = store_lib.reuse(store, settings=key, locked=False)
    if found is None:
        with files.writer_lock(store, what="descriptor store"):
            found = store_lib.reuse(store, settings=key, locked=True)  # finished while we waited
            if found is None:
                return _loop(step, devices, paths, (store, key), ids=ids, loading=loading,
                             bbx=bbx, report=report, start=start, desc=desc)  # fmt: skip
    rows, _, info = found
    logging.info("reusing descriptor store %s (%d rows)", store, len(rows))
    report.update(reused=True, kept=info["kept"],
                  skipped=[(paths[i], m) for i, m in sorted(info["failed"].items())])  # fmt: skip
    return rows, _finish(report, start, 0)


def _loop(
    step: Callable[[np.ndarray], jax.Array],
    devices: int,
    paths: list[str],
    target: tuple[str, Mapping[str, Any]] | None,
    *,
    ids: list[str],
    loading: Loading,
    bbx: Sequence[Any] | None,
    report: dict[str, Any],
    start: float,
    desc: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    batch_size = loading.batch_size
    plan = images_lib.plan_batches(paths, bbx=bbx, policy=loading.policy, batch_size=batch_size)
    dim = _descriptor_dim(step, plan, batch_size, devices)
    if target is None:
        sink: _ArraySink | _StoreSink = _ArraySink(len(paths), dim)
    else:
        store, key = target
        sink = _StoreSink(store, ids, dim, key)
    report["resumed"] = int(sink.done.sum())
    if report["resumed"]:
        logging.info("resuming %s: %d of %d rows done", target[0], report["resumed"], len(paths))
    todo = [(shape, idx) for shape, idx in plan if not sink.done[idx].all()]
    shapes: set[tuple[int, ...]] = set()

    def commit(batch: images_lib.Batch, out: jax.Array | None) -> None:
        rows = np.zeros((0, dim), np.float32)
        if out is not None:
            rows = np.asarray(out, np.float32)[: len(batch.indices)]
            bad = ~np.isfinite(rows).all(axis=1)
            if bad.any():
                names = [paths[i] for i in batch.indices[bad]]
                raise FloatingPointError(f"non-finite descriptors for images {names}")
        sink.write(batch.indices, rows, batch.failed)

    batches = loading.iterate(paths, bbx=bbx, plan=todo)
    remaining = sum(len(idx) for _, idx in todo)
    inflight = None
    try:
        count = lambda b: len(b.indices) + len(b.failed)
        for batch in track(batches, total=remaining, desc=desc, count=count):
            out = None
            if len(batch.indices):
                b = len(batch.indices)
                padded = batch.images
                size = steps.padded_batch_size(b, batch_size, devices)
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
    except BaseException as err:
        batches.close()  # cancel the decoding queued ahead
        if inflight is not None and not isinstance(err, store_lib.StoreWriteError):
            try:  # keep the last finished batch for the resumed run
                commit(*inflight)
            except Exception as late:  # the original error is the one to raise
                logging.warning("could not save the last batch before stopping: %s", late)
        if isinstance(sink, _StoreSink):
            sink.close()  # the .partial file stays for the next run to resume
        raise
    report["shapes"] = sorted(shapes)
    if isinstance(sink, _ArraySink):
        kept = np.asarray([i for i in range(len(paths)) if i not in sink.failed], np.int64)
        report.update(kept=kept, skipped=[(paths[i], m) for i, m in sorted(sink.failed.items())])
        if report["skipped"]:
            logging.warning("skipped %d unreadable images: %s", len(sink.failed), report["skipped"])
        return sink.rows[kept], _finish(report, start, remaining)
    try:
        store_lib.finalize(sink.file, store)
    finally:
        sink.close()
    rows, _, info = store_lib.read_store(store, settings=key)
    report.update(kept=info["kept"],
                  skipped=[(paths[i], m) for i, m in sorted(info["failed"].items())])  # fmt: skip
    return rows, _finish(report, start, remaining)


def _descriptor_dim(step: Callable, plan: Sequence, batch_size: int, multiple: int) -> int:
    """``D`` from ``jax.eval_shape`` of the step on the first planned shape (no compute)."""
    for (height, width), idx in plan:
        if height > 0:
            size = steps.padded_batch_size(len(idx), batch_size, multiple)
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


# ------------------------------------------------------------------------- several processes


def _extract_multihost(
    encoder: Any,
    paths: list[str],
    pooling: Pooling,
    *,
    store: str | None,
    key: Mapping[str, Any] | None,
    mesh: Mesh | None,
    loading: Loading,
    bbx: Sequence[Any] | None,
    ids: list[str],
    desc: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    p, count = jax.process_index(), jax.process_count()
    local = mesh_lib.local_mesh(mesh)
    step = steps.make_step(encoder, pooling, mesh=local)
    devices = mesh_lib.mesh_size(local)
    exists = store is not None and os.path.exists(store)
    exists = bool(multihost_utils.broadcast_one_to_all(np.asarray(exists)))
    if exists:
        if not os.path.exists(store):
            raise FileNotFoundError(
                f"process {p}: descriptor store {store} exists on process 0 but not here; a "
                "multi-host run needs the store on a filesystem every process sees"
            )
        return _extract(step, devices, paths, loading=loading, bbx=bbx, ids=ids, store=store,
                        key=key, desc=desc)  # fmt: skip
    sl = mesh_lib.process_slice(len(paths))
    part = None if store is None else f"{store}.part{p}of{count}"
    rep: dict[str, Any] = {}
    if sl.stop > sl.start:
        part_key = None if key is None else {**key, "process_slice": [sl.start, sl.stop]}
        rows, rep = _extract(
            step, devices, paths[sl], bbx=None if bbx is None else bbx[sl], ids=ids[sl],
            store=part, key=part_key, desc=f"{desc} [process {p}/{count}]", loading=loading,
        )  # fmt: skip
        kept = np.asarray(rep["kept"], np.int64) + sl.start
        skipped = [list(s) for s in rep["skipped"]]
    else:  # more processes than images
        rows, kept, skipped = np.zeros((0, 0), np.float32), np.zeros(0, np.int64), []
    dim = int(np.asarray(multihost_utils.process_allgather(np.asarray([rows.shape[1]]))).max())
    if rows.shape[1] != dim:
        rows = np.zeros((len(rows), dim), np.float32)
    all_rows = mesh_lib.allgather_rows(np.asarray(rows, np.float32))
    all_kept = mesh_lib.allgather_rows(kept)
    all_skipped = [tuple(s) for part_s in mesh_lib.allgather_json(skipped) for s in part_s]
    report = {
        "store": store, "reused": False, "resumed": int(rep.get("resumed", 0)),
        "skipped": all_skipped, "shapes": rep.get("shapes", []), "kept": all_kept,
        "seconds": rep.get("seconds", 0.0), "images_per_s": rep.get("images_per_s", 0.0),
        "processes": count,
    }  # fmt: skip
    if store is not None:
        if p == 0:
            _write_gathered(store, key, paths, ids, all_rows, all_kept, all_skipped)
        multihost_utils.sync_global_devices(f"jretrieval store written: {store}")
        if part is not None and os.path.exists(part):
            os.remove(part)
    return all_rows, report


def _write_gathered(
    store: str,
    key: Mapping[str, Any],
    paths: list[str],
    ids: list[str],
    rows: np.ndarray,
    kept: np.ndarray,
    skipped: list[tuple[str, str]],
) -> None:
    """Process 0: the single-process store (same key, ids, order) from gathered rows."""
    index = {path: i for i, path in enumerate(paths)}
    failed = [(index[path], msg) for path, msg in skipped]
    with files.writer_lock(store, what="descriptor store"):
        f = store_lib.open_for_writing(store, ids=ids, dim=rows.shape[1], settings=key)
        try:
            for start in range(0, max(len(kept), 1), mesh_lib.GATHER_ROWS):
                sel = slice(start, start + mesh_lib.GATHER_ROWS)
                store_lib.mark_batch(f, kept[sel], rows[sel], failed if start == 0 else ())
            store_lib.finalize(f, store)
        finally:
            if f.id.valid:
                f.close()
    logging.info("wrote %s (%d rows from %d processes)", store, len(kept), jax.process_count())
