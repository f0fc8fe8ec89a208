"""Benchmark: search, AQE, DBA and diffusion from 5k to 1M database vectors; time and memory.

Run from the repository root, one size (or a few) per invocation so each stays under ~10 min on
2 CPU cores; results accumulate in ``docs/scale_results.json`` and ``--report`` writes
``docs/benchmarks.md`` and the log-log plot ``docs/scale.png``:

    python -m bench.scale --sizes 5000,50000 --stages search,aqe,dba
    python -m bench.scale --sizes 500000,1000000 --stages search,aqe,dba
    python -m bench.scale --sizes 5000 --stages diffusion
    python -m bench.scale --sizes 50000 --stages diffusion --impls sharded,scipy
    python -m bench.scale --sizes 500000 --stages diffusion
    python -m bench.scale --report

Every measurement runs in its own subprocess (``--worker``), so its peak memory is the process's
peak resident set (``ru_maxrss``) minus the resident set after the data were loaded: the extra
memory the stage needed. Data: synthetic clustered descriptors, 512-d, L2-normalised
(``make_data``: small noisy clusters whose kNN lists cross clusters, so the mutual kNN graph has
one large component, as distractor-heavy R1M data), written once per size to
``/tmp/jretrieval_scale/`` and loaded by the workers; 100 queries from the same distribution.

Implementations (``sharded`` runs the functions with ``mesh=`` the mesh of all local devices; on
this machine one CPU device, so the sharded code runs with one shard). As faiss's ``index.add``,
the placement of the database on the devices (``mesh.shard_rows``) is done once, untimed, for
search and AQE; each timed call then only moves the queries:

- search top-100: ``search.topk(mesh=)`` and ``search.topk`` vs faiss ``IndexFlatIP.search``;
- AQE (k = 10): ``expansion.aqe(mesh=)`` vs faiss search + NumPy weighted sum;
- DBA (k = 20): ``expansion.dba(mesh=)`` (ring kNN + ring aggregation) vs faiss
  ``search(db, db, 21)`` + NumPy; the kNN step dominates both;
- diffusion offline (truncation 1000, kd 50, 20 CG steps): ``diffusion.offline(mesh=)`` and
  ``diffusion.offline`` vs the authors' recipe (faiss kNN with k = truncation, their mutual-
  neighbour Laplacian in ``scipy.sparse``, one ``scipy.sparse.linalg.cg`` per node in a Python
  loop).

Where a stage is quadratic in N and would not finish in minutes, it is timed on a subset and
extrapolated linearly, and the table says so: kNN-type stages (DBA, the diffusion kNN) on the first
``R`` database rows as queries against all N (``search.topk(mesh=)`` for ours, the same blocked
top-k per row as the ring; faiss ``search``) times ``N / R``; the per-node solves on ``S`` nodes
times ``N / S``, for both SciPy's loop and ours (the native CPU kernel) the per-node time from the
largest size where they ran on the real graph, since their work depends on the edges inside each
truncation set (the XLA kernels' work does not: they are timed on a neighbour table of the right
shape).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

DATA_DIR = "/tmp/jretrieval_scale"
RESULTS = os.path.join("docs", "scale_results.json")
REPORT = os.path.join("docs", "benchmarks.md")
PLOT = os.path.join("docs", "scale.png")
DIM, NQ, K_SEARCH, K_AQE, K_DBA = 512, 100, 100, 10, 20
TRUNCATION, KD, GAMMA, ALPHA = 1000, 50, 3.0, 0.99
STAGES = ("search", "aqe", "dba", "diffusion")
IMPLS = {
    "search": ("sharded", "search", "faiss"),
    "aqe": ("sharded", "faiss"),
    "dba": ("sharded", "faiss"),
    "diffusion": ("sharded", "diffusion", "scipy"),
}
#: largest N at which a stage runs in full; above it, rows/nodes are subsampled.
FULL_KNN, FULL_SOLVES, FULL_SCIPY_SOLVES = 50_000, 50_000, 5_000
SUBSET_ROWS, SUBSET_NODES = 2_500, 2_000


# ----------------------------------------------------------------------------- data


def make_data(n: int, *, dim: int = DIM, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(queries [NQ, dim], database [n, dim])`` float32, clustered, L2-normalised.

    Cluster sizes are lognormal (median ~33), centres uniform on the sphere, each cluster with
    its own noise level; generated in chunks so the float64 temporaries stay small.
    """
    rng = np.random.default_rng(seed)
    total = n + NQ
    sizes = np.clip(rng.lognormal(3.5, 1.0, total), 2, 1000).astype(np.int64)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), total) + 1]
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes)[:total])
    centres = rng.standard_normal((len(sizes), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sigma = rng.uniform(1.5, 3.0, len(sizes)).astype(np.float32) / np.sqrt(dim)
    x = np.empty((total, dim), np.float32)
    for s in range(0, total, 65536):
        lab = labels[s : s + 65536]
        noise = rng.standard_normal((len(lab), dim), dtype=np.float32)
        x[s : s + len(lab)] = centres[lab] + sigma[lab, None] * noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:NQ], x[NQ:]


def data_path(n: int) -> str:
    return os.path.join(DATA_DIR, f"clustered_{n}_{DIM}.npy")


def ensure_data(n: int) -> str:
    path = data_path(n)
    if not os.path.exists(path):
        os.makedirs(DATA_DIR, exist_ok=True)
        q, db = make_data(n)
        tmp = path + ".tmp.npy"
        np.save(tmp, np.concatenate([q, db]))
        os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- worker


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(stage: str, impl: str, n: int) -> dict:
    """One measurement (called in a fresh process). Returns the record for the results file."""
    import jax

    from jretrieval import expansion, search
    from jretrieval import mesh as mesh_lib
    from jretrieval.mesh import shard_rows

    x = np.load(data_path(n))
    q, db = x[:NQ], x[NQ:]
    base = _rss_mb()
    mesh = mesh_lib.make_mesh(jax.local_devices())
    rec = {"stage": stage, "impl": impl, "n": n, "devices": int(mesh.devices.size)}
    subset = None
    rows = n if n <= FULL_KNN else SUBSET_ROWS
    index = shards = None
    if impl == "faiss":
        import faiss

        index = faiss.IndexFlatIP(DIM)
        index.add(db)  # a copy; not timed
    elif impl == "search":
        db = jax.device_put(db)  # placed once; not timed
    elif impl == "sharded" and stage in ("search", "aqe"):
        shards = shard_rows(db, mesh)  # placed once, like faiss's add; not timed
        jax.block_until_ready(shards.array)

    def run() -> None:
        if stage == "search":
            if impl == "faiss":
                index.search(q, K_SEARCH)
            elif impl == "search":
                jax.block_until_ready(search.topk(q, db, K_SEARCH))
            else:
                jax.block_until_ready(search.topk(q, shards, K_SEARCH, mesh=mesh))
        elif stage == "aqe":
            if impl == "faiss":
                s, i = index.search(q, K_AQE)
                y = q + db[i].sum(axis=1)
                y /= np.linalg.norm(y, axis=1, keepdims=True) + 1e-6
            else:
                jax.block_until_ready(expansion.aqe(q, shards, K_AQE, mesh=mesh))
        elif stage == "dba":
            if impl == "faiss":
                s, i = index.search(db[:rows], K_DBA + 1)
                w = (i != np.arange(rows)[:, None]).astype(np.float32)
                y = db[:rows] + np.einsum("nk,nkd->nd", w, db[i])
                y /= np.linalg.norm(y, axis=1, keepdims=True) + 1e-6
            elif rows == n:
                jax.block_until_ready(expansion.dba(db, K_DBA, mesh=mesh).array)
            else:  # the ring's work per row (1024-row chunks, 4096-row blocks) on `rows` rows
                _rows_topk(db, rows, K_DBA + 1, mesh)
        else:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")

    if stage == "diffusion":
        rec.update(_diffusion(impl, db, mesh))
        subset = rec.pop("subset", None)
        t0 = time.perf_counter()
    else:
        if stage == "dba" and rows < n:
            subset = rows
        repeat = 2 if n <= FULL_KNN and not (stage == "dba" and n > 5000) else 1
        for _ in range(repeat):  # the first run compiles; the last one is timed
            t0 = time.perf_counter()
            run()
        rec["runs"] = repeat
    seconds = time.perf_counter() - t0
    if subset is not None and stage != "diffusion":
        seconds *= n / subset
        rec["note"] = f"extrapolated from {subset} of {n} rows (x {n / subset:.0f})"
    rec.setdefault("seconds", seconds)
    rec.update(base_mb=base, peak_extra_mb=max(0.0, _peak_mb() - base))
    return rec


def _rows_topk(db: np.ndarray, rows: int, k: int, mesh) -> None:
    """The first ``rows`` database rows' top-``k`` against all, in the ring's blocking."""
    import jax

    from jretrieval import search
    from jretrieval.mesh import shard_rows

    shards = shard_rows(db, mesh)
    for s in range(0, rows, 1024):
        out = search.topk(db[s : min(rows, s + 1024)], shards, k, mesh=mesh)
        jax.block_until_ready(out)


def _diffusion(impl: str, db: np.ndarray, mesh) -> dict:
    """Offline diffusion (all nodes), by parts where a part is extrapolated."""
    import jax
    import jax.numpy as jnp

    from jretrieval import diffusion, native
    from jretrieval.mesh import shard_rows

    n = len(db)
    parts: dict[str, float] = {}
    notes = []
    if impl == "diffusion":
        if n > FULL_KNN:
            raise ValueError("diffusion.offline has no subset mode; run it at N <= 50k")
        t = time.perf_counter()
        jax.block_until_ready(diffusion.offline(db, truncation=TRUNCATION, kd=KD).values)
        return {"seconds": time.perf_counter() - t, "parts": {"total": time.perf_counter() - t}}
    use_native = impl == "sharded" and diffusion.use_native("auto", "cpu")
    threads = native.threads() if use_native else 0  # diffusion.offline(mesh=)'s own choice on CPU
    if impl == "sharded" and n <= FULL_SOLVES:  # diffusion.offline(mesh=)'s two stages, timed apart
        t = time.perf_counter()
        shards = shard_rows(db, mesh)
        ids, ids_kd, sims_kd = diffusion._neighbours_mesh(
            shards.array, mesh=mesh, m=n, truncation=TRUNCATION, kd=KD,
            rows=diffusion._default_rows(n, None),
        )  # fmt: skip
        a_s = diffusion._graph_mesh(ids_kd, sims_kd, mesh=mesh, m=n, gamma=GAMMA, alpha=ALPHA)
        jax.block_until_ready(a_s)
        parts["kNN + mutual graph (mesh)"] = time.perf_counter() - t
        t = time.perf_counter()
        vals = diffusion._solve_mesh(
            ids, ids_kd, a_s, mesh=mesh, m=n, node_chunk=16, max_iter=20, tol=1e-6,
            threads=threads,
        )  # fmt: skip
        jax.block_until_ready(vals)
        parts["per-node solves"] = time.perf_counter() - t
        return {"seconds": sum(parts.values()), "parts": parts,
                "solve_per_node": parts["per-node solves"] / n}  # fmt: skip
    if impl == "sharded":  # kNN on R rows + solves on S nodes
        rows = SUBSET_ROWS
        _rows_topk(db, 1024, TRUNCATION, mesh)  # compile
        t = time.perf_counter()
        _rows_topk(db, rows, TRUNCATION, mesh)
        parts["kNN (truncation lists)"] = (time.perf_counter() - t) * n / rows
        notes.append(f"kNN extrapolated from {rows} rows (x {n / rows:.0f})")
        if threads:
            per_node = _per_node_reference("sharded")
            if per_node is None:
                raise RuntimeError("run the sharded diffusion at a smaller N first (per node)")
            parts["per-node solves"] = per_node["solve_per_node"] * n
            notes.append(f"solves: per-node time measured at N={per_node['n']} x N")
            return {"seconds": sum(parts.values()), "parts": parts, "note": "; ".join(notes)}
        rng = np.random.default_rng(0)
        ids_kd = jnp.asarray(rng.integers(0, n, (n, KD), dtype=np.int32))
        a_s = jnp.asarray(rng.random((n, KD), dtype=np.float32) * 0.02)
        t_ids = np.stack(
            [np.concatenate([[i], rng.choice(n, TRUNCATION - 1, replace=False)]) for i in
             range(SUBSET_NODES)]
        ).astype(np.int32)  # fmt: skip
        solve = jax.jit(lambda t: diffusion._solve_rows(t, ids_kd, a_s, max_iter=20, tol=1e-6))
        jax.block_until_ready(solve(jnp.asarray(t_ids[:16])))  # compile
        t = time.perf_counter()
        for s in range(0, SUBSET_NODES, 16):
            jax.block_until_ready(solve(jnp.asarray(t_ids[s : s + 16])))
        parts["per-node solves"] = (time.perf_counter() - t) * n / SUBSET_NODES
        notes.append(
            f"XLA solves extrapolated from {SUBSET_NODES} nodes (x {n / SUBSET_NODES:.0f})"
        )
        return {"seconds": sum(parts.values()), "parts": parts, "note": "; ".join(notes)}
    # SciPy: the authors' recipe
    import faiss

    index = faiss.IndexFlatIP(DIM)
    index.add(db)
    rows = n if n <= FULL_KNN else SUBSET_ROWS
    t = time.perf_counter()
    sims, ids = index.search(db[:rows], TRUNCATION)
    parts["kNN (faiss, truncation lists)"] = (time.perf_counter() - t) * n / rows
    if rows < n:
        notes.append(f"kNN extrapolated from {rows} rows (x {n / rows:.0f})")
        per_node = _per_node_reference("scipy")
        if per_node is None:
            raise RuntimeError("run the scipy diffusion at a smaller N first (per-node time)")
        parts["Laplacian (authors' loop)"] = per_node["laplacian_per_node"] * n
        parts["per-node CG loop"] = per_node["solve_per_node"] * n
        notes.append(f"Laplacian and solves: per-node times measured at N={per_node['n']} x N")
        return {"seconds": sum(parts.values()), "parts": parts, "note": "; ".join(notes)}
    t = time.perf_counter()
    from references.diffusion_authors import get_laplacian, offline_rows

    lap = get_laplacian(sims[:, :KD], ids[:, :KD])
    parts["Laplacian (authors' loop)"] = time.perf_counter() - t
    nodes = np.arange(n)
    if n > FULL_SCIPY_SOLVES:
        nodes = np.linspace(0, n - 1, SUBSET_NODES).astype(np.int64)
        notes.append(f"solves extrapolated from {len(nodes)} nodes (x {n / len(nodes):.0f})")
    t = time.perf_counter()
    offline_rows(lap, ids, nodes)
    parts["per-node CG loop"] = (time.perf_counter() - t) * n / len(nodes)
    return {
        "seconds": sum(parts.values()),
        "parts": parts,
        "note": "; ".join(notes),
        "laplacian_per_node": parts["Laplacian (authors' loop)"] / n,
        "solve_per_node": parts["per-node CG loop"] / n,
    }


def _per_node_reference(impl: str) -> dict | None:
    """The diffusion result of ``impl`` at the largest N where its solves ran on a real graph."""
    best = None
    for r in load_results():
        if r["stage"] == "diffusion" and r["impl"] == impl and "solve_per_node" in r:
            if best is None or r["n"] > best["n"]:
                best = r
    return best


# ----------------------------------------------------------------------------- driver


def load_results() -> list[dict]:
    if not os.path.exists(RESULTS):
        return []
    with open(RESULTS) as f:
        return json.load(f)


def save_result(rec: dict) -> None:
    results = [
        r
        for r in load_results()
        if (r["stage"], r["impl"], r["n"]) != (rec["stage"], rec["impl"], rec["n"])
    ]
    results.append(rec)
    results.sort(key=lambda r: (STAGES.index(r["stage"]), r["n"], r["impl"]))
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, RESULTS)


