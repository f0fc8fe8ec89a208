"""Reports of an experiment: tables shaped like the paper's, JSON, long CSV, and pictures.

Shape convention: values are percentages (like the paper's tables); ``ranks`` are ``[Q, >=k]``
database indices, best first; images are RGB.

The results dict (``jretrieval.experiment.run`` builds it; every key but ``dataset`` and
``models`` is optional)::

    {"dataset": "oxford5k", "protocol": "classic" | "revisited" | "instre",
     "models": {row: {column: {metric: value in percent}}},
     "labels": {row: label shown in the tables}, "columns": [column keys in order],
     "metrics": [metric keys shown], "settings": {...}, "notes": [...], "skipped": {...},
     "examples": {row: {"column", "queries", "ranks"}}, ...}

Column keys are the ranking columns of Table 1 (``"G"``, ``"G+AQE"``, ... ``"G+DBA+AQE+DFS"``),
PCA dimensions of a Table 3 sweep (``"32"`` ... ``"2048"``, and ``"none"`` or ``"True dim."`` for
no PCA), or ``"<column> @ <dim>"`` for a sweep over several ranking columns. Metric keys are
those of ``jretrieval.metrics.evaluate`` (``"mAP"``; ``"E/mAP"``, ``"M/mP@5"``, ...).

Layouts, as in the paper: **Table 1** (classic / INSTRE protocol): rows = models, columns = the
ranking columns, mAP. **Table 2** (revisited protocol, one per ranking column): rows = models,
Easy / Medium / Hard x mAP, mP@5, mP@10. **Table 3** (sweep): rows = models, columns = PCA
dimensions and "True dim.", the headline metric (mAP; M/mAP for the revisited protocol), best
per row in bold. In Tables 1 and 2 the best value of each column is bold, single models and
ensembles (``"a+b"`` rows) ranked separately (a group with one value has no best) and the
fine-tuned upper bound (``apgem``) not ranked, as in the paper. Where the paper published
figures for the same dataset and rows, they follow each table, labelled as such (``PAPER``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from absl import logging
from PIL import Image, ImageDraw, ImageOps

__all__ = [
    "PAPER",
    "RANKING_COLUMNS",
    "Table",
    "format_markdown",
    "format_table",
    "plot_dimension_sweep",
    "plot_top_results",
    "read_csv",
    "read_json",
    "tables",
    "write",
    "write_report",
]

#: Table 1's ranking columns, in the paper's order.
RANKING_COLUMNS = (
    "G",
    "G+AQE",
    "G+DFS",
    "G+DBA",
    "G+AQE+DFS",
    "G+DBA+AQE",
    "G+DBA+DFS",
    "G+DBA+AQE+DFS",
)
#: Table 2's metrics (revisited protocol), in the paper's order.
TABLE2_METRICS = tuple(f"{s}/{m}" for s in "EMH" for m in ("mAP", "mP@5", "mP@10"))
#: Table 3's PCA dimensions; "none" is the paper's "True dim." (no PCA).
TABLE3_DIMS = ("32", "64", "128", "256", "512", "1024", "2048", "none")
#: names of the "no PCA" column.
NO_PCA_NAMES = ("none", "True dim.", "true dim.", "None")
#: rows never bolded: the paper's fine-tuned upper bound (its footnote 3).
UPPER_BOUND_ROWS = ("apgem",)
CSV_FIELDS = ("dataset", "model", "column", "metric", "value")

#: Figures published in the paper (Krishna, McGuinness, O'Connor, ICMR 2021), percent, keyed
#: by the model names of ``configs/common.py``, transcribed from ``shared/paper.md``:
#: ``PAPER[layout][dataset][row]`` is a tuple in the order of ``RANKING_COLUMNS`` (table1),
#: ``TABLE2_METRICS`` (table2) or ``TABLE3_DIMS`` (table3). The Baseline rows of Table 1 for
#: Paris6k and INSTRE are left out: the transcription lost one of their eight values.
PAPER: dict[str, dict[str, dict[str, tuple[float, ...]]]] = {
    "table1": {
        "oxford5k": {
            "baseline": (55.12, 67.85, 74.29, 62.63, 82.64, 70.60, 77.95, 80.40),
            "simclr1x": (51.47, 62.96, 71.42, 61.00, 76.40, 66.32, 72.98, 73.38),
            "simclr2x": (58.59, 70.49, 79.11, 67.34, 82.34, 72.62, 79.02, 79.96),
            "simclr4x": (59.40, 69.80, 80.07, 67.52, 82.00, 71.03, 78.67, 76.98),
            "mocov1": (56.76, 66.89, 74.78, 64.12, 76.44, 69.77, 73.39, 73.95),
            "mocov2": (58.36, 67.49, 75.26, 65.09, 78.07, 69.86, 72.52, 72.86),
            "amdim": (36.95, 43.44, 48.13, 39.97, 52.99, 44.69, 46.30, 47.74),
            "simclr2x+simclr4x": (61.89, 72.64, 81.66, 69.27, 86.02, 74.43, 80.45, 81.99),
            "simclr2x+amdim": (57.06, 67.37, 75.63, 64.69, 77.77, 69.29, 72.84, 74.51),
            "simclr2x+mocov2": (61.33, 71.58, 78.97, 68.47, 82.33, 72.94, 78.36, 79.03),
            "simclr4x+mocov2": (61.87, 71.97, 80.86, 68.20, 84.02, 72.94, 78.56, 79.57),
            "simclr4x+amdim": (58.13, 68.76, 77.66, 64.81, 80.05, 69.78, 75.93, 77.32),
            "apgem": (66.90, 78.57, 90.36, 75.70, 94.34, 81.92, 89.65, 91.12),
        },
        "paris6k": {
            "simclr1x": (42.28, 61.15, 85.16, 64.36, 90.17, 74.45, 89.37, 90.49),
            "simclr2x": (44.48, 59.65, 89.39, 63.28, 91.61, 71.91, 90.82, 91.48),
            "simclr4x": (44.96, 56.30, 88.98, 60.40, 90.18, 68.46, 88.18, 88.74),
            "mocov1": (43.22, 60.34, 83.13, 63.00, 86.90, 72.11, 87.91, 88.73),
            "mocov2": (49.72, 64.46, 88.02, 67.06, 89.86, 75.01, 88.65, 89.01),
            "amdim": (34.87, 49.20, 59.55, 47.72, 63.70, 56.06, 64.18, 65.08),
            "simclr2x+simclr4x": (45.27, 56.84, 89.97, 59.88, 91.60, 68.07, 89.19, 90.28),
            "simclr2x+amdim": (44.45, 60.06, 86.71, 63.02, 89.06, 71.12, 88.46, 88.76),
            "simclr2x+mocov2": (47.93, 61.46, 90.92, 64.96, 92.47, 72.37, 90.42, 91.08),
            "simclr4x+mocov2": (47.44, 58.44, 90.40, 61.88, 91.97, 69.48, 89.00, 89.93),
            "simclr4x+amdim": (44.74, 57.05, 87.59, 60.66, 88.97, 68.60, 87.06, 87.45),
            "apgem": (49.87, 63.46, 93.99, 67.99, 95.56, 76.78, 90.15, 94.07),
        },
        "instre": {
            "simclr1x": (27.51, 47.85, 55.38, 47.34, 60.61, 57.73, 21.00, 61.15),
            "simclr2x": (36.68, 57.04, 66.47, 56.89, 69.48, 65.27, 24.93, 67.18),
            "simclr4x": (44.76, 63.73, 73.51, 63.26, 75.02, 70.17, 28.79, 70.54),
            "mocov1": (33.44, 54.88, 66.31, 54.84, 70.10, 64.65, 29.25, 69.80),
            "mocov2": (33.36, 51.79, 60.66, 50.47, 62.56, 58.83, 22.38, 59.77),
            "amdim": (24.34, 37.92, 45.47, 36.69, 47.14, 42.74, 29.47, 47.71),
            "simclr2x+simclr4x": (45.58, 63.94, 73.54, 63.54, 74.81, 70.54, 28.73, 70.75),
            "simclr2x+amdim": (39.37, 59.02, 68.85, 59.09, 71.14, 66.68, 26.19, 67.93),
            "simclr2x+mocov2": (41.99, 60.99, 70.42, 60.64, 72.24, 68.41, 26.09, 68.69),
            "simclr4x+mocov2": (47.07, 65.23, 74.64, 64.93, 76.12, 71.42, 27.09, 71.26),
            "simclr4x+amdim": (45.83, 63.88, 74.25, 63.84, 75.28, 70.83, 30.07, 71.60),
            "apgem": (20.78, 31.37, 34.85, 30.29, 38.06, 35.93, 18.48, 37.54),
        },
    },
    "table2": {
        "roxford5k": {
            "baseline": (45.65, 67.55, 61.81, 32.89, 64.00, 58.57, 12.10, 23.71, 19.43),
            "simclr1x": (47.17, 69.78, 63.90, 31.98, 65.24, 57.52, 9.52, 20.57, 15.86),
            "simclr2x": (54.95, 76.69, 69.49, 38.54, 73.14, 65.33, 14.41, 31.21, 22.93),
            "simclr4x": (54.65, 74.80, 68.37, 38.57, 73.71, 65.05, 14.05, 30.07, 22.79),
            "mocov1": (48.29, 68.48, 64.36, 33.57, 64.43, 58.58, 9.27, 20.05, 15.62),
            "mocov2": (52.69, 72.33, 65.86, 36.49, 67.24, 59.24, 10.72, 23.38, 18.67),
            "amdim": (21.24, 38.31, 31.35, 17.54, 36.38, 32.57, 4.11, 5.92, 6.33),
            "simclr2x+simclr4x": (55.23, 76.15, 68.87, 39.60, 74.29, 65.64, 15.01, 29.43, 23.97),
            "simclr2x+amdim": (52.08, 72.28, 65.51, 36.19, 66.86, 58.57, 10.20, 21.64, 17.64),
            "simclr2x+mocov2": (55.11, 76.47, 69.35, 38.46, 70.52, 62.57, 12.51, 27.12, 21.83),
            "simclr4x+mocov2": (53.98, 72.40, 67.90, 38.31, 70.10, 64.69, 13.38, 28.43, 23.13),
            "simclr4x+amdim": (49.23, 70.76, 64.00, 35.72, 67.62, 61.33, 11.72, 23.79, 18.80),
            "apgem": (64.07, 84.93, 80.56, 51.03, 89.43, 83.86, 30.30, 54.86, 44.00),
        },
        "rparis6k": {
            "baseline": (47.20, 91.14, 87.00, 31.63, 93.71, 91.71, 10.44, 57.14, 43.43),
            "simclr1x": (49.35, 93.14, 89.52, 31.61, 95.71, 92.00, 8.93, 46.57, 38.43),
            "simclr2x": (54.28, 94.00, 91.14, 34.47, 96.00, 92.86, 10.87, 62.00, 49.71),
            "simclr4x": (54.97, 93.71, 91.71, 35.39, 96.29, 94.86, 12.34, 66.57, 56.29),
            "mocov1": (50.47, 92.29, 89.71, 31.48, 95.14, 92.57, 8.13, 46.57, 36.29),
            "mocov2": (55.77, 92.86, 89.24, 36.32, 94.86, 92.14, 11.71, 60.00, 50.43),
            "amdim": (38.62, 80.29, 73.71, 25.92, 82.57, 75.71, 6.36, 25.14, 19.57),
            "simclr2x+simclr4x": (55.54, 94.00, 91.86, 35.59, 96.00, 94.00, 12.37, 66.29, 56.00),
            "simclr2x+amdim": (53.71, 93.71, 90.43, 34.57, 95.14, 93.14, 10.46, 55.71, 46.00),
            "simclr2x+mocov2": (57.00, 93.43, 91.00, 36.66, 95.14, 93.29, 11.88, 64.00, 52.43),
            "simclr4x+mocov2": (56.86, 94.29, 91.71, 36.61, 96.29, 94.86, 12.68, 69.43, 55.57),
            "simclr4x+amdim": (54.65, 92.86, 90.57, 35.06, 95.71, 93.43, 11.41, 61.14, 48.71),
            "apgem": (54.90, 94.38, 91.95, 37.36, 98.86, 97.00, 14.65, 76.86, 63.71),
        },
    },
    "table3": {
        "oxford5k": {
            "baseline": (48.31, 54.61, 56.68, 57.52, 55.12, 49.44, 37.23, 58.47),
            "simclr1x": (34.96, 44.96, 54.17, 54.79, 51.47, 44.16, 34.94, 50.63),
            "simclr2x": (36.79, 47.96, 60.32, 61.68, 58.59, 49.82, 24.62, 53.72),
            "simclr4x": (35.32, 45.86, 57.77, 61.70, 59.40, 53.83, 44.71, 41.94),
            "mocov1": (29.90, 41.95, 54.62, 57.38, 56.76, 50.20, 39.37, 38.73),
            "mocov2": (39.92, 47.88, 57.92, 60.43, 58.36, 52.14, 40.05, 51.76),
            "amdim": (11.52, 15.30, 21.71, 28.71, 36.95, 37.58, 30.73, 16.10),
        },
        "paris6k": {
            "baseline": (72.22, 71.83, 63.65, 53.40, 41.46, 28.99, 17.89, 68.36),
            "simclr1x": (69.90, 73.29, 66.62, 54.58, 42.28, 30.70, 20.06, 66.60),
            "simclr2x": (75.21, 77.90, 69.25, 57.83, 44.48, 33.05, 23.27, 72.20),
            "simclr4x": (77.16, 78.04, 69.19, 57.29, 44.96, 35.02, 25.79, 72.89),
            "mocov1": (56.84, 63.63, 61.87, 54.07, 43.22, 32.57, 21.63, 53.66),
            "mocov2": (70.08, 75.11, 71.24, 61.66, 49.72, 35.73, 22.98, 69.99),
            "amdim": (21.49, 33.96, 41.19, 40.85, 34.87, 26.82, 17.85, 25.50),
        },
        "instre": {
            "baseline": (26.44, 34.92, 38.68, 38.55, 36.64, 29.25, 20.20, 33.03),
            "simclr1x": (16.47, 23.27, 29.01, 30.35, 27.51, 21.85, 15.97, 21.85),
            "simclr2x": (18.42, 26.83, 35.88, 39.67, 36.68, 29.64, 21.57, 25.94),
            "simclr4x": (18.92, 28.97, 40.45, 46.99, 44.76, 36.68, 27.65, 28.98),
            "mocov1": (20.08, 27.85, 33.77, 36.24, 33.44, 26.66, 18.46, 23.01),
            "mocov2": (19.00, 27.38, 34.34, 36.22, 33.36, 26.86, 18.79, 26.22),
            "amdim": (10.65, 15.88, 20.55, 24.15, 24.34, 20.45, 14.45, 10.25),
        },
    },
}
_PAPER_KEYS = {"table1": RANKING_COLUMNS, "table2": TABLE2_METRICS, "table3": TABLE3_DIMS}

# Colours of plot_top_results' borders.
POSITIVE = (0, 170, 0)
NEGATIVE = (220, 0, 0)
JUNK = (150, 150, 150)
QUERY = (0, 90, 220)
_BORDER, _MARGIN, _SPACING, _QUERY_GAP = 4, 8, 4, 16


class Table(NamedTuple):
    """One table of the report.

    Attributes:
      layout: ``"table1"``, ``"table2"`` or ``"table3"``.
      title: what it shows (dataset, metric, column).
      header: column headers, the first being ``"Method"``.
      rows: ``(row key, label, values)`` with ``None`` for a missing value.
      bold: per row, which values are the best (see the module docstring).
      reference: ``True`` for the paper's published figures.
    """

    layout: str
    title: str
    header: list[str]
    rows: list[tuple[str, str, list[float | None]]]
    bold: list[list[bool]]
    reference: bool = False


# ------------------------------------------------------------------------------ validation


def _check(results: Any) -> None:
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a dict; got {type(results).__name__}")
    for key in ("dataset", "models"):
        if key not in results:
            raise ValueError(f"results has no {key!r} (keys {sorted(results)})")
    models = results["models"]
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


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


# ------------------------------------------------------------------------------ tables


def _split_column(key: str) -> tuple[str | None, str | None]:
    """``(ranking column, dim name)`` of a column key; dim ``None`` for plain ranking columns."""
    if " @ " in key:
        col, dim = key.rsplit(" @ ", 1)
        return col, ("none" if dim in NO_PCA_NAMES else dim)
    if key in NO_PCA_NAMES:
        return None, "none"
    if key.isdigit():
        return None, key
    return key, None


def _columns(results: Mapping[str, Any]) -> list[str]:
    order = list(results.get("columns") or [])
    for figures in results["models"].values():
        order += [c for c in figures if c not in order]
    return order


def headline_metric(protocol: str | None) -> str:
    """The metric of Tables 1 and 3: ``"mAP"``, or ``"M/mAP"`` for the revisited protocol."""
    return "M/mAP" if protocol == "revisited" else "mAP"


def _label(results: Mapping[str, Any], row: str) -> str:
    return str((results.get("labels") or {}).get(row, row))


def _bold_by_column(keys: Sequence[str], values: list[list[float | None]]) -> list[list[bool]]:
    """Best of each column, single models and ensembles ranked separately (2+ values)."""
    bold = [[False] * len(v) for v in values]
    groups: dict[bool, list[int]] = {}
    for i, key in enumerate(keys):
        if key not in UPPER_BOUND_ROWS:
            groups.setdefault("+" in key, []).append(i)
    for members in groups.values():
        for j in range(len(values[0]) if values else 0):
            column = [(round(values[i][j], 2), i) for i in members if values[i][j] is not None]
            if len(column) > 1:  # a lone value is not "the best"
                best = max(v for v, _ in column)
                for v, i in column:
                    bold[i][j] = v == best
    return bold


def _bold_by_row(values: list[list[float | None]]) -> list[list[bool]]:
    bold = []
    for row in values:
        present = [round(v, 2) for v in row if v is not None]
        best = max(present) if present else None
        bold.append([v is not None and round(v, 2) == best for v in row])
    return bold


def _make(layout, title, header, keys, labels, values, *, per_row=False, reference=False):
    bold = _bold_by_row(values) if per_row else _bold_by_column(keys, values)
    rows = list(zip(keys, labels, values, strict=True))
    return Table(layout, title, header, rows, bold, reference)


def _paper_table(table: Table, dataset: str, keys: Sequence[str]) -> Table | None:
    """The paper's figures for the rows and columns of ``table``, if it published any."""
    published = PAPER.get(table.layout, {}).get(dataset, {})
    order = _PAPER_KEYS[table.layout]
    rows = [(k, lab) for k, lab, _ in table.rows if k in published]
    wanted = [k if k in order else None for k in keys]
    if not rows or not any(wanted):
        return None
    values = [
        [published[k][order.index(c)] if c is not None else None for c in wanted] for k, _ in rows
    ]
    title = f"{table.title}, as published in the paper (Krishna et al., ICMR 2021), for reference"
    return _make(
        table.layout,
        title,
        table.header,
        [k for k, _ in rows],
        [lab for _, lab in rows],
        values,
        per_row=table.layout == "table3",
        reference=True,
    )


