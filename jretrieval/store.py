"""The HDF5 descriptor store: one file per (model, dataset, settings), resumable, never stale.

Shape convention: ``descriptors`` is ``float32 [N, D]``, one row per image of the extraction's
path list, in that order; ``ids`` is ``[N]`` UTF-8 strings (the image ids).

File layout (``FORMAT`` 1):

- datasets ``descriptors [N, D] float32``, ``ids [N] str``, ``done [N] bool`` (row written),
  ``failed [N] bool`` (image skipped as unreadable; its row is NaN and excluded by readers);
- attributes ``settings`` (canonical JSON of everything that determines the numbers),
  ``settings_sha256``, ``completed`` (number of ``done`` rows), ``complete`` (bool),
  ``failed_messages`` (JSON ``{index: message}``), ``format``.

Protocol: a run writes ``<path>.partial``, one batch at a time (rows, then ``done``, then
``completed``, then a flush); only after the last batch is ``complete`` set and the file renamed to
``<path>`` with ``os.replace`` (atomic). So a file under the final name is always complete; an
interrupted run leaves only the ``.partial`` file, which the next run with identical settings
resumes (``done`` tells which rows remain). A ``.partial`` that cannot be opened (killed in the
middle of an HDF5 write) or whose settings differ is discarded and started afresh. A complete
file whose settings differ from the requested ones is an error, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import numpy as np
from absl import logging

__all__ = [
    "FORMAT",
    "StoreMismatchError",
    "canonical_json",
    "create_partial",
    "open_partial",
    "read_store",
    "settings_digest",
    "store_path",
]

FORMAT = 1
PARTIAL_SUFFIX = ".partial"


class StoreMismatchError(ValueError):
    """A store file exists for other settings or other images."""


def canonical_json(settings: Mapping[str, Any]) -> str:
    """Sorted-key JSON (numpy scalars/arrays and tuples as plain JSON); raises on other types."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        raise TypeError(f"settings value {obj!r} of type {type(obj).__name__} is not JSON")

    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=default)


def settings_digest(settings: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of ``canonical_json(settings)``."""
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()


def store_path(directory: str | os.PathLike, *, model: str, dataset: str, settings: Mapping) -> str:
    """``<directory>/<model>__<dataset>__<digest[:12]>.h5``: different settings, different file."""
    clean = [re.sub(r"[^A-Za-z0-9_.-]+", "-", s) for s in (model, dataset)]
    digest = settings_digest(settings)[:12]
    return os.path.join(os.fspath(directory), f"{clean[0]}__{clean[1]}__{digest}.h5")


def _diff(stored: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(stored) | set(wanted))
    out = []
    for key in keys:
        a, b = stored.get(key, "<absent>"), wanted.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _diff(a, b, f"{prefix}{key}.")
        elif canonical_json({"v": a}) != canonical_json({"v": b}):
            shown_a, shown_b = (
                repr(v) if len(repr(v)) < 80 else repr(v)[:77] + "..." for v in (a, b)
            )
            out.append(f"{prefix}{key}: stored {shown_a}, requested {shown_b}")
    return out


def _check_settings(f: h5py.File, path: str, settings: Mapping[str, Any]) -> None:
    stored = json.loads(f.attrs["settings"])
    wanted = json.loads(canonical_json(settings))
    if stored != wanted:
        diff = "; ".join(_diff(stored, wanted)[:8])
        raise StoreMismatchError(
            f"descriptor store {path} was written with other settings ({diff}); use a path per "
            "settings (jretrieval.store.store_path) or delete the file"
        )


def read_store(
    path: str | os.PathLike, *, settings: Mapping[str, Any] | None = None
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Reads a complete store.

    Args:
      path: the final (not ``.partial``) file.
      settings: if given, must equal the stored settings (``StoreMismatchError`` otherwise).

    Returns:
      ``(descriptors float32 [N_kept, D], ids [N_kept], info)`` where rows of skipped images are
      left out and ``info = {"settings", "kept" int64 [N_kept], "failed": {index: message},
      "n": N}``.

    Raises:
      ValueError: the file is not complete (an interrupted run), or not a descriptor store.
    """
    path = os.fspath(path)
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT or "descriptors" not in f:
            raise ValueError(f"{path} is not a jretrieval descriptor store (format {FORMAT})")
        if not bool(f.attrs.get("complete", False)):
            raise ValueError(
                f"descriptor store {path} is incomplete ({int(f.attrs['completed'])} of "
                f"{f['descriptors'].shape[0]} rows); rerun the extraction to resume it"
            )
        if settings is not None:
            _check_settings(f, path, settings)
        failed = np.asarray(f["failed"][...], bool)
        kept = np.flatnonzero(~failed)
        desc = np.asarray(f["descriptors"][...], np.float32)[kept]
        ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["ids"][...]]
        info = {
            "settings": json.loads(f.attrs["settings"]),
            "kept": kept,
            "failed": {int(k): v for k, v in json.loads(f.attrs["failed_messages"]).items()},
            "n": len(failed),
        }
    return desc, [ids[i] for i in kept], info


