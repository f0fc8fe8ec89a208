"""Retrieval on a database sharded along N over the device mesh: top-k, AQE, DBA, kNN, diffusion.

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
- ``knn`` (database vs database, for DBA and the diffusion graph): the database shards travel
  around the ring with ``lax.ppermute`` inside ``shard_map``; each device scores its own rows (in
  chunks of ``query_block``) against the shard in flight (in blocks of ``block_size``) and merges
  the candidates into its running ``[s, k]`` top-k. A device holds its shard, the in-flight shard
  and its ``[s, k]`` state. Merges across ring steps sort by (score desc, index asc), so ties are
  ordered exactly as on one device.
- ``aqe``: top-k as above, then every device sums the neighbour vectors it owns (weights masked
  by ownership) and a ``psum`` adds the ``[Q, D]`` partial sums.
- ``dba``: ``knn`` (``k + 1``, own index dropped as in ``jretrieval.expansion.dba``), then a second
  ring pass in which each device adds the neighbours held by the shard in flight.
- ``offline`` / ``diffusion_rank`` (``jretrieval.diffusion``, Yang et al. 2019): truncation lists by
  ``knn`` (each node first), the mutual check by a ring pass over the ``kd``-lists, degrees
  all-gathered (``N`` floats), then the per-node truncated CG solves sharded along the node axis:
  each device solves its own nodes with the ``[N, kd]`` neighbour table replicated (``8 N kd``
  bytes: 400 MB at one million nodes): on CPU devices by the native kernel
  (``jretrieval.native``, ``solver="auto"``; the host's cores shared by its devices), elsewhere
  by the XLA per-node kernel in chunks of ``node_chunk``. Results equal ``diffusion.offline`` up
  to float rounding (its dense per-component shortcut is a speed path of the single-device XLA
  code; here every node takes the per-node path).

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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jretrieval import diffusion, native, search
from jretrieval import mesh as mesh_lib
from jretrieval.mesh import Sharded, replicate, shard_rows, to_host
from jretrieval.whitening import l2_normalize

__all__ = [
    "Sharded",
    "aqe",
    "dba",
    "diffusion_rank",
    "knn",
    "offline",
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


# ----------------------------------------------------------------------------- diffusion


def _table_rows(table, t_ids, ids_kd, a_s):
    """Non-zeros of the truncated operators ``alpha S[T_i, T_i]`` of a chunk of nodes.

    ``t_ids`` int32 ``[C, T]`` (node first); ``ids_kd``/``a_s`` ``[M, kd]`` (all nodes);
    ``table`` int32 ``[C, M]``, all ``-1`` (a loop carry: entries are set for this chunk's
    truncation sets and reset afterwards, so each chunk costs ``O(T kd)``, not ``O(M)``).
    Returns ``(table, local [C, T * kd], vals [C, T * kd])``: for the entry ``(row a, slot j)``
    the position of the neighbour ``ids_kd[T[a], j]`` in ``T`` (``-1`` if outside) and its
    value (0 if outside or not mutual), rows in order. (``diffusion``'s per-node path fills a
    fresh ``[C, M]`` table per chunk instead: ``O(M)`` per node, 4 MB per node at 1M.)"""
    c, t = t_ids.shape
    r = jnp.arange(c)[:, None]
    table = table.at[r, t_ids].set(jnp.arange(t, dtype=jnp.int32)[None])
    nbr = ids_kd[t_ids].reshape(c, -1)
    local = jnp.take_along_axis(table, nbr, axis=1)
    table = table.at[r, t_ids].set(-1)
    vals = jnp.where(local >= 0, a_s[t_ids].reshape(c, -1), 0.0)
    return table, local, vals


def _solve_chunk(table, t_ids, ids_kd, a_s, *, max_iter, tol):
    """CG solutions ``[C, T]`` of a chunk's truncated systems ``(I - alpha S_TT) x = e_0``.

    The operator stays in the ``[T, kd]`` neighbour-table layout (a gather and a reduction over
    ``kd`` per step). Packing each node's non-zeros (about a third of the table on the benchmark
    graphs) into COO entries needs a scatter-add per step, which XLA:CPU runs ~2.5x slower per
    element, so it did not pay off."""
    c, t = t_ids.shape
    table, local, vals = _table_rows(table, t_ids, ids_kd, a_s)
    vals = vals.reshape(c, t, -1)
    base = (jnp.arange(c, dtype=jnp.int32) * t)[:, None]
    flat = (jnp.maximum(local, 0) + base).reshape(-1)

    def matvec(p):
        g = p.reshape(-1).at[flat].get(mode="promise_in_bounds").reshape(vals.shape)
        return p - jnp.sum(vals * g, axis=-1)

    b = jnp.zeros((c, t), jnp.float32).at[:, 0].set(1.0)
    return table, diffusion._cg(matvec, b, max_iter=max_iter, tol=tol)


def _over_node_chunks(fn, t_ids, m_all, chunk, out_init):
    """``out[rows] = fn(table, t_ids[rows])`` over equal chunks of rows, with the ``[C, M]``
    position table carried from chunk to chunk (see ``_table_rows``)."""
    s = t_ids.shape[0]
    num = -(-s // min(chunk, s))
    c = -(-s // num)

    def body(carry, j):
        table, out = carry
        lo = jnp.minimum(j * c, s - c)  # the shifted last chunk recomputes identical rows
        table, res = fn(table, lax.dynamic_slice_in_dim(t_ids, lo, c))
        return (table, lax.dynamic_update_slice_in_dim(out, res, lo, 0)), None

    table = jnp.full((c, m_all), -1, jnp.int32)
    return lax.scan(body, (table, out_init), jnp.arange(num))[0][1]


@functools.partial(
    jax.jit,
    static_argnames=(
        "mesh", "n", "truncation", "kd", "gamma", "alpha", "block_size", "query_block",
    ),
)  # fmt: skip
def _graph_impl(db, *, mesh, n, truncation, kd, gamma, alpha, block_size, query_block):
    """Truncation sets ``[M, T]`` (``diffusion.Offline`` layout), kd-lists ``[M, kd]`` and
    ``alpha S`` on them ``[M, kd]`` (mutual kNN affinity, symmetric normalisation), sharded."""
    axis = mesh_lib.axis_name(mesh)
    size = mesh.devices.size
    top_s, top_i = _knn_impl(
        db, mesh=mesh, k=truncation, n=n, block_size=block_size, query_block=query_block,
        self_first=True,
    )  # fmt: skip

    def body(x, top_s, top_i):
        x = x.astype(jnp.float32)
        s = x.shape[0]
        d = lax.axis_index(axis)
        gid = d * s + jnp.arange(s, dtype=jnp.int32)
        valid = gid < n
        # diffusion.Offline's layout: the truncation set by increasing index, with the node
        # itself swapped into slot 0 (and the smallest index into the node's place).
        srt = jnp.sort(top_i, axis=1)
        me = jnp.argmax(srt == top_i[:, :1], axis=1)
        r = jnp.arange(s)
        ids = srt.at[r, me].set(srt[:, 0]).at[:, 0].set(top_i[:, 0])
        ids_kd = top_i[:, :kd]
        sims_kd = top_s[:, :kd]

        # Mutual check: is the node in the kd-list of each of its neighbours? (ring)
        def check(mut, blk, owner):
            def update(old, lo):
                c = old[0].shape[0]
                nb = lax.dynamic_slice_in_dim(ids_kd, lo, c) - owner * s
                me = lax.dynamic_slice_in_dim(gid, lo, c)
                own = (nb >= 0) & (nb < s)
                back = jnp.take(blk, jnp.clip(nb, 0, s - 1), axis=0)  # [c, kd, kd]
                hit = jnp.any(back == me[:, None, None], axis=2) & own
                return (old[0] | hit,)

            return _row_chunks(update, (mut,), s, query_block)[0]

        mutual = check(jnp.zeros((s, kd), bool), ids_kd, d)
        if size > 1:

            def step(carry, t):
                mut, blk = carry
                blk = lax.ppermute(blk, axis, mesh_lib.ring_perm(size))
                return (check(mut, blk, (d + t) % size), blk), None

            mutual = lax.scan(step, (mutual, ids_kd), jnp.arange(1, size))[0][0]
        mutual = mutual & (ids_kd != gid[:, None]) & valid[:, None]
        w = jnp.where(mutual, jnp.maximum(sims_kd, 0.0) ** gamma, 0.0)
        inv = (jnp.sum(w, axis=1) + 1e-12) ** -0.5
        inv_all = lax.all_gather(inv, axis, tiled=True)  # [n_dev * s]
        a_s = alpha * (w * inv[:, None] * inv_all[jnp.minimum(ids_kd, inv_all.shape[0] - 1)])
        return ids, ids_kd, jnp.where(valid[:, None], a_s, 0.0)

    specs = (P(axis), P(axis), P(axis))
    return mesh_lib.shard_map(mesh, body, specs, specs)(db, top_s, top_i)


def _solve_body(axis, n, fn, out_shape):
    def body(ids, ids_kd, a_s):
        s = ids.shape[0]
        gid = lax.axis_index(axis) * s + jnp.arange(s, dtype=jnp.int32)
        valid = gid < n
        # The neighbour tables of all nodes, replicated ([M, kd] each).
        kd_all = lax.all_gather(ids_kd, axis, tiled=True)
        as_all = lax.all_gather(a_s, axis, tiled=True)
        t_ids = jnp.where(valid[:, None], ids, jnp.arange(ids.shape[1], dtype=jnp.int32)[None])
        out = fn(t_ids, kd_all, as_all, jnp.zeros((s, *out_shape), jnp.float32))
        return jnp.where(valid.reshape((s,) + (1,) * len(out_shape)), out, 0.0)

    return body


@functools.partial(
    jax.jit, static_argnames=("mesh", "n", "node_chunk", "max_iter", "tol", "threads")
)  # fmt: skip
def _solve_impl(ids, ids_kd, a_s, *, mesh, n, node_chunk, max_iter, tol, threads):
    """The offline values ``[M, T]``: each device solves its own nodes, chunk by chunk, or all
    at once with the native CPU kernel on ``threads`` threads (``threads > 0``)."""
    axis = mesh_lib.axis_name(mesh)
    t = ids.shape[1]

    def fn(t_ids, kd_all, as_all, out):
        if threads:
            kw = dict(max_iter=max_iter, tol=tol, num_threads=threads)
            return native.truncated_cg(t_ids, kd_all, as_all, **kw)

        def solve(table, rows):
            return _solve_chunk(table, rows, kd_all, as_all, max_iter=max_iter, tol=tol)

        return _over_node_chunks(solve, t_ids, kd_all.shape[0], node_chunk, out)

    return mesh_lib.shard_map(mesh, _solve_body(axis, n, fn, (t,)), (P(axis),) * 3, P(axis))(
        ids, ids_kd, a_s
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


def knn(
    database: ArrayLike | Sharded,
    k: int,
    *,
    mesh: Mesh,
    self_first: bool = False,
    block_size: int = 4096,
    query_block: int = 1024,
) -> tuple[Sharded, Sharded]:
    """Each database vector's ``k`` nearest database vectors (itself included), ring-sharded.

    Args:
      database: ``[N, D]`` or ``Sharded``; k: ``1 <= k <= N`` (static).
      mesh: 1-D device mesh.
      self_first: score each vector's own index ``+inf`` (always first), as the diffusion graph.
      block_size: in-flight rows scored at once; query_block: own rows at once (memory per
        device ``query_block x block_size`` similarities).

    Returns:
      ``(scores, indices)`` as ``Sharded`` ``[N, k]`` float32 / int32, by (score desc, index
      asc): equal to ``search.topk(database, database, k)``.
    """
    db = _database(database, mesh)
    k = _check_k(k, db.n, f"database has N = {db.n} rows")
    _check_blocks(block_size=block_size, query_block=query_block)
    s, i = _knn_impl(
        db.array, mesh=mesh, k=k, n=db.n, block_size=block_size, query_block=query_block,
        self_first=bool(self_first),
    )  # fmt: skip
    return Sharded(s, db.n), Sharded(i, db.n)


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


def offline(
    database: ArrayLike,
    *,
    mesh: Mesh,
    truncation: int = 1000,
    kd: int = 50,
    gamma: float = 3.0,
    alpha: float = 0.99,
    tol: float = 1e-6,
    max_iter: int = 20,
    block_size: int = 4096,
    query_block: int = 1024,
    node_chunk: int = 16,
    solver: str = "auto",
    keep_sharded: bool = False,
) -> diffusion.Offline | tuple[Sharded, Sharded, dict[str, Any]]:
    """``diffusion.offline`` sharded over ``mesh`` (see the module docstring).

    Args:
      database: ``[M, D]`` float descriptors (the graph's nodes).
      mesh: 1-D device mesh.
      truncation, kd, gamma, alpha, tol, max_iter: as ``diffusion.offline``.
      block_size, query_block: the kNN ring's blocks; node_chunk: nodes per batched solve.
      solver: as ``diffusion.offline`` (``"auto"``: the native kernel on CPU devices).
      keep_sharded: return ``(indices, values, params)`` as ``Sharded`` ``[M, T]`` instead of
        a ``diffusion.Offline`` (whose arrays are unpadded, i.e. resharded by XLA).

    Returns:
      ``diffusion.Offline`` equal to ``diffusion.offline(database, ...)`` (values allclose).
    """
    search.check_descriptors(database, "database")
    host = np.asarray(database, np.float32) if not isinstance(database, jax.Array) else None
    m = int(np.shape(database)[0])
    if isinstance(truncation, bool) or not isinstance(truncation, int) or truncation < 1:
        raise ValueError(f"truncation must be a positive int, got {truncation!r}")
    t = min(truncation, m)
    if isinstance(kd, bool) or not isinstance(kd, int) or not 1 <= kd <= t:
        raise ValueError(f"kd={kd!r} is out of range: expected 1 <= kd <= {t} (truncation, M={m})")
    if not 0 < alpha < 1 or not gamma > 0 or not tol >= 0 or max_iter < 0:
        raise ValueError(f"need 0 < alpha < 1, gamma > 0, tol >= 0, max_iter >= 0; got "
                         f"{alpha=}, {gamma=}, {tol=}, {max_iter=}")  # fmt: skip
    _check_blocks(block_size=block_size, query_block=query_block, node_chunk=node_chunk)
    threads = 0
    if diffusion.use_native(solver, mesh.devices.flat[0].platform):
        local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        threads = native.threads(local)  # the local devices' solves run at the same time
    db = shard_rows(database, mesh)
    ids, ids_kd, a_s = _graph_impl(
        db.array, mesh=mesh, n=m, truncation=t, kd=kd, gamma=float(gamma), alpha=float(alpha),
        block_size=block_size, query_block=query_block,
    )  # fmt: skip
    vals = _solve_impl(
        ids, ids_kd, a_s, mesh=mesh, n=m, node_chunk=node_chunk,
        max_iter=int(max_iter), tol=float(tol), threads=threads,
    )  # fmt: skip
    params = dict(truncation=t, kd=kd, gamma=float(gamma), alpha=float(alpha), tol=float(tol),
                  max_iter=int(max_iter))  # fmt: skip
    if keep_sharded:
        return Sharded(ids, m), Sharded(vals, m), params
    if host is None:
        host = to_host(jnp.asarray(database, jnp.float32))
    return diffusion.Offline(
        indices=ids[:m], values=vals[:m], fingerprint=diffusion.fingerprint(host), **params
    )


@functools.partial(jax.jit, static_argnames=("mesh", "num_queries", "chunk"))
def _joint_scores_impl(ids, vals, *, mesh, num_queries, chunk):
    """Cosine of L2-normalised offline rows, queries (rows ``< Q``) vs database rows."""
    axis = mesh_lib.axis_name(mesh)

    def body(ids, vals):
        s, t = ids.shape
        d = lax.axis_index(axis)
        gid = d * s + jnp.arange(s, dtype=jnp.int32)
        vals = vals / jnp.maximum(jnp.linalg.norm(vals, axis=1, keepdims=True), 1e-30)
        m_pad = s * lax.axis_size(axis)
        # Dense query rows [Q, M]: each device scatters the query rows it owns, then psum.
        rows = jnp.where(gid < num_queries, gid, num_queries)  # out of range -> dropped
        q_rows = jnp.zeros((num_queries, m_pad), jnp.float32)
        q_rows = q_rows.at[rows[:, None], ids].set(vals, mode="drop")
        q_rows = lax.psum(q_rows, axis)
        qt = q_rows.T  # [M, Q]

        def update(old, lo):
            c = old[0].shape[0]
            ii = lax.dynamic_slice_in_dim(ids, lo, c)
            vv = lax.dynamic_slice_in_dim(vals, lo, c)
            return (jnp.einsum("ntq,nt->nq", qt[ii], vv, precision=_HIGHEST),)

        out = jnp.zeros((s, num_queries), jnp.float32)
        return _row_chunks(update, (out,), s, chunk)[0]

    return mesh_lib.shard_map(mesh, body, (P(axis), P(axis)), P(axis))(ids, vals)


@functools.partial(jax.jit, static_argnames=("mesh", "n"))
def _online_scores_impl(nn_s, nn_i, ids, vals, gamma, *, mesh, n):
    axis = mesh_lib.axis_name(mesh)

    def body(nn_s, nn_i, ids, vals):
        s = ids.shape[0]
        w = jnp.maximum(nn_s, 0.0) ** gamma  # [Q, kq]
        local = nn_i - lax.axis_index(axis) * s
        own = (local >= 0) & (local < s)
        li = jnp.clip(local, 0, s - 1)
        contrib = jnp.where(own, w, 0.0)[..., None] * vals[li]  # [Q, kq, T]
        q = nn_i.shape[0]
        rows = jnp.broadcast_to(jnp.arange(q)[:, None, None], contrib.shape)
        part = jnp.zeros((q, s * lax.axis_size(axis)), jnp.float32)
        part = part.at[rows, ids[li]].add(contrib)
        return lax.psum(part, axis)[:, :n]

    return mesh_lib.shard_map(mesh, body, (P(), P(), P(axis), P(axis)), P())(nn_s, nn_i, ids, vals)


def _order_fn(scores: jax.Array, sims: jax.Array) -> jax.Array:
    """Indices by decreasing ``scores``, ties by decreasing ``sims`` then increasing index."""
    n = scores.shape[1]
    by_sim = lax.top_k(sims, n)[1]
    by_score = lax.top_k(jnp.take_along_axis(scores, by_sim, axis=1), n)[1]
    return jnp.take_along_axis(by_sim, by_score, axis=1).astype(jnp.int32)


@functools.lru_cache(maxsize=8)
def _order(mesh: Mesh):
    """``_order_fn`` jitted with a replicated ``[Q, N]`` result (readable on every process)."""
    return jax.jit(_order_fn, out_shardings=NamedSharding(mesh, P()))


@functools.partial(jax.jit, static_argnames=("mesh",))
def _sims_impl(q, db, *, mesh):
    axis = mesh_lib.axis_name(mesh)
    body = lambda q, x: jnp.matmul(q, x.astype(jnp.float32).T, precision=_HIGHEST)
    return mesh_lib.shard_map(mesh, body, (P(), P(axis)), P(None, axis))(q, db)


def diffusion_rank(
    queries: ArrayLike,
    database: ArrayLike,
    *,
    mesh: Mesh,
    truncation: int = 1000,
    kd: int = 50,
    kq: int = 10,
    gamma: float = 3.0,
    alpha: float = 0.99,
    mode: str = "joint",
    block_size: int = 4096,
    query_block: int = 1024,
    node_chunk: int = 16,
    solver: str = "auto",
) -> jax.Array:
    """``diffusion.rank`` with the graph, the solves and the scores sharded over ``mesh``.

    Returns:
      int32 ``[Q, N]`` database indices, best first (scores as ``diffusion.rank``; ties by plain
      inner product, then index). The ``[Q, N]`` ordering itself is computed from the gathered
      scores: it is the output.
    """
    if mode not in diffusion.MODES:
        raise ValueError(f"mode must be one of {diffusion.MODES}, got {mode!r}")
    search.check_descriptors(queries, "queries")
    search.check_descriptors(database, "database")
    q = np.asarray(queries, np.float32)
    x = np.asarray(database, np.float32)
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"queries {q.shape} and database {x.shape} have different sizes")
    n, nq = x.shape[0], q.shape[0]
    if isinstance(kq, bool) or not isinstance(kq, int) or not 1 <= kq <= n:
        raise ValueError(f"kq={kq!r} is out of range: expected 1 <= kq <= {n} (database {x.shape})")
    kw = dict(mesh=mesh, truncation=truncation, kd=kd, gamma=gamma, alpha=alpha,
              block_size=block_size, query_block=query_block, node_chunk=node_chunk,
              solver=solver)  # fmt: skip
    db = shard_rows(x, mesh)
    sims = _sims_impl(replicate(jnp.asarray(q), mesh), db.array, mesh=mesh)[:, :n]
    if mode == "online":
        ids, vals, _ = offline(x, keep_sharded=True, **kw)
        nn_s, nn_i = topk(q, db, kq, mesh=mesh)
        scores = _online_scores_impl(
            nn_s, nn_i, ids.array, vals.array, jnp.float32(gamma), mesh=mesh, n=n
        )
    else:
        ids, vals, params = offline(np.concatenate([q, x]), keep_sharded=True, **kw)
        chunk = max(1, (1 << 22) // (params["truncation"] * nq))
        scores = _joint_scores_impl(ids.array, vals.array, mesh=mesh, num_queries=nq, chunk=chunk)
        scores = scores[nq : nq + n].T
    return _order(mesh)(scores, sims)
