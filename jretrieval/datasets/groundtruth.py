"""Ground-truth files of the retrieval benchmarks, read without executing code.

Shape convention: a :class:`GroundTruth` holds ``N`` database names (``imlist``), ``Q`` query
names (``qimlist``) and ``Q`` dicts (``gnd``) whose index arrays are 1-D int64, 0-based positions
in ``imlist``; ``bbx`` is ``(x1, y1, x2, y2)`` in pixels of the full query image, or ``None``.

* cirtorch / revisitop pickles (``gnd_oxford5k.pkl``, ``gnd_paris6k.pkl``: ``ok``, ``junk``,
  ``bbx``; ``gnd_roxford5k.pkl``, ``gnd_rparis6k.pkl``: ``easy``, ``hard``, ``junk``, ``bbx``):
  ``load_gnd``. Names carry no extension (the datasets append ``.jpg``).
* INSTRE as distributed by Iscen et al. (CVPR 2017) for their diffusion code,
  ``gnd_instre.mat`` (MATLAB v5; 1250 queries, 27293 database images; ``imlist``, ``qimlist``
  cell arrays of relative paths with extension; ``gnd`` struct array with ``ok`` 1-based
  positives and ``bbx`` ``(x1, y1, x2, y2)``; no junk, queries are not database images):
  ``load_instre``. It also takes a pickle in the revisitop format (0-based).
* The revisitop 1M distractor list ``revisitop1m.txt`` (one relative path per line):
  ``load_distractors``. A folder of images: ``list_images``.

Pickles go through a restricted unpickler that resolves only builtin containers and scalars
and the handful of numpy functions that rebuild arrays, dtypes and scalars; anything else
(``os.system``, ``subprocess``, arbitrary classes) is refused before it is called.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "GroundTruth",
    "UnsafePickleError",
    "list_images",
    "load_distractors",
    "load_gnd",
    "load_instre",
]

#: file suffixes ``list_images`` treats as images (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

_INDEX_KEYS = ("ok", "junk", "easy", "hard")


class GroundTruth(NamedTuple):
    """A benchmark's image lists and per-query ground truth.

    Attributes:
      imlist: ``N`` database image names, as stored in the file.
      qimlist: ``Q`` query image names.
      gnd: ``Q`` dicts: ``ok`` and ``junk`` (classic, INSTRE) or ``easy``, ``hard`` and
        ``junk`` (revisited), each a 1-D int64 array of 0-based indices into ``imlist``
        (``junk`` is empty when the file has none), and ``bbx``: a tuple of 4 floats
        ``(x1, y1, x2, y2)`` or ``None``.
    """

    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A ground-truth pickle names something other than containers, scalars and arrays."""


def _numpy_rebuilders() -> dict[str, Any]:
    try:  # NumPy >= 2 (and the forward-compatibility shim of 1.26)
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - older NumPy
        from numpy.core import multiarray, numeric
    return {
        "_reconstruct": multiarray._reconstruct,
        "scalar": multiarray.scalar,
        "_frombuffer": numeric._frombuffer,
    }


_BUILTINS = {
    t.__name__: t
    for t in (list, dict, tuple, set, frozenset, bytearray, bytes, str, int, float, complex, bool)
}


def _allowed_global(module: str, name: str) -> Any | None:
    """The object a pickle may name as ``module.name``, or None when it is not allowed."""
    if module in ("builtins", "__builtin__"):
        return _BUILTINS.get(name)
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
        "_reconstruct",
        "scalar",
    ):
        return _numpy_rebuilders()[name]
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
        return _numpy_rebuilders()[name]
    if module == "_codecs" and name == "encode":  # how protocol 2 spells bytes objects
        import codecs

        return codecs.encode
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str):
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_global(module, name)
        if obj is None:
            raise UnsafePickleError(
                f"refusing to unpickle {module}.{name} from {self._path}: ground-truth files "
                "may contain only builtin containers and scalars (list, dict, tuple, set, str, "
                "int, float, bytes) and numpy arrays, dtypes and scalars"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"refusing persistent id {pid!r} in {self._path}: ground-truth files are self-contained"
        )


def _unpickle(path: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ground-truth file {path!r} does not exist")
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError) as e:
            raise ValueError(f"{path} is not a readable ground-truth pickle: {e}") from e


def _names(value: Any, key: str, path: str) -> list[str]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        raise ValueError(f"{path}: {key!r} must be a list of image names; got {type(value)}")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, np.ndarray) and v.size == 1:
            v = v.reshape(-1)[0]
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        if not isinstance(v, str):
            raise ValueError(f"{path}: {key}[{i}] is {type(v).__name__}; expected a str name")
        out.append(str(v))
    return out


