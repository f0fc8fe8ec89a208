"""Nearest-neighbour search by inner product on one device or a mesh: top-k, ranking, kNN, Index.

Shape convention: descriptor sets are row-major, ``queries`` ``[Q, D]`` and ``database``
``[N, D]``; similarities are ``queries @ database.T`` ``[Q, N]``; results are ``[Q, k]`` (best
first). Descriptors are usually L2-normalised, so the inner product is the cosine.

One kernel, two placements. ``block_topk`` is the top-k of a block of database rows that knows
its global row offset and the valid row count: it scores ``block_size`` rows at a time (views of
the rows, never a padded copy; the last block is shifted back and its revisited rows score
``-inf``) and keeps a running top-k. With ``mesh=None`` it runs over the whole database; with a
mesh (``jretrieval.mesh``) the database is split along N, every device runs the same kernel on
its shard under ``shard_map`` and an ``all_gather`` of the ``[devices, Q, k]`` candidates is
merged once. ``self_topk`` (each database row's neighbours within the database: DBA, kNN
graphs) runs the kernel on chunks of ``query_block`` own rows; on a mesh the shards travel
around the ring (``ppermute``) and each step's candidates are merged by (score desc, index asc).

``block_size`` has one meaning everywhere: the number of database rows scored at once (per
device), so a similarity block holds ``rows x block_size`` floats, ``rows`` being ``Q`` for
``topk``/``rank``/``Index`` and ``query_block`` for ``self_topk``. ``None`` (default) picks
``max(1024, 2**19 // rows)``, i.e. blocks of about 2 MiB of float32 scores, which stay in the
CPU's caches between the product and the merge (5,242 rows for 100 queries; measured 1.3-1.6x
faster at 500k than one 64 MiB block). ``self_topk`` scores chunks of ``query_block`` own rows
(default 512); on one device it walks the symmetric matrix in square tiles of
``min(block_size, query_block)`` rows (half the products), on a mesh in ``query_block x
block_size`` tiles.

Ties: equal scores are ordered by increasing database index (``lax.top_k`` keeps the lower
position first; the running merge puts earlier blocks first; shards are gathered in index
order; the ring merges sort by index on equal scores; the full ranking uses a stable sort), so
results match ``np.argsort(-s, kind="stable")`` on one device and on any mesh.

Full ranking (``rank(..., k=None)``) is ``[Q, N]`` by definition. On one CPU device its sort runs
in NumPy through ``jax.pure_callback`` (XLA's CPU sort is a generic comparator sort, ~5x slower
than NumPy's SIMD sort of unique 64-bit keys: the float's order-preserving bits above the
index); elsewhere and on a mesh ``lax.top_k`` with ``k = N``.

``Index(database, mesh=None)`` places the database once (as faiss's ``add``) and answers
``topk``/``rank`` with one transfer (the queries) and one dispatch per call. The functions
``topk``/``rank`` on raw arrays do the same with the database transferred per call. Jitted
computations are cached per shape and static argument, so repeated calls never retrace.

Numerics: inputs of any float dtype (bfloat16 included) are scored in float32 with
``Precision.HIGHEST`` (GPUs/TPUs give the float32 ranking, not a TF32 one). A shard's blocking
may round a score differently in the last bit from one device's product, so on a mesh candidates
within ~1e-7 of each other may swap; exact ties (duplicates) are ordered exactly.

Validation: ``jretrieval.checks``, identical with and without a mesh (see there).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jretrieval import mesh as mesh_lib
from jretrieval.checks import (
    check_descriptors,
    check_finite,
    check_k,
    check_pair,
    check_positive,
    check_shape,
    finite_flag,
    raise_if_not_finite,
)
from jretrieval.mesh import Sharded, replicate, shard_rows

__all__ = [
    "Index",
    "block_topk",
    "check_descriptors",
    "check_shape",
    "default_block",
    "lexi_merge",
    "rank",
    "row_chunks",
    "self_topk",
    "topk",
]

_HIGHEST = lax.Precision.HIGHEST
#: similarity entries per block when ``block_size`` is None (2 MiB of float32: cache-sized).
BLOCK_BUDGET = 1 << 19
#: own rows per chunk of ``self_topk`` (and its one-device tile side) when ``query_block`` is None.
QUERY_BLOCK = 512
#: how ``self_topk`` scores a row against itself.
OWN = {"keep": None, "exclude": -jnp.inf, "first": jnp.inf}


def default_block(rows: int, block_size: int | None) -> int:
    """Database rows per block: ``block_size``, or ``max(1024, BLOCK_BUDGET // rows)``."""
    return int(block_size) if block_size is not None else max(1024, BLOCK_BUDGET // max(rows, 1))


# ----------------------------------------------------------------------------- kernels


def _similarities(q: jax.Array, x: jax.Array) -> jax.Array:
    # + 0.0 maps -0.0 to 0.0, so that lax.top_k treats the two zeros as equal (a tie).
    return jnp.matmul(q, x.T, precision=_HIGHEST) + 0.0


def block_topk(q, x, k, *, start, n, block, own_ids=None, own_score=None):
    """Top-``k`` of ``q @ x.T`` over the rows of ``x`` (global ids ``start + r``, valid below
    ``n``), scored ``block`` rows at a time with a running merge (earlier rows win ties).

    ``own_ids`` ``[Q]`` with ``own_score`` (``+inf``/``-inf``): a query's own id scores that.
    Returns float32 ``[Q, k]``, int32 ``[Q, k]`` (slots without a candidate hold ``-inf`` and
    the placeholder index ``n``) and a bool scalar: every similarity was finite. A NaN or inf
    anywhere in a query or database row makes all of that row's similarities NaN or inf, so
    this is the inputs' finiteness check at ``Q x N`` instead of ``N x D`` reads (it is also
    False if finite inputs overflow float32).
    """
    s = x.shape[0]
    num = -(-s // min(block, s))
    bs = -(-s // num)  # equal blocks, so the shifted last block rescores fewer than num rows

    def scores(lo, fresh_from):
        blk = lax.dynamic_slice_in_dim(x, lo, bs)
        r = lo + jnp.arange(bs, dtype=jnp.int32)
        gid = start + r
        sc = _similarities(q, blk)
        ok = jnp.all(jnp.isfinite(sc))  # padding rows are zeros: finite
        if own_ids is not None:
            sc = jnp.where(gid[None, :] == own_ids[:, None], own_score, sc)
        valid = (r >= fresh_from) & (gid < n)
        return jnp.where(valid[None, :], sc, -jnp.inf), jnp.broadcast_to(gid, sc.shape), ok

    if num == 1:
        sc, gid, ok = scores(0, 0)
        kk = min(k, bs)
        top, pos = lax.top_k(sc, kk)
        idx = jnp.take_along_axis(gid, pos, axis=1)
        if kk < k:
            top = jnp.pad(top, ((0, 0), (0, k - kk)), constant_values=-jnp.inf)
            idx = jnp.pad(idx, ((0, 0), (0, k - kk)), constant_values=n)
    else:

        def body(carry, j):
            best_s, best_i, ok = carry
            sc, gid, ok_j = scores(jnp.minimum(j * bs, s - bs), j * bs)
            return (*merge(best_s, best_i, sc, gid, k), ok & ok_j), None

        init = (
            jnp.full((q.shape[0], k), -jnp.inf),
            jnp.full((q.shape[0], k), n, jnp.int32),
            jnp.array(True),
        )
        top, idx, ok = lax.scan(body, init, jnp.arange(num))[0]
    return top, jnp.where(jnp.isneginf(top), n, idx).astype(jnp.int32), ok


def merge(best_s, best_i, sc, ids, k):
    """Top ``k`` of a running ``[R, k]`` list and a new ``[R, B]`` block of scores (``ids``
    ``[B]`` or ``[R, B]``). The running entries come first, so on equal scores ``lax.top_k``
    keeps them: they hold the lower indices as long as blocks arrive in increasing order."""
    all_s = jnp.concatenate([best_s, sc], axis=1)
    all_i = jnp.concatenate([best_i, jnp.broadcast_to(ids, sc.shape)], axis=1)
    top, pos = lax.top_k(all_s, k)
    return top, jnp.take_along_axis(all_i, pos, axis=1)


def lexi_merge(s1, i1, s2, i2, k):
    """The ``k`` best of two candidate lists by (score desc, index asc)."""
    neg, idx = lax.sort(
        (-jnp.concatenate([s1, s2], axis=1), jnp.concatenate([i1, i2], axis=1)),
        dimension=1,
        num_keys=2,
    )
    return -neg[:, :k], idx[:, :k]


def row_chunks(update, state: tuple, rows: int, chunk: int) -> tuple:
    """Applies ``update(old_rows, lo) -> new_rows`` to ``state`` (arrays ``[rows, ...]``) in
    equal chunks of at most ``chunk`` rows (``old_rows[0].shape[0]`` rows from ``lo``). The
    last chunk is shifted back to stay in bounds; rows it revisits keep their value, so
    ``update`` may accumulate."""
    num = -(-rows // min(chunk, rows))
    c = -(-rows // num)
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


def ring(fn, state, x, *, device, axis, size):
    """``state = fn(state, shard, owner)`` for every shard of the ring, starting with the own
    one (``owner == device``); the others arrive by ``ppermute`` (one shard in flight)."""
    state = fn(state, x, device)
    if size == 1:
        return state

    def step(carry, t):
        st, blk = carry
        blk = lax.ppermute(blk, axis, mesh_lib.ring_perm(size))
        return (fn(st, blk, (device + t) % size), blk), None

    return lax.scan(step, (state, x), jnp.arange(1, size))[0][0]


def self_topk_pairs(x, *, k, block, own):
    """One device: each row's ``k`` nearest rows of ``x`` ``[N, D]`` from the symmetric
    similarity matrix, block pair by block pair (``i <= j``; each ``block x block`` tile serves
    rows ``i`` and, transposed, rows ``j``): half the products of ``N`` rows against all.
    Returns ``[N, k]`` scores and indices and the finiteness flag (as ``block_topk``)."""
    x = x.astype(jnp.float32)
    n, d = x.shape
    b = min(block, n)
    nb = -(-n // b)
    blocks = jnp.pad(x, ((0, nb * b - n), (0, 0))).reshape(nb, b, d)
    # i-major pairs: every row block meets the column blocks in increasing order, which keeps
    # "lower index first" on ties through the running merge.
    pairs = np.array([(i, j) for i in range(nb) for j in range(i, nb)], np.int32)
    offsets = jnp.arange(b, dtype=jnp.int32)
    diagonal = offsets[:, None] == offsets[None, :]

    def step(carry, pair):
        best_s, best_i, ok = carry
        i, j = pair[0], pair[1]
        sc = _similarities(blocks[i], blocks[j])  # rows i x columns j, and transposed
        ok = ok & jnp.all(jnp.isfinite(sc))
        if OWN[own] is not None:
            sc = jnp.where(diagonal & (i == j), OWN[own], sc)
        cols_i, cols_j = i * b + offsets, j * b + offsets
        bs, bi = merge(best_s[i], best_i[i], jnp.where(cols_j < n, sc, -jnp.inf), cols_j, k)
        best_s, best_i = best_s.at[i].set(bs), best_i.at[i].set(bi)
        sc_t = jnp.where((cols_i < n)[None, :] & (i != j), sc.T, -jnp.inf)  # not on i == j
        bs, bi = merge(best_s[j], best_i[j], sc_t, cols_i, k)
        return (best_s.at[j].set(bs), best_i.at[j].set(bi), ok), None

    init = (
        jnp.full((nb, b, k), -jnp.inf, jnp.float32),
        jnp.full((nb, b, k), n, jnp.int32),
        jnp.array(True),
    )
    (top, idx, ok), _ = lax.scan(step, init, jnp.asarray(pairs))
    top, idx = top.reshape(nb * b, k)[:n], idx.reshape(nb * b, k)[:n]
    return top, jnp.where(jnp.isneginf(top), n, idx), ok


def self_topk_rows(x, *, k, n, block, query_block, own, device=0, axis=None, size=1):
    """Each own row's ``k`` nearest rows of the whole (ring-distributed) database.

    ``x`` ``[s, D]``: this device's rows (global ids ``device * s + r``); ``own`` a key of
    ``OWN``. One device (``size=1``): ``self_topk_pairs`` in tiles of
    ``min(block, query_block)`` rows (half the products). Returns ``[s, k]`` scores and indices
    and this device's finiteness flag (``block_topk``'s)."""
    if size == 1:
        return self_topk_pairs(x, k=k, block=min(block, query_block), own=own)
    x = x.astype(jnp.float32)
    s = x.shape[0]

    def merge(state, blk, owner):
        def update(old, lo):
            q = lax.dynamic_slice_in_dim(x, lo, old[0].shape[0])
            ids = device * s + lo + jnp.arange(q.shape[0], dtype=jnp.int32)
            kw = {} if OWN[own] is None else dict(own_ids=ids, own_score=OWN[own])
            cs, ci, ok = block_topk(q, blk, k, start=owner * s, n=n, block=block, **kw)
            ok = old[2] & ok  # per row, so that the chunks' state stays [rows, ...]
            return (*lexi_merge(old[0], old[1], cs, ci, k), ok)

        return row_chunks(update, state, s, query_block)

    init = (jnp.full((s, k), -jnp.inf), jnp.full((s, k), n, jnp.int32), jnp.ones((s,), bool))
    top, idx, ok = ring(merge, init, x, device=device, axis=axis, size=size)
    return top, idx, jnp.all(ok)


# ----------------------------------------------------------------------------- jitted paths


def topk_local(q, db, *, k, block):
    """One device: ``block_topk`` over the whole database (traceable): scores, ids, finite."""
    return block_topk(q.astype(jnp.float32), db.astype(jnp.float32), k, start=0,
                      n=db.shape[0], block=block)  # fmt: skip


def topk_sharded(q, db, *, mesh, k, n, block):
    """A mesh: ``block_topk`` per shard, all-gather, one merge (traceable; replicated out):
    scores, ids, finite."""
    axis = mesh_lib.axis_name(mesh)

    def body(q, x):
        x = x.astype(jnp.float32)
        start = lax.axis_index(axis) * x.shape[0]
        # At most a shard's rows per device: n_dev * min(k, s) >= k candidates in all, and a
        # full ranking (k = N) gathers [Q, N], not n_dev copies of it.
        s, i, ok = block_topk(q, x, min(k, x.shape[0]), start=start, n=n, block=block)
        s_all = jnp.moveaxis(lax.all_gather(s, axis), 0, 1).reshape(q.shape[0], -1)
        i_all = jnp.moveaxis(lax.all_gather(i, axis), 0, 1).reshape(q.shape[0], -1)
        top, pos = lax.top_k(s_all, k)  # device order = index order: lower index first on ties
        return top, jnp.take_along_axis(i_all, pos, axis=1), all_devices(ok, axis)

    specs = (P(), P(), P())
    return mesh_lib.shard_map(mesh, body, (P(), P(axis)), specs)(q.astype(jnp.float32), db)


def all_devices(ok: jax.Array, axis: str) -> jax.Array:
    """A per-device bool, True on every device iff it is True on all (inside ``shard_map``)."""
    return lax.psum(jnp.where(ok, 0, 1), axis) == 0


@functools.partial(jax.jit, static_argnames=("k", "block", "mesh", "n", "check_db"))
def _topk_impl(q, db, *, k, block, mesh, n, check_db):
    """(scores, indices, finite flag of the inputs); ``db`` the placed database. The flag is
    ``block_topk``'s (from the similarities), or the queries' alone when the database was
    checked when placed (``check_db=False``, an ``Index``: fewer reads for small ``Q``)."""
    if mesh is None:
        s, i, ok = topk_local(q, db, k=k, block=block)
    else:
        s, i, ok = topk_sharded(q, db, mesh=mesh, k=k, n=n, block=block)
    return s, i, ok if check_db else finite_flag(q)


def _sort_rows_desc(s: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = argsort(-s[i])``, stable, for ``[R, N]`` float32 ``s`` (``N < 2**31``)."""
    neg = -s + np.float32(0.0)  # + 0.0 turns -0.0 into 0.0: equal scores stay ties
    bits = neg.view(np.int32)
    # order-preserving integer image of the floats, index in the low 32 bits: unique keys, so
    # a fast (SIMD, unstable) sort of the keys gives exactly the stable order.
    key = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).astype(np.int64)
    key <<= 32
    key |= np.arange(s.shape[1], dtype=np.int64)
    key.sort(axis=1)
    out[...] = key & 0xFFFFFFFF


def _host_argsort_desc(s: np.ndarray) -> np.ndarray:
    """Stable descending argsort along the last axis, with NumPy (CPU only); rows are split
    over the CPU cores (NumPy's sort releases the GIL)."""
    s = np.asarray(s, np.float32)
    flat = s.reshape(-1, s.shape[-1])
    out = np.empty(flat.shape, np.int32)
    chunks = [c for c in np.array_split(np.arange(flat.shape[0]), _sort_pool()[1]) if c.size]
    if len(chunks) <= 1:
        _sort_rows_desc(flat, out)
    else:
        spans = [(int(c[0]), int(c[-1]) + 1) for c in chunks]
        pool = _sort_pool()[0]
        list(pool.map(lambda a: _sort_rows_desc(flat[a[0] : a[1]], out[a[0] : a[1]]), spans))
    return out.reshape(s.shape)


@functools.cache
def _sort_pool() -> tuple[concurrent.futures.ThreadPoolExecutor, int]:
    workers = max(1, min(os.cpu_count() or 1, 8))
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="rank"), workers


def _argsort_desc_cpu(s: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct(s.shape, jnp.int32)
    return jax.pure_callback(_host_argsort_desc, out, s, vmap_method="broadcast_all")


def _argsort_desc_xla(s: jax.Array) -> jax.Array:
    # lax.top_k with k = N is a full descending sort, lower index first on ties.
    return lax.top_k(s, s.shape[-1])[1].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("check_db",))
def _full_rank_impl(q, db, *, check_db):
    """One device: (indices ``[Q, N]``, finite flag of the inputs)."""
    s = _similarities(q.astype(jnp.float32), db.astype(jnp.float32))
    flag = jnp.all(jnp.isfinite(s)) if check_db else finite_flag(q)  # as block_topk's
    idx = lax.platform_dependent(s, cpu=_argsort_desc_cpu, default=_argsort_desc_xla)
    return idx, flag


@functools.partial(
    jax.jit, static_argnames=("k", "n", "block", "query_block", "own", "mesh")
)  # fmt: skip
def _self_topk_impl(x, *, k, n, block, query_block, own, mesh):
    """(scores, indices, finite flag); sharded rows on a mesh."""
    if mesh is None:
        return self_topk_rows(x, k=k, n=n, block=block, query_block=query_block, own=own)
    axis = mesh_lib.axis_name(mesh)
    size = mesh.devices.size

    def body(x):
        s, i, ok = self_topk_rows(x, k=k, n=n, block=block, query_block=query_block, own=own,
                                  device=lax.axis_index(axis), axis=axis, size=size)  # fmt: skip
        return s, i, all_devices(ok, axis)

    return mesh_lib.shard_map(mesh, body, P(axis), (P(axis), P(axis), P()))(x)


# ----------------------------------------------------------------------------- public API


def place(database: Any, mesh: Mesh | None) -> tuple[Any, int]:
    """The database on the device(s): ``(array, N)`` (a padded sharded array on a mesh)."""
    if mesh is None:
        if isinstance(database, Sharded):
            return database.unpad(), database.n
        return database, int(np.shape(database)[0])
    rows = shard_rows(database, mesh)
    return rows.array, rows.n


def place_queries(queries: Any, mesh: Mesh | None) -> Any:
    """The queries replicated over ``mesh`` (one transfer); as they are without a mesh (the
    jitted call transfers them)."""
    if mesh is None or isinstance(queries, jax.core.Tracer):
        return queries
    return replicate(queries, mesh)


def _topk(queries, database, k, mesh, block_size, check_db=True):
    """Checked top-k of placed or raw inputs (shared by ``topk``, ``rank`` and ``Index``)."""
    nq, n, _ = check_pair(queries, database)
    k = check_k(k, n, f"database {(n, check_shape(database, 'database')[1])} has N = {n} rows")
    check_positive(block_size=block_size)
    if k == 0:
        check_finite(queries, "queries")
        return jnp.zeros((nq, 0), jnp.float32), jnp.zeros((nq, 0), jnp.int32)
    db, n = place(database, mesh)
    scores, idx, flag = _topk_impl(
        place_queries(queries, mesh), db, k=k, block=default_block(nq, block_size), mesh=mesh, n=n,
        check_db=check_db,
    )  # fmt: skip
    names = {"queries": queries, "database": database} if check_db else {"queries": queries}
    raise_if_not_finite(flag, **names)
    return scores, idx


def topk(
    queries: ArrayLike,
    database: ArrayLike | Sharded,
    k: int,
    *,
    mesh: Mesh | None = None,
    block_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The ``k`` database vectors with the largest inner product with each query.

    Args:
      queries: ``[Q, D]`` float array.
      database: ``[N, D]`` float array (or ``jretrieval.mesh.Sharded`` rows).
      k: number of neighbours, an integer ``0 <= k <= N``.
      mesh: a 1-D device mesh: the database is split along N over it (``None``: one device).
      block_size: database rows scored at once (per device); ``None``: see the module
        docstring. Memory ``Q x block_size`` similarities.

    Returns:
      ``(scores, indices)``: float32 ``[Q, k]`` inner products in descending order and int32
      ``[Q, k]`` database indices (ties: lower index first).

    Raises:
      ValueError: non-2D or empty inputs, different ``D``, ``k`` out of range, a bad
        ``block_size``, or (for concrete arrays) NaN/inf values.
    """
    return _topk(queries, database, k, mesh, block_size)


def rank(
    queries: ArrayLike,
    database: ArrayLike | Sharded,
    k: int | None = None,
    *,
    mesh: Mesh | None = None,
    block_size: int | None = None,
) -> jax.Array:
    """Database indices sorted by decreasing inner product with each query.

    Args:
      queries: ``[Q, D]`` float array.
      database: ``[N, D]`` float array (or ``Sharded`` rows).
      k: keep the first ``k`` (blocked top-k, bounded memory); ``None`` ranks all ``N``.
      mesh: as ``topk``.
      block_size: as ``topk`` (used when ``k`` is given or on a mesh).

    Returns:
      int32 ``[Q, k]`` (or ``[Q, N]``) indices, best first; ties by increasing index.
    """
    return _rank(queries, database, k, mesh, block_size)


def _rank(queries, database, k, mesh, block_size, check_db=True):
    if k is not None or mesh is not None:
        n = check_shape(database, "database")[0]
        return _topk(queries, database, n if k is None else k, mesh, block_size, check_db)[1]
    check_pair(queries, database)
    check_positive(block_size=block_size)
    idx, flag = _full_rank_impl(queries, place(database, None)[0], check_db=check_db)
    names = {"queries": queries, "database": database} if check_db else {"queries": queries}
    raise_if_not_finite(flag, **names)
    return idx


def self_topk(
    database: ArrayLike | Sharded,
    k: int,
    *,
    exclude_self: bool = True,
    self_first: bool = False,
    mesh: Mesh | None = None,
    block_size: int | None = None,
    query_block: int | None = None,
) -> tuple[jax.Array, jax.Array] | tuple[Sharded, Sharded]:
    """The ``k`` nearest neighbours of every database vector within the database (kNN graph).

    Equal to ``topk(database, database, k)`` with each row's own index removed
    (``exclude_self``; other copies of a duplicated vector still count) or put first
    (``self_first``, as the diffusion graph wants), or kept where it scores
    (both False).

    Args:
      database: ``[N, D]`` float array (or ``Sharded`` rows).
      k: neighbours per vector, ``0 <= k <= N - 1`` (``<= N`` without exclusion).
      exclude_self, self_first: the own index's treatment (not both).
      mesh: a 1-D device mesh: rows split along N, shards passed around the ring.
      block_size: database rows scored at once; query_block: own rows at once (``None``:
        512). Memory ``query_block x block_size`` similarities per device.

    Returns:
      ``(scores, indices)``: float32 ``[N, k]`` descending and int32 ``[N, k]`` (ties: lower
      index first); on a mesh as ``Sharded`` rows.
    """
    if exclude_self and self_first:
        raise ValueError("self_topk: exclude_self and self_first exclude each other")
    n = check_shape(database, "database")[0]
    limit = n - 1 if exclude_self else n
    what = f"database {check_shape(database, 'database')} has N = {n} rows" + (
        ", own index excluded" if exclude_self else ""
    )
    k = check_k(k, limit, what)
    check_positive(block_size=block_size, query_block=query_block)
    qb = QUERY_BLOCK if query_block is None else int(query_block)
    own = "exclude" if exclude_self else "first" if self_first else "keep"
    db, n = place(database, mesh)
    if k == 0:
        check_finite(database, "database")
        s, i = jnp.zeros((db.shape[0], 0), jnp.float32), jnp.zeros((db.shape[0], 0), jnp.int32)
    else:
        s, i, flag = _self_topk_impl(
            db, k=k, n=n, block=default_block(qb, block_size), query_block=qb, own=own, mesh=mesh
        )
        raise_if_not_finite(flag, database=database)
    return (s, i) if mesh is None else (Sharded(s, n), Sharded(i, n))


class Index:
    """A database placed once on the device(s), searched by inner product (faiss's
    ``IndexFlatIP`` after ``add``).

    Args:
      database: ``[N, D]`` float descriptors; checked (shape, finite) and copied to the
        device(s) as float32, sharded along N when ``mesh`` has several devices.
      mesh: a 1-D device mesh (``None``: the default device).
      block_size: as ``topk``.

    ``index.topk(queries, k) -> (scores, ids)``: float32 and int32 ``[Q, k]`` (NumPy-compatible
    JAX arrays), best first, ties by lower index; ``index.rank(queries, k=None)`` the indices.
    """

    def __init__(
        self, database: ArrayLike | Sharded, *, mesh: Mesh | None = None,
        block_size: int | None = None,
    ) -> None:  # fmt: skip
        n, d = check_shape(database, "database")
        check_positive(block_size=block_size)
        if mesh is None:
            rows = database.unpad() if isinstance(database, Sharded) else database
            self._db: Any = jax.device_put(jnp.asarray(rows, jnp.float32))
        elif isinstance(database, Sharded):
            self._db = shard_rows(database, mesh)
        else:
            self._db = shard_rows(np.asarray(database, np.float32), mesh)
        check_finite(self._db, "database")
        self.mesh, self.block_size, self.n, self.d = mesh, block_size, n, d

    @property
    def database(self) -> jax.Array | Sharded:
        """The placed float32 database (``Sharded`` rows on a mesh)."""
        return self._db

    def __len__(self) -> int:
        return self.n

    def topk(self, queries: ArrayLike, k: int) -> tuple[jax.Array, jax.Array]:
        """``(scores [Q, k], ids [Q, k])`` of the ``k`` best database rows per query."""
        return _topk(queries, self._db, k, self.mesh, self.block_size, check_db=False)

    def rank(self, queries: ArrayLike, k: int | None = None) -> jax.Array:
        """int32 ``[Q, k]`` (``[Q, N]`` for ``k=None``) indices, best first."""
        return _rank(queries, self._db, k, self.mesh, self.block_size, check_db=False)
