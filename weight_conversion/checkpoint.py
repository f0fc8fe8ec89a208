"""Reading untrusted PyTorch checkpoints without running their code.

Shape convention: tensors are returned as NumPy float32 arrays in the *PyTorch* layout (convs
OIHW); the per-family modules transpose them.

``load_checkpoint`` first tries ``torch.load(weights_only=True)``, torch's own allow-listing
unpickler. Only if that refuses the file does it retry with :class:`RestrictedUnpickler`, which
admits exactly: torch's tensor/storage rebuild functions, ``collections.OrderedDict``, NumPy's
array/dtype/scalar reconstruction (``_codecs.encode`` limited to latin-1, as protocol-2 pickles
of bytes need), and scikit-learn's ``PCA`` (old ``sklearn.decomposition.pca`` and new
``sklearn.decomposition._pca``) replaced by an inert :class:`PCAStub` that only stores its
pickled ``__dict__``. That is what dirtorch's AP-GeM checkpoints need; anything else (e.g.
``os.system``) is refused with its name, before it can be called.
"""

from __future__ import annotations

import os
import pickle
import types
import zipfile
from typing import Any

import numpy as np
import torch

from jretrieval.models import io

#: (module, name) -> object admitted by the restricted unpickler.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = np._core.multiarray._reconstruct
    _ALLOWED[(_mod, "scalar")] = np._core.multiarray.scalar
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = np._core.numeric._frombuffer


class PCAStub:
    """Stands in for ``sklearn.decomposition.PCA``: keeps the pickled attributes, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"PCA state is a {type(state).__name__}, not a dict")
        self.__dict__.update(state)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes`` (latin-1 only)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode(..., {encoding!r})")
    return text.encode("latin-1")


_ALLOWED[("_codecs", "encode")] = _latin1_encode
for _mod in ("sklearn.decomposition.pca", "sklearn.decomposition._pca"):
    _ALLOWED[(_mod, "PCA")] = PCAStub


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals listed in this module's docstring."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"refused global {module}.{name}: only torch tensors, NumPy arrays and "
            "sklearn PCA objects are admitted in a checkpoint"
        )


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


#: a ``pickle_module`` for ``torch.load``.
restricted_pickle = types.SimpleNamespace(
    Unpickler=RestrictedUnpickler, load=_restricted_load, __name__="restricted_pickle"
)


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (``jretrieval.models.io.file_sha256``)."""
    return io.file_sha256(path)


def load_checkpoint(path: str | os.PathLike) -> Any:
    """What ``torch.load`` returns for ``path``, without executing code from the file.

    Zip-format files are memory-mapped (``mmap=True``), so tensors are read from the page cache
    on demand rather than copied. Raises ``FileNotFoundError`` or ``ValueError`` naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as strict_err:
        lines = str(strict_err).strip().splitlines()
        first = next((ln.strip() for ln in lines if "WeightsUnpickler error" in ln), lines[0])
        try:
            return torch.load(
                path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle
            )
        except Exception as err:
            raise ValueError(
                f"refusing checkpoint {path!r}: weights-only load failed ({first}) and the "
                f"restricted unpickler failed too: {type(err).__name__}: {err}"
            ) from err
    except Exception as err:
        raise ValueError(
            f"cannot read checkpoint {path!r} (truncated or not a PyTorch file?): "
            f"{type(err).__name__}: {err}"
        ) from err


def to_numpy(tensor: Any, *, key: str) -> np.ndarray:
    """A float32 NumPy array for a floating tensor (a view when it already is float32).

    fp16/bf16/fp64 are upcast/cast to float32; anything else raises ``ValueError`` naming ``key``.
    """
    if isinstance(tensor, np.ndarray):
        array = tensor
    elif isinstance(tensor, torch.Tensor):
        if not tensor.is_floating_point():
            raise ValueError(f"checkpoint key {key!r} is a {tensor.dtype} tensor; expected float")
        tensor = tensor.detach()
        if tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()
        array = tensor.numpy()
    else:
        raise ValueError(f"checkpoint key {key!r} holds a {type(tensor).__name__}, not a tensor")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"checkpoint key {key!r} has dtype {array.dtype}; expected float")
    return array if array.dtype == np.float32 else array.astype(np.float32)
