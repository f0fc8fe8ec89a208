"""Query expansion (AQE, alpha-QE) and database-side augmentation (DBA), on one device or a mesh.

Shape convention: descriptor sets are row-major, ``queries [Q, D]``, ``database [N, D]``
(usually L2-normalised); similarities are inner products. Outputs have the input's shape and
unit-norm rows (float32).

Definitions:

* ``aqe``: ``q' = L2(q + sum_j w_j d_j)`` over the ``k`` database vectors ``d_j`` most similar
  to ``q``;
* ``dba``: ``d_i' = L2(d_i + sum_j w_j d_j)`` over the ``k`` database vectors most similar to
  ``d_i``, its own index excluded (with duplicates the other copies still count);
* ``alpha = 0``: every ``w_j = 1`` (average query expansion, Chum et al. 2007; DBA,
  Arandjelovic and Zisserman 2012); ``alpha > 0``: ``w_j = max(s_j, 0) ** alpha`` with ``s_j``
  the similarity (alpha-QE, Radenovic et al. 2018);
* ``k = 0`` returns the L2-normalised input.

L2 is ``x / (||x|| + 1e-6)`` (``jretrieval.whitening.l2_normalize``). The neighbours come from
``jretrieval.topk``'s kernels (``block_topk`` for AQE, ``self_topk_rows`` for DBA), so ties go
to the lower index and memory is bounded by ``block_size`` (database rows scored at once: a
``Q x block_size`` block for AQE, ``query_block x block_size`` for DBA). The weighted sum of
neighbours is one kernel, ``gather_sum``, over a block of database rows that knows its row
offset: on one device it sees every row; on a mesh each device sums the neighbours its shard
holds and a ``psum`` adds the ``[Q, D]`` parts (AQE), or the shards travel around the ring and
each device adds what the shard in flight holds for its own rows (DBA: ``[N, D]`` stays sharded).

``k`` is static; ``alpha`` may be traced. Arguments are checked by ``jretrieval.checks`` (the
same messages with and without a mesh); the jitted computations return a finiteness flag of the
inputs and the public functions raise ``ValueError`` naming the argument when it is False.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jretrieval import mesh as mesh_lib
from jretrieval import search, topk
from jretrieval.checks import (
    check_alpha,
    check_finite,
    check_k,
    check_pair,
    check_positive,
    check_shape,
    raise_if_not_finite,
)
from jretrieval.mesh import Sharded
from jretrieval.whitening import l2_normalize

__all__ = ["aqe", "dba", "gather_sum", "weights"]


def weights(scores: jax.Array, alpha: jax.Array) -> jax.Array:
    """``w = max(s, 0) ** alpha``; ``alpha = 0`` gives 1 (``jnp.power(0., 0.)`` is 1)."""
    return jnp.power(jnp.maximum(scores, 0.0), alpha)


def gather_sum(x: jax.Array, idx: jax.Array, w: jax.Array, *, start=0) -> jax.Array:
    """``sum_j w[:, j] X[idx[:, j]]`` over the neighbours held by ``x`` ``[s, D]``, the rows
    ``[start, start + s)`` of the database ``X``; others add nothing. ``idx``/``w`` ``[R, k]``.
    """
    rows = x.shape[0]
    local = idx - start
    w = jnp.where((local >= 0) & (local < rows), w, 0.0)
    local = jnp.clip(local, 0, rows - 1)

    # One row gather per neighbour rank, accumulated: XLA's fused [R, k, D] gather-reduce was
    # ~10x slower on CPU, and this never holds more than one [R, D] gathered block.
    def add(j, acc):
        return acc + w[:, j, None] * jnp.take(x, local[:, j], axis=0)

    return lax.fori_loop(0, idx.shape[1], add, jnp.zeros((idx.shape[0], x.shape[1]), x.dtype))


@functools.partial(jax.jit, static_argnames=("k", "block", "mesh", "n"))
def _aqe_impl(queries, db, alpha, *, k, block, mesh, n):
    q = queries.astype(jnp.float32)
    if mesh is None:
        db = db.astype(jnp.float32)
        scores, idx, flag = search.topk_local(q, db, k=k, block=block)
        return l2_normalize(q + gather_sum(db, idx, weights(scores, alpha))), flag
    axis = mesh_lib.axis_name(mesh)
    scores, idx, flag = search.topk_sharded(q, db, mesh=mesh, k=k, n=n, block=block)

    def body(q, x, idx, w):
        x = x.astype(jnp.float32)
        part = gather_sum(x, idx, w, start=lax.axis_index(axis) * x.shape[0])
        return l2_normalize(q + lax.psum(part, axis))

    specs = (P(), P(axis), P(), P())
    return mesh_lib.shard_map(mesh, body, specs, P())(q, db, idx, weights(scores, alpha)), flag


@functools.partial(jax.jit, static_argnames=("k", "n", "block", "query_block", "mesh"))
def _dba_impl(db, alpha, *, k, n, block, query_block, mesh):
    kw = dict(k=k, n=n, block=block, query_block=query_block, own="exclude")
    if mesh is None:
        x = db.astype(jnp.float32)
        scores, idx, flag = topk.self_topk_rows(x, **kw)
        return l2_normalize(x + gather_sum(x, idx, weights(scores, alpha))), flag
    axis = mesh_lib.axis_name(mesh)
    size = mesh.devices.size

    def body(x, alpha):
        x = x.astype(jnp.float32)
        s = x.shape[0]
        d = lax.axis_index(axis)
        scores, idx, ok = topk.self_topk_rows(x, device=d, axis=axis, size=size, **kw)
        w = weights(scores, alpha)

        def add(acc, blk, owner):
            return acc + gather_sum(blk, idx, w, start=owner * s)

        total = topk.ring(add, jnp.zeros_like(x), x, device=d, axis=axis, size=size)
        return l2_normalize(x + total), topk.all_devices(ok, axis)

    return mesh_lib.shard_map(mesh, body, (P(axis), P()), (P(axis), P()))(db, alpha)


def aqe(
    queries: ArrayLike,
    database: ArrayLike | Sharded,
    k: int = 10,
    alpha: float = 0.0,
    *,
    mesh: Mesh | None = None,
    block_size: int | None = None,
) -> jax.Array:
    """Average (``alpha = 0``) or alpha-weighted query expansion.

    Args:
      queries: ``[Q, D]`` query descriptors.
      database: ``[N, D]`` database descriptors (or ``Sharded`` rows).
      k: number of top database neighbours added to each query, ``0 <= k <= N``.
      alpha: weight exponent, ``w_j = max(s_j, 0) ** alpha`` (``alpha = 0``: all 1).
      mesh: a 1-D device mesh: the database is split along N (``None``: one device).
      block_size: database rows scored at once (memory ``Q x block_size``; ``None``: as
        ``jretrieval.search``).

    Returns:
      ``[Q, D]`` float32 expanded queries with unit-norm rows (replicated on a mesh).
    """
    nq, n, d = check_pair(queries, database)
    k = check_k(k, n, f"database {(n, d)} has N = {n} rows")
    check_alpha(alpha)
    check_positive(block_size=block_size)
    if k == 0:
        check_finite(queries, "queries")
        check_finite(database, "database")
        return l2_normalize(jnp.asarray(queries, jnp.float32))
    db, n = search.place(database, mesh)
    out, flag = _aqe_impl(
        search.place_queries(queries, mesh), db, alpha, k=k,
        block=search.default_block(nq, block_size), mesh=mesh, n=n,
    )  # fmt: skip
    raise_if_not_finite(flag, queries=queries, database=database)
    return out


def dba(
    database: ArrayLike | Sharded,
    k: int = 20,
    alpha: float = 0.0,
    *,
    mesh: Mesh | None = None,
    block_size: int | None = None,
    query_block: int | None = None,
) -> jax.Array | Sharded:
    """Database-side augmentation: each vector plus its ``k`` nearest others, L2-normalised.

    Args:
      database: ``[N, D]`` database descriptors (or ``Sharded`` rows).
      k: number of neighbours (own index excluded) added to each vector,
        ``0 <= k <= N - 1``.
      alpha: weight exponent as in ``aqe``.
      mesh: a 1-D device mesh: rows split along N, neighbours found and summed on the ring.
      block_size: database rows scored at once; query_block: own rows at once (``None``:
        512). Memory ``query_block x block_size`` similarities (per device).

    Returns:
      ``[N, D]`` float32 augmented database with unit-norm rows; ``Sharded`` rows on a mesh.
    """
    n, d = check_shape(database, "database")
    k = check_k(k, n - 1, f"database {(n, d)} has N - 1 = {n - 1} other rows")
    check_alpha(alpha)
    check_positive(block_size=block_size, query_block=query_block)
    qb = search.QUERY_BLOCK if query_block is None else int(query_block)
    db, n = search.place(database, mesh)
    if k == 0:
        check_finite(database, "database")
        out = l2_normalize(jnp.asarray(db, jnp.float32))
    else:
        out, flag = _dba_impl(
            db, alpha, k=k, n=n, block=search.default_block(qb, block_size), query_block=qb,
            mesh=mesh,
        )  # fmt: skip
        raise_if_not_finite(flag, database=database)
    return out if mesh is None else Sharded(out, n)
