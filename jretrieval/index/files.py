"""The on-disk index: one directory, a format version, written atomically, checked on load.

Layout of ``INDEX_DIR`` (format ``FORMAT``)::

    manifest.json    format, model (name, source, weights digest, pooling), every setting,
                     sizes, the images root, the byte size of every other file, diffusion params
    database.npy     float32 [N, d]: post-processed database descriptors (L2, PCA-whitening,
                     L2, DBA when asked), row i is paths.txt line i
    paths.txt        N image paths relative to the images root, UTF-8, one per line
    whitening.npz    mean [C], projection [C, K], eigenvalues [K]   (absent: --pca_dim=0)
    bn_stats.npz     the recalibrated BatchNorm statistics, keys "layer/.../mean"  (--bn=none:
                     absent; the weights themselves stay in the checkpoint, named by digest)
    diffusion.npz    indices [N, T] int32, values [N, T] float32: the offline diffusion matrix
                     (only with --diffusion)

Every array is read with ``allow_pickle=False`` (no code runs from an index file). ``write``
builds the whole directory beside the target (``INDEX_DIR.tmp``) and swaps it in with renames,
so a failed or interrupted build leaves an existing index as it was. ``read`` refuses a
directory of another format version, a missing file or one whose size differs from the
manifest's (truncated), naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

__all__ = ["FORMAT", "IndexFileError", "MANIFEST", "read", "write"]

FORMAT = 1
MANIFEST = "manifest.json"
KIND = "jretrieval-index"


class IndexFileError(ValueError):
    """An index directory that cannot be read: missing, truncated or of another format."""


def flatten_tree(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A nested dict of arrays (BN statistics) as ``{"a/b/c": array}`` for ``np.savez``."""
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def unflatten_tree(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The inverse of ``flatten_tree``."""
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def write(
    out: str,
    *,
    manifest: Mapping[str, Any],
    database: np.ndarray,
    paths: Sequence[str],
    whitening: Mapping[str, np.ndarray] | None,
    bn_stats: Mapping[str, Any] | None,
    diffusion: Mapping[str, np.ndarray] | None,
) -> None:
    """Writes the index directory ``out`` atomically (see the module docstring)."""
    out = os.path.abspath(out)
    tmp, old = out + ".tmp", out + ".old"
    for leftover in (tmp, old):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)
    if os.path.exists(out) and not os.path.isdir(out):
        raise IndexFileError(f"--out={out!r} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, MANIFEST)):
        raise IndexFileError(f"--out={out!r} is a non-empty directory that is not an index")
    os.makedirs(tmp)
    try:
        np.save(os.path.join(tmp, "database.npy"), np.asarray(database, np.float32))
        with open(os.path.join(tmp, "paths.txt"), "w", encoding="utf-8") as f:
            f.writelines(p + "\n" for p in paths)
        if whitening is not None:
            np.savez(os.path.join(tmp, "whitening.npz"), **whitening)
        if bn_stats is not None:
            np.savez(os.path.join(tmp, "bn_stats.npz"), **flatten_tree(bn_stats))
        if diffusion is not None:
            np.savez(os.path.join(tmp, "diffusion.npz"), **diffusion)
        sizes = {n: os.path.getsize(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
        full = {"format": FORMAT, "kind": KIND, **manifest, "files": sizes}
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(full, f, indent=1, sort_keys=True)
        if os.path.isdir(out):
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(old) and not os.path.exists(out):
            os.replace(old, out)  # put the previous index back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _manifest(path: str) -> dict[str, Any]:
    name = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise IndexFileError(f"--index={path!r} is not a directory (expected an index directory)")
    if not os.path.isfile(name):
        raise IndexFileError(f"{name} is missing: {path!r} is not a jretrieval index directory")
    try:
        with open(name, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IndexFileError(f"{name} is truncated or not JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise IndexFileError(f"{name} is not a jretrieval index manifest")
    version = manifest.get("format")
    if version != FORMAT:
        newer = isinstance(version, int) and version > FORMAT
        raise IndexFileError(
            f"{name}: index format {version!r} "
            + ("is newer than this jretrieval reads" if newer else "is not the one this reads")
            + f" (format {FORMAT}); rebuild the index with this version"
        )
    return manifest


def _load(path: str, name: str, size: int) -> Any:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise IndexFileError(f"{file} is missing (the manifest lists it)")
    actual = os.path.getsize(file)
    if actual != size:
        raise IndexFileError(f"{file} is truncated or altered: {actual} bytes, expected {size}")
    try:
        if name.endswith(".npz"):
            with np.load(file, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if name.endswith(".npy"):
            return np.load(file, allow_pickle=False)
        with open(file, encoding="utf-8") as f:
            return f.read().splitlines()
    except (OSError, ValueError, EOFError) as err:
        raise IndexFileError(f"{file} cannot be read: {err}") from None


def read(path: str) -> dict[str, Any]:
    """The index directory ``path`` as a dict: ``manifest``, ``database``, ``paths``,
    ``whitening`` / ``bn_stats`` / ``diffusion`` (``None`` when absent)."""
    manifest = _manifest(path)
    files = manifest.get("files", {})
    for required in ("database.npy", "paths.txt"):
        if required not in files:
            raise IndexFileError(f"{os.path.join(path, MANIFEST)} lists no {required}")
    out: dict[str, Any] = {"manifest": manifest}
    for name in ("database", "paths", "whitening", "bn_stats", "diffusion"):
        file = {"database": "database.npy", "paths": "paths.txt"}.get(name, name + ".npz")
        out[name] = _load(path, file, files[file]) if file in files else None
    n, d = manifest["count"], manifest["dim"]
    if out["database"].shape != (n, d) or len(out["paths"]) != n:
        raise IndexFileError(
            f"{path}: database.npy {out['database'].shape} and {len(out['paths'])} paths do "
            f"not match the manifest's {n} x {d}"
        )
    if out["bn_stats"] is not None:
        out["bn_stats"] = unflatten_tree(out["bn_stats"])
    return out