def tables(results: Mapping[str, Any], *, paper: bool = True) -> list[Table]:
    """The report's tables (see the module docstring), with the paper's where it has them.

    Args:
      results: the results dict.
      paper: append the paper's published figures after each table they exist for.

    Returns:
      Tables in order: Table 1 or the Table 2 blocks (ranking columns), then Table 3 (sweep).
    """
    _check(results)
    dataset = str(results["dataset"])
    protocol = results.get("protocol")
    models = results["models"]
    keys = list(models)
    labels = [_label(results, k) for k in keys]
    plain, sweeps = [], {}
    for key in _columns(results):
        col, dim = _split_column(key)
        if dim is None:
            plain.append(key)
        else:
            sweeps.setdefault(col, []).append((dim, key))

    def value(row: str, column: str, metric: str) -> float | None:
        return _number(models[row].get(column, {}).get(metric))

    out: list[Table] = []
    if plain and protocol == "revisited":
        shown = [m for m in (results.get("metrics") or TABLE2_METRICS) if m in TABLE2_METRICS]
        shown = shown or list(TABLE2_METRICS)
        for col in plain:
            values = [[value(r, col, m) for m in shown] for r in keys]
            title = f"Table 2: {dataset}, {col}, Easy (E) / Medium (M) / Hard (H), percent"
            out.append(_make("table2", title, ["Method", *shown], keys, labels, values))
            paper_cols = list(shown) if col == "G" else []
            ref = _paper_table(out[-1], dataset, paper_cols) if paper else None
            out += [ref] if ref else []
    elif plain:
        metric = headline_metric(protocol)
        values = [[value(r, c, metric) for c in plain] for r in keys]
        title = f"Table 1: {dataset}, {metric} (%)"
        out.append(_make("table1", title, ["Method", *plain], keys, labels, values))
        ref = _paper_table(out[-1], dataset, plain) if paper else None
        out += [ref] if ref else []
    for col, dims in sweeps.items():
        metric = headline_metric(protocol)
        dims = sorted(dims, key=lambda d: (d[0] == "none", int(d[0]) if d[0].isdigit() else 0))
        header = ["Method", *("True dim." if d == "none" else d for d, _ in dims)]
        values = [[value(r, key, metric) for _, key in dims] for r in keys]
        where = f", {col}" if col else ""
        title = f"Table 3: {dataset}{where}, {metric} (%) by PCA-whitening dimension"
        out.append(_make("table3", title, header, keys, labels, values, per_row=True))
        paper_dims = [d for d, _ in dims] if col in (None, "G") else []
        ref = _paper_table(out[-1], dataset, paper_dims) if paper else None
        out += [ref] if ref else []
    return out


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _notes(results: Mapping[str, Any]) -> list[str]:
    lines = [str(n) for n in results.get("notes") or []]
    chance = results.get("chance")
    if isinstance(chance, Mapping) and chance.get("value") is not None:
        lines.append(
            f"Chance level (expected {chance.get('metric', 'mAP')} of a random ranking): "
            f"{float(chance['value']):.2f}%"
        )
    skipped = results.get("skipped") or {}
    for model, items in skipped.items():
        lines.append(f"{model}: {len(items)} unreadable images skipped (listed in results.json)")
    return lines


