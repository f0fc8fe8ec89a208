"""jretrieval.search against NumPy float64 argsort; blocking, ties, jit and bad input.

Tolerances: indices exactly (inputs are drawn so that neighbouring float64 scores differ by far
more than float32 round-off); scores to 1e-5 absolute.
"""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jretrieval import search


def _tie_free(rng, q, n, d, min_gap=1e-4):
    """Random unit vectors whose per-query sorted float64 scores are separated by min_gap."""
    while True:
        queries = rng.standard_normal((q, d))
        database = rng.standard_normal((n, d))
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        database /= np.linalg.norm(database, axis=1, keepdims=True)
        s = np.sort(queries @ database.T, axis=1)
        if n == 1 or np.diff(s, axis=1).min() > min_gap:
            return queries.astype(np.float32), database.astype(np.float32)


def _reference(queries, database):
    s = queries.astype(np.float64) @ database.astype(np.float64).T
    return s, np.argsort(-s, axis=1, kind="stable")


@pytest.mark.parametrize("q,n,d", [(3, 1, 4), (5, 40, 8), (4, 97, 16)])
def test_rank_equals_argsort_of_similarities(q, n, d):
    rng = np.random.default_rng(n)
    queries, database = _tie_free(rng, q, n, d)
    s, order = _reference(queries, database)
    ranks = np.asarray(search.rank(queries, database))
    assert ranks.dtype == np.int32 and ranks.shape == (q, n)
    np.testing.assert_array_equal(ranks, order)
    for k in sorted({0, 1, min(7, n), n}):
        scores, idx = search.topk(queries, database, k)
        assert idx.shape == (q, k) and scores.shape == (q, k)
        np.testing.assert_array_equal(np.asarray(idx), order[:, :k])
        np.testing.assert_allclose(
            np.asarray(scores), np.take_along_axis(s, order[:, :k], 1), atol=1e-5
        )
        np.testing.assert_array_equal(np.asarray(search.rank(queries, database, k)), order[:, :k])


@pytest.mark.parametrize("block_size", [1, 7, 96, 1000])
def test_blocked_equals_unblocked(block_size):
    # N = 97 is prime, so every block size but 1 and >= 97 leaves a padded last block.
    rng = np.random.default_rng(0)
    queries, database = _tie_free(rng, 6, 97, 12)
    _, order = _reference(queries, database)
    for k in (5, 97):
        scores, idx = search.topk(queries, database, k, block_size=block_size)
        np.testing.assert_array_equal(np.asarray(idx), order[:, :k])
        assert np.all(np.isfinite(np.asarray(scores)))  # padding (-inf) never selected


def test_blocking_bounds_the_similarity_block():
    # The traced computation never holds a [Q, N] float array when k and a smaller block are
    # given: the largest similarity block is [Q, block_size] (+ the k running entries).
    q, n, d, k, block = 3, 1000, 8, 5, 64
    jaxpr = jax.make_jaxpr(functools.partial(search.topk, k=k, block_size=block))(
        jnp.zeros((q, d)), jnp.zeros((n, d))
    )

    def shapes(jx):
        for eqn in jx.eqns:
            for v in eqn.outvars:
                yield tuple(v.aval.shape)
            for param in eqn.params.values():
                if isinstance(param, jax.extend.core.ClosedJaxpr):
                    yield from shapes(param.jaxpr)
                elif isinstance(param, jax.extend.core.Jaxpr):
                    yield from shapes(param)

    all_shapes = list(shapes(jaxpr.jaxpr))
    # the running merge is there (equal blocks: 16 blocks of 63 rows for N = 1000)
    assert (q, k + 63) in all_shapes
    assert max(np.prod(s) for s in all_shapes if s and s[0] == q) <= q * (k + block)


def test_ties_lower_index_first():
    database = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.0], [1.0, 0.0]], np.float32)
    queries = np.array([[1.0, 0.0]], np.float32)
    # scores 1, 0, 1, 0.5, 1 -> the three ties in index order, then 3, then 1.
    expected = [[0, 2, 4, 3, 1]]
    np.testing.assert_array_equal(np.asarray(search.rank(queries, database)), expected)
    for block_size in (1, 2, 3, 16):
        _, idx = search.topk(queries, database, 4, block_size=block_size)
        np.testing.assert_array_equal(np.asarray(idx), [expected[0][:4]])


def test_hand_computed_scores():
    queries = np.array([[1.0, 2.0]], np.float32)
    database = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]], np.float32)
    scores, idx = search.topk(queries, database, 3, block_size=2)
    np.testing.assert_array_equal(np.asarray(idx), [[2, 1, 0]])
    np.testing.assert_allclose(np.asarray(scores), [[3.0, 2.0, 1.0]], rtol=1e-6)


