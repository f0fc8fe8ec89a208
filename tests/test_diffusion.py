"""Tests of jretrieval.diffusion against a NumPy/SciPy float64 version of the authors' algorithm.

The reference below follows fyang93/diffusion step by step (kNN by inner product, mutual kNN
affinity with clipped similarities ** gamma, D^-1/2 W D^-1/2, L = I - alpha S, one SciPy CG per
node on L[ids][:, ids] with b = e_0, rtol=1e-6, maxiter=20, rows assembled into a CSR matrix;
joint scores = inner products of L2-normalised rows; online scores = sum of the kq neighbours'
rows weighted by similarity ** gamma). Tolerances: offline rows to 1e-4 of the largest entry of
the row (float32 CG against float64 CG); rankings must be orderings of the reference scores
(non-increasing up to 1e-5 relative), with ties broken by plain similarity.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla

from jretrieval import diffusion, native

# The native kernel needs a C++ compiler (a build failure with a compiler present fails tests).
needs_compiler = pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler")

# ------------------------------------------------------------------------------------------
# Reference (float64, plain loops, as the authors' code; SciPy >= 1.14 spells tol as rtol).


def ref_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = x @ x.T
    np.fill_diagonal(s, np.inf)  # the node itself first (as faiss does without duplicates)
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, axis=1), ids


def ref_laplacian(sims, ids, kd, gamma, alpha) -> sp.csr_matrix:
    n = len(ids)
    sims = np.maximum(sims[:, :kd], 0) ** gamma
    idk = ids[:, :kd]
    rows, cols, vals = [], [], []
    for i in range(n):
        mutual = np.isin(idk[idk[i]], i).any(axis=1)
        mutual[0] = False
        rows += [i] * int(mutual.sum())
        cols += list(idk[i, mutual])
        vals += list(sims[i, mutual])
    w = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    d = np.asarray(w.sum(axis=1)).ravel() + 1e-12
    dm = sp.diags(d**-0.5)
    return (sp.eye(n) - alpha * (dm @ w @ dm)).tocsr()


def ref_offline(x, truncation, kd, gamma=3.0, alpha=0.99) -> np.ndarray:
    """Dense ``[M, M]`` offline matrix (rows = per-node CG solutions)."""
    sims, ids = ref_knn(x.astype(np.float64), truncation)
    lap = ref_laplacian(sims, ids, kd, gamma, alpha)
    b = np.zeros(truncation)
    b[0] = 1
    out = np.zeros((len(x), len(x)))
    for i in range(len(x)):
        sol, _ = sla.cg(lap[ids[i]][:, ids[i]], b, rtol=1e-6, maxiter=20)
        out[i, ids[i]] = sol
    return out


def ref_joint_scores(q, db, truncation, kd, gamma=3.0, alpha=0.99) -> np.ndarray:
    off = ref_offline(np.concatenate([q, db]), truncation, kd, gamma, alpha)
    f = off / np.linalg.norm(off, axis=1, keepdims=True)
    return f[: len(q)] @ f[len(q) :].T


def ref_online_scores(q, db, truncation, kd, kq, gamma=3.0, alpha=0.99) -> np.ndarray:
    off = ref_offline(db, truncation, kd, gamma, alpha)
    s = q.astype(np.float64) @ db.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :kq]
    w = np.maximum(np.take_along_axis(s, ids, axis=1), 0) ** gamma
    return np.einsum("qk,qkn->qn", w, off[ids])


def dense(off: diffusion.Offline) -> np.ndarray:
    idx, val = np.asarray(off.indices), np.asarray(off.values)
    out = np.zeros((len(idx), len(idx)))
    np.put_along_axis(out, idx, val, axis=1)
    return out


def clustered(n, dim=32, clusters=5, noise=1.4, seed=0, return_labels=False):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, n)
    x = centers[labels] + noise * rng.standard_normal((n, dim)) / dim**0.5
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return (x, labels) if return_labels else x


def assert_orders(ranks, ref_scores, sims):
    """``ranks`` sorts ``ref_scores`` descending (1e-5 relative), ties by ``sims`` descending."""
    ranks = np.asarray(ranks)
    assert ranks.shape == ref_scores.shape
    for r, s, t in zip(ranks, ref_scores, sims, strict=True):
        assert sorted(r) == list(range(len(s)))
        got = s[r]
        tol = 1e-5 * np.abs(s).max()
        assert np.all(np.diff(got) <= tol), "not ordered by the reference scores"
        tied = got[:-1] == got[1:]  # exact ties, mostly the unreached items (score 0)
        assert np.all(np.diff(t[r])[tied] <= 1e-6), "ties not broken by similarity"


# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    x = clustered(330, seed=1)
    return x[:30], x[30:]  # 30 queries, 300 database vectors


# The native kernel; XLA's component GEMM path; XLA's per-node path.
SOLVERS = [pytest.param("native", 1024, marks=needs_compiler), ("xla", 1024), ("xla", 1)]


@pytest.mark.parametrize(("solver", "dense_max"), SOLVERS)
def test_offline_matches_reference(data, solver, dense_max):
    _, db = data
    off = diffusion.offline(db, truncation=100, kd=10, dense_max=dense_max, solver=solver)
    assert off.indices.shape == off.values.shape == (300, 100)
    np.testing.assert_array_equal(np.asarray(off.indices[:, 0]), np.arange(300))
    ref = ref_offline(db, 100, 10)
    got = dense(off)
    scale = np.abs(ref).max(axis=1, keepdims=True)
    assert np.all(np.abs(got - ref) <= 1e-4 * scale)
    # The truncation sets are the reference's 100 nearest neighbours.
    _, ids = ref_knn(db.astype(np.float64), 100)
    assert all(set(a) == set(b) for a, b in zip(np.asarray(off.indices), ids, strict=True))


@pytest.mark.parametrize(("solver", "dense_max"), SOLVERS)
def test_offline_connected_graph_every_path(solver, dense_max):
    # One cluster: a single component, so dense_max decides XLA's path; all give the reference.
    x = clustered(160, dim=16, clusters=1, noise=3.0, seed=2)
    ref = ref_offline(x, 60, 12)
    got = dense(diffusion.offline(x, truncation=60, kd=12, dense_max=dense_max, solver=solver))
    assert np.all(np.abs(got - ref) <= 1e-4 * np.abs(ref).max(axis=1, keepdims=True))


def test_joint_rank_matches_reference(data):
    q, db = data
    ranks = diffusion.rank(q, db, truncation=100, kd=10, mode="joint")
    assert ranks.dtype == np.int32
    assert_orders(ranks, ref_joint_scores(q, db, 100, 10), q @ db.T)


def test_online_rank_matches_reference(data):
    q, db = data
    off = diffusion.offline(db, truncation=100, kd=10)
    ranks = diffusion.online_rank(off, q, db, kq=5)
    assert_orders(ranks, ref_online_scores(q, db, 100, 10, 5), q @ db.T)
    # rank(mode="online") is offline + online_rank; the offline result serves other queries.
    np.testing.assert_array_equal(
        np.asarray(diffusion.rank(q, db, truncation=100, kd=10, kq=5, mode="online")),
        np.asarray(ranks),
    )
    other = clustered(7, seed=9)
    assert_orders(
        diffusion.online_rank(off, other, db, kq=5),
        ref_online_scores(other, db, 100, 10, 5),
        other @ db.T,
    )


def average_precision(ranks: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Non-interpolated AP per query; ``positives`` boolean ``[Q, N]``."""
    hits = np.take_along_axis(positives, ranks, axis=1)
    precision = np.cumsum(hits, axis=1) / np.arange(1, ranks.shape[1] + 1)
    return (precision * hits).sum(axis=1) / hits.sum(axis=1)


