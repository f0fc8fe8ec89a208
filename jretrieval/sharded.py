"""Diffusion on a database sharded along N over the device mesh: the kNN ring and the graph.

Shape convention: ``queries`` ``[Q, D]`` (replicated), ``database`` ``[N, D]`` rows split over the
1-D mesh of ``jretrieval.mesh.make_mesh`` in equal contiguous shards of ``s = ceil(N / n)``
rows (device ``d`` holds global rows ``[d s, (d + 1) s)``; the last shard is padded, and padding
rows never score). ``Sharded(array, n)`` carries such a padded, sharded ``[n s, ...]`` array and its
``n`` valid rows; every function here accepts a plain array (sharded on the way in) or a
``Sharded``, and returns ``[Q, ...]`` results replicated and ``[N, ...]`` results as ``Sharded``.

Search, AQE and DBA on a mesh are ``jretrieval.search`` / ``jretrieval.expansion`` with
``mesh=``; the kNN ring here (``knn``) is ``search.self_topk``'s kernel.

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

from jretrieval import diffusion, native, search, topk
from jretrieval import mesh as mesh_lib
from jretrieval.checks import check_k, check_positive
from jretrieval.mesh import Sharded, replicate, shard_rows, to_host

__all__ = [
    "Sharded",
    "diffusion_rank",
    "knn",
    "offline",
    "shard_rows",
]

_HIGHEST = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- kernels

# The block top-k, its merges and the ring kNN are jretrieval.topk's (each formula once).
_row_chunks = topk.row_chunks


def _knn_impl(db, *, mesh, k, n, block_size, query_block, self_first):
    """``search.self_topk``'s ring over ``mesh`` (own index kept, or first with ``self_first``):
    ``[n_dev * s, k]`` scores and indices, sharded."""
    own = "first" if self_first else "keep"
    out = search._self_topk_impl(
        db, k=k, n=n, block=block_size, query_block=query_block, own=own, mesh=mesh
    )
    return out[0], out[1]  # (the finiteness flag: the callers checked their input)


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


_check_k = check_k
_check_blocks = check_positive


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
        nn_s, nn_i = search.topk(q, db, kq, mesh=mesh)
        scores = _online_scores_impl(
            nn_s, nn_i, ids.array, vals.array, jnp.float32(gamma), mesh=mesh, n=n
        )
    else:
        ids, vals, params = offline(np.concatenate([q, x]), keep_sharded=True, **kw)
        chunk = max(1, (1 << 22) // (params["truncation"] * nq))
        scores = _joint_scores_impl(ids.array, vals.array, mesh=mesh, num_queries=nq, chunk=chunk)
        scores = scores[nq : nq + n].T
    return _order(mesh)(scores, sims)