def create_partial(
    path: str, *, ids: Sequence[str], dim: int, settings: Mapping[str, Any]
) -> h5py.File:
    """Creates ``<path>.partial`` (atomically: temp name, then rename) and opens it ``r+``."""
    partial = path + PARTIAL_SUFFIX
    tmp = partial + ".tmp"
    n = len(ids)
    with h5py.File(tmp, "w") as f:
        f.create_dataset(
            "descriptors",
            shape=(n, dim),
            dtype=np.float32,
            chunks=(max(1, min(n, 1024)), dim) if n else None,
            fillvalue=np.nan,
        )
        f.create_dataset("ids", data=np.asarray(list(ids), dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("done", shape=(n,), dtype=bool, fillvalue=False)
        f.create_dataset("failed", shape=(n,), dtype=bool, fillvalue=False)
        f.attrs["format"] = FORMAT
        f.attrs["settings"] = canonical_json(settings)
        f.attrs["settings_sha256"] = settings_digest(settings)
        f.attrs["completed"] = 0
        f.attrs["complete"] = False
        f.attrs["failed_messages"] = "{}"
    os.replace(tmp, partial)
    return h5py.File(partial, "r+")


def open_partial(
    path: str, *, ids: Sequence[str], dim: int, settings: Mapping[str, Any]
) -> h5py.File | None:
    """Opens ``<path>.partial`` for resuming if it matches; ``None`` (after removing it) if not."""
    partial = path + PARTIAL_SUFFIX
    if not os.path.exists(partial):
        return None
    try:
        f = h5py.File(partial, "r+")
    except OSError as err:
        logging.warning("discarding unreadable partial store %s (%s)", partial, err)
        os.remove(partial)
        return None
    try:
        _check_settings(f, partial, settings)
        stored_ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["ids"][...]]
        if stored_ids != list(ids) or f["descriptors"].shape != (len(ids), dim):
            raise StoreMismatchError(f"{partial}: other images or descriptor size")
    except (StoreMismatchError, KeyError) as err:
        f.close()
        logging.warning("discarding partial store %s that does not match (%s)", partial, err)
        os.remove(partial)
        return None
    return f


def mark_batch(
    f: h5py.File,
    indices: np.ndarray,
    rows: np.ndarray,
    failed: Sequence[tuple[int, str]] = (),
) -> None:
    """Writes one batch's rows (``indices`` ascending) and failures, then the counters; flushes."""
    if len(indices):
        f["descriptors"][indices] = rows
    fail_idx = np.asarray(sorted(i for i, _ in failed), np.int64)
    if len(fail_idx):
        f["failed"][fail_idx] = True
        messages = json.loads(f.attrs["failed_messages"])
        messages.update({str(i): msg for i, msg in failed})
        f.attrs["failed_messages"] = json.dumps(messages, sort_keys=True)
    done = np.union1d(np.asarray(indices, np.int64), fail_idx)
    if len(done):
        newly = int(np.count_nonzero(~f["done"][done]))
        f["done"][done] = True
        f.attrs["completed"] = int(f.attrs["completed"]) + newly
    f.flush()


def finalize(f: h5py.File, path: str) -> None:
    """Marks a fully written ``.partial`` file complete, closes it, renames it to ``path``."""
    done = np.asarray(f["done"][...], bool)
    if not done.all():
        raise RuntimeError(f"{f.filename}: {np.count_nonzero(~done)} rows not written")
    f.attrs["complete"] = True
    f.flush()
    f.close()
    os.replace(path + PARTIAL_SUFFIX, path)
