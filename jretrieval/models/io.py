"""The converted-encoder file: one HDF5 per model, read and written here.

Layout (all arrays float32, stored in the Flax layout, e.g. conv kernels HWIO ``[kh,kw,in,out]``):

```
/variables/<collection>/<module>/.../<name>   datasets, e.g. /variables/params/layer1_0/conv1/kernel
attrs: format = "jretrieval-encoder", format_version = 1,
       architecture, preprocessing, metadata  (JSON strings)
       name, depth, width, source, sha256      (copies for h5dump / h5ls users, when known)
```

Writes are atomic: a temporary file in the target folder, then ``os.replace``; nothing is left
behind on failure.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

FORMAT = "jretrieval-encoder"
FORMAT_VERSION = 1


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to ``{"a/b/c": leaf}``."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` to nested dicts."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def save(
    path: str | os.PathLike,
    architecture: Mapping[str, Any],
    variables: Mapping[str, Any],
    preprocessing: Mapping[str, Any],
    metadata: Mapping[str, Any],
) -> None:
    """Writes an encoder file atomically (temp file + ``os.replace``).

    Args:
      path: the ``.h5`` file to write; its folder must exist.
      architecture: ``{"name": ..., **constructor kwargs}`` (JSON-serialisable).
      variables: ``{"params": {...}, "batch_stats": {...}, ...}`` of arrays; each is written as
        float32, one leaf at a time (a non-contiguous view is copied only while it is written).
      preprocessing: ``{"mean": [3], "std": [3]}`` for RGB in [0, 1].
      metadata: JSON-serialisable provenance (source file, SHA-256, format...).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"save: folder {folder!r} of output {path!r} does not exist")
    attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": json.dumps(dict(architecture), sort_keys=True),
        "preprocessing": json.dumps(dict(preprocessing), sort_keys=True),
        "metadata": json.dumps(dict(metadata), sort_keys=True),
    }
    for key in ("name", "depth", "width"):
        if key in architecture:
            attrs[key] = architecture[key]
    for key in ("source", "sha256"):
        if key in metadata:
            attrs[key] = metadata[key]
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".h5")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(attrs)
            group = f.create_group("variables")
            for key, value in flatten(variables).items():
                group.create_dataset(key, data=np.asarray(value, dtype=np.float32))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read(path: str | os.PathLike) -> tuple[dict, dict, dict, dict]:
    """Reads an encoder file; returns ``(architecture, variables, preprocessing, metadata)``.

    ``variables`` holds float32 NumPy arrays. Raises ``FileNotFoundError`` / ``ValueError``
    naming the file when it is missing, not HDF5, or not an encoder file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder file {path!r} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"encoder file {path!r} is not a readable HDF5 file: {err}") from err
    with f:
        if f.attrs.get("format") != FORMAT or "variables" not in f:
            raise ValueError(
                f"{path!r} is not a {FORMAT} file (attribute format={f.attrs.get('format')!r}); "
                "convert checkpoints with `python -m weight_conversion`"
            )
        version = int(f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise ValueError(f"{path!r} has format_version {version}; expected {FORMAT_VERSION}")
        flat: dict[str, np.ndarray] = {}

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                flat[name] = obj[()]

        f["variables"].visititems(visit)
        architecture = json.loads(f.attrs["architecture"])
        preprocessing = json.loads(f.attrs["preprocessing"])
        metadata = json.loads(f.attrs["metadata"])
    return architecture, unflatten(flat), preprocessing, metadata
