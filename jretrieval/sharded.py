"""Retrieval on a database sharded along N over the device mesh: top-k, AQE, DBA.

Shape convention: ``queries`` ``[Q, D]`` (replicated), ``database`` ``[N, D]`` rows split over the
1-D mesh of ``jretrieval.distributed.make_mesh`` in equal contiguous shards of ``s = ceil(N / n)``
rows (device ``d`` holds global rows ``[d s, (d + 1) s)``; the last shard is padded, and padding
rows never score). ``Sharded(array, n)`` carries such a padded, sharded ``[n s, ...]`` array and its
``n`` valid rows; every function here accepts a plain array (sharded on the way in) or a
``Sharded``, and returns ``[Q, ...]`` results replicated and ``[N, ...]`` results as ``Sharded``.

How each operation stays within one shard plus ``O(k)`` per query (never a ``Q x N`` or
``N x N`` matrix in one place when only the top-k is needed):

- ``topk`` / ``rank(k)`` (query vs database): per device, a blocked top-k over its shard
  (``block_size`` rows scored at once, running merge), then an all-gather of the ``[n, Q, k]``
  candidates and one merge. Ties: lower index first, as ``jretrieval.search.topk``.
- ``_knn_impl`` (database vs database, for DBA): the database shards travel
  around the ring with ``lax.ppermute`` inside ``shard_map``; each device scores its own rows (in
  chunks of ``query_block``) against the shard in flight (in blocks of ``block_size``) and merges
  the candidates into its running ``[s, k]`` top-k. A device holds its shard, the in-flight shard
  and its ``[s, k]`` state. Merges across ring steps sort by (score desc, index asc), so ties are
  ordered exactly as on one device.
- ``aqe``: top-k as above, then every device sums the neighbour vectors it owns (weights masked
  by ownership) and a ``psum`` adds the ``[Q, D]`` partial sums.
- ``dba``: ``_knn_impl`` (``k + 1``, own index dropped as in ``jretrieval.expansion.dba``),
  then a second ring pass in which each device adds the neighbours held by the shard in flight.

Diffusion on a mesh is ``jretrieval.diffusion``'s own functions with ``mesh=``.

Every numeric kernel is a jitted ``jax.shard_map`` with static shapes; the public functions are
thin eager wrappers that validate arguments (as ``jretrieval.search``) and place the inputs.

Exactness: the similarities are float32 products; a shard's blocking may round a score
differently in the last bit from a one-device product, so candidates whose scores lie within
~1e-7 of each other may swap (changing a kNN list or truncation set at its boundary), as between
two BLAS libraries. On tie-free data, and for exact ties (duplicates), the results are equal.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jretrieval import mesh as mesh_lib
from jretrieval import search
from jretrieval.mesh import Sharded, replicate, shard_rows
from jretrieval.whitening import l2_normalize

__all__ = [
    "Sharded",
    "aqe",
    "dba",
    "rank",
    "shard_rows",
    "topk",
]

_HIGHEST = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- kernels


def _row_chunks(update, state: tuple, rows: int, chunk: int) -> tuple:
    """Applies ``update(old_rows, lo) -> new_rows`` to ``state`` (arrays ``[rows, ...]``) in
    equal chunks of at most ``chunk`` rows (``old_rows[0].shape[0]`` rows from ``lo``). The
    last chunk is shifted back to stay in bounds; rows it revisits keep their value, so
    ``update`` may accumulate."""
    num = -(-rows // min(chunk, rows))
    c = -(-rows // num)  # equal chunks: the shifted last one revisits fewer than num rows
    if num == 1:
        return update(state, 0)

    def body(st, j):
        lo = jnp.minimum(j * c, rows - c)
        old = tuple(lax.dynamic_slice_in_dim(a, lo, c) for a in st)
        new = update(old, lo)
        fresh = (lo + jnp.arange(c)) >= j * c
        new = tuple(
            jnp.where(fresh.reshape((c,) + (1,) * (o.ndim - 1)), nw, o)
            for nw, o in zip(new, old, strict=True)
        )
        st = tuple(
            lax.dynamic_update_slice_in_dim(a, nw, lo, 0) for a, nw in zip(st, new, strict=True)
        )
        return st, None

    return lax.scan(body, state, jnp.arange(num))[0]


def _block_topk(q, x, k, *, start, n, block, q_ids=None):
    """Top-``k`` of ``q @ x.T`` over the rows of ``x`` (global ids ``start + r``, valid below
    ``n``), scored ``block`` rows at a time. With ``q_ids`` a query's own id scores ``+inf``.
    Returns float32 ``[Q, k]`` and int32 ``[Q, k]`` (-inf / ``n`` where fewer than ``k``)."""
    s = x.shape[0]
    num = -(-s // min(block, s))
    bs = -(-s // num)  # equal blocks, so the shifted last block rescores fewer than num rows

    def scores(lo, fresh_from):
        blk = lax.dynamic_slice_in_dim(x, lo, bs)
        r = lo + jnp.arange(bs, dtype=jnp.int32)
        gid = start + r
        sc = jnp.matmul(q, blk.T, precision=_HIGHEST)
        if q_ids is not None:
            sc = jnp.where(gid[None, :] == q_ids[:, None], jnp.inf, sc)
        valid = (r >= fresh_from) & (gid < n)
        return jnp.where(valid[None, :], sc, -jnp.inf), jnp.broadcast_to(gid, sc.shape)

    if num == 1:
        sc, gid = scores(0, 0)
        kk = min(k, bs)
        top, pos = lax.top_k(sc, kk)
        idx = jnp.take_along_axis(gid, pos, axis=1)
        if kk < k:
            top = jnp.pad(top, ((0, 0), (0, k - kk)), constant_values=-jnp.inf)
            idx = jnp.pad(idx, ((0, 0), (0, k - kk)), constant_values=n)
        return top, jnp.where(jnp.isneginf(top), n, idx).astype(jnp.int32)

    def body(carry, j):
        best_s, best_i = carry
        sc, gid = scores(jnp.minimum(j * bs, s - bs), j * bs)
        all_s = jnp.concatenate([best_s, sc], axis=1)
        all_i = jnp.concatenate([best_i, gid], axis=1)
        top, pos = lax.top_k(all_s, k)
        return (top, jnp.take_along_axis(all_i, pos, axis=1)), None

    init = (jnp.full((q.shape[0], k), -jnp.inf), jnp.full((q.shape[0], k), n, jnp.int32))
    return lax.scan(body, init, jnp.arange(num))[0]


def _lexi_merge(s1, i1, s2, i2, k):
    """The ``k`` best of two candidate lists by (score desc, index asc)."""
    neg, idx = lax.sort(
        (-jnp.concatenate([s1, s2], axis=1), jnp.concatenate([i1, i2], axis=1)),
        dimension=1,
        num_keys=2,
    )
    return -neg[:, :k], idx[:, :k]


@functools.partial(jax.jit, static_argnames=("mesh", "k", "n", "block_size"))
def _topk_impl(queries, db, *, mesh, k, n, block_size):
    axis = mesh_lib.axis_name(mesh)
    q = queries.astype(jnp.float32)

    def body(q, x):
        x = x.astype(jnp.float32)
        start = lax.axis_index(axis) * x.shape[0]
        # At most a shard's rows per device: n_dev * min(k, s) >= k candidates in all, and a
        # full ranking (k = N) gathers [Q, N], not n_dev copies of it.
        s, i = _block_topk(q, x, min(k, x.shape[0]), start=start, n=n, block=block_size)
        s_all = lax.all_gather(s, axis)  # [n_dev, Q, k], device order = index order
        i_all = lax.all_gather(i, axis)
        s_all = jnp.moveaxis(s_all, 0, 1).reshape(q.shape[0], -1)
        i_all = jnp.moveaxis(i_all, 0, 1).reshape(q.shape[0], -1)
        top, pos = lax.top_k(s_all, k)  # stable: lower position (= lower index) first on ties
        return top, jnp.take_along_axis(i_all, pos, axis=1)

    return mesh_lib.shard_map(mesh, body, (P(), P(axis)), (P(), P()))(q, db)


@functools.partial(
    jax.jit, static_argnames=("mesh", "k", "n", "block_size", "query_block", "self_first")
)
def _knn_impl(db, *, mesh, k, n, block_size, query_block, self_first):
    axis = mesh_lib.axis_name(mesh)
    size = mesh.devices.size

    def body(x):
        x = x.astype(jnp.float32)
        s = x.shape[0]
        d = lax.axis_index(axis)

        def merge(state, blk, owner, first):
            def update(old, lo):
                q = lax.dynamic_slice_in_dim(x, lo, old[0].shape[0])
                ids = d * s + lo + jnp.arange(q.shape[0], dtype=jnp.int32)
                cs, ci = _block_topk(
                    q, blk, k, start=owner * s, n=n, block=block_size,
                    q_ids=ids if self_first else None,
                )  # fmt: skip
                if first:
                    return cs, ci
                return _lexi_merge(old[0], old[1], cs, ci, k)

            return _row_chunks(update, state, s, query_block)

        init = (jnp.full((s, k), -jnp.inf), jnp.full((s, k), n, jnp.int32))
        state = merge(init, x, d, True)
        if size == 1:
            return state

        def step(carry, t):
            state, blk = carry
            blk = lax.ppermute(blk, axis, mesh_lib.ring_perm(size))
            return (merge(state, blk, (d + t) % size, False), blk), None

        return lax.scan(step, (state, x), jnp.arange(1, size))[0][0]

    return mesh_lib.shard_map(mesh, body, P(axis), (P(axis), P(axis)))(db)


def _ring_gather_sum(x, idx, w, *, axis, size, chunk):
    """``sum_j w[i, j] * X[idx[i, j]]`` for the local rows, ``X`` the sharded ``x`` (ring)."""
    s = x.shape[0]
    d = lax.axis_index(axis)

    def add(acc, blk, owner):
        def update(old, lo):
            ii = lax.dynamic_slice_in_dim(idx, lo, old[0].shape[0]) - owner * s
            ww = lax.dynamic_slice_in_dim(w, lo, old[0].shape[0])
            own = (ii >= 0) & (ii < s)
            ww = jnp.where(own, ww, 0.0)
            nb = jnp.take(blk, jnp.clip(ii, 0, s - 1), axis=0)  # [c, k, D]
            return (old[0] + jnp.sum(ww[..., None] * nb, axis=1),)

        return _row_chunks(update, (acc,), s, chunk)[0]

    acc = add(jnp.zeros_like(x), x, d)
    if size == 1:
        return acc

    def step(carry, t):
        acc, blk = carry
        blk = lax.ppermute(blk, axis, mesh_lib.ring_perm(size))
        return (add(acc, blk, (d + t) % size), blk), None

    return lax.scan(step, (acc, x), jnp.arange(1, size))[0][0]


@functools.partial(jax.jit, static_argnames=("mesh", "k", "n", "block_size"))
def _aqe_impl(queries, db, alpha, *, mesh, k, n, block_size):
    axis = mesh_lib.axis_name(mesh)
    q = queries.astype(jnp.float32)
    scores, idx = _topk_impl(q, db, mesh=mesh, k=k, n=n, block_size=block_size)
    w = jnp.power(jnp.maximum(scores, 0.0), alpha)

    def body(q, x, idx, w):
        x = x.astype(jnp.float32)
        s = x.shape[0]
        local = idx - lax.axis_index(axis) * s
        own = (local >= 0) & (local < s)
        nb = jnp.take(x, jnp.clip(local, 0, s - 1), axis=0)
        part = jnp.sum(jnp.where(own, w, 0.0)[..., None] * nb, axis=1)
        return l2_normalize(q + lax.psum(part, axis))

    return mesh_lib.shard_map(mesh, body, (P(), P(axis), P(), P()), P())(q, db, idx, w)


@functools.partial(
    jax.jit, static_argnames=("mesh", "k", "n", "block_size", "query_block")
)  # fmt: skip
def _dba_impl(db, alpha, *, mesh, k, n, block_size, query_block):
    axis = mesh_lib.axis_name(mesh)
    size = mesh.devices.size
    scores, idx = _knn_impl(
        db, mesh=mesh, k=k + 1, n=n, block_size=block_size, query_block=query_block,
        self_first=False,
    )  # fmt: skip

    def body(x, scores, idx, alpha):
        x = x.astype(jnp.float32)
        gid = lax.axis_index(axis) * x.shape[0] + jnp.arange(x.shape[0], dtype=jnp.int32)
        not_self = idx != gid[:, None]
        keep = not_self & (jnp.cumsum(not_self, axis=1) <= k)
        w = jnp.where(keep, jnp.power(jnp.maximum(scores, 0.0), alpha), 0.0)
        total = _ring_gather_sum(x, idx, w, axis=axis, size=size, chunk=query_block)
        return l2_normalize(x + total)

    return mesh_lib.shard_map(mesh, body, (P(axis), P(axis), P(axis), P()), P(axis))(
        db, scores, idx, alpha
    )


# ----------------------------------------------------------------------------- public API


def _database(database: ArrayLike | Sharded, mesh: Mesh, name: str = "database") -> Sharded:
    if isinstance(database, Sharded):
        if database.array.ndim != 2 or database.n < 1:
            raise ValueError(f"{name} must be [N, D] with N >= 1, got {database.array.shape}")
        return shard_rows(database, mesh)
    search.check_descriptors(database, name)
    return shard_rows(database, mesh)


def _check_k(k: Any, limit: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= k <= limit:
        raise ValueError(f"k={k!r} is out of range: expected an int 0 <= k <= {limit} ({what})")
    return int(k)


def _check_blocks(**blocks: Any) -> None:
    for name, v in blocks.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _queries(queries: ArrayLike, db: Sharded, mesh: Mesh) -> jax.Array:
    search.check_descriptors(queries, "queries")
    if np.shape(queries)[1] != db.array.shape[1]:
        raise ValueError(
            f"queries {tuple(np.shape(queries))} and database {(db.n, db.array.shape[1])} have "
            "different descriptor sizes (expected [Q, D] and [N, D] with the same D)"
        )
    return replicate(jnp.asarray(queries), mesh)


def topk(
    queries: ArrayLike,
    database: ArrayLike | Sharded,
    k: int,
    *,
    mesh: Mesh,
    block_size: int = 16384,
) -> tuple[jax.Array, jax.Array]:
    """``search.topk`` with the database sharded over ``mesh``.

    Args:
      queries: ``[Q, D]``; database: ``[N, D]`` or ``Sharded``; k: ``0 <= k <= N`` (static).
      mesh: 1-D device mesh; block_size: database rows scored at once per device.

    Returns:
      ``(scores float32 [Q, k], indices int32 [Q, k])``, best first, replicated.
    """
    db = _database(database, mesh)
    k = _check_k(k, db.n, f"database has N = {db.n} rows")
    _check_blocks(block_size=block_size)
    q = _queries(queries, db, mesh)
    if k == 0:
        return jnp.zeros((q.shape[0], 0), jnp.float32), jnp.zeros((q.shape[0], 0), jnp.int32)
    return _topk_impl(q, db.array, mesh=mesh, k=k, n=db.n, block_size=block_size)


def rank(
    queries: ArrayLike,
    database: ArrayLike | Sharded,
    k: int | None = None,
    *,
    mesh: Mesh,
    block_size: int = 16384,
) -> jax.Array:
    """``search.rank`` sharded: int32 ``[Q, k]`` (sharded top-k), or ``[Q, N]`` for ``k=None``
    (the full ordering is ``Q x N`` by definition: per-shard scores, merged by a full top-k)."""
    db = _database(database, mesh)
    return topk(queries, db, db.n if k is None else k, mesh=mesh, block_size=block_size)[1]


def aqe(
    queries: ArrayLike,
    database: ArrayLike | Sharded,
    k: int = 10,
    alpha: float = 0.0,
    *,
    mesh: Mesh,
    block_size: int = 16384,
) -> jax.Array:
    """``expansion.aqe`` with the database sharded: ``[Q, D]`` unit rows, replicated."""
    db = _database(database, mesh)
    k = _check_k(k, db.n, f"database has N = {db.n} rows")
    if not float(alpha) >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    _check_blocks(block_size=block_size)
    q = _queries(queries, db, mesh)
    if k == 0:
        return l2_normalize(q.astype(jnp.float32))
    return _aqe_impl(q, db.array, jnp.float32(alpha), mesh=mesh, k=k, n=db.n, block_size=block_size)


def dba(
    database: ArrayLike | Sharded,
    k: int = 20,
    alpha: float = 0.0,
    *,
    mesh: Mesh,
    block_size: int = 4096,
    query_block: int = 1024,
) -> Sharded:
    """``expansion.dba`` on the ring: ``Sharded`` ``[N, D]`` unit rows."""
    db = _database(database, mesh)
    k = _check_k(k, db.n - 1, f"database has N - 1 = {db.n - 1} other rows")
    if not float(alpha) >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    _check_blocks(block_size=block_size, query_block=query_block)
    if k == 0:
        return Sharded(l2_normalize(db.array.astype(jnp.float32)), db.n)
    out = _dba_impl(
        db.array, jnp.float32(alpha), mesh=mesh, k=k, n=db.n, block_size=block_size,
        query_block=query_block,
    )  # fmt: skip
    return Sharded(out, db.n)
