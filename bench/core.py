"""Benchmark of the retrieval core beside the NumPy/PyTorch code it replaces, in one run.

    python -m bench.core            # paper size: 5,063 database + 70 queries, 2048-d,
                                    # 16 maps of 23x23x2048; about 2-3 minutes on 2 cores
    python -m bench.core --quick    # small sizes, a smoke test (seconds)

Each stage is warmed up (jit compilation, reported as "first call") and then timed as the
median of 5 (fast stages: 20) runs with ``block_until_ready``, alternating with the reference
(same data, same process), with a short pause before every call so one library's spinning
worker threads do not slow the other down. Every stage also checks that both sides agree.
The table is printed and written to ``docs/bench_core.md`` (``--out`` to change; not with
``--quick``).

References (written here, restating the code each stage replaces):

* pooling: cirtorch's ``rmac``/``gem`` loop in PyTorch (CPU, ``no_grad``, NCHW);
* whitening: cirtorch's ``pcawhitenlearn`` (float64 ``np.linalg.eig`` of the covariance) and
  ``whitenapply``; a float64 ``np.linalg.eigh`` variant is shown too as the stronger baseline;
* search: ``np.argsort(-(Q @ X.T))``; top-100 with ``np.argpartition`` then a sort of the 100;
* AQE / DBA: NumPy similarities, ``argpartition`` top-k, weighted sum, L2;
* metrics: revisitop's ``compute_map`` loop (``np.in1d`` replaced by ``np.isin``, NumPy 2).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F

from bench.harness import timed_pair
from jretrieval import expansion, pooling, search, whitening

try:
    from jretrieval import metrics
except ImportError:  # another helper's module; the stage is skipped without it
    metrics = None


# ----------------------------------------------------------------------------- references


def torch_rmac(x: torch.Tensor, levels: int = 3, eps: float = 1e-6) -> torch.Tensor:
    """cirtorch's rmac loop (NCHW -> [B, C])."""
    ovr = 0.4
    steps = torch.Tensor([2, 3, 4, 5, 6, 7])
    height, width = x.size(2), x.size(3)
    w = min(width, height)
    b = (max(height, width) - w) / (steps - 1)
    _, idx = torch.min(torch.abs(((w**2 - w * b) / w**2) - ovr), 0)
    wd = idx.item() + 1 if height < width else 0
    hd = idx.item() + 1 if height > width else 0
    v = F.max_pool2d(x, (height, width))
    v = v / (torch.norm(v, p=2, dim=1, keepdim=True) + eps)
    for level in range(1, levels + 1):
        wl = math.floor(2 * w / (level + 1))
        wl2 = math.floor(wl / 2 - 1)
        b = 0 if level + wd == 1 else (width - wl) / (level + wd - 1)
        cen_w = torch.floor(wl2 + torch.Tensor(range(level + wd)) * b) - wl2
        b = 0 if level + hd == 1 else (height - wl) / (level + hd - 1)
        cen_h = torch.floor(wl2 + torch.Tensor(range(level + hd)) * b) - wl2
        for i in cen_h.tolist():
            for j in cen_w.tolist():
                if wl == 0:
                    continue
                r = x[:, :, int(i) : int(i) + wl, int(j) : int(j) + wl]
                vt = F.max_pool2d(r, (r.size(-2), r.size(-1)))
                v = v + vt / (torch.norm(vt, p=2, dim=1, keepdim=True) + eps)
    return v[:, :, 0, 0]


def torch_gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    return F.avg_pool2d(x.clamp(min=eps).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p)[:, :, 0, 0]


def numpy_pcawhitenlearn(x: np.ndarray, symmetric: bool = False):
    """cirtorch pcawhitenlearn on [D, N] float64 (``eig``; ``eigh`` when ``symmetric``)."""
    n = x.shape[1]
    m = x.mean(axis=1, keepdims=True)
    xc = x - m
    cov = xc @ xc.T
    cov = (cov + cov.T) / (2 * n)
    eigval, eigvec = np.linalg.eigh(cov) if symmetric else np.linalg.eig(cov)
    order = eigval.argsort()[::-1]
    eigval, eigvec = eigval[order].real, eigvec[:, order].real
    return m, np.linalg.inv(np.sqrt(np.diag(eigval))) @ eigvec.T