@pytest.mark.parametrize("mode", ["joint", "online"])
def test_mean_average_precision_agrees(mode):
    x, labels = clustered(330, seed=4, noise=2.0, return_labels=True)
    q, db = x[:30], x[30:]
    positives = labels[:30, None] == labels[None, 30:]
    ranks = np.asarray(diffusion.rank(q, db, truncation=100, kd=10, kq=5, mode=mode))
    if mode == "joint":
        ref = ref_joint_scores(q, db, 100, 10)
    else:
        ref = ref_online_scores(q, db, 100, 10, 5)
    ref_ranks = np.lexsort((-(q @ db.T), -ref), axis=1)
    got, want = average_precision(ranks, positives), average_precision(ref_ranks, positives)
    assert abs(got.mean() - want.mean()) <= 1e-3
    np.testing.assert_allclose(got, want, atol=1e-2)
    # Diffusion helps here (a check that the comparison is not between two broken rankings).
    plain = average_precision(np.argsort(-(q @ db.T), axis=1), positives)
    assert want.mean() > plain.mean()


def two_chains(n=20, gap=0.35):
    """Two parallel arcs; along-arc neighbours are closer than the other arc, far ends are not."""
    t = np.linspace(0, 2.0, n)
    a = np.stack([np.cos(t), np.sin(t), np.zeros(n)], axis=1)
    b = np.stack([np.cos(t), np.sin(t), np.full(n, gap)], axis=1)
    x = np.concatenate([a, b])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("mode", ["joint", "online"])
