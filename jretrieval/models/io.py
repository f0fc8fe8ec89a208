"""The converted-encoder file: one HDF5 per model, read and written here.

Layout (all arrays float32, stored in the Flax layout, e.g. conv kernels HWIO ``[kh,kw,in,out]``):

```
/variables/<collection>/<module>/.../<name>   datasets, e.g. /variables/params/layer1_0/conv1/kernel
attrs: format = "jretrieval-encoder", format_version = 1,
       architecture, preprocessing, metadata  (JSON strings)
       name, depth, width, source, sha256      (copies for h5dump / h5ls users, when known)
```

Writes are atomic: a temporary file (``.tmp-*.h5``) in the target folder, then ``os.replace``;
nothing is left behind on failure. Files are created with the user's umask (0644 under 022).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

FORMAT = "jretrieval-encoder"
FORMAT_VERSION = 1

_CHUNK = 1 << 20


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


def _create_temporary(folder: str) -> str:
    """A new empty ``.tmp-*.h5`` file in ``folder``, created with the user's umask.

    ``tempfile.mkstemp`` would create it 0600, and ``os.replace`` keeps that mode, so converted
    and BN files were unreadable to the group; ``os.open(..., 0o666)`` lets the umask decide.
    """
    while True:
        tmp = os.path.join(folder, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}.h5")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # pragma: no cover - a 48-bit name collision
            continue


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
    tmp = _create_temporary(folder)
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


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _open(path: str) -> h5py.File:
    """The encoder file open for reading, its format checked; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder file {path!r} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"encoder file {path!r} is not a readable HDF5 file: {err}") from err
    if f.attrs.get("format") != FORMAT or "variables" not in f:
        found = f.attrs.get("format")
        f.close()
        raise ValueError(
            f"{path!r} is not a {FORMAT} file (attribute format={found!r}); "
            "convert checkpoints with `python -m weight_conversion`"
        )
    version = int(f.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        f.close()
        raise ValueError(f"{path!r} has format_version {version}; expected {FORMAT_VERSION}")
    return f


def _json_attr(f: h5py.File, key: str, path: str) -> dict:
    try:
        value = json.loads(f.attrs[key])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path!r}: attribute {key!r} is missing or not JSON ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path!r}: attribute {key!r} is {value!r}; expected a JSON object")
    return value


def read_architecture(path: str | os.PathLike) -> dict[str, Any]:
    """The ``architecture`` an encoder file states, from its attributes only (no weights read).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file, as ``read`` does.
    """
    path = os.fspath(path)
    with _open(path) as f:
        return _json_attr(f, "architecture", path)


def read(path: str | os.PathLike) -> tuple[dict, dict, dict, dict]:
    """Reads an encoder file; returns ``(architecture, variables, preprocessing, metadata)``.

    ``variables`` holds float32 NumPy arrays. Raises ``FileNotFoundError`` / ``ValueError``
    naming the file when it is missing, not HDF5, or not an encoder file.
    """
    path = os.fspath(path)
    with _open(path) as f:
        flat: dict[str, np.ndarray] = {}

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                flat[name] = obj[()]

        f["variables"].visititems(visit)
        architecture = _json_attr(f, "architecture", path)
        preprocessing = _json_attr(f, "preprocessing", path)
        metadata = _json_attr(f, "metadata", path)
    return architecture, unflatten(flat), preprocessing, metadata
