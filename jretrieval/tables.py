"""Tables shaped like the paper's, from a ``Results``: the table model, bold rules, Markdown and
console text, and the comparison with the paper's published figures.

Layouts, as in the paper: **Table 1** (classic / INSTRE protocol): rows = models, columns = the
ranking columns, mAP. **Table 2** (revisited protocol, one per ranking column): rows = models,
Easy / Medium / Hard x mAP, mP@5, mP@10. **Table 3** (sweep): rows = models, columns = PCA
dimensions and "True dim.", the headline metric (mAP; M/mAP for the revisited protocol), best
per row in bold. In Tables 1 and 2 the best value of each column is bold, single models and
ensembles (``"a+b"`` rows) ranked separately (a group with one value has no best) and the
fine-tuned upper bound (``jretrieval.paper.UPPER_BOUND``) not ranked, as in the paper.

Where the paper published figures for the same dataset, rows and columns
(``jretrieval.paper.PUBLISHED``), Markdown follows each table with the published one, and the
console prints under each of our rows the paper's figure and our difference from it. A
published column with a note (``jretrieval.paper.PUBLISHED_NOTES``) is marked and its note
printed under the table instead of a difference.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from jretrieval import paper
from jretrieval.metrics import headline_metric
from jretrieval.results import Results, as_results, jsonable

__all__ = ["Table", "format_markdown", "format_table", "published", "split_column", "tables"]

#: marks a published column that is not compared (its note follows the table).
NOTE_MARK = "†"


class Table(NamedTuple):
    """One table of the report.

    Attributes:
      layout: ``"table1"``, ``"table2"`` or ``"table3"``.
      title: what it shows (dataset, metric, column).
      header: column headers, the first being ``"Method"``.
      rows: ``(row key, label, values)`` with ``None`` for a missing value.
      bold: per row, which values are the best (see the module docstring).
      reference: ``True`` for the paper's published figures.
      paper_keys: per column, the key of the paper's figure it matches (``None``: none).
    """

    layout: str
    title: str
    header: list[str]
    rows: list[tuple[str, str, list[float | None]]]
    bold: list[list[bool]]
    reference: bool = False
    paper_keys: tuple[str | None, ...] = ()


def number(value: Any) -> float | None:
    """A figure as a float, ``None`` for missing or NaN."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def split_column(key: str) -> tuple[str | None, str | None]:
    """``(ranking column, dim name)`` of a column key; dim ``None`` for plain ranking columns."""
    if " @ " in key:
        col, dim = key.rsplit(" @ ", 1)
        return col, ("none" if dim in paper.NO_PCA_NAMES else dim)
    if key in paper.NO_PCA_NAMES:
        return None, "none"
    if key.isdigit():
        return None, key
    return key, None


def _bold_by_column(keys: Sequence[str], values: list[list[float | None]]) -> list[list[bool]]:
    """Best of each column, single models and ensembles ranked separately (2+ values)."""
    bold = [[False] * len(v) for v in values]
    groups: dict[bool, list[int]] = {}
    for i, key in enumerate(keys):
        if key not in paper.UPPER_BOUND:
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


def _make(layout, title, header, keys, labels, values, paper_keys, *, reference=False) -> Table:
    bold = _bold_by_row(values) if layout == "table3" else _bold_by_column(keys, values)
    rows = list(zip(keys, labels, values, strict=True))
    return Table(layout, title, header, rows, bold, reference, tuple(paper_keys))


def published(table: Table, dataset: str) -> dict[str, list[float | None]]:
    """The paper's figures aligned with ``table``'s columns, for the rows it published."""
    figures = paper.PUBLISHED.get(table.layout, {}).get(dataset, {})
    order = paper.PUBLISHED_ORDER[table.layout]
    out = {}
    for key, _, _ in table.rows:
        if key in figures and any(table.paper_keys):
            out[key] = [
                None if c is None else figures[key][order.index(c)] for c in table.paper_keys
            ]
    return out


def _column_notes(table: Table, dataset: str) -> list[tuple[int, str]]:
    """``(column index, note)`` for the published columns the paper's figures are doubtful in."""
    return [
        (j, paper.PUBLISHED_NOTES[(table.layout, dataset, c)])
        for j, c in enumerate(table.paper_keys)
        if (table.layout, dataset, c) in paper.PUBLISHED_NOTES
    ]


