"""Pictures of the results: Table 3 as a plot, and the top-10 results of a few queries.

Images are RGB; pictures are PNG files written atomically (``results_files.write_atomic``).
``plot_dimension_sweep`` needs matplotlib (optional: ``pip install -e '.[plots]'``);
``plot_top_results`` only Pillow.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from jretrieval import paper, tables
from jretrieval.metrics import headline_metric
from jretrieval.results import Results, as_results
from jretrieval.results_files import write_atomic

__all__ = [
    "FRAME_COLOURS",
    "plot_dimension_sweep",
    "plot_top_results",
    "top_results_size",
]

# Colours of the frames, and what the legend says they mean.
QUERY = (0, 90, 220)
POSITIVE = (0, 170, 0)
NEGATIVE = (220, 0, 0)
JUNK = (150, 150, 150)
FRAME_COLOURS: dict[str, tuple[tuple[int, int, int], str]] = {
    "query": (QUERY, "query (its box in blue)"),
    "positive": (POSITIVE, "positive"),
    "negative": (NEGATIVE, "negative"),
    "junk": (JUNK, "junk (ignored by the metric)"),
}
_BORDER, _MARGIN, _SPACING, _QUERY_GAP = 4, 8, 4, 16
_LEGEND, _TITLE, _CAPTION, _LINE = 22, 16, 26, 12  # heights in pixels
_TEXT = (0, 0, 0)


# ------------------------------------------------------------------------------ Table 3 plot


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
    results: Results | Mapping[str, Any],
    path: str | os.PathLike,
    *,
    metric: str | None = None,
    size: tuple[int, int] = (640, 400),
) -> str:
    """Table 3 as a picture: the metric against the PCA dimension, one line per model.

    The x axis is log2 (32 ... 2048); the no-PCA value ("True dim.") is a dashed horizontal
    line in the model's colour.

    Args:
      results: results holding a sweep (column keys "32".."2048" / "none").
      path: the PNG file.
      metric: what to plot (default: ``mAP``, ``M/mAP`` for the revisited protocol).
      size: ``(width, height)`` in pixels.

    Returns:
      ``path``.
    """
    results = as_results(results)
    if not any(t.layout == "table3" for t in tables.tables(results, paper_tables=False)):
        raise ValueError(
            "results hold no Table 3 sweep (column keys '32'..'2048' or 'none'); columns "
            f"found: {results.column_order()}"
        )
    metric = metric or headline_metric(results.protocol)
    keys = [(k, tables.split_column(k)) for k in results.column_order()]
    first = next(col for _, (col, dim) in keys if dim is not None)
    points = [(dim, k) for k, (col, dim) in keys if dim is not None and col == first]
    fig = _matplotlib_figure(size[0] / 100, size[1] / 100, 100)
    ax = fig.add_subplot(1, 1, 1)
    dims_seen: set[int] = set()
    for i, (row, figures) in enumerate(results.models.items()):
        colour = f"C{i % 10}"
        xy = [
            (int(d), tables.number(figures.get(k, {}).get(metric)))
            for d, k in points
            if d.isdigit()
        ]
        xy = sorted((x, y) for x, y in xy if y is not None)
        if xy:
            dims_seen.update(x for x, _ in xy)
            ax.plot(*zip(*xy, strict=True), marker="o", color=colour, label=results.label(row))
        none = [tables.number(figures.get(k, {}).get(metric)) for d, k in points if d == "none"]
        if none and none[0] is not None:
            ax.axhline(none[0], color=colour, linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    if dims_seen:
        ticks = sorted(dims_seen)
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel(f"PCA-whitening dimension (dashed: no PCA, {paper.NO_PCA})")
    ax.set_ylabel(f"{metric} (%)")
    where = f", {first}" if first else ""
    ax.set_title(f"{results.dataset}{where}: {metric} against dimension", fontsize=10)
    ax.grid(True, alpha=0.3)
    if results.models:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.fspath(path)
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
    return path


# ------------------------------------------------------------------------------ top-k picture


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
    height = (
        2 * _MARGIN + _LEGEND + n_queries * (_TITLE + cell + _CAPTION) + (n_queries - 1) * _SPACING
    )
    return width, height


def cell_origin(i: int, t: int, thumb: int) -> tuple[int, int]:
    """Top-left pixel of the frame of tile ``t`` (0: the query) of query row ``i``."""
    cell = thumb + 2 * _BORDER
    x = _MARGIN + t * (cell + _SPACING) + (_QUERY_GAP - _SPACING if t > 0 else 0)
    y = _MARGIN + _LEGEND + i * (_TITLE + cell + _CAPTION + _SPACING) + _TITLE
    return x, y


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text`` shortened from the left (``..`` prefix) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(".." + text, font=font) > width:
        text = text[1:]
    return ".." + text


def plot_top_results(
    query_paths: Sequence[str],
    result_paths: Sequence[Sequence[str]],
    labels: Sequence[Sequence[str]],
    path: str | os.PathLike,
    *,
    aps: Sequence[float | None] | None = None,
    bbx: Sequence[Sequence[float] | None] | None = None,
    thumb: int = 128,
    column: str | None = None,
) -> str:
    """A picture of the top results of a few queries (PNG, Pillow).

    A legend of the frame colours on top; then one row per query: a title with the query's
    file name and AP, the query (its box drawn in blue), then its results, best first, framed
    green (positive), red (negative) or grey (junk); under each image its rank and file name.

    Args:
      query_paths: ``Q`` query image files.
      result_paths: ``Q`` lists of ``k`` database image files, best first.
      labels: ``Q`` lists of ``k`` of ``"positive"``, ``"negative"``, ``"junk"``
        (``jretrieval.metrics.label_results``).
      path: the PNG file (written atomically).
      aps: ``Q`` APs in percent (``None``: no positives) shown in the titles.
      bbx: ``Q`` query boxes ``(x1, y1, x2, y2)`` to draw, or ``None``.
      thumb: side of each thumbnail in pixels.
      column: the ranking column shown, named in the titles.

    Returns:
      ``path``; the picture is ``top_results_size(Q, k, thumb)`` pixels.
    """
    n = len(query_paths)
    k = len(result_paths[0]) if n else 0
    if n == 0 or k == 0:
        raise ValueError(f"plot_top_results: nothing to show ({n} queries, {k} results each)")
    for name, value in (("result_paths", result_paths), ("labels", labels)):
        if len(value) != n or any(len(r) != k for r in value):
            raise ValueError(f"{name} must be {n} lists of {k} (one per query); got {value!r}")
    for name, value in (("aps", aps), ("bbx", bbx)):
        if value is not None and len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} queries")
    bad = sorted({lab for row in labels for lab in row} - {"positive", "negative", "junk"})
    if bad:
        raise ValueError(f"labels {bad}; expected 'positive', 'negative' or 'junk'")
    canvas = Image.new("RGB", top_results_size(n, k, thumb), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x = _MARGIN
    for colour, meaning in FRAME_COLOURS.values():  # the legend
        draw.rectangle([x, _MARGIN + 2, x + 12, _MARGIN + 14], fill=colour)
        draw.text((x + 16, _MARGIN + 3), meaning, fill=_TEXT, font=font)
        x += 16 + int(draw.textlength(meaning, font=font)) + 14
    cell = thumb + 2 * _BORDER
    for i in range(n):
        x0, y0 = cell_origin(i, 0, thumb)
        ap = None if aps is None else aps[i]
        ap_text = "no positives" if ap is None else f"AP {ap:.2f}%"
        where = f" ({column})" if column else ""
        title = f"{os.path.basename(query_paths[i])}: {ap_text}{where}"
        draw.text((x0, y0 - _TITLE + 2), title, fill=_TEXT, font=font)
        tiles = [(query_paths[i], QUERY, None if bbx is None else bbx[i], "query")]
        tiles += [
            (p, FRAME_COLOURS[lab][0], None, f"#{r + 1}")
            for r, (p, lab) in enumerate(zip(result_paths[i], labels[i], strict=True))
        ]
        for t, (image, colour, box, caption) in enumerate(tiles):
            x, y = cell_origin(i, t, thumb)
            canvas.paste(Image.new("RGB", (cell, cell), colour), (x, y))
            canvas.paste(_thumbnail(image, thumb, box), (x + _BORDER, y + _BORDER))
            draw.text((x, y + cell + 1), caption, fill=_TEXT, font=font)
            name = _fit(draw, os.path.basename(image), font, cell)
            draw.text((x, y + cell + 1 + _LINE), name, fill=_TEXT, font=font)
    path = os.fspath(path)
    write_atomic(path, lambda f: canvas.save(f, format="PNG"), binary=True)
    return path