def test_disconnected_clusters_never_cross(mode):
    x = two_chains()
    q, db = x[[0, 39]], np.delete(x, [0, 39], axis=0)  # ends of both chains as queries
    own = np.array([0] * 19 + [1] * 19)
    # Plain similarity does put the other chain first for some items: the test is not vacuous.
    plain = np.argsort(-(q @ db.T), axis=1)
    assert (own[plain[0, :19]] == 1).any()
    ranks = np.asarray(diffusion.rank(q, db, truncation=38, kd=4, kq=1, mode=mode))
    np.testing.assert_array_equal(own[ranks[0, :19]], 0)
    np.testing.assert_array_equal(own[ranks[1, :19]], 1)


def test_parameters_change_the_result_and_key(data):
    _, db = data
    base = diffusion.offline(db, truncation=80, kd=10)
    longer = diffusion.offline(db, truncation=90, kd=10)
    wider = diffusion.offline(db, truncation=80, kd=12)
    assert len({base.key, longer.key, wider.key}) == 3
    assert longer.indices.shape == (300, 90)
    assert not np.allclose(dense(base), dense(wider), atol=1e-3)
    assert not np.allclose(dense(base), dense(longer), atol=1e-3)
    # The key names every parameter.
    assert "T80" in base.key and "kd10" in base.key and base.fingerprint in base.key
    # An offline matrix of other descriptors is refused, not silently used.
    with pytest.raises(ValueError, match="other descriptors"):
        diffusion.online_rank(base, db[:3], db[::-1].copy())


def test_small_graph_clamps_truncation_and_duplicates_put_self_first():
    x = clustered(12, dim=8, seed=3)
    x = np.concatenate([x, x[:4]])  # exact duplicates: ties in the similarities
    off = diffusion.offline(x, truncation=1000, kd=5)
    assert off.truncation == 16 and off.indices.shape == (16, 16)
    np.testing.assert_array_equal(np.asarray(off.indices[:, 0]), np.arange(16))
    ref = ref_offline(x, 16, 5)
    got = dense(off)
    assert np.all(np.abs(got - ref) <= 1e-4 * np.abs(ref).max(axis=1, keepdims=True))
    ranks = diffusion.rank(x[:2], x, truncation=1000, kd=5, kq=3, mode="online")
    assert ranks.shape == (2, 16)


def test_offline_is_a_pytree(data):
    import jax

    off = diffusion.offline(data[1][:50], truncation=20, kd=5)
    leaves, tree = jax.tree_util.tree_flatten(off)
    assert len(leaves) == 2
    again = jax.tree_util.tree_unflatten(tree, leaves)
    assert again.key == off.key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"queries": np.zeros((0, 4), np.float32)}, "queries is empty"),
        ({"queries": np.ones((2, 5), np.float32)}, "different descriptor sizes"),
        ({"database": np.ones(4, np.float32)}, r"database must be a \[N, D\]"),
        ({"database": np.array([[1, 0, 0, np.nan]] * 6, np.float32)}, "NaN or inf"),
        ({"kq": 7}, "kq=7 is out of range"),
        ({"kd": 9}, "kd=9 is out of range"),
        ({"truncation": 3, "kd": 5}, "kd=5 is out of range"),
        ({"truncation": 0}, "truncation=0"),
        ({"alpha": 1.0}, "alpha must be in"),
        ({"gamma": -1.0}, "gamma must be"),
        ({"mode": "both"}, "mode must be one of"),
        ({"solver": "scipy"}, "solver must be one of"),
    ],
)
def test_bad_input(kwargs, match):
    args = {
        "queries": np.eye(2, 4, dtype=np.float32),
        "database": np.eye(6, 4, dtype=np.float32),
        "truncation": 6,
        "kd": 3,
        "kq": 2,
        "mode": "online",
    }
    args.update(kwargs)
    q, db = args.pop("queries"), args.pop("database")
    with pytest.raises(ValueError, match=match):
        diffusion.rank(q, db, **args)