def test_jit_and_bfloat16():
    rng = np.random.default_rng(3)
    queries, database = _tie_free(rng, 2, 30, 8)
    _, order = _reference(queries, database)
    f = jax.jit(functools.partial(search.topk, k=4, block_size=8))
    np.testing.assert_array_equal(np.asarray(f(queries, database)[1]), order[:, :4])
    r = jax.jit(search.rank)(queries, database)
    np.testing.assert_array_equal(np.asarray(r), order)
    # bfloat16 inputs: scored in float32 from the rounded values.
    qb, db = jnp.asarray(queries, jnp.bfloat16), jnp.asarray(database, jnp.bfloat16)
    _, ref = _reference(np.asarray(qb, np.float32), np.asarray(db, np.float32))
    scores, idx = search.topk(qb, db, 5)
    assert scores.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(idx), ref[:, :5])


@pytest.mark.parametrize(
    "queries,database,k,match",
    [
        (np.zeros((2, 4)), np.zeros((5, 3)), 1, r"queries \(2, 4\), database \(5, 3\)"),
        (np.zeros((0, 4)), np.zeros((5, 4)), 1, r"queries is empty.*\(0, 4\)"),
        (np.zeros((2, 4)), np.zeros((0, 4)), None, r"database is empty"),
        (np.zeros((2, 4)), np.zeros((5, 4)), 6, r"k=6 is out of range.*<= 5.*\(5, 4\) has N = 5"),
        (np.zeros((2, 4)), np.zeros((5, 4)), -1, r"k=-1"),
        (np.zeros(4), np.zeros((5, 4)), 1, r"queries must be a \[N, D\].*\(4,\)"),
        (np.zeros((2, 4), np.int32), np.zeros((5, 4)), 1, r"queries must be a float array"),
    ],
)
def test_bad_shapes(queries, database, k, match):
    with pytest.raises(ValueError, match=match):
        search.rank(queries, database, k)
    if k is not None:
        with pytest.raises(ValueError, match=match):
            search.topk(queries, database, k)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(bad):
    database = np.ones((5, 4), np.float32)
    database[3, 1] = bad
    with pytest.raises(ValueError, match=r"database holds NaN or inf \(shape \(5, 4\).*\[3\]"):
        search.topk(np.ones((2, 4), np.float32), database, 2)
    with pytest.raises(ValueError, match=r"queries holds NaN or inf"):
        search.rank(database, np.ones((5, 4), np.float32))


def test_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        search.topk(np.ones((2, 4)), np.ones((5, 4)), 2, block_size=0)


def test_both_full_sort_paths_agree():
    # rank(k=None) sorts with NumPy on CPU and with lax.top_k elsewhere; both must give the
    # stable descending order, rows with and without ties.
    rng = np.random.default_rng(9)
    s = rng.standard_normal((4, 50)).astype(np.float32)
    s[1, [3, 17, 40]] = 2.5  # a three-way tie at the top
    s[2, ::2] = 0.0  # many ties
    s[3, :10], s[3, 10:20] = -0.0, 0.0  # the two zeros compare equal
    expected = np.argsort(-s, axis=1, kind="stable")
    np.testing.assert_array_equal(search._host_argsort_desc(s), expected)
    # (the XLA path gets scores from _similarities, which has already mapped -0.0 to 0.0)
    xla = search._argsort_desc_xla(jnp.asarray(s) + 0.0)
    np.testing.assert_array_equal(np.asarray(xla), expected)
    # the same through the public path, from inner products that give -0.0 and 0.0
    database = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
    queries = np.array([[-0.0, 1.0], [0.0, -1.0]], np.float32)
    np.testing.assert_array_equal(
        np.asarray(search.rank(queries, database)), [[2, 0, 1, 3], [0, 1, 3, 2]]
    )
    _, idx = search.topk(queries, database, 4, block_size=3)
    np.testing.assert_array_equal(np.asarray(idx), [[2, 0, 1, 3], [0, 1, 3, 2]])
    np.testing.assert_array_equal(search._host_argsort_desc(s[None]), expected[None])


@pytest.mark.parametrize("block_size", [5, 512])
def test_self_topk_equals_masked_argsort(block_size):
    # 23 vectors with duplicated rows (ties between different indices), several block sizes
    # including ones that do not divide N.
    rng = np.random.default_rng(11)
    x = rng.standard_normal((23, 5)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[[7, 15]] = x[3]  # three copies of one unit vector
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    s_excl = s.copy()
    np.fill_diagonal(s_excl, -np.inf)
    for k in (6, 22):
        scores, idx = search.self_topk(x, k, block_size=block_size)
        np.testing.assert_array_equal(
            np.asarray(idx), np.argsort(-s_excl, axis=1, kind="stable")[:, :k]
        )
        np.testing.assert_allclose(
            np.asarray(scores), -np.sort(-s_excl, axis=1)[:, :k], rtol=1e-5, atol=1e-5
        )
    # row 15's nearest others are its two copies, lower index first
    np.testing.assert_array_equal(
        np.asarray(search.self_topk(x, 2, block_size=block_size)[1])[15], [3, 7]
    )
    _, idx = search.self_topk(x, 23, exclude_self=False, block_size=block_size)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(search.rank(x, x)))