def _settings_lines(settings: Any) -> list[str]:
    """A few settings worth seeing beside the numbers."""
    if not isinstance(settings, Mapping):
        return []
    picks = [
        ("input", ("extraction", "policy")),
        ("pooling", ("pooling", "name")),
        ("whitening dim", ("whitening", "dim")),
        ("BN recalibration", ("bn", "mode")),
        ("models", ("models",)),
    ]
    lines = []
    for name, path in picks:
        node: Any = settings
        for part in path:
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            lines.append(f"{name}: {json.dumps(_jsonable(node))}")
    return lines


def format_markdown(results: Mapping[str, Any], *, paper: bool = True) -> str:
    """The report as Markdown: the tables (best values in bold), notes and main settings."""
    out = [f"# {results.get('dataset')}: retrieval results", ""]
    for note in _notes(results):
        out += [f"> {note}", ""]
    settings = _settings_lines(results.get("settings"))
    if settings:
        out += [f"- {s}" for s in settings] + [""]
    for table in tables(results, paper=paper):
        out += [f"## {table.title}", ""]
        out.append("| " + " | ".join(table.header) + " |")
        out.append("| :-- | " + " | ".join("--:" for _ in table.header[1:]) + " |")
        for (_, label, values), bold in zip(table.rows, table.bold, strict=True):
            cells = [
                f"**{_cell(v)}**" if b else _cell(v) for v, b in zip(values, bold, strict=True)
            ]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        what = "row" if table.layout == "table3" else "column"
        out += ["", f"Best per {what} in bold.", ""]
    return "\n".join(out)


