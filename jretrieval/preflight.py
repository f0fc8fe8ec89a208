"""Every check that can be made before the hours of work: settings, folders, model files.

An experiment spends hours in BN recalibration and extraction (about 6 hours per ResNet-50 on
Oxford on a CPU) before it ranks anything or writes a file. ``check`` runs once the ground
truth is loaded (so the number of database images is known) and before any image is decoded,
and refuses, naming the setting or file and what was expected:

- ``extraction.batch_size``, ``bn.batch_size``: positive integers;
- ``extraction.max_pixels``: a positive integer (then applied, ``images.set_max_pixels``);
- the pooling of each model (``model_zoo[m].pooling`` or ``pooling.name``): a key of
  ``jretrieval.pooling.POOLING`` (or ``"model"``: the encoder's own head); ``pooling.levels``
  a non-negative integer for R-MAC, ``pooling.p`` a positive number for GeM;
- each ``whitening.dim``: at most the number of descriptors the PCA is learned on (the database
  images, plus the queries with ``whitening.learn_on="database+queries"``), since a PCA of
  ``N`` vectors has at most ``N`` components;
- the workdir and the output folder: writable (a probe file is created and removed);
- each model's file: present and holding the architecture its zoo entry states (read from the
  file's metadata, no weights loaded: ``jretrieval.models.check_architecture``); a random-init
  entry: an architecture that builds; ``pooling="model"`` only for an encoder with its own
  descriptor head.

Ground-truth problems (duplicate or overlapping indices, query boxes outside their images) are
refused earlier, by ``jretrieval.datasets.load_dataset``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from jretrieval import models, pooling
from jretrieval.datasets import Dataset
from jretrieval.datasets import images as images_lib

__all__ = ["check", "check_writable"]

#: the pooling name of a zoo entry that pools with the encoder's own head (AP-GeM).
OWN_HEAD = "model"


def _as_dict(value: Any) -> dict[str, Any]:
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ValueError(f"{name}={value!r}; expected a positive integer")
    if value < 1:
        raise ValueError(f"{name}={value!r}; expected a positive integer (>= 1)")
    return int(value)


def check_writable(folder: str, what: str) -> None:
    """Creates ``folder`` if needed and a probe file in it (then removes it).

    Raises:
      PermissionError / OSError: naming ``what`` (e.g. ``"workdir"``) and the folder, so a
        read-only output folder fails now rather than after all the computation.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".preflight-", suffix=".tmp"):
            pass
    except OSError as err:
        raise type(err)(
            err.errno,
            f"{what} {folder!r} is not writable ({err.strerror}); every result would be lost "
            f"at the end of the run: choose a writable folder or fix its permissions",
        ) from None


def _check_pooling(config: Any, name: str, spec: Mapping[str, Any]) -> None:
    method = spec.get("pooling") or config.pooling.name
    where = f"model_zoo[{name!r}].pooling" if spec.get("pooling") else "pooling.name"
    if method == OWN_HEAD:
        return
    if method not in pooling.POOLING:
        raise ValueError(
            f"{where}={method!r} (model {name!r}); expected one of {sorted(pooling.POOLING)}"
        )
    if method == "rmac":
        levels = config.pooling.levels
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
            raise ValueError(f"pooling.levels={levels!r}; expected an integer >= 0 for R-MAC")
    if method == "gem":
        p = config.pooling.p
        if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p) or p <= 0:
            raise ValueError(f"pooling.p={p!r}; expected a finite number > 0 for GeM")


def _check_model(config: Any, name: str, spec: Mapping[str, Any]) -> None:
    expected = spec.get("architecture")
    expected = _as_dict(expected) if expected else None
    if spec.get("file"):
        path = os.path.join(config.checkpoint_dir, spec["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"converted encoder for model {name!r} not found at {path!r} "
                f"(checkpoint_dir={config.checkpoint_dir!r}); run `bin/download_checkpoints.sh` "
                "and `bin/convert_checkpoints.sh`, or set --config.checkpoint_dir"
            )
        found = models.read_architecture(path)
        models.check_architecture(found, expected, where=f"{path} (model {name!r})")
    elif expected:
        found = expected
    else:
        raise ValueError(f"model_zoo[{name!r}] has neither 'file' nor 'architecture': {spec}")
    module = models.build(found)  # an architecture this version can build
    if spec.get("pooling") == OWN_HEAD and not getattr(module, "has_descriptor", False):
        raise ValueError(
            f"model_zoo[{name!r}].pooling={OWN_HEAD!r} needs an encoder with its own descriptor "
            f"head (AP-GeM); {models.architecture_name(found)} has none: expected pooling None "
            f"or one of {sorted(pooling.POOLING)}"
        )


def _check_dims(config: Any, dataset: Dataset, dims: Sequence[int | None]) -> None:
    learn_on = config.whitening.learn_on
    n_train = len(dataset.db_paths)
    if learn_on == "database+queries":
        n_train += len(dataset.query_paths)
    for dim in dims:
        if dim is not None and dim > n_train:
            raise ValueError(
                f"whitening.dim={dim} exceeds the {n_train} descriptors the PCA is learned on "
                f"(whitening.learn_on={learn_on!r}, dataset {dataset.name!r}): a PCA has at "
                f"most that many components; expected a dim <= {n_train}, or 'none'"
            )


def check(
    config: Any,
    dataset: Dataset,
    *,
    rows: Sequence[tuple[str, Sequence[str]]],
    dims: Sequence[int | None],
) -> None:
    """Runs every check of the module docstring; then applies ``extraction.max_pixels``.

    Args:
      config: the experiment config (``configs/common.py``).
      dataset: the loaded dataset (its ground truth gives the number of database images).
      rows: ``experiment.parse_models(config.models)``: ``(row name, member models)``.
      dims: ``experiment.parse_dims(config.whitening.dim)`` (``None``: no PCA).

    Raises:
      ValueError, FileNotFoundError, OSError, models.ArchitectureMismatchError: naming the
        setting, folder or file at fault. Nothing is decoded, extracted or written (but the
        probe files) before this returns.
    """
    _positive_int(config.extraction.batch_size, "extraction.batch_size")
    _positive_int(config.bn.batch_size, "bn.batch_size")
    max_pixels = config.extraction.get("max_pixels", None)
    if max_pixels is not None:
        _positive_int(max_pixels, "extraction.max_pixels")
    members = list(dict.fromkeys(m for _, ms in rows for m in ms))
    for name in members:
        if name not in config.model_zoo:
            raise ValueError(f"model {name!r} is not in config.model_zoo")
        spec = _as_dict(config.model_zoo[name])
        _check_pooling(config, name, spec)
    _check_dims(config, dataset, dims)
    check_writable(config.workdir, "workdir")
    out = config.output.get("dir", None) or os.path.join(config.workdir, "results")
    check_writable(out, "output directory")
    for name in members:
        _check_model(config, name, _as_dict(config.model_zoo[name]))
    images_lib.set_max_pixels(max_pixels)
