"""The HDF5 descriptor store: one file per (model, dataset, settings), resumable, never stale.

Shape convention: ``descriptors`` is ``float32 [N, D]``, one row per image of the extraction's
path list, in that order; ``ids`` is ``[N]`` UTF-8 strings (the image ids).

File layout (``FORMAT`` 1):

- datasets ``descriptors [N, D] float32``, ``ids [N] str``, ``done [N] bool`` (row written),
  ``failed [N] bool`` (image skipped as unreadable; its row is NaN and excluded by readers);
- attributes ``settings`` (canonical JSON of everything that determines the numbers),
  ``settings_sha256``, ``completed`` (number of ``done`` rows), ``complete`` (bool),
  ``failed_messages`` (JSON ``{index: message}``), ``format``.

Protocol (``jretrieval.files``): only the holder of ``files.writer_lock(path)`` creates, resumes
or renames ``<path>.partial``; another run on the same workdir waits for it and then reuses the
finished store. The partial file is created whole under a temporary name and renamed; its
datasets are allocated in full when it is created (HDF5 ``ALLOC_TIME_EARLY``), so a full disk
fails then, with nothing written yet, and never half-way through a batch: later writes only
overwrite space the file already has. A run writes one batch at a time (rows, then ``done``, then
``completed``, then a flush); only after the last batch is ``complete`` set and the file renamed
to ``<path>`` with ``os.replace`` (atomic). So a file under the final name is always complete; an
interrupted run leaves only the ``.partial`` file, which the next run with identical settings
resumes (``done`` tells which rows remain). A store or partial that cannot be read (truncated,
killed in the middle of an HDF5 write, a final file marked incomplete) is moved aside
(``files.move_aside``, the path logged) and rebuilt; a partial for other settings is moved aside
too. A complete file whose settings differ from the requested ones is an error, never silently
reused. A failed write raises ``StoreWriteError`` (an ``OSError``) naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from jretrieval import files

__all__ = [
    "FORMAT",
    "StoreCorruptError",
    "StoreMismatchError",
    "StoreWriteError",
    "canonical_json",
    "finalize",
    "mark_batch",
    "open_for_writing",
    "read_store",
    "reuse",
    "settings_digest",
    "store_path",
    "writing",
]

FORMAT = 1
PARTIAL_SUFFIX = ".partial"


class StoreMismatchError(ValueError):
    """A store file exists for other settings or other images."""


class StoreCorruptError(ValueError):
    """A store file cannot be read: truncated, not a store, or marked incomplete."""


class StoreWriteError(OSError):
    """Writing a cache file failed (a full disk, a file size limit, an I/O error)."""

    def __init__(self, path: str, err: BaseException, what: str = "descriptor store") -> None:
        code = getattr(err, "errno", None)
        kept = (
            "the rows written so far are kept and the extraction resumes from them"
            if what == "descriptor store"
            else "nothing was written under the final name"
        )
        self.message = (
            f"could not write {what} {path}: {err}; free space (or lift the limit) and rerun: "
            f"{kept}"
        )
        super().__init__(code or errno.EIO, self.message)
        self.path = path

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def writing(path: str, what: str = "descriptor store") -> Iterator[None]:
    """Turns HDF5 write failures (``OSError``, ``RuntimeError``) into ``StoreWriteError``."""
    try:
        yield
    except StoreWriteError:
        raise
    except (OSError, RuntimeError) as err:
        raise StoreWriteError(path, err, what) from err


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
      StoreCorruptError: the file cannot be read, is not a descriptor store, or is incomplete.
      StoreMismatchError: ``settings`` differ from the stored ones.
    """
    path = os.fspath(path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT or "descriptors" not in f:
                raise StoreCorruptError(
                    f"{path} is not a jretrieval descriptor store (format {FORMAT})"
                )
            if not bool(f.attrs.get("complete", False)):
                raise StoreCorruptError(
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
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise StoreCorruptError(f"descriptor store {path} cannot be read ({err})") from err
    return desc, [ids[i] for i in kept], info


def reuse(
    path: str, *, settings: Mapping[str, Any], locked: bool
) -> tuple[np.ndarray, list[str], dict[str, Any]] | None:
    """``read_store(path, settings=settings)`` if ``path`` exists and is readable, else ``None``.

    A corrupt file is moved aside (``files.move_aside``) only by the holder of the writer lock
    (``locked=True``); without it ``None`` tells the caller to take the lock and look again.
    Other settings raise ``StoreMismatchError`` (never silently reused).
    """
    if not os.path.exists(path):
        return None
    try:
        return read_store(path, settings=settings)
    except StoreCorruptError as err:
        if locked:
            files.move_aside(path, str(err))
        return None


def _create_partial(
    path: str, *, ids: Sequence[str], dim: int, settings: Mapping[str, Any]
) -> h5py.File:
    """Creates ``<path>.partial`` whole (temp name, every dataset allocated, then rename)."""
    partial = path + PARTIAL_SUFFIX
    n = len(ids)

    def early() -> Any:  # one property list per dataset: h5py sets its chunks on it
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        return dcpl

    with writing(partial), files.atomic_write(partial) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(
                "descriptors",
                shape=(n, dim),
                dtype=np.float32,
                chunks=(max(1, min(n, 1024)), dim) if n and dim else None,
                fillvalue=np.nan,
                dcpl=early(),
            )
            f.create_dataset(
                "ids", data=np.asarray(list(ids), dtype=object), dtype=h5py.string_dtype()
            )
            f.create_dataset("done", shape=(n,), dtype=bool, fillvalue=False, dcpl=early())
            f.create_dataset("failed", shape=(n,), dtype=bool, fillvalue=False, dcpl=early())
            f.attrs["format"] = FORMAT
            f.attrs["settings"] = canonical_json(settings)
            f.attrs["settings_sha256"] = settings_digest(settings)
            f.attrs["completed"] = 0
            f.attrs["complete"] = False
            f.attrs["failed_messages"] = "{}"
    with writing(partial):
        return h5py.File(partial, "r+")


def _open_partial(
    path: str, *, ids: Sequence[str], dim: int, settings: Mapping[str, Any]
) -> h5py.File | None:
    """``<path>.partial`` opened for resuming if it matches; ``None`` (moved aside) if not."""
    partial = path + PARTIAL_SUFFIX
    if not os.path.exists(partial):
        return None
    try:
        f = h5py.File(partial, "r+")
    except OSError as err:
        if getattr(err, "errno", None) in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise RuntimeError(
                f"partial store {partial} is open for writing by another process that does not "
                f"take {partial[: -len(PARTIAL_SUFFIX)]}{files.LOCK_SUFFIX}; stop it first"
            ) from err
        files.move_aside(partial, f"unreadable partial store: {err}")
        return None
    try:
        _check_settings(f, partial, settings)
        stored_ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["ids"][...]]
        if stored_ids != list(ids) or f["descriptors"].shape != (len(ids), dim):
            raise StoreMismatchError(f"{partial}: other images or descriptor size")
        np.asarray(f["done"][...], bool)  # readable to its end
    except (StoreMismatchError, KeyError, OSError, json.JSONDecodeError) as err:
        f.close()
        files.move_aside(partial, f"partial store for other settings or damaged: {err}")
        return None
    return f


def open_for_writing(
    path: str, *, ids: Sequence[str], dim: int, settings: Mapping[str, Any]
) -> h5py.File:
    """``<path>.partial`` resumed if it matches, else created; the caller holds
    ``files.writer_lock(path)``."""
    f = _open_partial(path, ids=ids, dim=dim, settings=settings)
    return f if f is not None else _create_partial(path, ids=ids, dim=dim, settings=settings)


def mark_batch(
    f: h5py.File,
    indices: np.ndarray,
    rows: np.ndarray,
    failed: Sequence[tuple[int, str]] = (),
) -> None:
    """Writes one batch's rows (``indices`` ascending) and failures, then the counters; flushes.

    Raises:
      StoreWriteError: the write failed (the rows of earlier batches stay in the file).
    """
    with writing(f.filename):
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
    with writing(f.filename):
        f.attrs["complete"] = True
        f.flush()
        f.close()
        os.replace(path + PARTIAL_SUFFIX, path)
