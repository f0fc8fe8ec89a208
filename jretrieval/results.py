"""The results of an experiment as one typed object, and where they came from (provenance).

``jretrieval.experiment.run`` returns a ``Results``; ``jretrieval.report`` writes it
(``results.json`` is ``Results.to_dict()``, read back by ``Results.from_dict``) and the tables
(``jretrieval.tables``) read it. Figures are percentages, as in the paper's tables.

Keys, as the tables use them:

- rows: model names (``configs/common.py``'s zoo), ``"a+b"`` for an ensemble;
- column keys: a ranking column of Table 1 (``"G"``, ``"G+AQE"``, ...), a PCA dimension of a
  Table 3 sweep (``"32"`` ... ``"2048"``, ``"True dim."`` / ``"none"`` for no PCA), or
  ``"<column> @ <dim>"`` for a sweep over several ranking columns;
- metric keys: those of ``jretrieval.metrics.evaluate`` (``"mAP"``; ``"E/mAP"``, ``"M/mP@5"``...).

Per-query AP (``per_query[row][column][mAP key]``) lists one value per evaluated query, in the
order of ``queries[row]`` (dataset query indices; unreadable queries are not evaluated), ``None``
for a query without positives (left out of the mean, as revisitop does).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import platform
import subprocess
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["Results", "as_results", "provenance"]

#: packages whose versions ``provenance`` records.
PACKAGES = ("jax", "jaxlib", "flax", "numpy", "ml_collections", "pillow", "h5py", "absl-py")


@dataclasses.dataclass
class Results:
    """One experiment's figures and everything needed to read them.

    Attributes:
      dataset: dataset name (``"oxford5k"``...).
      models: ``{row: {column key: {metric: percent or None}}}``.
      protocol: ``"classic"``, ``"revisited"`` or ``"instre"`` (``None``: unknown).
      table: the paper's table the run reproduces (``"table1"``, ``"table2"``, ``"table3"``).
      labels: ``{row: label shown in the tables}``.
      columns: column keys in display order.
      metrics: metric keys shown.
      dims: whitening dims swept (``None`` = no PCA); column_dims: ``{column key: dim}``.
      per_query: ``{row: {column key: {mAP key: [AP percent or None per query]}}}``.
      queries: ``{row: [dataset query indices evaluated]}``, the order of ``per_query``.
      chance: ``{"metric", "value"}``: the headline metric of a random ranking (kept queries).
      choices: the procedure's open choices, stated in the report (BN pass, whitening, AP-GeM).
      settings: the config as a dict.
      notes: lines printed above the tables.
      skipped: ``{model: [(part, path, why)]}`` unreadable images left out.
      timings: ``{"models": {model: {stage: s}}, "rows": {row: {stage: s}}, "total": s}``.
      stores: ``{model: {part: descriptor store path}}``.
      encoders: ``{model: jretrieval.models.provenance(encoder)}`` (architecture, weight digests).
      examples: ``{row: {"column", "queries", "query_paths", "bbx", "ap", "ranks", "paths",
        "labels"}}``: the top-10 results of a few queries for the picture (see
        ``jretrieval.pictures.plot_top_results``).
      sizes: ``{"database": N, "queries": Q}``.
      provenance: package versions, git commit, devices (``provenance()``).
    """

    dataset: str
    models: dict[str, dict[str, dict[str, float | None]]]
    protocol: str | None = None
    table: str = "table1"
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    columns: list[str] = dataclasses.field(default_factory=list)
    metrics: list[str] = dataclasses.field(default_factory=list)
    dims: list[int | None] = dataclasses.field(default_factory=list)
    column_dims: dict[str, int | None] = dataclasses.field(default_factory=dict)
    per_query: dict[str, dict[str, dict[str, list[float | None]]]] = dataclasses.field(
        default_factory=dict
    )
    queries: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    chance: dict[str, Any] | None = None
    choices: dict[str, Any] = dataclasses.field(default_factory=dict)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, list] = dataclasses.field(default_factory=dict)
    timings: dict[str, Any] = dataclasses.field(default_factory=dict)
    stores: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    encoders: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    examples: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_models(self.models)

    def label(self, row: str) -> str:
        """The row's label in the tables (the row key when it has none)."""
        return str(self.labels.get(row, row))

    def column_order(self) -> list[str]:
        """``columns`` followed by any column key found in ``models`` but not listed there."""
        order = list(self.columns)
        for figures in self.models.values():
            order += [c for c in figures if c not in order]
        return order

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (NumPy converted, tuples as lists, NaN and inf as ``None``)."""
        return jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Results:
        """A ``Results`` from ``to_dict()``'s output or a hand-written dict.

        Only ``dataset`` and ``models`` are required; unknown keys raise ``ValueError``
        naming them.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"results must be a dict; got {type(data).__name__}")
        missing = [k for k in ("dataset", "models") if k not in data]
        if missing:
            raise ValueError(f"results has no {missing[0]!r} (keys {sorted(data)})")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(
                f"results has unknown keys {unknown}; expected some of {sorted(fields)}"
            )
        return cls(**{k: v for k, v in data.items() if v is not None})

    def __getitem__(self, key: str) -> Any:
        """Read access by field name (``results["models"]``), for callers of the former dict."""
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)


def as_results(obj: Results | Mapping[str, Any]) -> Results:
    """``obj`` itself, or a ``Results`` built from a dict (``Results.from_dict``)."""
    return obj if isinstance(obj, Results) else Results.from_dict(obj)


def _check_models(models: Any) -> None:
    if not isinstance(models, Mapping):
        raise ValueError(f"results['models'] must be a dict; got {type(models).__name__}")
    for row, columns in models.items():
        if not isinstance(columns, Mapping):
            raise ValueError(f"results['models'][{row!r}] must be a dict of columns")
        for col, figures in columns.items():
            if not isinstance(figures, Mapping):
                raise ValueError(
                    f"results['models'][{row!r}][{col!r}] must be a dict {{metric: value}}; "
                    f"got {type(figures).__name__}"
                )
            for metric, value in figures.items():
                if value is not None and not isinstance(value, int | float | np.number):
                    raise ValueError(
                        f"results['models'][{row!r}][{col!r}][{metric!r}] = {value!r}; "
                        "expected a number (percent) or None"
                    )


def jsonable(obj: Any) -> Any:
    """Plain JSON values: NumPy scalars/arrays converted, tuples as lists, NaN/inf as None."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    return str(obj)


# ----------------------------------------------------------------------------- provenance


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(folder: str | None = None) -> str | None:
    """The project's git commit (``+dirty`` with uncommitted changes), or ``None`` outside git."""
    folder = folder or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", folder, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", folder, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def provenance() -> dict[str, Any]:
    """Package versions, the project's git commit and the devices JAX sees (kind and count)."""
    import jax

    devices = jax.devices()
    return {
        "versions": {
            "python": platform.python_version(),
            **{p: _version(p) for p in ("jretrieval", *PACKAGES)},
        },
        "git_commit": git_commit(),
        "devices": {
            "platform": devices[0].platform if devices else None,
            "kind": devices[0].device_kind if devices else None,
            "count": len(devices),
            "processes": jax.process_count(),
        },
    }
