"""Query expansion (AQE, alpha-QE) and database-side augmentation (DBA).

Shape convention: descriptor sets are row-major, ``queries [Q, D]``, ``database [N, D]``
(usually L2-normalised); similarities are inner products. Outputs have the input's shape and
unit-norm rows (float32).

Definitions (issue 2):

* ``aqe``: ``q' = L2(q + sum_j w_j d_j)`` over the ``k`` database vectors ``d_j`` most similar
  to ``q``;
* ``dba``: ``d_i' = L2(d_i + sum_j w_j d_j)`` over the ``k`` database vectors most similar to
  ``d_i``, its own index excluded (with duplicates the other copies still count);
* ``alpha = 0``: every ``w_j = 1`` (average query expansion, Chum et al. 2007; DBA,
  Arandjelovic and Zisserman 2012); ``alpha > 0``: ``w_j = max(s_j, 0) ** alpha`` with ``s_j``
  the similarity (alpha-QE, Radenovic et al. 2018);
* ``k = 0`` returns the L2-normalised input.

L2 is ``x / (||x|| + 1e-6)`` (``jretrieval.whitening.l2_normalize``). Neighbours come from
``jretrieval.search.topk`` (AQE) and ``jretrieval.search.self_topk`` (DBA: half the inner
products of the symmetric database x database matrix), ties lower index first, so memory is
bounded by the block size. ``k`` is static; ``alpha`` may be traced. The public functions
check shapes eagerly, call jitted implementations that also return a finiteness flag of the
inputs, and raise ``ValueError`` naming the argument when it is False (on concrete values;
under an outer ``jit`` only shapes are checked).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jretrieval import search
from jretrieval.whitening import l2_normalize

__all__ = ["aqe", "dba"]


def _weights(scores: jax.Array, alpha: jax.Array) -> jax.Array:
    # max(s, 0) ** 0 == 1 (jnp.power(0., 0.) is 1), so alpha = 0 gives plain averaging.
    return jnp.power(jnp.maximum(scores, 0.0), alpha)


def _expand(x: jax.Array, database: jax.Array, idx: jax.Array, w: jax.Array) -> jax.Array:
    """``L2(x + sum_j w[:, j] database[idx[:, j]])`` for ``[Q, k]`` weights and indices."""

    # One row gather per neighbour rank, accumulated: XLA's fused [Q, k, D] gather-reduce was
    # ~10x slower on CPU, and this never holds more than one [Q, D] gathered block.
    def add(j, acc):
        return acc + w[:, j, None] * jnp.take(database, idx[:, j], axis=0)

    return l2_normalize(lax.fori_loop(0, idx.shape[1], add, x))


@functools.partial(jax.jit, static_argnames=("k", "block_size"))
def _aqe_impl(queries, database, alpha, k, block_size):
    q = queries.astype(jnp.float32)
    db = database.astype(jnp.float32)
    finite = search.finite_flag(q, db)
    if k == 0:
        return l2_normalize(q), finite
    scores, idx = search.topk(q, db, k, block_size=block_size)
    return _expand(q, db, idx, _weights(scores, alpha)), finite


@functools.partial(jax.jit, static_argnames=("k", "block_size"))
def _dba_impl(database, alpha, k, block_size):
    db = database.astype(jnp.float32)
    finite = search.finite_flag(db)
    if k == 0:
        return l2_normalize(db), finite
    # k nearest others of every vector (own index excluded, duplicates kept), from the
    # symmetric similarity matrix block pair by block pair.
    scores, idx = search.self_topk(db, k, exclude_self=True, block_size=block_size)
    return _expand(db, db, idx, _weights(scores, alpha)), finite


def _check_k_alpha(k: int, alpha: float, limit: int, what: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= limit:
        raise ValueError(f"k={k!r} is out of range: expected an int 0 <= k <= {limit} ({what})")
    if not isinstance(alpha, jax.core.Tracer) and not float(alpha) >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")


def aqe(
    queries: ArrayLike,
    database: ArrayLike,
    k: int = 10,
    alpha: float = 0.0,
    *,
    block_size: int = 16384,
) -> jax.Array:
    """Average (``alpha = 0``) or alpha-weighted query expansion.

    Args:
      queries: ``[Q, D]`` query descriptors.
      database: ``[N, D]`` database descriptors.
      k: number of top database neighbours added to each query (static), ``0 <= k <= N``.
      alpha: weight exponent, ``w_j = max(s_j, 0) ** alpha`` (``alpha = 0``: all 1).
      block_size: database block of the neighbour search (memory ``Q x block_size``).

    Returns:
      ``[Q, D]`` float32 expanded queries with unit-norm rows.
    """
    qs = search.check_shape(queries, "queries")
    ds = search.check_shape(database, "database")
    if qs[1] != ds[1]:
        raise ValueError(f"queries {qs} and database {ds} have different descriptor sizes")
    _check_k_alpha(k, alpha, ds[0], f"database {ds} has N = {ds[0]} vectors")
    out, finite = _aqe_impl(
        jnp.asarray(queries), jnp.asarray(database), alpha, k=k, block_size=block_size
    )
    search.raise_if_not_finite(finite, queries=queries, database=database)
    return out


def dba(
    database: ArrayLike, k: int = 20, alpha: float = 0.0, *, block_size: int = 512
) -> jax.Array:
    """Database-side augmentation: each vector plus its ``k`` nearest others, L2-normalised.

    Args:
      database: ``[N, D]`` database descriptors.
      k: number of neighbours (own index excluded) added to each vector (static),
        ``0 <= k <= N - 1``.
      alpha: weight exponent as in ``aqe``.
      block_size: block of ``search.self_topk`` (memory ``block_size^2`` similarities).

    Returns:
      ``[N, D]`` float32 augmented database with unit-norm rows.
    """
    ds = search.check_shape(database, "database")
    _check_k_alpha(k, alpha, ds[0] - 1, f"database {ds} has N - 1 = {ds[0] - 1} other vectors")
    out, finite = _dba_impl(jnp.asarray(database), alpha, k=k, block_size=block_size)
    search.raise_if_not_finite(finite, database=database)
    return out
