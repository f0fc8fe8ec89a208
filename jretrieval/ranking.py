"""The ranking columns of the paper's Table 1, as named compositions of search, AQE, DBA and DFS.

Shape convention: ``queries`` ``[Q, D]`` and ``database`` ``[N, D]`` are the post-processed
descriptors (L2 -> PCA-whitening -> L2, see ``jretrieval.whitening``), row-major; every column
returns ``ranks`` int ``[Q, N]``: for each query, all database indices, best first (the layout
``jretrieval.metrics.evaluate`` reads).

The columns (Krishna et al., ICMR 2021, Sec. 4.1; ``N`` = AQE neighbours, ``N'`` = DBA
neighbours):

=================  ===========================================================================
``G``              global search: ``search.rank(q, db)``.
``G+AQE``          ``q' = aqe(q, db, k=aqe_k)`` (``N = 10``); ``search.rank(q', db)``.
``G+DFS``          ``diffusion.rank(q, db)``.
``G+DBA``          ``db' = dba(db, k=dba_k)`` (``N' = 20``); ``search.rank(q, db')``.
``G+AQE+DFS``      ``q' = aqe(q, db, k=aqe_k)``; ``diffusion.rank(q', db)``: the expanded
                   queries are the queries the diffusion starts from (their kNN and, in
                   ``joint`` mode, their nodes in the graph); the graph's database side is
                   ``db`` unchanged.
``G+DBA+AQE``      ``db' = dba(db, k=combined_dba_k)`` (``N' = 20``);
                   ``q' = aqe(q, db', k=combined_aqe_k)`` (``N = 1``, after Gordo et al. 2017:
                   the query is expanded with its neighbour in the *augmented* database);
                   ``search.rank(q', db')``.
``G+DBA+DFS``      ``db' = dba(db, k=dba_k)``; ``diffusion.rank(q, db')``: the diffusion graph
                   is built on the augmented database.
``G+DBA+AQE+DFS``  ``db' = dba(db, k=combined_dba_k)``; ``q' = aqe(q, db', k=combined_aqe_k)``;
                   ``diffusion.rank(q', db')``.
=================  ===========================================================================

DBA is applied to the database side only (queries are not database images); the search that
follows, plain or diffused, is always against that same augmented database, and indices refer
to the original database order (DBA changes vectors, not their positions). Queries are never
augmented with each other.

Parameters come from the experiment config: ``cfg.ranking`` (``aqe_k``, ``dba_k``,
``combined_aqe_k``, ``combined_dba_k``, ``aqe_alpha``, ``dba_alpha``, ``block_size``) and
``cfg.diffusion`` (``truncation``, ``kd``, ``kq``, ``gamma``, ``alpha``, ``mode``, ``solver``;
keyword arguments of ``jretrieval.diffusion.rank``). ``rank_columns`` computes several columns at
once, sharing the DBA'd database and the expanded queries between them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.typing import ArrayLike

from jretrieval import checks, diffusion, expansion, paper, search
from jretrieval import mesh as mesh_lib
from jretrieval.mesh import Sharded, shard_rows

__all__ = [
    "COLUMNS",
    "COLUMN_NAMES",
    "ColumnSpec",
    "RankingParams",
    "check_columns",
    "column_spec",
    "params_from_config",
    "rank_column",
    "rank_columns",
]


class ColumnSpec(NamedTuple):
    """Which stages a column composes: DBA on the database, AQE on the queries, diffusion."""

    dba: bool
    aqe: bool
    dfs: bool


def column_spec(name: str) -> ColumnSpec:
    """The stages a column composes, read from its name: the "+"-separated parts after "G"."""
    stages = name.split("+")
    return ColumnSpec(dba="DBA" in stages, aqe="AQE" in stages, dfs="DFS" in stages)


#: Table 1's columns (``jretrieval.paper.COLUMNS``), in the paper's order, and their stages.
SPECS: dict[str, ColumnSpec] = {name: column_spec(name) for name in paper.COLUMNS}
COLUMN_NAMES: tuple[str, ...] = paper.COLUMNS

DIFFUSION_KEYS = ("truncation", "kd", "kq", "gamma", "alpha", "mode", "solver")


class RankingParams(NamedTuple):
    """Hyperparameters of the columns (defaults: the paper's).

    Attributes:
      aqe_k: AQE neighbours ``N`` when AQE is used without DBA (10).
      dba_k: DBA neighbours ``N'`` when DBA is used without AQE (20).
      combined_aqe_k: AQE neighbours when combined with DBA (1, after Gordo et al. 2017).
      combined_dba_k: DBA neighbours when combined with AQE (20).
      aqe_alpha, dba_alpha: weighting exponents (0: plain averages; see ``jretrieval.expansion``).
      block_size: database rows scored at once by the searches and the expansions' kNN
        (memory ``Q x block_size`` for search and AQE, at most ``512 x block_size`` for DBA's
        chunks of 512 database rows); ``None``: ``jretrieval.search``'s default.
      diffusion: keyword arguments of ``jretrieval.diffusion.rank``.
    """

    aqe_k: int = 10
    dba_k: int = 20
    combined_aqe_k: int = 1
    combined_dba_k: int = 20
    aqe_alpha: float = 0.0
    dba_alpha: float = 0.0
    block_size: int | None = 16384
    diffusion: Mapping[str, Any] = {
        "truncation": 1000,
        "kd": 50,
        "kq": 10,
        "gamma": 3.0,
        "alpha": 0.99,
        "mode": "joint",
        "solver": "auto",
    }


def _section(cfg: Any, key: str) -> Mapping[str, Any]:
    try:
        section = cfg[key]
    except (KeyError, TypeError, AttributeError):
        section = getattr(cfg, key, None)
    if section is None:
        raise ValueError(f"ranking config has no {key!r} section; got keys {_keys(cfg)}")
    return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def _keys(cfg: Any) -> list[str]:
    try:
        return sorted(cfg.keys())
    except AttributeError:
        return []


def params_from_config(cfg: Any) -> RankingParams:
    """``RankingParams`` from a config with ``ranking`` and ``diffusion`` sections.

    ``cfg`` may be a ``ml_collections.ConfigDict``, a dict, or already a ``RankingParams``.
    Keys of ``ranking`` that are not parameters (``columns``) are ignored; unknown keys of
    ``diffusion`` raise.
    """
    if isinstance(cfg, RankingParams):
        return cfg
    ranking = _section(cfg, "ranking")
    diff = _section(cfg, "diffusion")
    unknown = sorted(set(diff) - set(DIFFUSION_KEYS))
    if unknown:
        raise ValueError(f"diffusion config has unknown keys {unknown}; expected {DIFFUSION_KEYS}")
    defaults = RankingParams()
    kwargs = {f: ranking.get(f, getattr(defaults, f)) for f in RankingParams._fields[:-1]}
    params = RankingParams(**kwargs, diffusion={**defaults.diffusion, **diff})
    for name in ("aqe_k", "dba_k", "combined_aqe_k", "combined_dba_k", "block_size"):
        value = getattr(params, name)
        if name == "block_size" and value is None:
            continue
        low = 1 if name == "block_size" else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"ranking.{name}={value!r}; expected a non-negative integer")
    # Checked here, before any extraction, rather than when the first diffusion column runs.
    for name, choices in (("mode", diffusion.MODES), ("solver", diffusion.SOLVERS)):
        if params.diffusion[name] not in choices:
            raise ValueError(
                f"diffusion.{name}={params.diffusion[name]!r}; expected one of {choices}"
            )
    return params


def check_columns(columns: Sequence[str] | str) -> tuple[str, ...]:
    """Validated column names (a comma-separated string is split); unknown names raise."""
    if isinstance(columns, str):
        columns = [columns]
    names = tuple(c.strip() for col in columns for c in str(col).split(",") if c.strip())
    unknown = [c for c in names if c not in SPECS]
    if unknown:
        raise ValueError(f"unknown ranking column(s) {unknown}; expected some of {COLUMN_NAMES}")
    if not names:
        raise ValueError(f"no ranking column given; expected some of {COLUMN_NAMES}")
    return names


def _clip_diffusion(kwargs: Mapping[str, Any], n_db: int, n_q: int) -> dict[str, Any]:
    """Diffusion parameters that fit a small graph (the demo): ``kd``, ``kq`` clipped, logged.

    ``diffusion.rank`` clamps ``truncation`` to the node count itself; ``kd`` must not exceed
    the truncation set and ``kq`` the database, so they are clipped here with a warning.
    """
    out = dict(kwargs)
    nodes = n_db + n_q if out.get("mode", "joint") == "joint" else n_db
    limits = {"kd": min(int(out.get("truncation", nodes)), nodes), "kq": n_db}
    for key, limit in limits.items():
        if key in out and out[key] > limit:
            logging.warning(
                "diffusion %s=%d > %d for this graph; using %d", key, out[key], limit, limit
            )
            out[key] = limit
    return out


def rank_columns(
    queries: ArrayLike,
    database: ArrayLike,
    cfg: Any,
    columns: Sequence[str] | str | None = None,
    *,
    mesh: Any = None,
) -> dict[str, jax.Array]:
    """Ranks of several Table 1 columns, sharing intermediate results.

    Args:
      queries: ``[Q, D]`` L2-normalised (whitened) query descriptors.
      database: ``[N, D]`` L2-normalised (whitened) database descriptors.
      cfg: config with ``ranking`` and ``diffusion`` sections, or ``RankingParams``.
      columns: names from ``COLUMN_NAMES`` (default: all, in the paper's order).
      mesh: a device mesh with several devices: the database is placed once, sharded along N,
        and every stage runs on it (``search``/``expansion`` with ``mesh=``; same ranks);
        ``None`` or one device: one device.

    Returns:
      ``{column: int32 [Q, N] ranks}`` in the order of ``columns``.
    """
    names = COLUMN_NAMES if columns is None else check_columns(columns)
    params = params_from_config(cfg)
    q_n, n_db = int(np.shape(queries)[0]), int(np.shape(database)[0])
    mesh = mesh if mesh_lib.mesh_size(mesh) > 1 else None
    checks.check_descriptors(database, "database")
    # Placed once (sharded along N on a mesh), as faiss's add; every stage reuses it.
    database = search.place(database, mesh)[0] if mesh is None else shard_rows(database, mesh)
    block = params.block_size
    memo: dict[tuple, Any] = {}

    def cached(key: tuple, fn: Callable[[], Any]) -> Any:
        if key not in memo:
            memo[key] = fn()
        return memo[key]

    def augmented(k: int) -> tuple[tuple, Any]:
        """The DBA'd database (``k`` neighbours) and its memo key."""
        key = ("dba", k, params.dba_alpha)
        fn = functools.partial(
            expansion.dba, database, k=k, alpha=params.dba_alpha, mesh=mesh, block_size=block
        )
        return key, cached(key, fn)

    out: dict[str, jax.Array] = {}
    for name in names:
        spec = SPECS[name]
        both = spec.dba and spec.aqe
        db_key, db = ("db",), database
        if spec.dba:
            db_key, db = augmented(params.combined_dba_k if both else params.dba_k)
        q_key, q = ("q",), queries
        if spec.aqe:
            k = params.combined_aqe_k if both else params.aqe_k
            q_key = ("aqe", db_key, k, params.aqe_alpha)
            fn = functools.partial(
                expansion.aqe, queries, db, k=k, alpha=params.aqe_alpha, mesh=mesh,
                block_size=block,
            )  # fmt: skip
            q = cached(q_key, fn)
        if spec.dfs:
            kwargs = _clip_diffusion(params.diffusion, n_db, q_n)
            ranks = cached(
                ("dfs", q_key, db_key), lambda q=q, db=db, kw=kwargs: _diffusion(q, db, mesh, kw)
            )
        else:
            ranks = cached(
                ("rank", q_key, db_key),
                lambda q=q, db=db: search.rank(q, db, mesh=mesh, block_size=block),
            )
        out[name] = ranks
    return out


def _diffusion(queries: Any, database: Any, mesh: Any, kwargs: dict[str, Any]) -> jax.Array:
    """``diffusion.rank`` on one device or the mesh (it builds its graph from host rows)."""
    host = database.to_numpy() if isinstance(database, Sharded) else database
    return diffusion.rank(queries, host, mesh=mesh, **kwargs)


def rank_column(name: str, queries: ArrayLike, database: ArrayLike, cfg: Any) -> jax.Array:
    """Ranks ``[Q, N]`` of one column (see the module docstring for its definition)."""
    if name not in SPECS:
        raise ValueError(f"unknown ranking column {name!r}; expected one of {COLUMN_NAMES}")
    return rank_columns(queries, database, cfg, [name])[name]


def _column_fn(name: str) -> Callable[[ArrayLike, ArrayLike, Any], jax.Array]:
    def fn(queries: ArrayLike, database: ArrayLike, cfg: Any) -> jax.Array:
        return rank_column(name, queries, database, cfg)

    fn.__name__ = "rank_" + name.replace("+", "_").lower()
    fn.__doc__ = f"Ranks ``[Q, N]`` of column {name!r} ({SPECS[name]})."
    return fn


#: column name -> ``fn(queries [Q, D], database [N, D], cfg) -> ranks [Q, N]``.
COLUMNS: dict[str, Callable[[ArrayLike, ArrayLike, Any], jax.Array]] = {
    name: _column_fn(name) for name in COLUMN_NAMES
}