def numpy_whitenapply(x: np.ndarray, m: np.ndarray, p: np.ndarray, dims: int) -> np.ndarray:
    y = p[:dims, :] @ (x - m)
    return y / (np.linalg.norm(y, ord=2, axis=0, keepdims=True) + 1e-6)


def numpy_topk(queries: np.ndarray, database: np.ndarray, k: int) -> np.ndarray:
    s = queries @ database.T
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def numpy_expand(x, database, k, alpha, exclude_self=False):
    s = x @ database.T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    nn = np.argpartition(-s, k - 1, axis=1)[:, :k]
    w = np.maximum(np.take_along_axis(s, nn, 1), 0) ** alpha if alpha else np.ones(nn.shape)
    y = x + np.einsum("qk,qkd->qd", w, database[nn])
    return y / (np.linalg.norm(y, axis=1, keepdims=True) + 1e-6)


def revisitop_compute_ap(ranks, nres):
    ap = 0.0
    recall_step = 1.0 / nres
    for j in np.arange(len(ranks)):
        rank = ranks[j]
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def revisitop_compute_map(ranks, gnd, kappas=(1, 5, 10)):
    """revisitop's loop; ``ranks`` is [N, Q] as in revisitop."""
    mean_ap, nq, nempty = 0.0, len(gnd), 0
    aps, pr, prs = np.zeros(nq), np.zeros(len(kappas)), np.zeros((nq, len(kappas)))
    for i in np.arange(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i], prs[i, :], nempty = float("nan"), float("nan"), nempty + 1
            continue
        qgndj = np.array(gnd[i].get("junk", []))
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k, ij = 0, 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k, ij = k + 1, ij + 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = revisitop_compute_ap(pos, len(qgnd))
        mean_ap, aps[i] = mean_ap + ap, ap
        pos += 1
        for j in np.arange(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    return mean_ap / (nq - nempty), aps, pr / (nq - nempty), prs


# ----------------------------------------------------------------------------- stages


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def run(quick: bool) -> list[dict]:
    n, q, d, dim = (600, 20, 256, 64) if quick else (5063, 70, 2048, 512)
    b, hw, c = (4, 23, 256) if quick else (16, 23, 2048)
    reps = 3 if quick else 5
    rng = np.random.default_rng(0)
    # R-MAC-like descriptors: non-negative, correlated (a low-rank part plus noise), unit norm.
    basis = rng.standard_normal((64, d))
    database = _unit(np.maximum(rng.standard_normal((n, 64)) @ basis + rng.random((n, d)), 0))
    queries = _unit(np.maximum(rng.standard_normal((q, 64)) @ basis + rng.random((q, d)), 0))
    maps = np.maximum(rng.standard_normal((b, hw, hw, c)), 0).astype(np.float32)
    rows = []

    def stage(name, ours, ref, agree, ref_name="", ref_repeats=reps, repeats=reps):
        first, ms, ref_ms, out, ref_out = timed_pair(ours, ref, repeats, ref_repeats)
        rows.append(
            dict(
                stage=name,
                first=first,
                ours=ms,
                ref=ref_ms,
                ref_name=ref_name,
                check=agree(out, ref_out),
            )
        )
        r = rows[-1]
        print(f"{name:34s} {ms:10.1f} {ref_ms:10.1f} {ref_ms / ms:7.2f}x  {r['check']}", flush=True)

    print(f"{'stage':34s} {'ours ms':>10s} {'ref ms':>10s} {'ratio':>8s}  agreement")
    maps_j = jax.device_put(maps)
    maps_t = torch.from_numpy(maps).permute(0, 3, 1, 2).contiguous()
    torch.set_grad_enabled(False)

    def maxdiff(a, b):
        diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
        return f"max abs diff {diff:.1e}"

    stage(
        f"pooling rmac {b}x{hw}x{hw}x{c}",
        lambda: pooling.rmac(maps_j),
        lambda: torch_rmac(maps_t).numpy(),
        maxdiff,
        "cirtorch rmac (torch)",
    )
    stage(
        f"pooling gem {b}x{hw}x{hw}x{c}",
        lambda: pooling.gem(maps_j),
        lambda: torch_gem(maps_t).numpy(),
        maxdiff,
        "cirtorch gem (torch)",
    )

    # Whitening: learn on the database, apply to database + queries.
    both = np.vstack([database, queries])
    # jretrieval gets device arrays, as in the pipeline (descriptors come out of jitted
    # stages); the one-time host-to-device copy is not part of the stage.
    database_j, both_j = jax.device_put(database), jax.device_put(both)
    db64 = database.astype(np.float64).T

    def sims_diff(w_out, ref_out):
        a, r = np.asarray(w_out, np.float64), np.asarray(ref_out, np.float64)
        return f"max abs similarity diff {np.abs(a[:q] @ a.T - r[:q] @ r.T).max():.1e}"

    def ours_whiten():
        return whitening.apply(whitening.learn_pca(database_j), both_j, dim=dim)

    def ref_whiten(symmetric):
        m, p = numpy_pcawhitenlearn(db64, symmetric)
        return numpy_whitenapply(both.astype(np.float64).T, m, p, dim).T

    stage(
        f"whitening learn+apply {n}x{d}->{dim}",
        ours_whiten,
        lambda: ref_whiten(False),
        sims_diff,
        "cirtorch (np.linalg.eig, float64)",
        ref_repeats=1,
        repeats=3,
    )
    stage(
        f"whitening learn+apply {n}x{d}->{dim}",
        ours_whiten,
        lambda: ref_whiten(True),
        sims_diff,
        "np.linalg.eigh float64",
        ref_repeats=3,
        repeats=3,
    )
    w = whitening.learn_pca(database)
    m, p = numpy_pcawhitenlearn(db64, True)
    stage(
        f"whitening apply {n + q}x{d}->{dim}",
        lambda: whitening.apply(w, both_j, dim=dim),
        lambda: numpy_whitenapply(both.T, m.astype(np.float32), p.astype(np.float32), dim).T,
        sims_diff,
        "whitenapply (float32)",
    )

    # Search and expansion on the whitened descriptors (as the pipeline does).
    xw = np.asarray(whitening.apply(w, both, dim=dim))
    dbw, qw = xw[:n], xw[n:]
    dbw_j, qw_j = jax.device_put(dbw), jax.device_put(qw)

    s64 = qw.astype(np.float64) @ dbw.astype(np.float64).T

    def same_ranks(a, b):
        # Equal up to float32 near-ties: the float64 score at each rank position agrees.
        a, b = np.asarray(a), np.asarray(b)
        gap = np.abs(np.take_along_axis(s64, a, 1) - np.take_along_axis(s64, b, 1)).max()
        return f"same index at {np.mean(a == b):.2%} of positions; max score gap {gap:.0e}"

    stage(
        f"search full rank {q}x{n}",
        lambda: search.rank(qw_j, dbw_j),
        lambda: np.argsort(-(qw @ dbw.T), axis=1),
        same_ranks,
        "np.argsort",
    )
    stage(
        f"search top-100 {q}x{n}",
        lambda: search.rank(qw_j, dbw_j, 100),
        lambda: numpy_topk(qw, dbw, 100),
        same_ranks,
        "np.argpartition + sort",
    )
    stage(
        f"aqe k=10 {q}x{n}",
        lambda: expansion.aqe(qw_j, dbw_j, k=10),
        lambda: numpy_expand(qw, dbw, 10, 0.0),
        maxdiff,
        "NumPy",
    )
    stage(
        f"alpha-qe k=10 alpha=3 {q}x{n}",
        lambda: expansion.aqe(qw_j, dbw_j, k=10, alpha=3.0),
        lambda: numpy_expand(qw, dbw, 10, 3.0),
        maxdiff,
        "NumPy",
    )
    stage(
        f"dba k=20 {n}x{n}",
        lambda: expansion.dba(dbw_j, k=20),
        lambda: numpy_expand(dbw, dbw, 20, 0.0, exclude_self=True),
        maxdiff,
        "NumPy",
    )

    if metrics is not None and hasattr(metrics, "compute_map"):
        ranks = np.asarray(search.rank(qw_j, dbw_j))
        gnd = []
        for _ in range(q):
            picks = rng.choice(n, 60, replace=False)
            gnd.append({"ok": picks[:40], "junk": picks[40:]})

        def close(a, b):
            return f"mAP diff {abs(a[0] - b[0]):.0e}, mP@k diff {np.abs(a[2] - b[2]).max():.0e}"

        stage(
            f"metrics compute_map {q}x{n}",
            lambda: metrics.compute_map(ranks, gnd),
            lambda: revisitop_compute_map(ranks.T, gnd),
            close,
            "revisitop loop",
        )
    return rows


def write_markdown(rows: list[dict], path: str, seconds: float, load_before: float) -> None:
    lines = [
        "# bench: retrieval core",
        "",
        "`python -m bench.core` (bench/core.py): synthetic data of the paper's size, 5,063 "
        "database + 70 query descriptors of 2,048 dimensions (whitened to 512 for search and "
        "expansion), 16 feature maps of 23x23x2048 for pooling. Median of 5 runs (20 when "
        "both sides take under 100 ms; 3 for whitening learning) after a warm-up call (the "
        '"first call" column includes jit compilation), alternating with the reference; the '
        "cirtorch `eig` whitening reference runs once.",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}, "
        f"numpy {np.__version__}; total run {seconds:.0f} s; load average "
        f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after the run (the machine "
        "is shared).",
        "",
        "| stage | reference | jretrieval ms | first call ms | reference ms | speed-up "
        "| agreement |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['ref_name']} | {r['ours']:.1f} | {r['first']:.0f} | "
            f"{r['ref']:.1f} | {r['ref'] / r['ours']:.2f}x | {r['check']} |"
        )
    lines += [
        "",
        "How each stage is made fast (and what to keep in mind when reading the figures):",
        "",
        "- R-MAC: the region grid is computed once per map shape in Python; the max over all "
        "regions is separable (distinct column intervals, then row intervals) and written as a "
        "masked elementwise max chain that XLA fuses into one pass. A masked `reduce` over a "
        "`[R, H, W]` mask was ~10x slower on CPU.",
        "- Whitening: `eigh` of the `D x D` covariance (or the `N x N` Gram matrix when N < D) in "
        "float32, instead of cirtorch's general `eig` in float64; the null space is projected "
        "out instead of inverted. The agreement column compares query x all similarities.",
        "- Full ranking: on CPU the sort runs in NumPy through `jax.pure_callback` (XLA's CPU "
        "sort is a generic comparator sort, ~5x slower on `[70, 5063]`): a SIMD sort of "
        "unique 64-bit keys (the score's order-preserving bits above the index, so the "
        "order is exactly the stable one), rows split over the cores. GPU/TPU use "
        "`lax.top_k` with k = N.",
        "- Top-k and AQE: `lax.top_k` on one `[Q, block]` similarity block per database block.",
        "- DBA: `search.self_topk` computes the kNN graph from block pairs (i <= j) of the "
        "symmetric similarity matrix: half the inner products of `topk(X, X)`, 512 x 512 "
        "blocks. The neighbour sum is a loop of row gathers (XLA's fused `[N, k, D]` "
        "gather-reduce was ~10x slower).",
        "- Rankings: positions holding different indices come from float32 near-ties (the "
        "synthetic descriptors are strongly correlated): NumPy's and XLA's matrix products "
        "round differently, so neighbours whose scores differ by ~1e-7 can swap; the max "
        "score gap (float64 scores at equal rank positions) shows both orders are right to "
        "that level.",
        "- jretrieval's times include its input validation (shapes, and the NaN/inf flag "
        "computed inside the jitted call); the references validate nothing.",
        "- The machine is shared with other jobs, so absolute times vary between runs by up "
        "to ~2x; the ratio of two columns of one run is the figure to read.",
        "",
    ]
    tmp = tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path) or ".", delete=False)
    with tmp:
        tmp.write("\n".join(lines) + "\n")
    os.replace(tmp.name, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, no markdown")
    parser.add_argument("--out", default="docs/bench_core.md")
    args = parser.parse_args()
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    rows = run(args.quick)
    if not args.quick:
        write_markdown(rows, args.out, time.perf_counter() - start, load_before)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
