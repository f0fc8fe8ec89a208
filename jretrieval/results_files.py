"""Result files: ``results.json`` (the whole ``Results``), ``results.csv`` (long format) and
``table.md``, written atomically with the user's umask, and read back.

``results.csv`` has one line per figure: ``dataset,model,column,metric,value`` (values written
with ``repr``, so they read back exactly; empty for a missing figure).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from jretrieval import tables
from jretrieval.results import Results, as_results

__all__ = ["CSV_FIELDS", "read_csv", "read_json", "read_results", "write_atomic", "write_files"]

CSV_FIELDS = ("dataset", "model", "column", "metric", "value")


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; restored at once
    os.umask(mask)
    return mask


def write_atomic(path: str, writer: Callable[[Any], None], *, binary: bool = False) -> None:
    """Writes through ``writer(file)`` to a temporary name beside ``path``, then renames.

    The file gets the mode a plain ``open(path, "w")`` would (``0o666`` less the umask;
    ``mkstemp`` alone would leave ``0o600``). On any error the old file, if any, is kept and
    the temporary file removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            writer(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _csv_text(results: Results) -> str:
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(CSV_FIELDS)
    for row, columns in results.models.items():
        for column, figures in columns.items():
            for metric, value in figures.items():
                v = tables.number(value)
                out.writerow([results.dataset, row, column, metric, "" if v is None else repr(v)])
    return buf.getvalue()


def write_files(results: Results | Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """Writes ``results.json``, ``results.csv`` and ``table.md`` into ``out_dir`` (created).

    Returns:
      ``{"json": path, "csv": path, "markdown": path}``.
    """
    results = as_results(results)
    out_dir = os.fspath(out_dir)
    paths = {
        "json": os.path.join(out_dir, "results.json"),
        "csv": os.path.join(out_dir, "results.csv"),
        "markdown": os.path.join(out_dir, "table.md"),
    }
    text = json.dumps(results.to_dict(), indent=2, allow_nan=False) + "\n"
    csv_text = _csv_text(results)
    markdown = tables.format_markdown(results) + "\n"
    write_atomic(paths["json"], lambda f: f.write(text))
    write_atomic(paths["csv"], lambda f: f.write(csv_text))
    write_atomic(paths["markdown"], lambda f: f.write(markdown))
    return paths


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
    """Reads a ``results.json`` as a plain dict."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_results(path: str | os.PathLike) -> Results:
    """Reads a ``results.json`` back as a ``Results``; a bad file raises naming it."""
    try:
        return Results.from_dict(read_json(path))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a results.json of jretrieval: {e}") from None
