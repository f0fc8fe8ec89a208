"""Nearest-neighbour search by inner product: blocked top-k and full ranking.

Shape convention: descriptor sets are row-major, ``queries`` ``[Q, D]`` and ``database``
``[N, D]``; similarities are ``queries @ database.T`` ``[Q, N]``; results are ``[Q, k]``
(best first). Descriptors are usually L2-normalised, so the inner product is the cosine.

Memory: ``topk`` (and ``rank`` with ``k`` given) walks over the database in blocks of
``block_size`` rows with a ``lax.scan`` and keeps a running top-k, merged with each block's
scores; at most ``Q x block_size`` similarities exist at once. The last block is padded and the
padded rows score ``-inf``. ``rank`` with ``k=None`` returns the full ordering, which is
``[Q, N]`` by definition, so it materialises the full similarity matrix. ``self_topk`` is the
kNN graph of one set (``topk(x, x, k)``, own index optionally excluded) computed over block
pairs of the symmetric similarity matrix: half the inner products, ``block_size^2`` memory.

Ties: equal scores are ordered by increasing database index (``lax.top_k`` keeps the lower
index first, the running merge puts earlier blocks first, and the full ranking uses a stable
sort), so results are deterministic and match ``np.argsort(-s, kind="stable")``.

Full ranking on CPU: XLA's CPU sort is a generic comparator sort, several times slower than
NumPy's SIMD argsort, so on the CPU platform the sort of ``rank(..., k=None)`` runs in NumPy
through ``jax.pure_callback`` (same order: a SIMD sort of unique 64-bit keys, the float's
order-preserving bits above the index, rows split over the cores). GPU/TPU use ``lax.top_k``
with ``k = N``. The top-k path is pure XLA everywhere.

Numerics: inputs of any float dtype (bfloat16 included) are cast to float32; the matrix product
uses ``Precision.HIGHEST`` so GPUs/TPUs give the float32 ranking, not a TF32/bfloat16 one.

Validation: ``topk``, ``rank`` and ``self_topk`` are thin eager wrappers. Shapes (rank 2,
matching ``D``, non-empty, ``k <= N``) are checked always, also while tracing. NaN/inf: the
jitted computation also returns ``finite_flag`` of its inputs (no extra pass or dispatch), and
the wrapper raises ``ValueError`` naming the argument if it is False; this needs concrete
values, so under an outer ``jit`` only the shape checks run (call ``check_finite`` on the
concrete inputs beforehand).
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

__all__ = [
    "check_descriptors",
    "check_finite",
    "check_shape",
    "finite_flag",
    "raise_if_not_finite",
    "rank",
    "self_topk",
    "topk",
]

_HIGHEST = lax.Precision.HIGHEST


def check_shape(x: ArrayLike, name: str) -> tuple[int, int]:
    """Raises ``ValueError`` unless ``x`` is a non-empty ``[N, D]`` float array; returns its
    shape. Cheap (no values read), so it also runs on tracers."""
    shape = tuple(np.shape(x))
    if len(shape) != 2:
        raise ValueError(f"{name} must be a [N, D] descriptor matrix, got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} is empty: got shape {shape}, expected at least one row")
    if shape[1] == 0:
        raise ValueError(f"{name} has zero-dimensional descriptors: got shape {shape}")
    dtype = getattr(x, "dtype", None)
    dtype = np.result_type(x) if dtype is None else dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array, got dtype {dtype} with shape {shape}")
    return shape


def check_descriptors(x: ArrayLike, name: str) -> None:
    """Raises ``ValueError`` unless ``x`` is a non-empty ``[N, D]`` float array of finite values.

    The finiteness check runs only on concrete arrays (not inside ``jax.jit``).
    """
    check_shape(x, name)
    check_finite(x, name)


def check_finite(x: ArrayLike, name: str) -> None:
    """Raises ``ValueError`` naming ``name`` if the concrete array ``x`` holds NaN or inf.

    A no-op for tracers (inside ``jax.jit`` the values are unknown).
    """
    if isinstance(x, jax.core.Tracer):
        return
    if isinstance(x, jax.Array):
        if bool(_all_finite(x)):
            return
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.inexact) or np.isfinite(x).all():
        return
    bad = ~np.isfinite(x)
    rows = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1)) if bad.ndim else []
    raise ValueError(
        f"{name} holds NaN or inf (shape {x.shape}, {int(bad.sum())} bad values, first bad "
        f"rows {[int(r) for r in rows[:5]]}); descriptors must be finite"
    )


def finite_flag(*arrays: jax.Array) -> jax.Array:
    """Scalar bool: all of ``arrays`` are finite. Meant inside a jitted computation, so the
    check costs no extra dispatch and runs alongside the main work; see ``raise_if_not_finite``.
    """
    flags = [jnp.all(jnp.isfinite(a)) for a in arrays]
    return functools.reduce(jnp.logical_and, flags, jnp.array(True))


def raise_if_not_finite(flag: jax.Array, **named: ArrayLike) -> None:
    """After a jitted call that returned ``finite_flag(...)`` of the ``named`` inputs: raise
    ``ValueError`` naming the first non-finite input (``check_finite``) if the flag is False.

    A no-op when ``flag`` is a tracer (the caller is itself being traced).
    """
    if isinstance(flag, jax.core.Tracer) or bool(flag):
        return
    for name, x in named.items():
        check_finite(x, name)
    raise ValueError(f"non-finite values in {', '.join(named)}")


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x))


def _check_pair(queries: ArrayLike, database: ArrayLike, k: int | None, block_size: int) -> None:
    """Shape checks of a query/database pair and of ``k`` and ``block_size`` (no values)."""
    qs = check_shape(queries, "queries")
    ds = check_shape(database, "database")
    if qs[1] != ds[1]:
        raise ValueError(
            f"queries and database have different descriptor sizes: queries {tuple(qs)}, "
            f"database {tuple(ds)} (expected [Q, D] and [N, D] with the same D)"
        )
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"k must be an int or None, got {k!r}")
        if not 0 <= k <= ds[0]:
            raise ValueError(
                f"k={k} is out of range for a database of shape {tuple(ds)}: expected 0 <= k <= N"
                f" = {ds[0]}"
            )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _similarities(queries: jax.Array, database: jax.Array) -> jax.Array:
    # + 0.0 maps -0.0 to 0.0, so that lax.top_k treats the two zeros as equal (a tie).
    return jnp.matmul(queries, database.T, precision=_HIGHEST) + 0.0


def _merge(
    best_s: jax.Array, best_i: jax.Array, s: jax.Array, idx: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
    """Top ``k`` of a running ``[R, k]`` list and a new ``[R, B]`` block of scores.

    The running entries come first, so on equal scores ``lax.top_k`` keeps them (they hold
    lower indices as long as blocks arrive in increasing index order).
    """
    all_s = jnp.concatenate([best_s, s], axis=1)
    all_i = jnp.concatenate([best_i, jnp.broadcast_to(idx, s.shape)], axis=1)
    new_s, pos = lax.top_k(all_s, k)
    return new_s, jnp.take_along_axis(all_i, pos, axis=1)


@functools.partial(jax.jit, static_argnames=("k", "block_size"))
def _topk_impl(
    queries: jax.Array, database: jax.Array, k: int, block_size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(scores, indices, finite flag of the inputs)."""
    q = queries.astype(jnp.float32)
    db = database.astype(jnp.float32)
    n, d = db.shape
    finite = finite_flag(q, db)
    if n <= block_size:  # one block: no scan needed
        scores, idx = lax.top_k(_similarities(q, db), k)
        return scores, idx.astype(jnp.int32), finite

    num_blocks = math.ceil(n / block_size)
    db = jnp.pad(db, ((0, num_blocks * block_size - n), (0, 0)))
    blocks = db.reshape(num_blocks, block_size, d)
    starts = jnp.arange(num_blocks, dtype=jnp.int32) * block_size
    offsets = jnp.arange(block_size, dtype=jnp.int32)

    def merge(carry, block):
        blk, start = block
        idx = start + offsets
        s = jnp.where(idx[None, :] < n, _similarities(q, blk), -jnp.inf)
        return _merge(*carry, s, idx, k), None

    init = (
        jnp.full((q.shape[0], k), -jnp.inf, jnp.float32),
        jnp.full((q.shape[0], k), n, jnp.int32),  # placeholders, always displaced (k <= N)
    )
    (scores, idx), _ = lax.scan(merge, init, (blocks, starts))
    return scores, idx, finite