def _paper_table(table: Table, dataset: str) -> Table | None:
    figures = published(table, dataset)
    if not figures:
        return None
    labels = {k: lab for k, lab, _ in table.rows}
    title = f"{table.title}, as published in the paper ({paper.CITATION}), for reference"
    return _make(
        table.layout,
        title,
        table.header,
        list(figures),
        [labels[k] for k in figures],
        list(figures.values()),
        table.paper_keys,
        reference=True,
    )


def tables(results: Results | Mapping[str, Any], *, paper_tables: bool = True) -> list[Table]:
    """The report's tables (see the module docstring), with the paper's where it has them.

    Args:
      results: a ``Results`` (or its dict form).
      paper_tables: append the paper's published figures after each table they exist for.

    Returns:
      Tables in order: Table 1 or the Table 2 blocks (ranking columns), then Table 3 (sweep).
    """
    results = as_results(results)
    keys = list(results.models)
    labels = [results.label(k) for k in keys]
    plain, sweeps = [], {}
    for key in results.column_order():
        col, dim = split_column(key)
        if dim is None:
            plain.append(key)
        else:
            sweeps.setdefault(col, []).append((dim, key))

    def value(row: str, column: str, metric: str) -> float | None:
        return number(results.models[row].get(column, {}).get(metric))

    out: list[Table] = []

    def add(table: Table) -> None:
        out.append(table)
        ref = _paper_table(table, results.dataset) if paper_tables else None
        if ref is not None:
            out.append(ref)

    dataset, protocol = results.dataset, results.protocol
    if plain and protocol == "revisited":
        wanted = [m for m in (results.metrics or paper.TABLE2_METRICS) if m in paper.TABLE2_METRICS]
        shown = wanted or list(paper.TABLE2_METRICS)
        for col in plain:
            values = [[value(r, col, m) for m in shown] for r in keys]
            title = f"Table 2: {dataset}, {col}, Easy (E) / Medium (M) / Hard (H), percent"
            paper_keys = shown if col == "G" else [None] * len(shown)
            add(_make("table2", title, ["Method", *shown], keys, labels, values, paper_keys))
    elif plain:
        metric = headline_metric(protocol)
        values = [[value(r, c, metric) for c in plain] for r in keys]
        title = f"Table 1: {dataset}, {metric} (%)"
        paper_keys = [c if c in paper.COLUMNS else None for c in plain]
        add(_make("table1", title, ["Method", *plain], keys, labels, values, paper_keys))
    for col, dims in sweeps.items():
        metric = headline_metric(protocol)
        dims = sorted(dims, key=lambda d: (d[0] == "none", int(d[0]) if d[0].isdigit() else 0))
        header = ["Method", *(paper.NO_PCA if d == "none" else d for d, _ in dims)]
        values = [[value(r, key, metric) for _, key in dims] for r in keys]
        where = f", {col}" if col else ""
        title = f"Table 3: {dataset}{where}, {metric} (%) by PCA-whitening dimension"
        matches = col in (None, "G")
        paper_keys = [d if matches and d in paper.TABLE3_DIM_NAMES else None for d, _ in dims]
        add(_make("table3", title, header, keys, labels, values, paper_keys))
    return out


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _settings_lines(results: Results) -> list[str]:
    """The choices the numbers depend on, stated beside them."""
    lines = []
    choices = results.choices or {}
    bn = choices.get("bn")
    if bn:
        if bn.get("mode") == "none":
            lines.append("BN recalibration: none (the checkpoints' own statistics)")
        else:
            what = {
                "pytorch": "PyTorch model.train() forward pass as in the paper (running "
                f"averages, momentum {bn.get('momentum')}, unbiased variance)",
                "exact": "exact population statistics (this project's improvement on the "
                "paper's running averages)",
            }.get(bn.get("mode"), str(bn.get("mode")))
            lines.append(
                f"BN recalibration: {what}; batch size {bn.get('batch_size')}, images: "
                f"{bn.get('images')} in {bn.get('order')}"
            )
    whitening = choices.get("whitening")
    if whitening:
        lines.append(f"whitening: {whitening}")
    if choices.get("apgem"):
        lines.append(f"GeM (AP) post-processing: {choices['apgem']}")
    settings = results.settings or {}
    for name, path in (("input", ("extraction", "policy")), ("pooling", ("pooling", "name"))):
        node: Any = settings
        for part in path:
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            lines.append(f"{name}: {json.dumps(jsonable(node))}")
    return lines


