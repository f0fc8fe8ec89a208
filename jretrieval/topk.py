"""Top-k kernels over a block of database rows, shared by one device and a mesh.

Shape convention: queries ``q`` ``[Q, D]``, a block of database rows ``x`` ``[s, D]`` whose
first row has the global index ``start`` and whose rows at or above ``n`` (the database size)
are padding; similarities ``q @ x.T``; results ``[Q, k]`` best first, ties by lower index.

These are the formulas of ``jretrieval.search`` (and of DBA in ``jretrieval.expansion``), each
written once: ``block_topk`` scores ``block`` rows at a time and merges them into a running
top-k (``merge``); ``lexi_merge`` merges candidate lists that do not arrive in index order (the
ring); ``self_topk_rows`` is each own row's kNN, on one device from the symmetric matrix
(``self_topk_pairs``), on a mesh by passing the shards around the ring (``ring``, ``ppermute``).
They are traceable functions, jitted by their callers (``search``), and run unchanged inside
``shard_map``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jretrieval import mesh as mesh_lib

__all__ = [
    "OWN",
    "all_devices",
    "block_topk",
    "lexi_merge",
    "merge",
    "ring",
    "row_chunks",
    "self_topk_pairs",
    "self_topk_rows",
    "similarities",
]

_HIGHEST = lax.Precision.HIGHEST
#: how ``self_topk_rows`` scores a row against itself.
OWN = {"keep": None, "exclude": -jnp.inf, "first": jnp.inf}


def similarities(q: jax.Array, x: jax.Array) -> jax.Array:
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
        sc = similarities(q, blk)
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
        sc = similarities(blocks[i], blocks[j])  # rows i x columns j, and transposed
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


def all_devices(ok: jax.Array, axis: str) -> jax.Array:
    """A per-device bool, True on every device iff it is True on all (inside ``shard_map``)."""
    return lax.psum(jnp.where(ok, 0, 1), axis) == 0
