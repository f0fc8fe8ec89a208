"""The report of an experiment: run it, then write its files and pictures.

``run(config)`` is what ``python -m jretrieval.main`` calls: ``jretrieval.experiment.run``
computes a ``jretrieval.results.Results`` (writing nothing), then ``write`` puts under
``output_dir(config)`` (``config.output.dir``, or ``<workdir>/results``):

- ``results.json``: every figure, per-query AP, the choices made, timings and provenance;
- ``results.csv``: the figures in long format; ``table.md``: the tables with the paper's
  published figures (``jretrieval.tables``, ``jretrieval.results_files``);
- ``dimension_sweep.png`` for a Table 3 sweep (matplotlib), and ``top10_<row>.png`` for each
  row with examples (``config.output.top10_queries`` > 0; ``jretrieval.pictures``).

With several processes (``distributed.multihost``) every process computes the same results and
only process 0 writes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, TextIO

from absl import logging

from jretrieval import experiment, files, pictures, results_files, tables
from jretrieval import mesh as mesh_lib
from jretrieval.results import Results, as_results

__all__ = ["output_dir", "run", "summary", "write"]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name) or "model"


def output_dir(config: Any) -> str:
    """Where ``run`` writes: ``config.output.dir``, or ``<workdir>/results``."""
    out = config.output.get("dir") if "output" in config else None
    return os.fspath(out) if out else os.path.join(config.workdir, "results")


def summary(results: Results | Mapping[str, Any]) -> str:
    """The console text: the tables, the paper's figures and our differences, the notes."""
    return tables.format_table(results)


def write(
    results: Results | Mapping[str, Any], out_dir: str | os.PathLike, *, plot: bool | None = None
) -> dict[str, str]:
    """Writes the result files, the sweep plot and the top-10 pictures into ``out_dir``.

    Args:
      results: a ``Results`` (or its dict form).
      out_dir: the folder (created if needed).
      plot: write ``dimension_sweep.png`` for a Table 3 sweep: ``None`` when matplotlib is
        installed (a warning otherwise), ``True`` always (ImportError without matplotlib),
        ``False`` never.

    Returns:
      ``{"json", "csv", "markdown"}`` paths, plus ``"plot"`` and ``"top10/<row>"`` when
      written.
    """
    results = as_results(results)
    out_dir = os.fspath(out_dir)
    paths = results_files.write_files(results, out_dir)
    has_sweep = any(t.layout == "table3" for t in tables.tables(results, paper_tables=False))
    if plot is not False and has_sweep:
        target = os.path.join(out_dir, "dimension_sweep.png")
        try:
            paths["plot"] = pictures.plot_dimension_sweep(results, target)
        except ImportError as e:
            if plot:
                raise
            logging.warning("no dimension-sweep plot: %s", e)
    for row, example in results.examples.items():
        if not example or not example.get("queries"):
            continue
        target = os.path.join(out_dir, f"top10_{_safe_name(row)}.png")
        paths[f"top10/{row}"] = pictures.plot_top_results(
            example["query_paths"],
            example["paths"],
            example["labels"],
            target,
            aps=example.get("ap"),
            bbx=example.get("bbx"),
            column=example.get("column"),
        )
    logging.info("report written to %s", out_dir)
    return paths


def run(config: Any, *, echo: TextIO | None = None) -> Results:
    """Runs the experiment of ``config`` and writes its report (process 0 only).

    Args:
      config: the experiment config.
      echo: a stream for the console tables (``python -m jretrieval.main``: stdout), written
        before any file, so that a folder that cannot be written loses nothing computed.

    Returns:
      The ``Results`` (also written under ``output_dir(config)``).
    """
    results = experiment.run(config)
    if mesh_lib.is_main_process():  # every process computed the same; one writes
        out = output_dir(config)
        if echo is not None:
            echo.write(summary(results) + "\n")
            echo.flush()
        with files.writer_lock(os.path.join(out, "results"), what="results"):  # one run at a time
            write(results, out)
    return results