def _indices(value: Any, *, key: str, query: int, n: int, path: str, offset: int = 0):
    """A list of image indices as a 1-D int64 array of 0-based positions in ``imlist``."""
    a = np.asarray(value)
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.dtype == bool or not (
        np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
    ):
        raise ValueError(f"{path}: gnd[{query}][{key!r}] has dtype {a.dtype}; expected integers")
    a = a.reshape(-1)
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a) & (a == np.round(a))):
        raise ValueError(f"{path}: gnd[{query}][{key!r}] holds non-integral values {a[:8]}")
    a = a.astype(np.int64) - offset
    bad = (a < 0) | (a >= n)
    if bad.any():
        base = "1-based " if offset else ""
        raise ValueError(
            f"{path}: gnd[{query}][{key!r}] holds {base}index {a[bad][0] + offset} outside "
            f"imlist (length {n}; array shape {a.shape})"
        )
    return a


def _check_disjoint(lists: Mapping[str, np.ndarray], *, query: int, path: str, offset: int):
    """Refuses an index listed twice in one list, or in two lists, of one query.

    A positive that is also junk (or easy and hard at once) has no defined place in the
    revisitop protocol, and a repeated positive would be counted twice by the metrics.
    """
    base = "1-based " if offset else ""
    for key, a in lists.items():
        values, counts = np.unique(a, return_counts=True)
        if (counts > 1).any():
            raise ValueError(
                f"{path}: gnd[{query}][{key!r}] lists {base}index "
                f"{int(values[counts > 1][0]) + offset} {int(counts.max())} times; expected "
                "each database image at most once per query"
            )
    keys = [k for k in ("ok", "easy", "hard", "junk") if k in lists]
    for n, first in enumerate(keys):
        for second in keys[n + 1 :]:
            both = np.intersect1d(lists[first], lists[second])
            if both.size:
                raise ValueError(
                    f"{path}: gnd[{query}] lists {base}index {int(both[0]) + offset} in both "
                    f"{first!r} and {second!r} ({both.size} shared); expected disjoint lists"
                )


def _bbx(value: Any, *, query: int, path: str) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    a = np.asarray(value)
    if a.size == 0:
        return None
    if a.size != 4 or not (np.issubdtype(a.dtype, np.number) and a.dtype != bool):
        raise ValueError(
            f"{path}: gnd[{query}]['bbx'] is {value!r} (shape {a.shape}); expected 4 numbers "
            "(x1, y1, x2, y2)"
        )
    x1, y1, x2, y2 = (float(v) for v in a.reshape(-1))
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        raise ValueError(
            f"{path}: gnd[{query}]['bbx'] = {(x1, y1, x2, y2)} is not a box (x1, y1, x2, y2) "
            "with x1 < x2 and y1 < y2"
        )
    return (x1, y1, x2, y2)


def _normalise(
    imlist: list[str], qimlist: list[str], gnd: Any, path: str, *, offset: int = 0
) -> GroundTruth:
    """Validates ``gnd`` against the lists; converts indices (minus ``offset``) to int64."""
    if isinstance(gnd, Mapping) or not isinstance(gnd, Sequence | np.ndarray):
        raise ValueError(f"{path}: 'gnd' must be a list of dicts; got {type(gnd).__name__}")
    if len(gnd) != len(qimlist):
        raise ValueError(
            f"{path}: 'gnd' has {len(gnd)} entries but 'qimlist' has {len(qimlist)} queries"
        )
    kind = None
    out = []
    for i, entry in enumerate(gnd):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{path}: gnd[{i}] is {type(entry).__name__}; expected a dict")
        this = "classic" if "ok" in entry else "revisited"
        needed = ("ok",) if this == "classic" else ("easy", "hard")
        missing = [k for k in needed if k not in entry]
        if missing:
            raise ValueError(
                f"{path}: gnd[{i}] has no {missing[0]!r} (keys {sorted(entry)}); expected 'ok' "
                "(classic) or 'easy' and 'hard' (revisited), with optional 'junk' and 'bbx'"
            )
        if kind is not None and this != kind:
            raise ValueError(f"{path}: gnd[{i}] is {this} ground truth but gnd[0] is {kind}")
        kind = this
        clean: dict[str, Any] = {}
        for key in _INDEX_KEYS:
            if key in entry:
                clean[key] = _indices(
                    entry[key], key=key, query=i, n=len(imlist), path=path, offset=offset
                )
        clean.setdefault("junk", np.zeros(0, np.int64))
        _check_disjoint(clean, query=i, path=path, offset=offset)
        clean["bbx"] = _bbx(entry.get("bbx"), query=i, path=path)
        out.append(clean)
    return GroundTruth(imlist, qimlist, out)


def _from_dict(data: Any, path: str, *, offset: int = 0) -> GroundTruth:
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a dict with imlist, qimlist, gnd; got {type(data)}")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r} (keys {sorted(map(str, data))})")
    imlist = _names(data["imlist"], "imlist", path)
    qimlist = _names(data["qimlist"], "qimlist", path)
    return _normalise(imlist, qimlist, data["gnd"], path, offset=offset)