@functools.partial(jax.jit, static_argnames=("k", "block_size", "exclude_self"))
def _self_topk_impl(
    x: jax.Array, k: int, block_size: int, exclude_self: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(scores, indices, finite flag of x)."""
    x = x.astype(jnp.float32)
    n, d = x.shape
    b = min(block_size, n)
    nb = math.ceil(n / b)
    blocks = jnp.pad(x, ((0, nb * b - n), (0, 0))).reshape(nb, b, d)
    # Block pairs (i, j), i <= j, i-major: every row block then meets the column blocks in
    # increasing order, which keeps "lower index first" on ties through the running merge.
    pairs = np.array([(i, j) for i in range(nb) for j in range(i, nb)], np.int32)
    offsets = jnp.arange(b, dtype=jnp.int32)
    diagonal = offsets[:, None] == offsets[None, :]

    def step(carry, pair):
        best_s, best_i = carry
        i, j = pair[0], pair[1]
        s = _similarities(blocks[i], blocks[j])  # [b, b], used for rows i and (transposed) j
        if exclude_self:
            s = jnp.where(diagonal & (i == j), -jnp.inf, s)
        cols_i, cols_j = i * b + offsets, j * b + offsets
        bs, bi = _merge(best_s[i], best_i[i], jnp.where(cols_j < n, s, -jnp.inf), cols_j, k)
        best_s, best_i = best_s.at[i].set(bs), best_i.at[i].set(bi)
        # the transposed block serves rows j (a no-op on the diagonal blocks, i == j)
        s_t = jnp.where((cols_i < n)[None, :] & (i != j), s.T, -jnp.inf)
        bs, bi = _merge(best_s[j], best_i[j], s_t, cols_i, k)
        return (best_s.at[j].set(bs), best_i.at[j].set(bi)), None

    init = (
        jnp.full((nb, b, k), -jnp.inf, jnp.float32),
        jnp.full((nb, b, k), n, jnp.int32),  # placeholders, always displaced
    )
    (scores, idx), _ = lax.scan(step, init, jnp.asarray(pairs))
    return scores.reshape(nb * b, k)[:n], idx.reshape(nb * b, k)[:n], finite_flag(x)


def self_topk(
    database: ArrayLike, k: int, *, exclude_self: bool = True, block_size: int = 512
) -> tuple[jax.Array, jax.Array]:
    """The ``k`` nearest neighbours of every database vector within the database (kNN graph).

    Same result as ``topk(database, database, k)`` (with each row's own index removed when
    ``exclude_self``; other copies of a duplicated vector still count), computed from the
    symmetric similarity matrix block pair by block pair: ``N^2 / 2`` inner products instead
    of ``N^2`` and at most ``block_size x block_size`` similarities at once.

    Args:
      database: ``[N, D]`` float array.
      k: neighbours per vector (static), ``0 <= k <= N - 1`` (``<= N`` without exclusion).
      exclude_self: leave each vector's own index out of its list.
      block_size: rows per block (static).

    Returns:
      ``(scores, indices)``: float32 ``[N, k]`` descending and int32 ``[N, k]`` (ties: lower
      index first).
    """
    n = check_shape(database, "database")[0]
    limit = n - 1 if exclude_self else n
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= limit:
        raise ValueError(
            f"k={k!r} is out of range for database {tuple(jnp.shape(database))}: expected "
            f"0 <= k <= {limit}" + (" (own index excluded)" if exclude_self else "")
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    scores, idx, finite = _self_topk_impl(
        jnp.asarray(database), k=k, block_size=block_size, exclude_self=exclude_self
    )
    raise_if_not_finite(finite, database=database)
    return scores, idx


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
    """Stable descending argsort along the last axis, with NumPy (CPU only).

    Rows are split over the CPU cores (NumPy's sort releases the GIL).
    """
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


@jax.jit
def _full_rank_impl(queries: jax.Array, database: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(indices, finite flag of the inputs)."""
    q, db = queries.astype(jnp.float32), database.astype(jnp.float32)
    s = _similarities(q, db)
    # XLA's CPU sort is a generic comparator sort, ~5x slower than NumPy's SIMD argsort on a
    # [70, 5063] block, so on CPU the sort runs in NumPy (a host callback; same order).
    idx = lax.platform_dependent(s, cpu=_argsort_desc_cpu, default=_argsort_desc_xla)
    return idx, finite_flag(q, db)


def topk(
    queries: ArrayLike, database: ArrayLike, k: int, *, block_size: int = 16384
) -> tuple[jax.Array, jax.Array]:
    """The ``k`` database vectors with the largest inner product with each query.

    Args:
      queries: ``[Q, D]`` float array.
      database: ``[N, D]`` float array.
      k: number of neighbours, ``0 <= k <= N`` (static).
      block_size: database rows scored at once (static); bounds memory to ``Q x block_size``.

    Returns:
      ``(scores, indices)``: float32 ``[Q, k]`` inner products in descending order and int32
      ``[Q, k]`` database indices (ties: lower index first).

    Raises:
      ValueError: non-2D or empty inputs, different ``D``, ``k`` out of range, or (for concrete
        arrays) NaN/inf values.
    """
    _check_pair(queries, database, k, block_size)
    scores, idx, finite = _topk_impl(
        jnp.asarray(queries), jnp.asarray(database), k=k, block_size=block_size
    )
    raise_if_not_finite(finite, queries=queries, database=database)
    return scores, idx


def rank(
    queries: ArrayLike, database: ArrayLike, k: int | None = None, *, block_size: int = 16384
) -> jax.Array:
    """Database indices sorted by decreasing inner product with each query.

    Args:
      queries: ``[Q, D]`` float array.
      database: ``[N, D]`` float array.
      k: keep the first ``k`` (blocked top-k, bounded memory); ``None`` ranks all ``N``.
      block_size: database rows scored at once when ``k`` is given (static).

    Returns:
      int32 ``[Q, k]`` (or ``[Q, N]``) indices, best first; ties by increasing index.
    """
    _check_pair(queries, database, k, block_size)
    if k is None:
        idx, finite = _full_rank_impl(jnp.asarray(queries), jnp.asarray(database))
    else:
        _, idx, finite = _topk_impl(
            jnp.asarray(queries), jnp.asarray(database), k=k, block_size=block_size
        )
    raise_if_not_finite(finite, queries=queries, database=database)
    return idx
