"""One row of a results table: post-processing, every ranking column, the metrics.

Shape convention: descriptor sets are row-major ``[N, D]`` (database) and ``[Q, D]`` (queries);
ranks are ``[Q, N]`` database indices, best first; figures are in percent.

A row is a model or an ensemble (``"a+b"``). ``evaluate_row`` takes its members' raw
descriptors (``Descriptors``, from ``jretrieval.experiment.describe``) and, for each whitening
dimension: L2-normalises each member and concatenates them (an ensemble: its members' vectors
L2-normalised, concatenated, L2-normalised again), PCA-whitens (learned once for all the
dimensions of a sweep, on ``learn_on``; ``None`` = no PCA, the paper's "True dim."), L2; or,
for AP-GeM with ``whitening.apgem="shipped"``, applies the checkpoint's own PCA as dirtorch's
``test_dir.py`` does. Then it ranks every column (``jretrieval.ranking``) and evaluates them
with the dataset's protocol (``jretrieval.metrics``), keeping the per-query AP.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jretrieval import metrics, paper, ranking, whitening
from jretrieval.datasets import Dataset
from jretrieval.models import apgem

__all__ = [
    "Descriptors",
    "LEARN_ON",
    "NO_PCA",
    "RowResults",
    "SHIPPED_PCA_POWER",
    "ShippedPCA",
    "column_key",
    "evaluate_row",
    "learn_whitening",
    "postprocess",
    "postprocess_shipped",
]

LEARN_ON = ("database", "database+queries")
NO_PCA = paper.NO_PCA
#: dirtorch ``test_dir.py``'s ``--whitenp``: the shipped PCA divides by variance ** 0.25.
SHIPPED_PCA_POWER = 0.25


class Descriptors(NamedTuple):
    """One model's raw (pooled, not normalised) descriptors of a dataset.

    Attributes:
      database: float32 ``[N_kept, C]`` rows for ``dataset.db_paths[db_kept]``.
      queries: float32 ``[Q_kept, C]`` rows for ``dataset.query_paths[q_kept]``.
      db_kept: int64 ``[N_kept]`` indices of the database images described.
      q_kept: int64 ``[Q_kept]`` indices of the queries described.
      info: stores, timings and skipped images.
    """

    database: np.ndarray
    queries: np.ndarray
    db_kept: np.ndarray
    q_kept: np.ndarray
    info: dict[str, Any]


def column_key(column: str, dim: int | None, *, sweep: bool, columns: int) -> str:
    """Name of a result column: the ranking column, the dim of a sweep, or both."""
    dim_name = NO_PCA if dim is None else str(dim)
    if not sweep:
        return column
    return dim_name if columns == 1 else f"{column} @ {dim_name}"


def learn_whitening(database: Any, queries: Any, *, learn_on: str = "database") -> Any:
    """The PCA-whitening of ``postprocess``, learned on L2-normalised ``learn_on`` descriptors.

    Learned once per row and shared by every dimension of a sweep (``dim`` only keeps the
    first components of the same PCA).
    """
    if learn_on not in LEARN_ON:
        raise ValueError(f"whitening.learn_on={learn_on!r}; expected one of {LEARN_ON}")
    db = whitening.l2_normalize(jnp.asarray(database, jnp.float32))
    if learn_on == "database":
        return whitening.learn_pca(db)
    q = whitening.l2_normalize(jnp.asarray(queries, jnp.float32))
    return whitening.learn_pca(jnp.concatenate([db, q]))


def postprocess(
    database: Any,
    queries: Any,
    *,
    dim: int | None,
    learn_on: str = "database",
    pca: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """L2 -> PCA-whitening (``dim`` components, learned on ``learn_on``) -> L2.

    Args:
      database: ``[N, D]`` descriptors (already L2-normalised per member for ensembles).
      queries: ``[Q, D]`` descriptors.
      dim: kept components, or ``None`` for no PCA (L2 only).
      learn_on: ``"database"`` or ``"database+queries"``.
      pca: a ``whitening.PCAWhitening`` already learned by ``learn_whitening`` on the same
        descriptors (a sweep learns it once); ``None``: learned here.

    Returns:
      ``(database [N, dim or D], queries [Q, dim or D])``, rows of unit norm.
    """
    if learn_on not in LEARN_ON:
        raise ValueError(f"whitening.learn_on={learn_on!r}; expected one of {LEARN_ON}")
    db, q = (
        whitening.l2_normalize(jnp.asarray(database, jnp.float32)),
        whitening.l2_normalize(jnp.asarray(queries, jnp.float32)),
    )
    if dim is None:
        return db, q
    if pca is None:
        pca = learn_whitening(db, q, learn_on=learn_on)
    components = int(pca.projection.shape[1])
    if dim > components:
        n_learn = db.shape[0] + (q.shape[0] if learn_on != "database" else 0)
        raise ValueError(
            f"whitening.dim={dim} exceeds the {components} components of a PCA learned on "
            f"{n_learn} descriptors of size {db.shape[1]} ({learn_on}); "
            f"expected a dim <= min(N, D) = {components}, or 'none'"
        )
    return whitening.apply(pca, db, dim=dim), whitening.apply(pca, q, dim=dim)


class ShippedPCA(NamedTuple):
    """The PCA an AP-GeM checkpoint ships (``"pca"`` variables) and its ``whiten`` flag."""

    arrays: Mapping[str, Any]
    whiten: bool


def postprocess_shipped(
    database: Any, queries: Any, pca: ShippedPCA, *, dim: int | None
) -> tuple[jax.Array, jax.Array]:
    """AP-GeM as dirtorch's ``test_dir.py`` evaluates it: the shipped PCA, power 0.25, L2.

    ``dim`` keeps the first components (``test_dir.py``'s ``--whitenv``; its default keeps all);
    ``None``: L2 only.
    """
    db = whitening.l2_normalize(jnp.asarray(database, jnp.float32))
    q = whitening.l2_normalize(jnp.asarray(queries, jnp.float32))
    if dim is None:
        return db, q
    k = int(np.shape(pca.arrays["components"])[0])
    if dim > k:
        raise ValueError(f"whitening.dim={dim} exceeds the {k} components of the shipped PCA")
    arrays = {
        "mean": pca.arrays["mean"],
        "components": pca.arrays["components"][:dim],
        "explained_variance": pca.arrays["explained_variance"][:dim],
    }
    power = SHIPPED_PCA_POWER
    return (
        apgem.apply_pca(arrays, db, power=power, whiten=pca.whiten),
        apgem.apply_pca(arrays, q, power=power, whiten=pca.whiten),
    )


def row_descriptors(
    rows: Descriptors | Sequence[Descriptors],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Concatenated, per-member L2-normalised descriptors over the images all members kept."""
    members = [rows] if isinstance(rows, Descriptors) else list(rows)
    db_kept = members[0].db_kept
    q_kept = members[0].q_kept
    for m in members[1:]:
        db_kept = np.intersect1d(db_kept, m.db_kept)
        q_kept = np.intersect1d(q_kept, m.q_kept)
    db_parts, q_parts = [], []
    for m in members:
        db_rows = np.searchsorted(m.db_kept, db_kept)
        q_rows = np.searchsorted(m.q_kept, q_kept)
        db_parts.append(np.asarray(whitening.l2_normalize(jnp.asarray(m.database[db_rows]))))
        q_parts.append(np.asarray(whitening.l2_normalize(jnp.asarray(m.queries[q_rows]))))
    return np.concatenate(db_parts, 1), np.concatenate(q_parts, 1), db_kept, q_kept


class RowResults(NamedTuple):
    """What ``evaluate_row`` returns for one row (a model or an ensemble).

    Attributes:
      figures: ``{column key: {metric: percent}}``.
      per_query: ``{column key: {mAP key: [AP percent or None per evaluated query]}}``.
      queries: dataset indices of the evaluated queries (the order of ``per_query``).
      example: the first column's top-10 of the first ``top`` queries, for the picture.
      seconds: ``{"whitening", "ranking", "evaluation"}`` wall time.
      chance: ``(metric, value)``: the headline metric of a random ranking, these queries.
    """

    figures: dict[str, dict[str, float]]
    per_query: dict[str, dict[str, list[float | None]]]
    queries: list[int]
    example: dict[str, Any]
    seconds: dict[str, float]
    chance: tuple[str, float] | None


def _example(dataset: Dataset, key: str, q_idx: np.ndarray, top10: np.ndarray, aps: Any) -> dict:
    labels = metrics.label_results(top10, [dataset.gnd[i] for i in q_idx], dataset.protocol)
    boxes = dataset.query_bbx
    return {
        "column": key,
        "queries": q_idx.tolist(),
        "query_paths": [dataset.query_paths[i] for i in q_idx],
        "bbx": None if boxes is None else [boxes[i] for i in q_idx],
        "ap": [None if np.isnan(a) else float(a) for a in aps],
        "ranks": top10.tolist(),
        "paths": [[dataset.db_paths[j] for j in row] for row in top10.tolist()],
        "labels": labels,
    }


def evaluate_row(
    descriptors: Sequence[Descriptors],
    dataset: Dataset,
    *,
    dims: Sequence[int | None],
    columns: Sequence[str],
    params: ranking.RankingParams,
    learn_on: str = "database",
    top: int = 0,
    mesh: Any = None,
    shipped: ShippedPCA | None = None,
) -> RowResults:
    """Figures of one row (a model or an ensemble) for every whitening dim and column.

    Args:
      descriptors: the members' raw descriptors (one for a single model).
      dataset: the dataset (ground truth, protocol, database size).
      dims: whitening dims (``None``: no PCA); the PCA is learned once for all of them.
      columns: ranking column names.
      params: ranking parameters; learn_on: see ``postprocess``.
      top: queries whose top-10 lists are returned (for the report's picture).
      mesh: device mesh; with several devices the ranking runs sharded along N
        (``ranking.rank_columns(mesh=...)``).
      shipped: AP-GeM's shipped PCA (``whitening.apgem="shipped"``) instead of the learned one.

    Returns:
      ``RowResults``; column keys from ``column_key``.
    """
    db_raw, q_raw, db_kept, q_kept = row_descriptors(descriptors)
    gnd = [dataset.gnd[i] for i in q_kept]
    headline = metrics.headline_metric(dataset.protocol)
    sweep = len(dims) > 1
    figures: dict[str, dict[str, float]] = {}
    per_query: dict[str, dict[str, list[float | None]]] = {}
    example: dict[str, Any] = {}
    seconds = {"whitening": 0.0, "ranking": 0.0, "evaluation": 0.0}
    pca = None
    for dim in dims:
        t0 = time.perf_counter()
        if shipped is not None:
            db, q = postprocess_shipped(db_raw, q_raw, shipped, dim=dim)
        else:
            if dim is not None and pca is None:  # once per row, whatever the number of dims
                pca = learn_whitening(db_raw, q_raw, learn_on=learn_on)
            db, q = postprocess(db_raw, q_raw, dim=dim, learn_on=learn_on, pca=pca)
        db, q = jax.block_until_ready((db, q))
        t1 = time.perf_counter()
        ranks = jax.block_until_ready(ranking.rank_columns(q, db, params, columns, mesh=mesh))
        t2 = time.perf_counter()
        for col, r in ranks.items():
            key = column_key(col, dim, sweep=sweep, columns=len(columns))
            full = db_kept[np.asarray(r)]  # indices into dataset.db_paths
            figures[key], aps = metrics.evaluate_queries(
                full, gnd, dataset.protocol, num_database=len(dataset.db_paths)
            )
            per_query[key] = {
                m: [None if np.isnan(a) else float(a) for a in v] for m, v in aps.items()
            }
            if not example and top > 0:
                example = _example(dataset, key, q_kept[:top], full[:top, :10], aps[headline][:top])
        seconds["whitening"] += t1 - t0
        seconds["ranking"] += t2 - t1
        seconds["evaluation"] += time.perf_counter() - t2
    try:
        chance = metrics.chance_level(gnd, dataset.protocol, len(dataset.db_paths))
    except ValueError as e:  # no query with positives
        logging.warning("no chance level: %s", e)
        chance = None
    return RowResults(figures, per_query, q_kept.tolist(), example, seconds, chance)