def load_gnd(path: str | os.PathLike) -> GroundTruth:
    """Reads a cirtorch / revisitop ground-truth pickle (``gnd_<dataset>.pkl``).

    Args:
      path: the pickle: a dict with ``imlist`` and ``qimlist`` (lists of names) and ``gnd`` (a
        list of dicts with ``bbx`` and ``ok``/``junk`` or ``easy``/``hard``/``junk``).

    Returns:
      The validated :class:`GroundTruth` (index arrays int64, ``bbx`` a float 4-tuple).

    Raises:
      FileNotFoundError: no such file.
      UnsafePickleError: the pickle names anything beyond containers, scalars and numpy arrays
        (nothing it names is called).
      ValueError: malformed content (the message names the key and the query index).
    """
    path = os.fspath(path)
    return _from_dict(_unpickle(path), path)


def _mat_str(cell: Any) -> str:
    """A MATLAB char array as read by scipy (``array(['name'])``) -> ``'name'``."""
    return "".join(str(c) for c in np.asarray(cell).reshape(-1))


def _mat_names(value: Any) -> list[str]:
    """A MATLAB cell array of names, or a char matrix (one name per row), as a list."""
    arr = np.asarray(value)
    if arr.dtype.kind == "U":  # char matrix: scipy gives one string per row
        return [str(s).rstrip() for s in arr.reshape(-1)]
    return [_mat_str(c) for c in arr.reshape(-1)]


def _load_mat(path: str) -> GroundTruth:
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise ImportError(
            f"reading the MATLAB file {path} needs scipy: pip install scipy (or convert it to a "
            "revisitop-style pickle)"
        ) from e
    try:
        mat = loadmat(path, squeeze_me=False, struct_as_record=True, chars_as_strings=True)
    except NotImplementedError as e:  # v7.3 (HDF5) files
        raise ValueError(f"{path}: {e}; re-save it as MATLAB v7 (save -v7)") from e
    for key in ("imlist", "qimlist", "gnd"):
        if key not in mat:
            found = sorted(k for k in mat if not k.startswith("__"))
            raise ValueError(f"{path}: missing variable {key!r} (variables {found})")
    imlist, qimlist = _mat_names(mat["imlist"]), _mat_names(mat["qimlist"])
    structs = np.asarray(mat["gnd"]).reshape(-1)
    fields = structs.dtype.names or ()
    if "ok" not in fields:
        raise ValueError(f"{path}: the 'gnd' struct array has no field 'ok' (fields {fields})")
    gnd = [{f: s[f] for f in fields if f in (*_INDEX_KEYS, "bbx")} for s in structs]
    return _normalise(imlist, qimlist, gnd, path, offset=1)


def load_instre(path: str | os.PathLike) -> GroundTruth:
    """Reads the INSTRE ground truth of Iscen et al. (CVPR 2017).

    Args:
      path: ``gnd_instre.mat`` as distributed with their diffusion code (MATLAB v5, read with
        ``scipy.io.loadmat``; its indices are 1-based and converted to 0-based), or a pickle in
        the revisitop format (0-based, read with the restricted unpickler).

    Returns:
      The validated :class:`GroundTruth`: 1250 queries, 27293 database images for the real
      file; ``ok`` per query, empty ``junk``, ``bbx`` ``(x1, y1, x2, y2)``.

    Raises:
      FileNotFoundError, ImportError (a .mat file without scipy), UnsafePickleError,
      ValueError (malformed content, naming the key and query).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ground-truth file {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(128)
    if head.startswith(b"MATLAB"):
        return _load_mat(path)
    return load_gnd(path)


def load_distractors(path: str | os.PathLike) -> list[str]:
    """Reads the revisitop 1M distractor list (``revisitop1m.txt``).

    Args:
      path: text file, one image path per line, relative to the ``jpg/`` folder and with its
        extension (revisitop ``read_imlist``). Blank lines are ignored.

    Returns:
      The paths in file order.

    Raises:
      FileNotFoundError: no such file. ValueError: an absolute path or a ``..`` component
        (line number given), or no entries at all.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"distractor list {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    names = []
    for lineno, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            continue
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in parts:
            raise ValueError(
                f"{path}:{lineno}: {name!r} is not a relative path inside the image folder"
            )
        names.append(name)
    if not names:
        raise ValueError(f"distractor list {path} holds no image names")
    return names


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder``, recursively, as sorted relative paths.

    Args:
      folder: a directory; files whose suffix (any case) is in ``IMAGE_EXTENSIONS`` count,
        hidden files and folders (name starting with ``.``) are skipped.

    Returns:
      Paths relative to ``folder`` with ``/`` separators, sorted; empty if there are none.

    Raises:
      FileNotFoundError: ``folder`` does not exist. NotADirectoryError: it is a file.
    """
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist")
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"{folder!r} is not a folder of images")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder)
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            found.append(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
    return sorted(found)
