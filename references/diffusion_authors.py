"""The diffusion authors' code (fyang93/diffusion), restated for tests and benchmarks.

Yang, Hinami, Matsui, Ly, Satoh, "Efficient image retrieval via decoupling diffusion into online
and offline processing", AAAI 2019; public code at github.com/fyang93/diffusion (``knn.py``,
``diffusion.py``, ``rank.py``). What it does, step by step, as restated here:

- ``KNN``: a faiss ``IndexFlatIP`` holding the features (float32, C-contiguous); ``search``
  returns faiss' ``(sims, ids)``, best first.
- ``Diffusion.get_offline_results(n_trunc, kd=50)``: ``sims, ids = knn.search(features,
  n_trunc)``; truncation lists = ``ids``; Laplacian from ``sims[:, :kd]``, ``ids[:, :kd]``;
  then for every node ``i`` (joblib ``Parallel(n_jobs=-1, prefer='threads')``)
  ``cg(lap_alpha[ids[i]][:, ids[i]], e_0, tol=1e-6, maxiter=20)``; the solutions become the
  rows of a CSR matrix ``[N, N]`` (float32).
- ``get_affinity(sims, ids, gamma=3)``: negative similarities set to 0, ``sims ** gamma``;
  for every node a plain Python loop keeps the neighbours ``j`` whose own kNN list holds ``i``
  (``np.isin(ids[ids[i]], i).any(axis=1)``), the node itself (slot 0) excluded; CSC matrix.
- ``get_laplacian(sims, ids, alpha=0.99)``: degrees ``W 1 + 1e-12``,
  ``L = I - alpha D^-1/2 W D^-1/2`` (``scipy.sparse``).
- ``rank.py search()`` (joint mode): ``Diffusion(vstack([queries, gallery]))``, offline rows
  L2-normalised (``sklearn.preprocessing.normalize``), ``scores = F_q @ F_db.T``,
  ``ranks = argsort(-scores)``.
- ``rank.py search_old()`` (online mode): ``Diffusion(gallery)``, ``knn.search(queries, kq)``,
  ``sims ** 3``, ``scores = sims[i] @ offline[ids[i]]`` per query, the ``n_trunc`` best kept.

Changes, none affecting results: no on-disk cache (their ``@cache('offline.jbl')`` names the
file without truncation or kd, so a changed parameter would silently reuse stale results); SciPy
>= 1.14 spells ``tol`` as ``rtol``; joblib's thread pool is a ``ThreadPoolExecutor`` with one
worker per core (joblib is not a dependency here); ``normalize`` is restated with
``scipy.sparse``; the ANN branch they use from 100,000 nodes (faiss IVFPQ) is left out: callers
here stay below it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import scipy.sparse as sparse
import scipy.sparse.linalg as linalg

__all__ = [
    "KNN", "Diffusion", "get_affinity", "get_laplacian", "offline_rows", "rank_joint",
    "rank_online",
]  # fmt: skip


class KNN:
    """``knn.KNN(database, method='cosine')``: exhaustive inner-product search."""

    def __init__(self, database: np.ndarray):
        database = np.ascontiguousarray(database, dtype=np.float32)
        self.index = faiss.IndexFlatIP(database.shape[1])
        self.index.add(database)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


class Diffusion:
    """``diffusion.Diffusion(features, cache_dir)`` without the cache (see the docstring)."""

    def __init__(self, features: np.ndarray):
        if len(features) >= 100_000:
            raise ValueError(
                "the authors switch to an IVFPQ index from 100,000 nodes: not restated"
            )
        self.features = features
        self.N = len(features)
        self.knn = KNN(features)

    def get_offline_results(self, n_trunc: int, kd: int = 50) -> sparse.csr_matrix:
        sims, ids = self.knn.search(self.features, n_trunc)
        lap_alpha = get_laplacian(sims[:, :kd], ids[:, :kd])
        all_scores = offline_rows(lap_alpha, ids, range(self.N))
        rows = np.repeat(np.arange(self.N), n_trunc)
        return sparse.csr_matrix(
            (all_scores.reshape(-1), (rows, ids.reshape(-1))), shape=(self.N, self.N),
            dtype=np.float32,
        )  # fmt: skip


def offline_rows(lap_alpha, trunc_ids: np.ndarray, nodes) -> np.ndarray:
    """``get_offline_result(i)`` for each node (their thread pool): ``[len(nodes), T]``."""
    trunc_init = np.zeros(trunc_ids.shape[1])
    trunc_init[0] = 1
    lap_alpha = sparse.csr_matrix(lap_alpha)

    def get_offline_result(i):
        ids_i = trunc_ids[i]
        trunc_lap = lap_alpha[ids_i][:, ids_i]
        scores, _ = linalg.cg(trunc_lap, trunc_init, rtol=1e-6, maxiter=20)
        return scores

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return np.stack(list(pool.map(get_offline_result, nodes)))


def get_laplacian(sims: np.ndarray, ids: np.ndarray, alpha: float = 0.99):
    """``L = I - alpha D^-1/2 W D^-1/2`` of the mutual kNN affinity (``Diffusion`` method)."""
    affinity = get_affinity(sims, ids)
    num = affinity.shape[0]
    degrees = affinity @ np.ones(num) + 1e-12
    mat = sparse.dia_matrix((degrees ** (-0.5), [0]), shape=(num, num), dtype=np.float32)
    stochastic = mat @ affinity @ mat
    sparse_eye = sparse.dia_matrix((np.ones(num), [0]), shape=(num, num), dtype=np.float32)
    return sparse_eye - alpha * stochastic


def get_affinity(sims: np.ndarray, ids: np.ndarray, gamma: float = 3):
    """The mutual kNN affinity by their per-node loop (``Diffusion`` method)."""
    num = sims.shape[0]
    sims = sims.copy()
    sims[sims < 0] = 0
    sims = sims**gamma
    vec_ids, mut_ids, mut_sims = [], [], []
    for i in range(num):
        ismutual = np.isin(ids[ids[i]], i).any(axis=1)
        ismutual[0] = False
        if ismutual.any():
            vec_ids.append(i * np.ones(ismutual.sum(), dtype=int))
            mut_ids.append(ids[i, ismutual])
            mut_sims.append(sims[i, ismutual])
    vec_ids, mut_ids, mut_sims = map(np.concatenate, [vec_ids, mut_ids, mut_sims])
    return sparse.csc_matrix((mut_sims, (vec_ids, mut_ids)), shape=(num, num), dtype=np.float32)


def _normalize_rows(m: sparse.csr_matrix) -> sparse.csr_matrix:
    """``sklearn.preprocessing.normalize(m, norm="l2", axis=1)``: zero rows stay zero."""
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    norms[norms == 0] = 1
    return sparse.diags(1 / norms) @ m


def rank_joint(queries: np.ndarray, gallery: np.ndarray, truncation: int, kd: int = 50):
    """``rank.py search()``: ranks ``[Q, N]``, best first."""
    n_query = len(queries)
    offline = Diffusion(np.vstack([queries, gallery])).get_offline_results(truncation, kd)
    features = _normalize_rows(offline.tocsr())
    scores = features[:n_query] @ features[n_query:].T
    return np.asarray(np.argsort(-scores.todense()))


def rank_online(
    queries: np.ndarray, gallery: np.ndarray, truncation: int, kd: int = 50, kq: int = 10,
    gamma: float = 3,
):  # fmt: skip
    """``rank.py search_old()``: ranks ``[Q, truncation]``, best first."""
    diffusion = Diffusion(gallery)
    offline = diffusion.get_offline_results(truncation, kd)
    sims, ids = diffusion.knn.search(queries, kq)
    sims = sims**gamma
    all_ranks = np.empty((len(ids), truncation), dtype=np.int64)
    for i in range(len(ids)):
        scores = sims[i] @ offline[ids[i]]
        parts = np.argpartition(-scores, truncation)[:truncation]
        all_ranks[i] = parts[np.argsort(-scores[parts])]
    return all_ranks
