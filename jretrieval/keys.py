"""Cache keys: everything a stored result depends on, computed once and passed down.

A key is a JSON-able dict; its canonical JSON (``store.canonical_json``) is stored beside the
numbers and its digest names the file (``store.store_path``), so different inputs give a
different file and a file is reused only for exactly the inputs it was computed from.

Both caches of a run use the same three ingredients:

- ``files_digest(paths)``: each image file's path, size and modification time (``st_mtime_ns``);
  a file rewritten in place changes it (content hashing would read every image twice on a
  dataset of 100k images; size + mtime is what ``make`` and ``rsync`` trust);
- ``variables_digest(variables)``: the weights and BN statistics, leaf by leaf (path, dtype,
  shape, bytes);
- every setting the numbers depend on (image list and boxes, resize policy, batch size, mode...).

``bn_key`` keys the recalibrated BN statistics (``<workdir>/bn/``); ``extraction_key`` keys a
descriptor store (``<workdir>/descriptors/``). The caller (``experiment``) computes each digest
once per encoder and file list and hands the key to ``extract.extract`` and to
``recalibration``; nothing below recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

__all__ = ["bn_key", "extraction_key", "files_digest", "ids_digest", "variables_digest"]


def variables_digest(variables: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes (identifies the weights and stats)."""
    h = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(variables).items()):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{'/'.join(map(str, path))}:{arr.dtype}:{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def files_digest(paths: Sequence[str]) -> str:
    """SHA-256 over every file's path, size and modification time in ns (``-1`` if missing)."""
    h = hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(path)
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns};".encode())
        except OSError:
            h.update(f"{path}:-1;".encode())
    return h.hexdigest()


def _json_digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _boxes(bbx: Sequence[Any] | None) -> list | None:
    return None if bbx is None else [None if b is None else [float(v) for v in b] for b in bbx]


def ids_digest(ids: Sequence[str], bbx: Sequence[Any] | None = None) -> str:
    """SHA-256 of the image ids (in order) and their crop boxes (``None``: uncropped)."""
    return _json_digest({"ids": list(ids), "bbx": _boxes(bbx)})


def _encoder_part(encoder: Any, weights: str) -> dict[str, Any]:
    return {
        "architecture": dict(getattr(encoder, "architecture", {}) or {}),
        "module": repr(encoder.module),
        "preprocessing": {k: list(map(float, v)) for k, v in encoder.preprocessing.items()},
        "variables_sha256": weights,
    }


def extraction_key(
    encoder: Any,
    *,
    weights: str,
    files: str,
    ids: Sequence[str],
    bbx: Sequence[Any] | None,
    policy: Mapping[str, Any],
    pooling: Mapping[str, Any],
    user: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The key of a descriptor store (stored as its ``settings`` attribute).

    Args:
      encoder: the encoder as extracted (module, preprocessing, architecture).
      weights: ``variables_digest(encoder.variables)`` (computed once by the caller).
      files: ``files_digest(paths)`` of the images extracted.
      ids, bbx: the image ids in row order and their boxes (``None``: no crop).
      policy: ``ResizePolicy.to_dict()``.
      pooling: ``steps.Pooling(...).to_dict()``.
      user: the caller's labels (model, dataset, part...), stored as ``"user"``.
    """
    return {
        "user": dict(user or {}),
        **_encoder_part(encoder, weights),
        "policy": dict(policy),
        **dict(pooling),
        "n_images": len(ids),
        "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "files_sha256": files,
        "bbx_sha256": _json_digest({"bbx": _boxes(bbx)}),
    }


def bn_key(
    encoder: Any,
    *,
    weights: str,
    files: str,
    ids: Sequence[str],
    bbx: Sequence[Any] | None,
    policy: Mapping[str, Any],
    mode: str,
    momentum: float | None,
    batch_size: int,
) -> dict[str, Any]:
    """The key of recalibrated BN statistics: the weights recalibrated (``weights`` is the digest
    *before* recalibration), the images (ids, boxes, files), and every setting of the pass."""
    return {
        **_encoder_part(encoder, weights),
        "ids": ids_digest(ids, bbx),
        "files_sha256": files,
        "mode": mode,
        "momentum": momentum if mode == "pytorch" else None,
        "batch_size": int(batch_size),
        "policy": dict(policy),
    }
