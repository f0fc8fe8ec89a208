"""What a query prints and the files other tools read: a table, JSON, ``.npy`` files, faiss.

Shape convention: database ``[N, d]`` and queries ``[Q, d]`` post-processed float32 rows;
``ranks.npy`` is int64 ``[N, Q]``: column ``q`` holds every database row by decreasing inner
product, revisitop's ``compute_map(ranks, gnd)`` layout (filipradenovic/revisitop); the
descriptor files are the ``X``/``Q`` inputs of the diffusion authors' code (fyang93/diffusion:
``gallery.npy``/``query.npy`` take rows). ``*_paths.txt`` name the rows, one per line.

``faiss``: an ``IndexFlatIP`` of the post-processed database (inner product = cosine on these
unit rows), written with ``faiss.write_index``; faiss is an optional extra
(``pip install jretrieval[faiss]``), and without it the export stops with that instruction.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jretrieval.index import wiring

__all__ = ["as_json", "as_table", "export_database", "export_queries", "write_faiss"]


def as_table(images: Sequence[str], hits: Any) -> str:
    """Rank, score and path of each query's results, one block per query image."""
    lines = []
    for q, path in enumerate(images):
        lines.append(f"query: {path}")
        lines.append(f"{'rank':>5}  {'score':>7}  path")
        for r, (score, name) in enumerate(zip(hits.scores[q], hits.paths[q], strict=True)):
            lines.append(f"{r + 1:>5}  {score:7.4f}  {name}")
    return "\n".join(lines)


def as_json(images: Sequence[str], hits: Any) -> list[dict[str, Any]]:
    """``[{"query": PATH, "results": [{"rank", "score", "path"}, ...]}, ...]``."""
    return [
        {
            "query": path,
            "results": [
                {"rank": r + 1, "score": round(float(s), 6), "path": name}
                for r, (s, name) in enumerate(zip(hits.scores[q], hits.paths[q], strict=True))
            ],
        }
        for q, path in enumerate(images)
    ]


def write_faiss(database: np.ndarray, path: str) -> str:
    """A faiss ``IndexFlatIP`` of ``database`` written to ``path``."""
    try:
        import faiss
    except ImportError:
        raise ValueError(
            "--export=faiss needs faiss, which is not installed; "
            "`pip install jretrieval[faiss]` (or faiss-cpu), or use --export=npy"
        ) from None
    index = faiss.IndexFlatIP(int(database.shape[1]))
    index.add(np.ascontiguousarray(database, np.float32))
    faiss.write_index(index, path)
    return path


def _database_files(index: Any, kind: str, folder: str) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    if kind == "faiss":
        return [write_faiss(index.database, os.path.join(folder, "database.faiss"))]
    np.save(os.path.join(folder, "database.npy"), index.database)
    with open(os.path.join(folder, "database_paths.txt"), "w", encoding="utf-8") as f:
        f.writelines(p + "\n" for p in index.paths)
    return [os.path.join(folder, n) for n in ("database.npy", "database_paths.txt")]


def export_database(index: Any, kind: str, out: str) -> list[str]:
    """``build --export``: the database files under ``<INDEX_DIR>/export/``."""
    return _database_files(index, kind, os.path.join(out, "export"))


def export_queries(index: Any, kind: str, out: str, images: Sequence[str], hits: Any) -> list[str]:
    """``query --export``: database files, and for npy the queries and their full ranks."""
    written = _database_files(index, kind, out)
    if kind == "npy":
        q = np.asarray(hits.queries, np.float32)
        order = wiring.rank(q, index.database)  # every row, best first
        np.save(os.path.join(out, "queries.npy"), q)
        np.save(os.path.join(out, "ranks.npy"), np.asarray(order, np.int64).T)
        with open(os.path.join(out, "query_paths.txt"), "w", encoding="utf-8") as f:
            f.writelines(os.fspath(p) + "\n" for p in images)
        written += [os.path.join(out, n) for n in ("queries.npy", "ranks.npy", "query_paths.txt")]
    return written