def test_self_topk_bad_input():
    x = np.ones((5, 3), np.float32)
    with pytest.raises(ValueError, match=r"k=5 is out of range.*<= 4.*database \(5, 3\)"):
        search.self_topk(x, 5)
    with pytest.raises(ValueError, match=r"database is empty"):
        search.self_topk(x[:0], 1)
    x[2, 2] = np.nan
    with pytest.raises(ValueError, match=r"database holds NaN or inf"):
        search.self_topk(x, 1)


def _one_device_mesh():
    from jretrieval import mesh as mesh_lib

    return mesh_lib.make_mesh(jax.devices()[:1])


@pytest.mark.parametrize("on_mesh", [False, True])
def test_bad_arguments_same_message_with_and_without_mesh(on_mesh):
    # The mesh path (shard_map, all_gather) with one shard: the checks run before placement,
    # so the messages are the one-device ones (tests/test_distributed.py: on four devices).
    kw = {"mesh": _one_device_mesh()} if on_mesh else {}
    q, db = np.ones((2, 4), np.float32), np.ones((5, 4), np.float32)
    with pytest.raises(ValueError, match=r"k=6 is out of range.*<= 5.*\(5, 4\) has N = 5"):
        search.topk(q, db, 6, **kw)
    with pytest.raises(ValueError, match=r"different descriptor sizes: queries \(2, 3\)"):
        search.rank(q[:, :3], db, 2, **kw)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        search.topk(q, db, 2, block_size=0, **kw)
    with pytest.raises(ValueError, match=r"k=5 is out of range.*<= 4.*own index excluded"):
        search.self_topk(db, 5, **kw)
    bad = db.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"database holds NaN or inf \(shape \(5, 4\).*\[3\]"):
        search.topk(q, bad, 2, **kw)
    with pytest.raises(ValueError, match=r"database holds NaN or inf \(shape \(5, 4\).*\[3\]"):
        search.Index(bad, **kw)
    with pytest.raises(ValueError, match=r"queries holds NaN or inf"):
        search.Index(db, **kw).topk(bad, 2)


def test_mesh_path_and_index_equal_the_reference():
    rng = np.random.default_rng(21)
    queries, database = _tie_free(rng, 4, 37, 8)
    s, order = _reference(queries, database)
    mesh = _one_device_mesh()
    for kw in ({}, {"mesh": mesh}):
        for block_size in (None, 5):
            scores, idx = search.topk(queries, database, 9, block_size=block_size, **kw)
            np.testing.assert_array_equal(np.asarray(idx), order[:, :9])
            np.testing.assert_allclose(
                np.asarray(scores), np.take_along_axis(s, order[:, :9], 1), atol=1e-5
            )
        np.testing.assert_array_equal(np.asarray(search.rank(queries, database, **kw)), order)
        index = search.Index(database, block_size=6, **kw)
        assert len(index) == 37
        scores, ids = index.topk(queries, np.int64(5))  # any integer k (issue 9)
        assert np.asarray(ids).dtype.kind == "i" and np.asarray(scores).shape == (4, 5)
        np.testing.assert_array_equal(np.asarray(ids), order[:, :5])
        np.testing.assert_array_equal(np.asarray(index.rank(queries)), order)
        np.testing.assert_array_equal(np.asarray(index.rank(queries, 3)), order[:, :3])
    # k as any integer type on the plain functions too
    np.testing.assert_array_equal(
        np.asarray(search.rank(queries, database, k=np.int64(5))), order[:, :5]
    )


def test_self_topk_on_a_mesh_and_self_first():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((19, 5)).astype(np.float32)
    x[[4, 11]] = x[2]  # ties across blocks
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    s_excl = s.copy()
    np.fill_diagonal(s_excl, -np.inf)
    ref = np.argsort(-s_excl, axis=1, kind="stable")
    mesh = _one_device_mesh()
    si, ii = search.self_topk(x, 6, mesh=mesh, block_size=4, query_block=5)
    np.testing.assert_array_equal(ii.to_numpy(), ref[:, :6])
    np.testing.assert_allclose(si.to_numpy(), np.take_along_axis(s, ref[:, :6], 1), atol=1e-4)
    # self_first: the own index first (scored +inf), then the nearest others
    _, first = search.self_topk(x, 4, exclude_self=False, self_first=True, block_size=3)
    np.testing.assert_array_equal(np.asarray(first)[:, 0], np.arange(19))
    np.testing.assert_array_equal(np.asarray(first)[:, 1:], ref[:, :3])


def test_repeated_calls_do_not_retrace():
    rng = np.random.default_rng(2)
    queries, database = _tie_free(rng, 3, 20, 4)
    search.topk(queries, database, 3)
    index = search.Index(database)
    index.topk(queries, 3)
    before = search._topk_impl._cache_size()
    for _ in range(3):
        search.topk(queries, database, 3)
        index.topk(queries + 0.5, np.int32(3))
    assert search._topk_impl._cache_size() == before