def _notes(results: Results) -> list[str]:
    lines = [str(n) for n in results.notes]
    chance = results.chance
    if isinstance(chance, Mapping) and chance.get("value") is not None:
        lines.append(
            f"Chance level (expected {chance.get('metric', 'mAP')} of a random ranking): "
            f"{float(chance['value']):.2f}%"
        )
    for model, items in results.skipped.items():
        lines.append(f"{model}: {len(items)} unreadable images skipped (listed in results.json)")
    return lines


def format_markdown(results: Results | Mapping[str, Any], *, paper_tables: bool = True) -> str:
    """The report as Markdown: notes, settings, the tables (best values in bold)."""
    results = as_results(results)
    out = [f"# {results.dataset}: retrieval results", ""]
    for note in _notes(results):
        out += [f"> {note}", ""]
    settings = _settings_lines(results)
    if settings:
        out += [f"- {s}" for s in settings] + [""]
    for table in tables(results, paper_tables=paper_tables):
        notes = _column_notes(table, results.dataset) if table.reference else []
        marked = {j for j, _ in notes}
        header = [h + (NOTE_MARK if j - 1 in marked else "") for j, h in enumerate(table.header)]
        out += [f"## {table.title}", ""]
        out.append("| " + " | ".join(header) + " |")
        out.append("| :-- | " + " | ".join("--:" for _ in header[1:]) + " |")
        for (_, label, values), bold in zip(table.rows, table.bold, strict=True):
            cells = [
                f"**{_cell(v)}**" if b else _cell(v) for v, b in zip(values, bold, strict=True)
            ]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        what = "row" if table.layout == "table3" else "column"
        out += ["", f"Best per {what} in bold.", ""]
        out += [f"{NOTE_MARK} {table.header[j + 1]}: {note}" for j, note in notes]
        out += [""] if notes else []
    return "\n".join(out)


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def format_table(results: Results | Mapping[str, Any], *, compare: bool = True) -> str:
    """The tables as fixed-width text for the console (best values marked ``*``).

    With ``compare``, every row the paper published for this dataset is followed by a
    ``paper`` line (its figures) and a ``diff`` line (ours minus the paper's); a column with a
    note (``jretrieval.paper.PUBLISHED_NOTES``) shows ``†`` instead of a difference, and the
    note is printed under the table.
    """
    results = as_results(results)
    blocks = []
    for table in tables(results, paper_tables=False):
        ref = published(table, results.dataset) if compare else {}
        notes = _column_notes(table, results.dataset) if ref else []
        noted = {j for j, _ in notes}
        body = []
        for (key, label, values), bold in zip(table.rows, table.bold, strict=True):
            body.append(
                [label]
                + [_cell(v) + ("*" if b else " ") for v, b in zip(values, bold, strict=True)]
            )
            if key in ref:
                theirs = ref[key]
                body.append(["  paper"] + [_cell(p) + " " for p in theirs])
                diffs = []
                for j, (v, p) in enumerate(zip(values, theirs, strict=True)):
                    if j in noted:
                        diffs.append(NOTE_MARK + " ")
                    elif v is None or p is None:
                        diffs.append("- ")
                    else:
                        diffs.append(_signed(v - p) + " ")
                body.append(["  diff"] + diffs)
        header = [table.header[0]] + [h + " " for h in table.header[1:]]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = [table.title]
        for r in [header, *body]:
            cells = [r[0].ljust(widths[0])] + [
                c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
            ]
            lines.append("  ".join(cells).rstrip())
        if ref:
            lines.append(f"paper: {paper.CITATION}; diff: ours minus the paper's.")
        lines += [f"{NOTE_MARK} {table.header[j + 1]}: {note}" for j, note in notes]
        blocks.append("\n".join(lines))
    notes = _notes(results)
    return "\n\n".join(blocks + (["\n".join(notes)] if notes else []))
