"""Diffusion ranking of Yang et al. (AAAI 2019), offline truncated solves + online combination.

"Efficient image retrieval via decoupling diffusion into online and offline processing"; the
facts follow the authors' public code (fyang93/diffusion), re-implemented in JAX.

Shape convention: descriptor sets are row-major, ``queries`` ``[Q, D]`` and ``database``
``[N, D]`` (usually L2-normalised; similarities are inner products). A graph has ``M`` nodes
(``M = N``, or ``Q + N`` in joint mode); the offline result is a fixed-shape sparse matrix with
``T = truncation`` entries per row: ``indices`` ``[M, T]`` and ``values`` ``[M, T]``. Rankings are
``[Q, N]`` database indices, best first.

The algorithm (every step as in the authors' code unless said otherwise):

1. Neighbours: each node's ``T`` most similar nodes (itself included, first) and, among them,
   its ``kd`` nearest (itself included, first).
2. Affinity: ``W[i, j] = max(s_ij, 0) ** gamma`` for *mutual* neighbours (``j`` in the kd-list of
   ``i`` and ``i`` in that of ``j``), ``i != j``; zero otherwise.
3. ``S = D^-1/2 W D^-1/2`` with ``D`` the row sums of ``W`` (``+ 1e-12``); ``L = I - alpha S``.
4. Per node ``i``: ``L`` restricted to its truncation set, ``L_TT x = e_i``, solved by conjugate
   gradient from ``x = 0`` (stop when ``||r|| < tol ||b||``, at most ``max_iter`` steps, as SciPy's
   ``cg(rtol=1e-6, maxiter=20)``); ``x`` is row ``i`` of the offline matrix.
5. Ranking. ``mode="joint"`` (the authors' current default, transductive): queries and database
   form one graph; score = inner product of L2-normalised offline rows. ``mode="online"`` (the
   paper's algorithm, for unseen queries): offline over the database only; a query's score is
   ``sum_j max(s_qj, 0) ** gamma * offline[j]`` over its ``kq`` nearest database vectors.

Default: ``mode="joint"`` because it is what the authors' public code runs and what papers that
report "DFS" with it (e.g. the ICMR 2021 evaluation this project reproduces) measured; it needs
the queries at offline time. For real search over a fixed database use ``offline`` once and
``online_rank`` for each query set (an ``Offline`` is a pytree the caller keeps; there is no
on-disk cache, so nothing stale can be reused: ``Offline`` records every parameter and a
fingerprint of the descriptors it was built from, and ``online_rank`` checks them).

Differences from the authors' code, all deliberate: (a) a node is always first in its own lists
(the authors take faiss' first hit, which is another node when descriptors are duplicated);
(b) items the diffusion does not reach (score 0) and exact ties are ordered by plain inner
product instead of arbitrarily; (c) query weights in online mode are clipped at 0 like the
affinity (``sims ** 3`` of a negative similarity would subtract a row); (d) online mode ranks
all ``N`` items, not only the first ``T``; (e) float32 CG (SciPy upcasts to float64).

Speed. Two solvers give the same values (to float rounding), ``solver="auto"`` picks one:

- ``"native"`` (the default on CPU): ``jretrieval.native.truncated_cg``, a C++ XLA custom call
  compiled on first use. Per node it stores only the edges inside the truncation set that the
  node reaches (x is exactly zero elsewhere) and runs the CG on that sparse matrix, threads over
  nodes. On a 2-core CPU it is 7-17x faster than the authors' per-node SciPy loop
  (``bench/scale.py``, ``docs/benchmarks.md``; end to end: ``bench/diffusion.py``).
- ``"xla"`` (GPU/TPU, or CPU without a C++ compiler): the truncated systems only couple nodes of
  the same connected component of the mutual kNN graph, and ``x`` is exactly zero outside the
  node's own component; so nodes are grouped by component. Components of at most ``dense_max``
  nodes are solved for all their nodes at once as dense matrix products (one block matrix
  shared by every node of a block of components, masked per node to its truncation set and
  component): exact, and it turns the per-node sparse matvecs into GEMMs (``_tiers`` picks a few
  block sizes, each a separate compilation). Nodes of larger components are solved per node on
  fixed-size ``[T, kd]`` neighbour tables (vmap over a chunk of nodes). Both paths run the same
  fixed-iteration CG (``lax.fori_loop``) with the tolerance stop masked per node. On CPU the
  per-node path is gather-bound (the padded tables hold ~4x more entries than the truncated
  subgraph), about as fast as SciPy; on accelerators gathers and GEMMs are cheap.

The neighbour step computes each row block's similarities with one matrix product, bounds the
``T``-th largest from below by an exact bisection over a column sample, and picks the exact top
``T`` among the candidates: on one device on the host (``lax.top_k`` with ``k = T`` is ~20x
slower on CPU), on a mesh by ``lax.top_k`` over the candidates (no host in the loop); only the
first ``kd`` are sorted.

One device and a mesh. Each stage is written once, as a kernel over a block of graph rows that
knows the rows' global ids (padding ids ``>= M`` never count): ``_threshold_rows`` /
``_node_first`` (neighbours), ``_mutual_rows`` / ``_weights`` / ``_normalised`` (affinity and
Laplacian), ``_solve_rows`` or the native kernel (solves), ``_query_rows`` / ``_joint_rows``
(joint scores), ``_online_rows`` (online scores). With ``mesh=None`` they run directly, block by
block; with a 1-D ``mesh`` (``jretrieval.mesh.make_mesh``) the nodes are split in contiguous
shards (``mesh.shard_rows``) and each device runs the same kernels on its rows under
``shard_map``, adding only collectives: the neighbour stage all-gathers the descriptors
(``M x D`` per device: 100 MB at 50,000 x 512), the affinity and the solves all-gather the
``[M, kd]`` lists and degrees (``8 M kd`` bytes), the joint scores ``psum`` the ``[Q, M]`` query
rows, the online scores ``psum`` ``[Q, N]``. The one-device XLA solver's component GEMM path and
the host pick are one-device speed paths (same results); on a mesh every node takes the
per-node path. Results equal one device's (indices exactly on tie-free data and for exact ties,
values to float rounding: a shard's products may round differently in the last bit).

``block_size`` (``offline``, ``rank``): graph rows scored against all ``M`` nodes at once by the
neighbour stage and densified at once by the joint scores, i.e. ``[block_size, M]`` float32 per
block (per device on a mesh); default a power of two within 16 MB (32 MB above 32,768
nodes). ``node_chunk``: nodes per call of the XLA per-node solver; ``dense_max``: the component
GEMM path's largest component.

``offline`` and ``rank`` take concrete arrays (host bookkeeping: components, chunking, progress);
the numeric kernels inside are jitted with static shapes. This module is long (about 1,000
lines) but one idea: the diffusion of Yang et al., stage by stage, with its two solvers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jretrieval import mesh as mesh_lib
from jretrieval import native, progress, search

__all__ = [
    "MODES",
    "SOLVERS",
    "Offline",
    "fingerprint",
    "offline",
    "online_rank",
    "rank",
    "use_native",
]

MODES = ("joint", "online")
SOLVERS = ("auto", "native", "xla")
_HIGHEST = lax.Precision.HIGHEST
_BUDGET = 1 << 22  # elements per array in one chunk (16 MB of float32)
_SAMPLE_BITS = 20  # leading bits of a sampled (lower-bound) neighbour threshold


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["indices", "values"],
    meta_fields=["truncation", "kd", "gamma", "alpha", "tol", "max_iter", "fingerprint"],
)
@dataclasses.dataclass(frozen=True)
class Offline:
    """The offline diffusion matrix as fixed-shape sparse rows, and what it was computed from.

    Attributes:
      indices: int32 ``[M, T]``; row ``i`` is node ``i``'s truncation set, ``i`` itself first,
        then the others by increasing index.
      values: float32 ``[M, T]``; the CG solution of node ``i``'s truncated system at
        ``indices[i]`` (row ``i`` of the authors' sparse offline matrix).
      truncation, kd, gamma, alpha, tol, max_iter: the parameters used (truncation after
        clamping to ``M``).
      fingerprint: hash of the float32 descriptors the graph was built from.
    """

    indices: jax.Array
    values: jax.Array
    truncation: int
    kd: int
    gamma: float
    alpha: float
    tol: float
    max_iter: int
    fingerprint: str

    @property
    def key(self) -> str:
        """Every parameter and the data fingerprint, e.g. to name a cache entry."""
        return (
            f"T{self.truncation}-kd{self.kd}-g{self.gamma!r}-a{self.alpha!r}-tol{self.tol!r}"
            f"-it{self.max_iter}-n{self.indices.shape[0]}-{self.fingerprint}"
        )


# ---------------------------------------------------------------------------------------------
# Validation


def fingerprint(x: np.ndarray) -> str:
    """Digest of a descriptor set, recorded in ``Offline`` so a stale result is refused."""
    return hashlib.blake2b(
        np.ascontiguousarray(x, np.float32).tobytes(), digest_size=12
    ).hexdigest()


def _check_int(name: str, value: object, low: int, high: int | None = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"{low} <= {name}" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{name}={value} is out of range: expected {bound}{what}")
    return int(value)


def _check_params(gamma: float, alpha: float, tol: float) -> None:
    if not (isinstance(gamma, int | float) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a positive finite number, got {gamma!r}")
    if not (isinstance(alpha, int | float) and 0 < alpha < 1):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if not (isinstance(tol, int | float) and tol >= 0):
        raise ValueError(f"tol must be a non-negative number, got {tol!r}")


def _descriptors(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, jax.core.Tracer):
        raise ValueError(f"{name} must be a concrete array (diffusion cannot be traced by jit)")
    search.check_descriptors(x, name)
    return np.asarray(x, dtype=np.float32)


def _pair(queries: ArrayLike, database: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    q, db = _descriptors(queries, "queries"), _descriptors(database, "database")
    if q.shape[1] != db.shape[1]:
        raise ValueError(
            f"queries and database have different descriptor sizes: queries {q.shape}, "
            f"database {db.shape}"
        )
    return q, db


# ---------------------------------------------------------------------------------------------
# Row blocks. Every kernel below works on a block of graph rows whose global ids it is given
# (``gid``, or the block's first id ``start``); ids ``>= M`` are padding (the mesh pads the last
# shard) and never count. One device runs a kernel directly over row blocks; a mesh runs the
# same kernel under ``shard_map`` on each device's rows, adding only ``all_gather``/``psum``.


def _default_rows(m: int, block_size: int | None) -> int:
    """Rows per block: ``block_size``, or a power of two keeping ``[rows, M]`` within 16 MB, or
    within 32 MB where 16 MB holds fewer than 128 rows (``M > 32,768``): a product of 64 rows
    runs at 100-150 GFLOP/s on a 2-core CPU against about 170 for 128 (the neighbour stage at
    50,000 nodes), while a block and its mask still fit a 32 MB L3. (Smaller ``M`` keep 16 MB:
    larger blocks there leave more padding in the last block and no faster products.)"""
    if block_size is None:
        rows = lambda budget: 2 ** int(math.log2(max(1, budget // m)))
        block_size = max(8, rows(_BUDGET) if rows(_BUDGET) >= 128 else rows(2 * _BUDGET))
    return int(min(m, block_size))


def _map_rows(fn, arrays: tuple, chunk: int):
    """``fn`` over equal chunks of ``chunk`` rows of ``arrays`` (``lax.map``, last one padded);
    ``fn`` returns a pytree of ``[chunk, ...]`` arrays, concatenated back to the input rows."""
    rows = arrays[0].shape[0]
    chunk = min(chunk, rows)
    num = -(-rows // chunk)
    pad = lambda a: jnp.pad(a, ((0, num * chunk - rows),) + ((0, 0),) * (a.ndim - 1))
    split = tuple(pad(a).reshape(num, chunk, *a.shape[1:]) for a in arrays)
    out = lax.map(lambda args: fn(*args), split) if num > 1 else fn(*(a[0] for a in split))
    merge = (
        (lambda a: a.reshape(num * chunk, *a.shape[2:])[:rows]) if num > 1 else (lambda a: a[:rows])
    )
    return jax.tree_util.tree_map(merge, out)


# ---------------------------------------------------------------------------------------------
# 1. Neighbours: truncation set by threshold bisection, kd-list by top_k on that set.


def _sortable(s: jax.Array) -> jax.Array:
    """uint32 keys with the same order as the float32 values (``-0.0 < 0.0`` aside)."""
    u = lax.bitcast_convert_type(s, jnp.uint32)
    return jnp.where((u >> 31) == 1, ~u, u | jnp.uint32(0x80000000))


def _sample_plan(m: int, truncation: int) -> tuple[int, int]:
    """``(stride, rank)`` of the candidate threshold: the ``rank``-th largest similarity among
    every ``stride``-th column, with a margin so that >= ``truncation`` columns pass w.h.p.
    (exact when ``stride == 1``)."""
    stride = max(1, m // (4 * truncation))
    expect = truncation / stride
    rank = truncation if stride == 1 else int(min(m // stride, expect + 4 * expect**0.5 + 8))
    return stride, rank


def _threshold_rows(q, x, gid, *, rank: int, stride: int):
    """Similarities ``s`` of a row block against all ``M`` nodes ``x`` and each row's
    candidates ``ge``: similarity >= the sample threshold, and the node's own column, which
    ranks first (as ``+inf``, ``_own_first``) but keeps its product in ``s`` (no scatter: one
    pass over the block fewer). The candidate count is left to the caller (the host counts
    the mask it reads anyway).

    The threshold is the ``rank``-th largest similarity among every ``stride``-th column, found
    by an exact bisection on the float order; with ``stride == 1`` it is the exact ``rank``-th
    largest of the row, otherwise a lower bound whose candidate set holds the top ``T`` with
    high probability (a row short of candidates takes its whole row). A lower bound needs only
    the leading ``_SAMPLE_BITS`` bits of the bisection (sign, exponent, 11 mantissa bits): the
    rest would tighten it by a relative 5e-4, a handful of candidates, at 12 more passes.
    """
    s = jnp.matmul(q, x.T, precision=_HIGHEST)
    sample = _sortable(s[:, ::stride])

    def bit(b, tau):  # largest tau with #(sample >= tau) >= rank, found bit by bit
        cand = tau | (jnp.uint32(1) << (31 - b).astype(jnp.uint32))
        ok = jnp.sum(sample >= cand[:, None], axis=1, dtype=jnp.int32) >= rank
        return jnp.where(ok, cand, tau)

    bits = 32 if stride == 1 else _SAMPLE_BITS
    tau = lax.fori_loop(0, bits, bit, jnp.zeros(q.shape[0], jnp.uint32))
    own = lax.broadcasted_iota(jnp.int32, s.shape, 1) == gid[:, None]
    return s, (_sortable(s) >= tau[:, None]) | own


def _own_first(s, idx, gid):
    """``s`` with each row's own column (``idx == gid``; padding rows have none) as ``+inf``."""
    return jnp.where(idx == gid[:, None], jnp.inf, s)


def _select_rows(s, ge, gid, truncation: int) -> jax.Array:
    """The ``T`` columns of largest ``s`` among each row's candidates (own column first, ties:
    lower column first), sorted by column: int32 ``[R, T]``. (The device form of
    ``_top_sets``.)"""
    keep = ge | (jnp.sum(ge, axis=1, dtype=jnp.int32) < truncation)[:, None]
    cols = lax.broadcasted_iota(jnp.int32, s.shape, 1)
    idx = lax.top_k(jnp.where(keep, _own_first(s, cols, gid), -jnp.inf), truncation)[1]
    return jnp.sort(idx, axis=1).astype(jnp.int32)


def _kd_rows(s, idx, gid, kd: int):
    """The ``kd`` largest of each row's truncation set (own column first): ``(sims, positions
    in idx)``."""
    return lax.top_k(_own_first(jnp.take_along_axis(s, idx, axis=1), idx, gid), kd)


def _node_first(idx, k_sims, k_pos):
    """``(ids [R, T], ids_kd [R, kd], sims_kd [R, kd])``: the node (its own column scores
    ``+inf``, so it leads its kd-list) swapped into slot 0 of its truncation set, the column it
    displaces into the node's place; the node's own similarity stored as 1."""
    r = jnp.arange(idx.shape[0])
    k_ids = jnp.take_along_axis(idx, k_pos, axis=1)
    ids = idx.at[r, k_pos[:, 0]].set(idx[:, 0]).at[:, 0].set(k_ids[:, 0])
    return ids, k_ids, k_sims.at[:, 0].set(1.0)


_threshold_block = jax.jit(_threshold_rows, static_argnames=("rank", "stride"))
# (Separate calls: on CPU, XLA only uses its fast top-k kernel when the outputs of
# ``lax.top_k`` are not updated in the same computation.)
_kd_block = jax.jit(_kd_rows, static_argnames=("kd",))
_node_first_block = jax.jit(_node_first)


def _top_sets(s: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """Per row, the ``k`` columns of largest ``s`` among its ``candidates`` (ties: lower
    column first), sorted by column: ``[R, k]``. Every row needs at least ``k`` candidates."""
    return _top_of_flat(s, np.flatnonzero(candidates), k)


def _top_of_flat(s: np.ndarray, flat: np.ndarray, k: int, own: np.ndarray | None = None):
    """``_top_sets`` from the flat indices of the candidates (row-major); ``own`` (one column
    per row, or none) ranks first, as ``+inf``.

    Vectorised over the rows: the candidates are packed into a padded ``[R, width]`` array, the
    ``k``-th largest value found by ``np.partition``, and the values above it (then the first
    of those equal to it) kept. (Flat indexing throughout: NumPy's 2-D fancy indexing and
    ``np.nonzero`` on a 2-D mask are several times slower.)
    """
    r, n = s.shape
    rows = flat // n
    count = np.bincount(rows, minlength=r)
    width = int(count.max())
    slot = rows * width + (np.arange(len(flat)) - (np.cumsum(count) - count)[rows])
    col = (flat - rows * n).astype(np.int32)
    vals = np.full(r * width, -np.inf, np.float32)
    cols = np.zeros(r * width, np.int32)
    vals[slot], cols[slot] = s.reshape(-1)[flat], col
    if own is not None:
        vals[slot[col == own[rows]]] = np.inf
    vals, cols = vals.reshape(r, width), cols.reshape(r, width)
    kth = np.partition(vals, width - k, axis=1)[:, width - k : width - k + 1]  # k-th largest
    keep = vals >= kth
    if np.any(np.count_nonzero(keep, axis=1) != k):  # ties at the k-th: the first ones
        equal = vals == kth
        need = k - np.sum(vals > kth, axis=1, keepdims=True)
        keep = (vals > kth) | (equal & (np.cumsum(equal, axis=1) <= need))
    return cols[keep].reshape(r, k)


def _neighbours_local(x: np.ndarray, truncation: int, kd: int, rows: int):
    """One device: ``(ids [M, T], ids_kd [M, kd], sims_kd [M, kd])`` as NumPy, block by block.

    The candidates are read on the host (``np.flatnonzero`` on the mask, exact top ``T`` by
    ``_top_sets`` only for rows with ties or extra candidates): on CPU several times faster
    than ``lax.top_k`` with ``k = T``, which the mesh kernel uses instead. Software-pipelined:
    the next block's product is dispatched before this block's host pick, and a block's
    results are read one block later, so the device never waits for the host.
    """
    m = x.shape[0]
    stride, rank = _sample_plan(m, truncation)
    xd = jnp.asarray(x)
    out = [np.empty((m, truncation), np.int32), np.empty((m, kd), np.int32)]
    out.append(np.empty((m, kd), np.float32))

    def threshold(start):  # dispatched, not waited for
        stop = min(start + rows, m)
        gid = jnp.arange(start, start + rows, dtype=jnp.int32)
        q = jnp.asarray(np.pad(x[start:stop], ((0, start + rows - stop), (0, 0))))
        return *_threshold_block(q, xd, gid, rank=rank, stride=stride), gid

    def store(start, got):
        stop = min(start + rows, m)
        for o, g in zip(out, got, strict=True):
            o[start:stop] = np.asarray(g)[: stop - start]

    count_rows = lambda s: min(rows, m - s)
    pending, done = threshold(0), None
    for start in progress.track(
        range(0, m, rows), total=m, desc="diffusion neighbours", unit="nodes", count=count_rows
    ):
        stop = min(start + rows, m)
        s, ge, gid = pending
        if stop < m:
            pending = threshold(stop)
        # (slicing the host views, not the device arrays: a device slice copies the block)
        ge_h = np.asarray(ge)[: stop - start]
        flat = np.flatnonzero(ge_h)  # row-major: by row, then by column
        count = np.diff(np.searchsorted(flat, np.arange(stop - start + 1) * m))
        if np.all(count == truncation):  # no ties, no margin (the exact threshold's usual case)
            idx = (flat % m).reshape(stop - start, truncation).astype(np.int32)
        else:
            if np.any(count < truncation):  # short of candidates: the whole row
                flat = np.flatnonzero(ge_h | (count < truncation)[:, None])
            own = np.arange(start, stop)
            idx = _top_of_flat(np.asarray(s)[: stop - start], flat, truncation, own)
            idx = idx.astype(np.int32)
        idx = jnp.asarray(np.pad(idx, ((0, start + rows - stop), (0, 0))))
        if done is not None:
            store(*done)
        done = start, _node_first_block(idx, *_kd_block(s, idx, gid, kd=kd))
    store(*done)
    return tuple(out)


@functools.partial(jax.jit, static_argnames=("mesh", "m", "truncation", "kd", "rows"))
def _neighbours_mesh(x, *, mesh, m: int, truncation: int, kd: int, rows: int):
    """The mesh: each device the same rows kernel on its shard of nodes, against all ``M``
    nodes (all-gathered), in blocks of ``rows``; ``lax.top_k`` picks the exact sets."""
    axis = mesh_lib.axis_name(mesh)
    stride, rank = _sample_plan(m, truncation)

    def body(x_loc):
        x_all = lax.all_gather(x_loc, axis, tiled=True)[:m]
        gid = lax.axis_index(axis) * x_loc.shape[0] + jnp.arange(x_loc.shape[0], dtype=jnp.int32)

        def block(q, g):
            s, ge = _threshold_rows(q, x_all, g, rank=rank, stride=stride)
            idx = _select_rows(s, ge, g, truncation)
            return _node_first(idx, *_kd_rows(s, idx, g, kd))

        return _map_rows(block, (x_loc, gid), rows)

    spec = P(axis)
    return mesh_lib.shard_map(mesh, body, spec, (spec, spec, spec))(x)


def _neighbours(x: np.ndarray, truncation: int, kd: int, *, mesh=None, block_size=None):
    """The neighbour stage alone, as NumPy ``(ids [M, T], ids_kd [M, kd], sims_kd [M, kd])``
    (for tests and benchmarks; ``offline`` keeps the mesh's results on the devices)."""
    m = x.shape[0]
    rows = _default_rows(m, block_size)
    if mesh is None:
        return _neighbours_local(x, truncation, kd, rows)
    xs = mesh_lib.shard_rows(x, mesh).array
    out = _neighbours_mesh(xs, mesh=mesh, m=m, truncation=truncation, kd=kd, rows=rows)
    return tuple(mesh_lib.to_host(a)[:m] for a in out)


# ---------------------------------------------------------------------------------------------
# 2-3. Mutual kNN affinity, normalisation, connected components.


def _mutual_rows(ids_kd, gid, ids_kd_all, chunk: int) -> jax.Array:
    """``[R, kd]``: is the row's node in the kd-list of each of its kd neighbours (itself and
    padding rows excluded)? ``ids_kd_all`` ``[M, kd]`` holds every node's kd-list."""
    m = ids_kd_all.shape[0]

    def block(nbr, node):
        back = ids_kd_all[nbr]  # [c, kd, kd]: the kd-lists of the neighbours
        hit = jnp.any(back == node[:, None, None], axis=2) & (nbr != node[:, None])
        return hit & (node < m)[:, None]

    return _map_rows(block, (ids_kd, gid), chunk)


def _weights(mutual, sims_kd, gamma):
    """``(W [R, kd], D^-1/2 [R])``: ``max(s, 0) ** gamma`` on mutual slots, degree + 1e-12."""
    w = jnp.where(mutual, jnp.maximum(sims_kd, 0.0) ** gamma, 0.0)
    return w, (jnp.sum(w, axis=1) + 1e-12) ** -0.5


def _normalised(w, inv_rows, inv_all, ids_kd, alpha):
    """``alpha S`` on the kd-lists: ``alpha D^-1/2 W D^-1/2`` (``inv_all`` ``[M]``)."""
    return alpha * (w * inv_rows[:, None] * inv_all[ids_kd])


def _mutual_chunk(m: int, kd: int) -> int:
    return max(1, min(m, _BUDGET // (kd * kd)))


@functools.partial(jax.jit, static_argnames=("gamma", "alpha"))
def _graph(ids_kd: jax.Array, sims_kd: jax.Array, gamma: float, alpha: float):
    """One device: ``(alpha * S [M, kd] on the kd-lists, mutual [M, kd])``; slot 0 is 0."""
    m, kd = ids_kd.shape
    gid = jnp.arange(m, dtype=jnp.int32)
    mutual = _mutual_rows(ids_kd, gid, ids_kd, _mutual_chunk(m, kd))
    w, inv = _weights(mutual, sims_kd, gamma)
    return _normalised(w, inv, inv, ids_kd, alpha), mutual


@functools.partial(jax.jit, static_argnames=("mesh", "m", "gamma", "alpha"))
def _graph_mesh(ids_kd, sims_kd, *, mesh, m: int, gamma: float, alpha: float):
    """The mesh: ``_graph`` on each device's rows, kd-lists and degrees all-gathered."""
    axis = mesh_lib.axis_name(mesh)

    def body(kd_loc, sims_loc):
        s, kd = kd_loc.shape
        gid = lax.axis_index(axis) * s + jnp.arange(s, dtype=jnp.int32)
        kd_all = lax.all_gather(kd_loc, axis, tiled=True)[:m]
        mutual = _mutual_rows(kd_loc, gid, kd_all, _mutual_chunk(m, kd))
        w, inv = _weights(mutual, sims_loc, gamma)
        inv_all = lax.all_gather(inv, axis, tiled=True)[:m]
        return _normalised(w, inv, inv_all, kd_loc, alpha)

    return mesh_lib.shard_map(mesh, body, (P(axis), P(axis)), P(axis))(ids_kd, sims_kd)


@jax.jit
def _components(ids_kd: jax.Array, mutual: jax.Array) -> jax.Array:
    """A label per node, equal within a connected component of the mutual graph."""
    m = ids_kd.shape[0]
    nbr = jnp.where(mutual, ids_kd, jnp.arange(m, dtype=jnp.int32)[:, None])

    def body(state):
        lab, _ = state
        new = jnp.minimum(lab, jnp.min(lab[nbr], axis=1))
        new = new[new]  # pointer jumping; labels stay node ids of the same component
        return new, jnp.any(new != lab)

    lab, _ = lax.while_loop(lambda s: s[1], body, (jnp.arange(m, dtype=jnp.int32), True))
    return lab


# ---------------------------------------------------------------------------------------------
# 4. Conjugate gradient, batched, fixed iterations, per-system tolerance stop.


def _cg(matvec, b: jax.Array, *, max_iter: int, tol: float) -> jax.Array:
    """Solves ``A x = b`` for every system in a batch (vectors on the last axis) like SciPy cg.

    Each system stops (keeps its iterate) at the first iteration where ``||r|| < tol ||b||``.
    """
    dot = lambda u, v: jnp.sum(u * v, axis=-1)
    atol = tol * jnp.sqrt(dot(b, b))
    rho = dot(b, b)

    def step(_, state):
        x, r, p, rho, active = state
        active = active & (jnp.sqrt(rho) >= atol) & (rho > 0)
        q = matvec(p)
        pq = dot(p, q)
        a = jnp.where(active, rho / jnp.where(pq == 0, 1.0, pq), 0.0)[..., None]
        x = x + a * p
        r = r - a * q
        rho_new = dot(r, r)
        beta = jnp.where(active, rho_new / jnp.where(rho == 0, 1.0, rho), 0.0)[..., None]
        p = jnp.where(active[..., None], r + beta * p, p)
        return x, r, p, jnp.where(active, rho_new, rho), active

    init = (jnp.zeros_like(b), b, b, rho, jnp.ones(rho.shape, bool))
    return lax.fori_loop(0, max_iter, step, init)[0]


@functools.partial(jax.jit, static_argnames=("max_iter", "tol"))
def _solve_dense(members, ids, ids_kd, a_s, comp, pos, *, max_iter: int, tol: float):
    """Exact solves for every node of ``k`` components of at most ``B`` nodes.

    members: int32 ``[k, B]`` node ids in component order (``-1`` pads). Returns the offline
    rows ``[k, B, T]`` (in each node's truncation-set order).
    """
    k, b_size = members.shape
    valid = members >= 0
    mem = jnp.where(valid, members, 0)
    kk = jnp.arange(k)[:, None, None]
    # St[v, u] = alpha S[u, v] within the component (entries of other components are 0).
    vals = jnp.where(valid[..., None], a_s[mem], 0.0)  # [k, B, kd]
    cols = jnp.where(vals != 0, pos[ids_kd[mem]], 0)
    rows = jnp.broadcast_to(jnp.arange(b_size)[None, :, None], cols.shape)
    st = jnp.zeros((k, b_size, b_size), jnp.float32).at[kk, cols, rows].add(vals)
    # mask[s, u]: component node u lies in the truncation set of component node s.
    t_ids = ids[mem]  # [k, B, T]
    inside = (comp[t_ids] == comp[mem][..., None]) & valid[..., None]
    t_pos = jnp.where(inside, pos[t_ids], 0)
    seeds = jnp.broadcast_to(jnp.arange(b_size)[None, :, None], t_pos.shape)
    mask = (
        jnp.zeros((k, b_size, b_size), jnp.float32)
        .at[kk, seeds, t_pos]
        .max(inside.astype(jnp.float32))
    )
    b = jnp.where(valid[..., None], jnp.eye(b_size, dtype=jnp.float32)[None], 0.0)

    def matvec(p):  # p [k, seeds, rows]
        return p - mask * jnp.matmul(p, st, precision=_HIGHEST)

    x = _cg(matvec, b, max_iter=max_iter, tol=tol)
    return jnp.where(inside, jnp.take_along_axis(x, t_pos, axis=2), 0.0)


def _solve_rows(t_ids, ids_kd, a_s, *, max_iter: int, tol: float):
    """Per-node solves of a block of nodes on ``[T, kd]`` neighbour tables (the XLA per-node
    kernel). ``t_ids`` int32 ``[C, T]`` truncation sets (node first); ``ids_kd``/``a_s``
    ``[M, kd]`` of all nodes. -> ``[C, T]``."""
    c, t = t_ids.shape
    m = ids_kd.shape[0]
    table = jnp.full((c, m), -1, jnp.int32)
    table = table.at[jnp.arange(c)[:, None], t_ids].set(jnp.arange(t, dtype=jnp.int32)[None])
    nbr = ids_kd[t_ids].reshape(c, -1)  # [C, T * kd]
    local = jnp.take_along_axis(table, nbr, axis=1).reshape(c, t, -1)
    vals = jnp.where(local >= 0, a_s[t_ids], 0.0)
    flat = (jnp.maximum(local, 0) + (jnp.arange(c) * t)[:, None, None]).reshape(-1)
    vals, flat = lax.optimization_barrier((vals, flat))

    def matvec(p):  # p [C, T]
        g = p.reshape(-1).at[flat].get(mode="promise_in_bounds").reshape(vals.shape)
        return p - jnp.sum(vals * g, axis=-1)

    b = jnp.zeros((c, t), jnp.float32).at[:, 0].set(1.0)
    return _cg(matvec, b, max_iter=max_iter, tol=tol)


@functools.partial(jax.jit, static_argnames=("max_iter", "tol"))
def _solve_nodes(nodes, ids, ids_kd, a_s, *, max_iter: int, tol: float):
    """``_solve_rows`` for the nodes ``nodes`` int32 ``[C]`` of one device's graph."""
    return _solve_rows(ids[nodes], ids_kd, a_s, max_iter=max_iter, tol=tol)


@functools.partial(jax.jit, static_argnames=("max_iter", "tol"))
def _solve_native(nodes, ids, ids_kd, a_s, *, max_iter: int, tol: float):
    """``_solve_nodes`` by the native CPU kernel; ``nodes`` int32 ``[C]``. -> ``[C, T]``."""
    return native.truncated_cg(ids[nodes], ids_kd, a_s, max_iter=max_iter, tol=tol)


# Nodes per native call: one compiled shape, progress every ~0.1-1 s, 8 MB of output at T=1000.
_NATIVE_CHUNK = 2048


def _solve_all_native(ids, ids_kd, a_s, *, max_iter, tol) -> np.ndarray:
    m, t = ids.shape
    chunk = min(_NATIVE_CHUNK, m)
    values = np.zeros((m, t), np.float32)
    args = tuple(jnp.asarray(a) for a in (ids, ids_kd, a_s))
    starts = range(0, m, chunk)
    count = lambda g: min(chunk, m - g)
    for g in progress.track(starts, total=m, desc="diffusion solves", unit="nodes", count=count):
        nodes = np.minimum(np.arange(g, g + chunk), m - 1).astype(np.int32)  # last chunk padded
        out = _solve_native(jnp.asarray(nodes), *args, max_iter=max_iter, tol=tol)
        values[g : g + count(g)] = np.asarray(out)[: count(g)]
    return values


@functools.partial(
    jax.jit, static_argnames=("mesh", "m", "node_chunk", "max_iter", "tol", "threads")
)  # fmt: skip
def _solve_mesh(ids, ids_kd, a_s, *, mesh, m, node_chunk, max_iter, tol, threads):
    """The mesh: each device solves its own nodes with every node's ``[M, kd]`` tables
    all-gathered (``8 M kd`` bytes), by the native kernel (``threads > 0``) or ``_solve_rows``
    in chunks of ``node_chunk`` nodes. Padding rows come back 0."""
    axis = mesh_lib.axis_name(mesh)

    def body(ids_loc, kd_loc, as_loc):
        s, t = ids_loc.shape
        valid = lax.axis_index(axis) * s + jnp.arange(s) < m
        kd_all = lax.all_gather(kd_loc, axis, tiled=True)[:m]
        as_all = lax.all_gather(as_loc, axis, tiled=True)[:m]
        t_ids = jnp.where(valid[:, None], ids_loc, jnp.arange(t, dtype=jnp.int32)[None])
        if threads:
            kw = dict(max_iter=max_iter, tol=tol, num_threads=threads)
            out = native.truncated_cg(t_ids, kd_all, as_all, **kw)
        else:
            solve = lambda rows: _solve_rows(rows, kd_all, as_all, max_iter=max_iter, tol=tol)
            out = _map_rows(solve, (t_ids,), node_chunk)
        return jnp.where(valid[:, None], out, 0.0)

    spec = P(axis)
    return mesh_lib.shard_map(mesh, body, (spec,) * 3, spec)(ids, ids_kd, a_s)


def use_native(solver: str, platform: str | None = None) -> bool:
    """Resolves ``solver`` for devices of ``platform`` (default: JAX's default backend):
    ``"auto"`` is native on CPU when the kernel builds (see the module docstring)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    platform = platform or jax.default_backend()
    if solver == "xla":
        return False
    if solver == "native":
        if platform != "cpu":
            raise ValueError(f'solver="native" runs on CPU only, not on {platform} devices')
        native.require()
        return True
    return platform == "cpu" and native.available()


# Speed heuristic of the dense path (results do not depend on it): a block size is worth its
# own compilation (~1 s) only if it saves more than that many GEMM FLOPs (~5e10 FLOP/s on CPU).
_COMPILE_FLOPS = 5e10


def _tiers(sizes: np.ndarray, dense_max: int, max_iter: int) -> tuple[list[int], np.ndarray]:
    """Block sizes of the dense path and each component's block size (0: per-node path).

    Natural sizes are powers of two from 32 (a node costs ``2 B^2`` FLOPs per CG step, at most
    4x its own component's); a size is merged into the next one while the extra FLOPs cost
    less than a compilation.
    """
    pow2 = np.maximum(32, 2 ** np.ceil(np.log2(np.maximum(sizes, 1)))).astype(np.int64)
    block = np.where(sizes <= dense_max, pow2, 0)
    b, top = 32, int(block.max())
    while b < top:
        nodes = int(sizes[block == b].sum())
        if 0 < nodes and nodes * 2 * 3 * b * b * max(max_iter, 1) < _COMPILE_FLOPS:
            block[block == b] = 2 * b
        b *= 2
    return sorted(set(block[block > 0].tolist())), block


def _pack(sizes: np.ndarray, capacity: int) -> list[list[int]]:
    """Components (by index) packed into blocks of ``capacity`` nodes (next-fit decreasing)."""
    blocks, room = [], 0
    for c in np.argsort(-sizes, kind="stable"):
        if sizes[c] > room:
            blocks.append([])
            room = capacity
        blocks[-1].append(int(c))
        room -= int(sizes[c])
    return blocks


def _solve(ids, ids_kd, a_s, labels, *, max_iter, tol, dense_max, node_chunk) -> np.ndarray:
    """Offline rows ``[M, T]``: dense path for components up to ``dense_max`` nodes (several
    components share a block: the block matrix is block-diagonal and each node's mask keeps it
    to its own component), per-node path for the rest."""
    m, t = ids.shape
    comp_ids, comp_of, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.argsort(comp_of, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    pos = np.zeros(m, np.int32)  # position in the node's dense block
    values = np.zeros((m, t), np.float32)

    work = []  # (kind, payload, node count)
    tiers, block_of = _tiers(sizes, dense_max, max_iter)
    big = block_of == 0
    for b_size in tiers:
        sel = np.nonzero(block_of == b_size)[0]
        blocks = []
        for block in _pack(sizes[sel], b_size):
            nodes = np.concatenate([order[starts[c] : starts[c + 1]] for c in sel[block]])
            pos[nodes] = np.arange(len(nodes))
            blocks.append(np.pad(nodes, (0, b_size - len(nodes)), constant_values=-1))
        if not blocks:
            continue
        if b_size > 128:  # one block per call: a single shape, and GEMMs big enough
            work += [("dense", row[None].astype(np.int32), int(np.sum(row >= 0))) for row in blocks]
            continue
        per = max(1, _BUDGET // (b_size * max(b_size, t)))
        per = min(per, 1 << int(math.ceil(math.log2(len(blocks)))))
        for g in range(0, len(blocks), per):  # groups of ``per`` blocks, the last one padded
            group = np.stack(blocks[g : g + per]).astype(np.int32)
            group = np.pad(group, ((0, per - len(group)), (0, 0)), constant_values=-1)
            work.append(("dense", group, int(np.sum(group >= 0))))
    args = tuple(jnp.asarray(a) for a in (ids, ids_kd, a_s))
    comp_d, pos_d = jnp.asarray(comp_of.astype(np.int32)), jnp.asarray(pos)
    big_nodes = order[np.isin(comp_of[order], np.nonzero(big)[0])].astype(np.int32)
    for g in range(0, len(big_nodes), node_chunk):
        nodes = big_nodes[g : g + node_chunk]
        work.append(("nodes", np.pad(nodes, (0, node_chunk - len(nodes))), len(nodes)))
    logging.info(
        "diffusion: %d nodes in %d components (largest %d); %d nodes solved per node",
        m,
        len(comp_ids),
        int(sizes.max()),
        len(big_nodes),
    )

    for kind, payload, count in progress.track(
        work, total=m, desc="diffusion solves", unit="nodes", count=lambda w: w[2]
    ):
        if kind == "dense":
            out = np.asarray(
                _solve_dense(jnp.asarray(payload), *args, comp_d, pos_d, max_iter=max_iter, tol=tol)
            )
            ok = payload >= 0
            values[payload[ok]] = out[ok]
        else:
            out = np.asarray(_solve_nodes(jnp.asarray(payload), *args, max_iter=max_iter, tol=tol))
            values[payload[:count]] = out[:count]
    return values


# ---------------------------------------------------------------------------------------------
# Offline: the three stages, on one device or on a mesh.


def _check_offline(x, truncation, kd, max_iter, gamma, alpha, tol, solver, mesh, **blocks) -> int:
    """Validates the offline arguments; returns the clamped truncation."""
    m = x.shape[0]
    _check_int("truncation", truncation, 1)
    t = min(int(truncation), m)
    _check_int("kd", kd, 1, t, f" (truncation set size min(truncation, M) for M={m} nodes)")
    _check_int("max_iter", max_iter, 0)
    for name, value in blocks.items():
        if value is not None:
            _check_int(name, value, 1)
    _check_params(gamma, alpha, tol)
    use_native(solver, None if mesh is None else mesh.devices.flat[0].platform)
    return t


def _offline_rows(x: np.ndarray, *, mesh, t, kd, gamma, alpha, tol, max_iter, rows, dense_max,
                  node_chunk, solver):  # fmt: skip
    """``(indices, values)`` ``[M, T]``: NumPy on one device; on a mesh, row-sharded device
    arrays padded to ``[n_dev * s, T]`` (padding rows last)."""
    m = x.shape[0]
    gamma, alpha, tol, max_iter = float(gamma), float(alpha), float(tol), int(max_iter)
    if mesh is not None:
        threads = 0
        if use_native(solver, mesh.devices.flat[0].platform):
            local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
            threads = native.threads(local)  # the local devices' solves run at the same time
        xs = mesh_lib.shard_rows(x, mesh).array
        ids, ids_kd, sims_kd = _neighbours_mesh(xs, mesh=mesh, m=m, truncation=t, kd=kd, rows=rows)
        a_s = _graph_mesh(ids_kd, sims_kd, mesh=mesh, m=m, gamma=gamma, alpha=alpha)
        kw = dict(mesh=mesh, m=m, node_chunk=node_chunk, max_iter=max_iter, tol=tol)
        return ids, _solve_mesh(ids, ids_kd, a_s, threads=threads, **kw)
    ids, ids_kd, sims_kd = _neighbours_local(x, t, kd, rows)
    a_s, mutual = _graph(jnp.asarray(ids_kd), jnp.asarray(sims_kd), gamma, alpha)
    if use_native(solver):
        return ids, _solve_all_native(ids, ids_kd, a_s, max_iter=max_iter, tol=tol)
    labels = np.asarray(_components(jnp.asarray(ids_kd), mutual))
    kw = dict(max_iter=max_iter, tol=tol, dense_max=dense_max, node_chunk=node_chunk)
    return ids, _solve(ids, ids_kd, np.asarray(a_s), labels, **kw)


def offline(
    database: ArrayLike,
    *,
    truncation: int = 1000,
    kd: int = 50,
    gamma: float = 3.0,
    alpha: float = 0.99,
    tol: float = 1e-6,
    max_iter: int = 20,
    mesh: Mesh | None = None,
    block_size: int | None = None,
    dense_max: int = 1024,
    node_chunk: int = 16,
    solver: str = "auto",
) -> Offline:
    """The offline diffusion matrix of a descriptor set (reusable across query sets).

    Args:
      database: ``[M, D]`` float descriptors (the graph's nodes), usually L2-normalised.
      truncation: truncation set size ``T`` per node; clamped to ``M``.
      kd: kNN list size for the mutual affinity, the node itself included (authors: 50);
        ``1 <= kd <= min(T, M)``.
      gamma: exponent of the clipped similarities.
      alpha: diffusion weight in ``L = I - alpha S``, in ``(0, 1)``.
      tol: CG relative residual tolerance; ``max_iter``: CG iteration cap.
      mesh: a 1-D device mesh (``jretrieval.mesh.make_mesh``) to shard the nodes over, or None
        for one device. With several processes every process passes the same full array.
      block_size: graph rows scored against all ``M`` nodes at once by the neighbour stage
        (and the joint scores of ``rank``): ``[block_size, M]`` float32 per block (default:
        a power of two within 16 MB). Speed/memory only.
      dense_max: components up to this size are solved as dense GEMMs by the one-device XLA
        solver (speed only; any value gives the same result).
      node_chunk: nodes per batched call of the XLA per-node solver (speed/memory only).
      solver: ``"native"`` (C++ kernel, CPU only), ``"xla"``, or ``"auto"`` (native on CPU when
        it builds, else xla); speed only: the values agree to float rounding.

    Returns:
      ``Offline`` with ``indices``/``values`` ``[M, T]``.
    """
    x = _descriptors(database, "database")
    kw = dict(kd=kd, gamma=gamma, alpha=alpha, tol=tol, max_iter=max_iter, mesh=mesh,
              dense_max=dense_max, node_chunk=node_chunk, solver=solver)  # fmt: skip
    t = _check_offline(x, truncation, block_size=block_size, **kw)
    ids, values = _offline_rows(x, t=t, rows=_default_rows(x.shape[0], block_size), **kw)
    if mesh is not None:
        ids, values = (mesh_lib.to_host(a)[: x.shape[0]] for a in (ids, values))
    return Offline(
        indices=jnp.asarray(ids),
        values=jnp.asarray(values),
        truncation=t,
        kd=int(kd),
        gamma=float(gamma),
        alpha=float(alpha),
        tol=float(tol),
        max_iter=int(max_iter),
        fingerprint=fingerprint(x),
    )


# ---------------------------------------------------------------------------------------------
# 5. Ranking.


def _order(scores: ArrayLike, sims: ArrayLike) -> jax.Array:
    """Indices by decreasing ``scores``, ties by decreasing ``sims`` then increasing index.

    A stable two-key sort on the host (NumPy's lexsort): on CPU it is several times faster
    than XLA's sort or two full ``lax.top_k`` passes.
    """
    order = np.lexsort((-np.asarray(sims), -np.asarray(scores)), axis=1)
    return jnp.asarray(order.astype(np.int32))


def _unit_rows(val: jax.Array) -> jax.Array:
    return val / jnp.maximum(jnp.linalg.norm(val, axis=1, keepdims=True), 1e-30)


def _query_rows(idx, val, gid, num_queries: int, m: int) -> jax.Array:
    """Dense ``[Q, M]`` rows of the block's query nodes (ids ``< Q``; other rows dropped)."""
    rows = jnp.where(gid < num_queries, gid, num_queries)[:, None]
    return jnp.zeros((num_queries, m), jnp.float32).at[rows, idx].set(val, mode="drop")


def _joint_rows(q_rows, idx, val, chunk: int) -> jax.Array:
    """``[R, Q]``: each row's (densified, ``chunk`` at a time) inner product with the queries."""
    m = q_rows.shape[1]

    def block(i, v):
        rows = jnp.arange(i.shape[0])[:, None]
        dense = jnp.zeros((i.shape[0], m), jnp.float32).at[rows, i].set(v)
        return jnp.matmul(dense, q_rows.T, precision=_HIGHEST)

    return _map_rows(block, (idx, val), chunk)


@functools.partial(jax.jit, static_argnames=("num_queries", "chunk"))
def _joint_scores_local(idx, val, *, num_queries: int, chunk: int) -> jax.Array:
    """Inner products ``[Q, N]`` of the L2-normalised offline rows of queries and database."""
    nq, m = num_queries, idx.shape[0]
    val = _unit_rows(val)
    q_rows = _query_rows(idx[:nq], val[:nq], jnp.arange(nq), nq, m)
    return _joint_rows(q_rows, idx[nq:], val[nq:], chunk).T


@functools.partial(jax.jit, static_argnames=("mesh", "m", "num_queries", "chunk"))
def _joint_scores_mesh(idx, val, *, mesh, m: int, num_queries: int, chunk: int) -> jax.Array:
    """The mesh: ``[n_dev * s, Q]`` row-sharded (query rows are summed over devices)."""
    axis = mesh_lib.axis_name(mesh)

    def body(i_loc, v_loc):
        gid = lax.axis_index(axis) * i_loc.shape[0] + jnp.arange(i_loc.shape[0])
        v_loc = _unit_rows(v_loc)
        q_rows = lax.psum(_query_rows(i_loc, v_loc, gid, num_queries, m), axis)
        return _joint_rows(q_rows, i_loc, v_loc, chunk)

    return mesh_lib.shard_map(mesh, body, (P(axis), P(axis)), P(axis))(idx, val)


def _online_rows(nn_sims, nn_ids, idx, val, start, gamma, n: int) -> jax.Array:
    """``[Q, N]``: ``sum_j max(s_qj, 0) ** gamma * offline[j]`` over the kq neighbours ``j``
    that are rows ``start .. start + R`` of this block (others contribute on their block)."""
    r = idx.shape[0]
    local = nn_ids - start
    own = (local >= 0) & (local < r)
    li = jnp.clip(local, 0, r - 1)
    w = jnp.where(own, jnp.maximum(nn_sims, 0.0) ** gamma, 0.0)
    contrib = w[..., None] * val[li]  # [Q, kq, T]
    rows = jnp.broadcast_to(jnp.arange(nn_ids.shape[0])[:, None, None], contrib.shape)
    return jnp.zeros((nn_ids.shape[0], n), jnp.float32).at[rows, idx[li]].add(contrib)


@functools.partial(jax.jit, static_argnames=("n",))
def _online_scores(nn_sims, nn_ids, idx, val, gamma, *, n: int) -> jax.Array:
    return _online_rows(nn_sims, nn_ids, idx, val, 0, gamma, n)


@functools.partial(jax.jit, static_argnames=("mesh", "n"))
def _online_scores_mesh(nn_sims, nn_ids, idx, val, gamma, *, mesh, n: int) -> jax.Array:
    axis = mesh_lib.axis_name(mesh)

    def body(nn_s, nn_i, i_loc, v_loc):
        start = lax.axis_index(axis) * i_loc.shape[0]
        return lax.psum(_online_rows(nn_s, nn_i, i_loc, v_loc, start, gamma, n), axis)

    specs = (P(), P(), P(axis), P(axis))
    return mesh_lib.shard_map(mesh, body, specs, P())(nn_sims, nn_ids, idx, val)


def _similarities(queries: np.ndarray, database: np.ndarray) -> jax.Array:
    return jnp.matmul(jnp.asarray(queries), jnp.asarray(database).T, precision=_HIGHEST)


def _online(q, db, idx, val, *, kq: int, gamma: float, truncation: int, mesh) -> jax.Array:
    """Online ranks ``[Q, N]`` from the database's offline rows (one device or mesh form)."""
    n = db.shape[0]
    nn_sims, nn_ids = (np.asarray(a) for a in search.topk(q, db, kq))
    out = []
    block = max(1, _BUDGET // max(n, kq * truncation))
    for s in range(0, q.shape[0], block):
        nn = (nn_sims[s : s + block], nn_ids[s : s + block])
        if mesh is None:
            scores = _online_scores(*nn, idx, val, float(gamma), n=n)
        else:
            nn = mesh_lib.replicate(tuple(jnp.asarray(a) for a in nn), mesh)
            scores = _online_scores_mesh(*nn, idx, val, jnp.float32(gamma), mesh=mesh, n=n)
        out.append(_order(scores, _similarities(q[s : s + block], db)))
    return jnp.concatenate(out, axis=0)


def online_rank(
    off: Offline,
    queries: ArrayLike,
    database: ArrayLike,
    *,
    kq: int = 10,
    gamma: float | None = None,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Ranks unseen queries with a database's offline matrix (the paper's online step).

    Args:
      off: ``offline(database, ...)``.
      queries: ``[Q, D]`` float descriptors.
      database: ``[N, D]``, the descriptors ``off`` was computed from (checked).
      kq: query neighbours combined, ``1 <= kq <= N``.
      gamma: exponent of their clipped similarities (default: ``off.gamma``).
      mesh: a 1-D device mesh to shard the offline rows over, or None for one device.

    Returns:
      int32 ``[Q, N]`` database indices, best first.
    """
    q, db = _pair(queries, database)
    n = db.shape[0]
    if off.indices.shape[0] != n or fingerprint(db) != off.fingerprint:
        raise ValueError(
            f"the offline matrix was computed from other descriptors ({off.indices.shape[0]} "
            f"nodes, fingerprint {off.fingerprint}) than this database {db.shape}; recompute it "
            "with offline(database, ...)"
        )
    _check_int("kq", kq, 1, n, f" (database of shape {db.shape})")
    gamma = off.gamma if gamma is None else gamma
    _check_params(gamma, off.alpha, off.tol)
    idx, val = off.indices, off.values
    if mesh is not None:
        idx, val = (mesh_lib.shard_rows(mesh_lib.to_host(a), mesh).array for a in (idx, val))
    return _online(q, db, idx, val, kq=kq, gamma=gamma, truncation=off.truncation, mesh=mesh)


def rank(
    queries: ArrayLike,
    database: ArrayLike,
    *,
    truncation: int = 1000,
    kd: int = 50,
    kq: int = 10,
    gamma: float = 3.0,
    alpha: float = 0.99,
    mode: str = "joint",
    solver: str = "auto",
    mesh: Mesh | None = None,
    block_size: int | None = None,
) -> jax.Array:
    """Diffusion ranking (Yang et al., AAAI 2019) of a database for each query.

    Args:
      queries: ``[Q, D]`` float descriptors (L2-normalised in the pipeline).
      database: ``[N, D]`` float descriptors.
      truncation: truncation set size, clamped to the number of graph nodes.
      kd: kNN list size (node included) of the mutual affinity.
      kq: query neighbours in ``"online"`` mode (unused in ``"joint"``), ``<= N``.
      gamma: similarity exponent; alpha: diffusion weight in ``(0, 1)``.
      mode: ``"joint"`` (queries are graph nodes; authors' default) or ``"online"``.
      solver: the offline solves' kernel, ``"auto"``, ``"native"`` or ``"xla"`` (``offline``).
      mesh: a 1-D device mesh to shard the graph's nodes over, or None for one device.
      block_size: graph rows per block of the neighbour and joint-score stages (``offline``).

    Returns:
      int32 ``[Q, N]`` database indices, best first.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    q, db = _pair(queries, database)
    _check_int("kq", kq, 1, db.shape[0], f" (database of shape {db.shape})")
    x = db if mode == "online" else np.concatenate([q, db])
    kw = dict(kd=kd, gamma=gamma, alpha=alpha, tol=1e-6, max_iter=20, mesh=mesh,
              dense_max=1024, node_chunk=16, solver=solver)  # fmt: skip
    t = _check_offline(x, truncation, block_size=block_size, **kw)
    rows = _default_rows(x.shape[0], block_size)
    idx, val = _offline_rows(x, t=t, rows=rows, **kw)
    if mode == "online":
        return _online(q, db, idx, val, kq=kq, gamma=gamma, truncation=t, mesh=mesh)
    nq, m = q.shape[0], x.shape[0]
    if mesh is None:
        scores = _joint_scores_local(jnp.asarray(idx), jnp.asarray(val), num_queries=nq, chunk=rows)
    else:
        scores = _joint_scores_mesh(idx, val, mesh=mesh, m=m, num_queries=nq, chunk=rows)
        scores = mesh_lib.to_host(scores)[nq:m].T
    return _order(scores, _similarities(q, db))