def format_table(results: Mapping[str, Any], *, paper: bool = False) -> str:
    """The tables as fixed-width plain text for the console (best values marked ``*``)."""
    blocks = []
    for table in tables(results, paper=paper):
        body = [
            [label] + [_cell(v) + ("*" if b else " ") for v, b in zip(values, bold, strict=True)]
            for (_, label, values), bold in zip(table.rows, table.bold, strict=True)
        ]
        header = [table.header[0]] + [h + " " for h in table.header[1:]]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = [table.title]
        for r in [header, *body]:
            cells = [r[0].ljust(widths[0])] + [
                c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
            ]
            lines.append("  ".join(cells).rstrip())
        blocks.append("\n".join(lines))
    notes = _notes(results)
    return "\n\n".join(blocks + (["\n".join(notes)] if notes else []))


# ------------------------------------------------------------------------------ files


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays converted, tuples as lists, NaN/inf as None."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    return str(obj)


def _write_atomic(path: str, writer: Callable[[Any], None], *, binary: bool = False) -> None:
    """Writes through ``writer(file)`` to a temporary name beside ``path``, then renames."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            writer(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _csv_text(results: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(CSV_FIELDS)
    for row, columns in results["models"].items():
        for column, figures in columns.items():
            for metric, value in figures.items():
                v = _number(value)
                out.writerow(
                    [results["dataset"], row, column, metric, "" if v is None else repr(v)]
                )
    return buf.getvalue()


def read_csv(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a ``results.csv`` back as ``{"dataset": ..., "models": {row: {col: {metric: v}}}}``.

    Several datasets in one file (concatenated reports) give ``{"datasets": {name: models}}``.
    """
    models: dict[str, dict[str, dict[str, dict[str, float | None]]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_FIELDS:
            raise ValueError(f"{path}: header {reader.fieldnames}; expected {list(CSV_FIELDS)}")
        for line in reader:
            value = float(line["value"]) if line["value"] else None
            by_row = models.setdefault(line["dataset"], {}).setdefault(line["model"], {})
            by_row.setdefault(line["column"], {})[line["metric"]] = value
    if len(models) == 1:
        ((dataset, rows),) = models.items()
        return {"dataset": dataset, "models": rows}
    return {"datasets": models}


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a ``results.json`` written by ``write_report``."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name) or "model"


def write_report(
    results: Mapping[str, Any], out_dir: str | os.PathLike, *, plot: bool | None = None
) -> dict[str, str]:
    """Writes ``results.json``, ``results.csv``, ``table.md`` (and the sweep plot) atomically.

    Args:
      results: the results dict (module docstring).
      out_dir: the folder (created if needed).
      plot: write ``dimension_sweep.png`` for a Table 3 sweep: ``None`` when matplotlib is
        installed (a warning otherwise), ``True`` always (ImportError without matplotlib),
        ``False`` never.

    Returns:
      ``{"json": path, "csv": path, "markdown": path}`` plus ``"plot"`` when written.
    """
    _check(results)
    out_dir = os.fspath(out_dir)
    paths = {
        "json": os.path.join(out_dir, "results.json"),
        "csv": os.path.join(out_dir, "results.csv"),
        "markdown": os.path.join(out_dir, "table.md"),
    }
    text = json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n"
    _write_atomic(paths["json"], lambda f: f.write(text))
    csv_text = _csv_text(results)
    _write_atomic(paths["csv"], lambda f: f.write(csv_text))
    markdown = format_markdown(results) + "\n"
    _write_atomic(paths["markdown"], lambda f: f.write(markdown))
    if plot is not False and any(t.layout == "table3" for t in tables(results, paper=False)):
        target = os.path.join(out_dir, "dimension_sweep.png")
        try:
            plot_dimension_sweep(results, target)
            paths["plot"] = target
        except ImportError as e:
            if plot:
                raise
            logging.warning("no dimension-sweep plot: %s", e)
    logging.info("report written to %s", out_dir)
    return paths


def write(
    results: dict[str, Any],
    out_dir: str | os.PathLike,
    *,
    dataset: Any = None,
    config: Any = None,
) -> dict[str, str]:
    """The experiment's report: ``write_report``, the chance level and top-10 pictures.

    Adds ``results["chance"]`` (``{"metric", "value"}``: the expected headline metric of a
    random ranking, for the classic, INSTRE and revisited-Medium ground truth) when ``dataset``
    is given, writes ``top10_<row>.png`` for every row with ``results["examples"]`` (query
    indices and their top-10 database indices), and sets ``results["summary"]`` to
    ``format_table(results)`` (what ``jretrieval.main`` prints).

    Args:
      results: the results dict; updated in place as above.
      out_dir: the folder.
      dataset: the ``jretrieval.datasets.Dataset`` ranked (paths, ``gnd``, boxes).
      config: the experiment config (unused beyond what ``results["settings"]`` holds).

    Returns:
      The paths written (``write_report``'s plus ``"top10/<row>"``).
    """
    del config
    if dataset is not None and dataset.gnd:
        try:
            results["chance"] = {
                "metric": headline_metric(dataset.protocol),
                "value": _chance(dataset.gnd, len(dataset.db_paths)),
            }
        except ValueError as e:
            logging.warning("no chance level: %s", e)
    paths = write_report(results, out_dir)
    for row, example in (results.get("examples") or {}).items():
        if dataset is None or not example or not example.get("queries"):
            continue
        queries = list(example["queries"])
        boxes = dataset.query_bbx
        target = os.path.join(os.fspath(out_dir), f"top10_{_safe_name(row)}.png")
        plot_top_results(
            [dataset.query_paths[q] for q in queries],
            dataset.db_paths,
            np.asarray(example["ranks"]),
            [dataset.gnd[q] for q in queries],
            target,
            n_queries=len(queries),
            k=min(10, np.asarray(example["ranks"]).shape[1]),
            bbx=None if boxes is None else [boxes[q] for q in queries],
        )
        paths[f"top10/{row}"] = target
    results["summary"] = format_table(results)
    return paths


def _chance(gnd: Sequence[Mapping[str, Any]], n_db: int) -> float:
    from jretrieval.datasets.demo import chance_map

    medium = []
    for entry in gnd:
        if "ok" in entry:
            medium.append(entry)
        else:  # revisited Medium: positives easy + hard, junk stays junk
            ok = np.concatenate([np.asarray(entry.get(k, []), np.int64) for k in ("easy", "hard")])
            medium.append({"ok": ok, "junk": entry.get("junk", [])})
    return chance_map(medium, n_db)


# ------------------------------------------------------------------------------ pictures


def _matplotlib_figure(width_in: float, height_in: float, dpi: int):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "plot_dimension_sweep needs matplotlib: pip install matplotlib "
            "(or pip install -e '.[plots]')"
        ) from e
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    return fig


def plot_dimension_sweep(
    results: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    metric: str | None = None,
    size: tuple[int, int] = (640, 400),
) -> str:
    """Table 3 as a picture: the metric against the PCA dimension, one line per model.

    The x axis is log2 (32 ... 2048); the no-PCA value ("True dim.") is a dashed horizontal
    line in the model's colour. Written as PNG (matplotlib, Agg backend) atomically.

    Args:
      results: a results dict holding a sweep (column keys "32".."2048" / "none").
      path: the PNG file.
      metric: what to plot (default: ``mAP``, ``M/mAP`` for the revisited protocol).
      size: ``(width, height)`` in pixels.

    Returns:
      ``path``.
    """
    sweep = [t for t in tables(results, paper=False) if t.layout == "table3"]
    if not sweep:
        raise ValueError(
            "results hold no Table 3 sweep (column keys '32'..'2048' or 'none'); columns "
            f"found: {_columns(results)}"
        )
    metric = metric or headline_metric(results.get("protocol"))
    keys = [(k, _split_column(k)) for k in _columns(results)]
    first = next(col for _, (col, dim) in keys if dim is not None)
    points = [(dim, k) for k, (col, dim) in keys if dim is not None and col == first]
    fig = _matplotlib_figure(size[0] / 100, size[1] / 100, 100)
    ax = fig.add_subplot(1, 1, 1)
    dims_seen: set[int] = set()
    colours = [f"C{i}" for i in range(10)]
    for i, (row, figures) in enumerate(results["models"].items()):
        colour = colours[i % len(colours)]
        xy = [(int(d), _number(figures.get(k, {}).get(metric))) for d, k in points if d.isdigit()]
        xy = sorted((x, y) for x, y in xy if y is not None)
        if xy:
            dims_seen.update(x for x, _ in xy)
            ax.plot(*zip(*xy, strict=True), marker="o", color=colour, label=_label(results, row))
        none = [_number(figures.get(k, {}).get(metric)) for d, k in points if d == "none"]
        if none and none[0] is not None:
            ax.axhline(none[0], color=colour, linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    if dims_seen:
        ticks = sorted(dims_seen)
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("PCA-whitening dimension (dashed: no PCA, true dimension)")
    ax.set_ylabel(f"{metric} (%)")
    where = f", {first}" if first else ""
    ax.set_title(f"{results['dataset']}{where}: {metric} against dimension", fontsize=10)
    ax.grid(True, alpha=0.3)
    if results["models"]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.fspath(path)
    _write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
    return path


def _thumbnail(path: str, thumb: int, bbx: Sequence[float] | None) -> Image.Image:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"plot_top_results: image {path!r} does not exist")
    with Image.open(path) as im:
        width = im.width
        im.draft("RGB", (thumb * 2, thumb * 2))  # fast JPEG decode at a reduced size
        im = im.convert("RGB")
    scale = im.width / width
    if bbx is not None:
        draw = ImageDraw.Draw(im)
        box = [float(v) * scale for v in bbx]
        draw.rectangle(box, outline=QUERY, width=max(2, round(3 * im.width / thumb)))
    out = Image.new("RGB", (thumb, thumb), (255, 255, 255))
    fitted = ImageOps.contain(im, (thumb, thumb))
    out.paste(fitted, ((thumb - fitted.width) // 2, (thumb - fitted.height) // 2))
    return out


def top_results_size(n_queries: int, k: int, thumb: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of ``plot_top_results``' picture."""
    cell = thumb + 2 * _BORDER
    width = 2 * _MARGIN + (k + 1) * cell + _QUERY_GAP + (k - 1) * _SPACING
    height = 2 * _MARGIN + n_queries * cell + (n_queries - 1) * _SPACING
    return width, height


def plot_top_results(
    query_paths: Sequence[str],
    db_paths: Sequence[str],
    ranks: Any,
    gnd: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    n_queries: int = 4,
    k: int = 10,
    thumb: int = 128,
    bbx: Sequence[Sequence[float] | None] | None = None,
) -> str:
    """A picture of the top-``k`` results of the first ``n_queries`` queries (PNG, Pillow).

    One row per query: the query (its box drawn in blue), then its top-``k`` database images
    framed green (positive: ``ok``, or ``easy``/``hard``), red (negative) or grey (junk).

    Args:
      query_paths: ``Q`` query image files.
      db_paths: ``N`` database image files.
      ranks: ``[Q, >=k]`` database indices, best first.
      gnd: ``Q`` ground-truth dicts of these queries.
      path: the PNG file (written atomically).
      n_queries: how many queries (the first ones) to show.
      k: results per query.
      thumb: side of each thumbnail in pixels.
      bbx: ``Q`` query boxes ``(x1, y1, x2, y2)`` to draw (default: ``gnd[i]["bbx"]``).

    Returns:
      ``path``; the picture is ``top_results_size(n_queries, k, thumb)`` pixels.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be a [Q, k] integer array; got {ranks.dtype} {ranks.shape}")
    n_queries = min(n_queries, len(query_paths))
    if len(gnd) < n_queries or ranks.shape[0] < n_queries:
        raise ValueError(
            f"{n_queries} queries shown but ranks has {ranks.shape[0]} rows and gnd {len(gnd)}"
        )
    if not 1 <= k <= ranks.shape[1]:
        raise ValueError(f"k={k}; ranks has {ranks.shape[1]} columns")
    shown = ranks[:n_queries, :k]
    if shown.size and (shown.min() < 0 or shown.max() >= len(db_paths)):
        raise ValueError(f"ranks hold indices outside 0..{len(db_paths) - 1}")
    canvas = Image.new("RGB", top_results_size(n_queries, k, thumb), (255, 255, 255))
    cell = thumb + 2 * _BORDER
    for i in range(n_queries):
        entry = gnd[i]
        if "ok" in entry:
            positives = set(np.asarray(entry["ok"]).reshape(-1).tolist())
        else:
            positives = set(np.asarray(entry.get("easy", [])).reshape(-1).tolist())
            positives |= set(np.asarray(entry.get("hard", [])).reshape(-1).tolist())
        junk = set(np.asarray(entry.get("junk", [])).reshape(-1).tolist())
        box = entry.get("bbx") if bbx is None else bbx[i]
        y = _MARGIN + i * (cell + _SPACING)
        tiles = [(query_paths[i], QUERY, box)]
        for j in shown[i].tolist():
            colour = POSITIVE if j in positives else JUNK if j in junk else NEGATIVE
            tiles.append((db_paths[j], colour, None))
        x = _MARGIN
        for t, (image, colour, b) in enumerate(tiles):
            canvas.paste(Image.new("RGB", (cell, cell), colour), (x, y))
            canvas.paste(_thumbnail(image, thumb, b), (x + _BORDER, y + _BORDER))
            x += cell + (_QUERY_GAP if t == 0 else _SPACING)
    path = os.fspath(path)
    _write_atomic(path, lambda f: canvas.save(f, format="PNG"), binary=True)
    return path
