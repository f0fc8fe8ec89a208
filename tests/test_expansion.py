"""jretrieval.expansion (AQE, alpha-QE, DBA) against plain NumPy float64 loops.

Tolerances: 1e-5 absolute on unit-norm outputs (float32 sums of <= 20 unit vectors). Inputs
are drawn with well separated similarities so that float32 and float64 pick the same
neighbours.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from jretrieval import expansion
from jretrieval import mesh as mesh_lib


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _l2(x):
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)


def numpy_aqe(queries, database, k, alpha):
    q, db = queries.astype(np.float64), database.astype(np.float64)
    out = []
    for qi in q:
        s = db @ qi
        nn = np.argsort(-s, kind="stable")[:k]
        w = np.maximum(s[nn], 0) ** alpha if alpha > 0 else np.ones(k)
        out.append(qi + (w[:, None] * db[nn]).sum(axis=0))
    return _l2(np.array(out))


def numpy_dba(database, k, alpha):
    db = database.astype(np.float64)
    out = []
    for i, di in enumerate(db):
        s = db @ di
        nn = [j for j in np.argsort(-s, kind="stable") if j != i][:k]
        w = np.maximum(s[nn], 0) ** alpha if alpha > 0 else np.ones(k)
        out.append(di + (w[:, None] * db[nn]).sum(axis=0))
    return _l2(np.array(out))


@pytest.mark.parametrize("k,alpha", [(1, 0.0), (5, 0.0), (5, 3.0), (31, 0.0), (31, 1.5)])
def test_aqe_matches_numpy(k, alpha):
    rng = np.random.default_rng(k)
    queries, database = _unit(rng, 4, 6), _unit(rng, 31, 6)
    got = expansion.aqe(queries, database, k=k, alpha=alpha)
    assert got.shape == (4, 6) and got.dtype == np.float32
    np.testing.assert_allclose(np.asarray(got), numpy_aqe(queries, database, k, alpha), atol=1e-5)


@pytest.mark.parametrize("k,alpha", [(1, 0.0), (4, 0.0), (4, 3.0), (24, 0.0)])
def test_dba_matches_numpy(k, alpha):
    rng = np.random.default_rng(10 + k)
    database = _unit(rng, 25, 5)
    got = np.asarray(expansion.dba(database, k=k, alpha=alpha))
    np.testing.assert_allclose(got, numpy_dba(database, k, alpha), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # norms stay 1


def test_k_zero_is_l2_of_input():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3)).astype(np.float32) * 4
    np.testing.assert_allclose(np.asarray(expansion.aqe(x, _unit(rng, 8, 3), k=0)), _l2(x), 1e-6)
    np.testing.assert_allclose(np.asarray(expansion.dba(x, k=0)), _l2(x), rtol=1e-6)


def test_hand_computed():
    database = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    query = np.array([[0.8, 0.6]], np.float32)
    # similarities 0.8, 0.96, 0.6, -0.8: top-2 are 1 and 0; q + d1 + d0 = (2.4, 1.4).
    expected = np.array([[2.4, 1.4]]) / (np.hypot(2.4, 1.4) + 1e-6)
    np.testing.assert_allclose(np.asarray(expansion.aqe(query, database, k=2)), expected, 1e-6)
    # alpha = 1: weights 0.96 and 0.8 -> q + 0.96 d1 + 0.8 d0 = (2.176, 1.368).
    expected = np.array([[2.176, 1.368]]) / (np.hypot(2.176, 1.368) + 1e-6)
    got = expansion.aqe(query, database, k=2, alpha=1.0)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
    # alpha = 2 with a negative similarity among the k: its weight max(s, 0)^2 is 0.
    got = expansion.aqe(query, database, k=4, alpha=2.0)
    v = query[0] + 0.96**2 * database[1] + 0.64 * database[0] + 0.36 * database[2]
    np.testing.assert_allclose(np.asarray(got)[0], v / (np.linalg.norm(v) + 1e-6), rtol=1e-5)


def test_dba_excludes_own_index_even_with_duplicates():
    # Rows 0 and 1 are identical: for row 1 the tie puts index 0 first, which must still be
    # used, while index 1 (itself) is not.
    database = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    got = np.asarray(expansion.dba(database, k=1))
    # row 0 -> + d1, row 1 -> + d0, row 2 -> + d3 (0.8), row 3 -> + d2 (0.8 beats 0.6)
    expected = _l2(database + database[[1, 0, 3, 2]])
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_jit():
    rng = np.random.default_rng(7)
    queries, database = _unit(rng, 3, 4), _unit(rng, 12, 4)
    f = jax.jit(functools.partial(expansion.aqe, k=3))
    np.testing.assert_allclose(
        np.asarray(f(queries, database, alpha=2.0)), numpy_aqe(queries, database, 3, 2.0), 1e-5
    )
    g = jax.jit(functools.partial(expansion.dba, k=2, block_size=5))
    np.testing.assert_allclose(np.asarray(g(database)), numpy_dba(database, 2, 0.0), atol=1e-5)


@pytest.mark.parametrize("on_mesh", [False, True])
def test_bad_input(on_mesh):
    # The same messages on one device and on a (one-device) mesh: the checks run before
    # anything is placed (tests/test_distributed.py repeats them on four devices).
    kw = {"mesh": mesh_lib.make_mesh(jax.devices()[:1])} if on_mesh else {}
    rng = np.random.default_rng(8)
    queries, database = _unit(rng, 3, 4), _unit(rng, 6, 4)
    with pytest.raises(ValueError, match=r"k=7 is out of range.*\(6, 4\)"):
        expansion.aqe(queries, database, k=7, **kw)
    with pytest.raises(ValueError, match=r"k=6 is out of range.*N - 1 = 5"):
        expansion.dba(database, k=6, **kw)
    with pytest.raises(
        ValueError, match=r"different descriptor sizes: queries \(3, 4\), database \(6, 5\)"
    ):
        expansion.aqe(queries, _unit(rng, 6, 5), **kw)
    with pytest.raises(ValueError, match=r"queries is empty.*\(0, 4\)"):
        expansion.aqe(queries[:0], database, k=1, **kw)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        expansion.aqe(queries, database, k=1, alpha=-1.0, **kw)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        expansion.dba(database, k=1, block_size=0, **kw)
    database[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"database holds NaN or inf \(shape \(6, 4\).*\[2\]"):
        expansion.dba(database, k=1, **kw)
    with pytest.raises(ValueError, match=r"database holds NaN or inf \(shape \(6, 4\).*\[2\]"):
        expansion.aqe(queries, database, k=2, **kw)


@pytest.mark.parametrize("k,alpha", [(1, 0.0), (4, 3.0)])
def test_one_device_mesh_equals_plain(k, alpha):
    # The mesh path's kernels (shard_map, psum, ring) with one shard, against NumPy.
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    rng = np.random.default_rng(12)
    queries, database = _unit(rng, 5, 6), _unit(rng, 19, 6)
    got = expansion.aqe(queries, database, k=k, alpha=alpha, mesh=mesh, block_size=4)
    np.testing.assert_allclose(np.asarray(got), numpy_aqe(queries, database, k, alpha), atol=1e-5)
    aug = expansion.dba(database, k=k, alpha=alpha, mesh=mesh, block_size=4, query_block=3)
    np.testing.assert_allclose(aug.to_numpy(), numpy_dba(database, k, alpha), atol=1e-5)
