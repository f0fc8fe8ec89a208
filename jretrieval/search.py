"""Nearest-neighbour search by inner product on one device or a mesh: top-k, ranking, kNN, Index.

Shape convention: descriptor sets are row-major, ``queries`` ``[Q, D]`` and ``database``
``[N, D]``; similarities are ``queries @ database.T`` ``[Q, N]``; results are ``[Q, k]`` (best
first). Descriptors are usually L2-normalised, so the inner product is the cosine.

One kernel, two placements. ``block_topk`` (``jretrieval.topk``) is the top-k of a block of rows
that knows its global row offset and the valid row count: it scores ``block_size`` rows at a time
(views of the rows, never a padded copy; the last block is shifted back and its revisited rows
score ``-inf``) and keeps a running top-k. With ``mesh=None`` it runs over the whole database; with
a mesh (``jretrieval.mesh``) the database is split along N, every device runs the same kernel on
its shard under ``shard_map`` and an ``all_gather`` of the ``[devices, Q, k]`` candidates is merged
once. ``self_topk`` (each database row's neighbours within the database: DBA, kNN graphs) runs the
kernel on chunks of ``query_block`` own rows; on a mesh the shards travel around the ring
(``ppermute``) and each step's candidates are merged by (score desc, index asc).

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
from jretrieval.topk import all_devices, block_topk, self_topk_rows, similarities

__all__ = [
    "Index",
    "check_descriptors",
    "check_shape",
    "default_block",
    "rank",
    "self_topk",
    "topk",
]

#: similarity entries per block when ``block_size`` is None (2 MiB of float32: cache-sized).
BLOCK_BUDGET = 1 << 19
#: own rows per chunk of ``self_topk`` (and its one-device tile side) when ``query_block`` is None.
QUERY_BLOCK = 512


def default_block(rows: int, block_size: int | None) -> int:
    """Database rows per block: ``block_size``, or ``max(1024, BLOCK_BUDGET // rows)``."""
    return int(block_size) if block_size is not None else max(1024, BLOCK_BUDGET // max(rows, 1))


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
    s = similarities(q.astype(jnp.float32), db.astype(jnp.float32))
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