def test_dense_block_sizes():
    sizes = np.array([1, 40, 100, 2000])
    tiers, block = diffusion._tiers(sizes, 1024, 20)  # cheap tiers merge into one compilation
    assert tiers == [128] and block.tolist() == [128, 128, 128, 0]
    tiers, block = diffusion._tiers(np.array([1, 40, 100, 2000] * 10**6), 1024, 20)
    assert tiers == [32, 64, 128]  # enough nodes: each size pays for its compilation
    assert diffusion._pack(np.array([5, 30, 20, 9]), 32) == [[1], [2, 3], [0]]


def test_several_block_sizes_match_reference(monkeypatch):
    # No merging: components of 40..160 nodes go to blocks of 64, 128 and 256 nodes.
    monkeypatch.setattr(diffusion, "_COMPILE_FLOPS", 0.0)
    x = np.concatenate([clustered(40 * (i + 1), dim=24, clusters=1, seed=i) for i in range(4)])
    x = x + np.repeat(np.eye(4, 24, dtype=np.float32) * 3, [40, 80, 120, 160], axis=0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids, ids_kd, sims_kd = diffusion._neighbours(x, 100, 8)
    _, mutual = diffusion._graph(jnp.asarray(ids_kd), jnp.asarray(sims_kd), 3.0, 0.99)
    labels = np.asarray(diffusion._components(jnp.asarray(ids_kd), mutual))
    tiers, _ = diffusion._tiers(np.unique(labels, return_counts=True)[1], 1024, 20)
    assert len(tiers) >= 3
    got = dense(diffusion.offline(x, truncation=100, kd=8, solver="xla"))
    ref = ref_offline(x, 100, 8)
    assert np.all(np.abs(got - ref) <= 1e-4 * np.abs(ref).max(axis=1, keepdims=True))


@pytest.mark.parametrize("n", [120, 400])  # exact bisection / sampled candidates (stride 2)
def test_truncation_sets_are_the_nearest_neighbours_ties_by_index(n):
    x = clustered(n - 40, dim=6, seed=5)
    x = np.concatenate([x, x[:40]])  # duplicates: exact ties among the similarities
    ids, ids_kd, sims_kd = diffusion._neighbours(x, 40, 5)
    # Ties are those of the float32 similarities (float64 would break some of them).
    s32 = (x @ x.T).astype(np.float32)
    np.fill_diagonal(s32, np.inf)
    want = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), -s32), axis=1)[:, :40]
    np.testing.assert_array_equal(ids[:, 0], np.arange(n))
    assert all(set(a) == set(b) for a, b in zip(ids, want, strict=True))
    assert all(set(a) == set(b) for a, b in zip(ids_kd, want[:, :5], strict=True))


def test_top_sets_match_a_per_row_sort_with_ties():
    # Small integer scores make exact ties common; +inf marks a node's own column.
    rng = np.random.default_rng(0)
    for _ in range(200):
        rows, n = int(rng.integers(1, 6)), int(rng.integers(5, 60))
        s = rng.integers(0, 6, (rows, n)).astype(np.float32)
        s[:, 0] = np.inf
        cand = rng.random((rows, n)) < rng.uniform(0.3, 1.0)
        cand[:, 0] = True
        k = int(rng.integers(1, cand.sum(axis=1).min() + 1))
        got = diffusion._top_sets(s, cand, k)
        for i in range(rows):
            cols = np.flatnonzero(cand[i])
            want = np.sort(cols[np.lexsort((cols, -s[i, cols]))[:k]])  # by value, then column
            np.testing.assert_array_equal(got[i], want)