def measure(stage: str, impl: str, n: int, timeout: int) -> dict | None:
    cmd = [sys.executable, "-m", "bench.scale", "--worker", stage, impl, str(n)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{stage:10s} {impl:10s} N={n:>8d}: timed out after {timeout}s", flush=True)
        return None
    if proc.returncode != 0:
        print(f"{stage} {impl} N={n} failed:\n{proc.stderr[-3000:]}", flush=True)
        return None
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["wall_s"] = time.perf_counter() - start
    save_result(rec)
    print(
        f"{stage:10s} {impl:10s} N={n:>8d}: {rec['seconds']:9.2f} s  "
        f"peak +{rec['peak_extra_mb']:8.0f} MB  {rec.get('note', '')}",
        flush=True,
    )
    return rec


# ----------------------------------------------------------------------------- report

LABELS = {
    ("search", "sharded"): "jretrieval.search.topk (mesh=)",
    ("search", "search"): "jretrieval.search.topk",
    ("search", "faiss"): "faiss IndexFlatIP",
    ("aqe", "sharded"): "jretrieval.expansion.aqe (mesh=)",
    ("aqe", "faiss"): "faiss + NumPy",
    ("dba", "sharded"): "jretrieval.expansion.dba (mesh=)",
    ("dba", "faiss"): "faiss + NumPy",
    ("diffusion", "sharded"): "jretrieval.diffusion.offline(mesh=)",
    ("diffusion", "diffusion"): "jretrieval.diffusion.offline",
    ("diffusion", "scipy"): "authors' recipe (faiss, SciPy CG loop)",
}
REFERENCE = {"search": "faiss", "aqe": "faiss", "dba": "faiss", "diffusion": "scipy"}
TITLES = {
    "search": f"Search, top-{K_SEARCH} of {NQ} queries",
    "aqe": f"AQE, k = {K_AQE}, {NQ} queries",
    "dba": f"DBA, k = {K_DBA} (every database vector)",
    "diffusion": f"Diffusion offline, truncation {TRUNCATION}, kd {KD}",
}


def _fmt_s(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:,.0f}"


def report_tables(results: list[dict]) -> str:
    """Markdown tables: per stage and N, every implementation's time and peak extra memory,
    and the reference's time over ours (``sharded``)."""
    out = []
    by = {(r["stage"], r["impl"], r["n"]): r for r in results}
    for stage in STAGES:
        sizes = sorted({r["n"] for r in results if r["stage"] == stage})
        if not sizes:
            continue
        impls = [i for i in IMPLS[stage] if any(r["impl"] == i for r in results
                                                  if r["stage"] == stage)]  # fmt: skip
        out.append(f"### {TITLES[stage]}\n")
        head = ["N"] + [f"{LABELS[(stage, i)]} s / MB" for i in impls]
        head.append(f"{REFERENCE[stage]} / ours")
        if stage == "diffusion":  # the target's comparison: the per-node loop alone
            head.append("per-node solves: scipy / ours")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        notes = []
        for n in sizes:
            cells = [f"{n:,}"]
            for i in impls:
                r = by.get((stage, i, n))
                if r is None:
                    cells.append("-")
                    continue
                mark = "*" if r.get("note") else ""
                cells.append(f"{_fmt_s(r['seconds'])}{mark} / {r['peak_extra_mb']:,.0f}")
                if r.get("note"):
                    notes.append(f"N={n:,}, {LABELS[(stage, i)]}: {r['note']}")
            ours, ref = by.get((stage, "sharded", n)), by.get((stage, REFERENCE[stage], n))
            ratio = ref["seconds"] / ours["seconds"] if ours and ref else None
            cells.append("-" if ratio is None else f"{ratio:.2f}x")
            if stage == "diffusion":
                ref_cg = (ref or {}).get("parts", {}).get("per-node CG loop")
                our_cg = (ours or {}).get("parts", {}).get("per-node solves")
                cells.append(f"{ref_cg / our_cg:.1f}x" if ref_cg and our_cg else "-")
            out.append("| " + " | ".join(cells) + " |")
        if notes:
            out.append("\n" + "\n".join(f"\\* {t}" for t in notes))
        out.append("")
        if stage == "diffusion":
            out.append("Diffusion by part (seconds; per node in ms where N divides):\n")
            out.append("| N | implementation | part | s | ms per node |")
            out.append("|---|---|---|---|---|")
            for n in sizes:
                for i in impls:
                    r = by.get((stage, i, n))
                    for part, sec in (r or {}).get("parts", {}).items():
                        if part != "total":
                            out.append(f"| {n:,} | {LABELS[(stage, i)]} | {part} | "
                                       f"{_fmt_s(sec)} | {1e3 * sec / n:.3g} |")  # fmt: skip
            out.append("")
    return "\n".join(out)


def write_plot(results: list[dict], path: str) -> None:
    """Log-log time and peak extra memory against N, one line per stage and implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = dict(zip(STAGES, ("C0", "C1", "C2", "C3"), strict=True))
    styles = {"sharded": "-o", "search": ":^", "diffusion": ":s", "faiss": "--x", "scipy": "--x"}
    for stage in STAGES:
        for impl in IMPLS[stage]:
            rs = sorted((r for r in results if (r["stage"], r["impl"]) == (stage, impl)),
                        key=lambda r: r["n"])  # fmt: skip
            if not rs:
                continue
            n = [r["n"] for r in rs]
            label = f"{stage}: {LABELS[(stage, impl)]}"
            axes[0].plot(n, [r["seconds"] for r in rs], styles[impl], color=colours[stage],
                         label=label)  # fmt: skip
            full = [r for r in rs if not r.get("note")]  # subset runs hold less: left out
            if full:
                axes[1].plot([r["n"] for r in full], [max(r["peak_extra_mb"], 1) for r in full],
                             styles[impl], color=colours[stage], label=label)  # fmt: skip
    ylabels = ("seconds (extrapolated points included)", "peak extra MB (full runs only)")
    for ax, ylabel in zip(axes, ylabels,
                          strict=True):  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("database size N (512-d)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


BEGIN, END = "<!-- bench.scale tables: begin -->", "<!-- bench.scale tables: end -->"


def write_report(results: list[dict]) -> None:
    """Regenerates the measured tables of ``docs/benchmarks.md`` (between the ``BEGIN`` and
    ``END`` markers; the rest of the file is hand-written) and the plot."""
    write_plot(results, PLOT)
    text = f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if os.path.exists(REPORT):
        with open(REPORT) as f:
            text = f.read()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{REPORT} lacks the markers {BEGIN!r} / {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    text = f"{head}{BEGIN}\n{report_tables(results)}\n{END}{tail}"
    tmp = REPORT + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, REPORT)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5000,50000")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--impls", default=None, help="comma-separated subset of implementations")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per measurement")
    parser.add_argument("--report", action="store_true", help="write docs/benchmarks.md")
    parser.add_argument("--worker", nargs=3, metavar=("STAGE", "IMPL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        stage, impl, n = args.worker
        print(json.dumps(run_worker(stage, impl, int(n))))
        return
    if args.report:
        write_report(load_results())
        print(f"wrote {REPORT} and {PLOT}")
        return
    wanted = None if args.impls is None else set(args.impls.split(","))
    for n in (int(s) for s in args.sizes.split(",")):
        ensure_data(n)
        for stage in args.stages.split(","):
            if stage not in IMPLS:
                raise SystemExit(f"unknown stage {stage!r}; expected one of {STAGES}")
            for impl in IMPLS[stage]:
                if wanted is None or impl in wanted:
                    if stage == "diffusion" and impl == "diffusion" and n > FULL_KNN:
                        continue
                    measure(stage, impl, n, args.timeout)


if __name__ == "__main__":
    main()
