"""Benchmark of ``jretrieval.search`` beside faiss ``IndexFlatIP`` and the old sharded top-k.

    python -m bench.search                 # 100 x 50,000 x 512 and top-100 at 500,000 (~3 min)
    python -m bench.search --quick         # small sizes, a smoke test (seconds)
    python -m bench.search --large 0       # skip the 500k stage

Stages (k = 100, 512-d float32 unit vectors, seeded; every stage checks the sides agree):

a. ``search.rank(q, db, k=100)`` with NumPy inputs, as a user calls it (the database is
   transferred and checked per call), vs faiss ``IndexFlatIP.search`` on an index that already
   holds the database (``add`` untimed). Target: at most 1.0x faiss's time.
b. ``search.Index(db).topk(q, 100)`` (the database placed once, untimed, as faiss's ``add``) vs
   the same faiss search. Target: at most 0.5x.
c. top-100 of 100 queries at N = 500,000 on one device: ``search.topk`` on the placed database
   vs the path ``jretrieval.sharded.topk`` took before the search core was unified (restated
   below: ``shard_rows`` on a one-device mesh, per-shard blocked top-k of 16,384-row blocks under
   ``shard_map``, all-gather, merge). Target: no slower. faiss at 500k is shown for scale.

Timings come from ``bench.harness.timed_pair`` (ours and the reference alternated after a
warm-up, medians); faiss's own medians are printed as well, since on a loaded machine the
absolute times move and the ratios are what to compare. The table is written to
``docs/bench_search.md`` (``--out``; not with ``--quick``).
"""

from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from bench.harness import environment, timed_pair
from jretrieval import mesh as mesh_lib
from jretrieval import search

K = 100
DIM = 512
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def unit_rows(rng: np.random.Generator, n: int, d: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# ----------------------------------------------------------------------------- the old path


def _old_block_topk(q, x, k, *, start, n, block):
    """``jretrieval.sharded._block_topk`` as it stood before this change (restated)."""
    s = x.shape[0]
    num = -(-s // min(block, s))
    bs = -(-s // num)

    def scores(lo, fresh_from):
        blk = lax.dynamic_slice_in_dim(x, lo, bs)
        r = lo + jnp.arange(bs, dtype=jnp.int32)
        gid = start + r
        sc = jnp.matmul(q, blk.T, precision=lax.Precision.HIGHEST)
        valid = (r >= fresh_from) & (gid < n)
        return jnp.where(valid[None, :], sc, -jnp.inf), jnp.broadcast_to(gid, sc.shape)

    def body(carry, j):
        best_s, best_i = carry
        sc, gid = scores(jnp.minimum(j * bs, s - bs), j * bs)
        top, pos = lax.top_k(jnp.concatenate([best_s, sc], axis=1), k)
        return (top, jnp.take_along_axis(jnp.concatenate([best_i, gid], axis=1), pos, 1)), None

    init = (jnp.full((q.shape[0], k), -jnp.inf), jnp.full((q.shape[0], k), n, jnp.int32))
    return lax.scan(body, init, jnp.arange(num))[0]


@functools.partial(jax.jit, static_argnames=("mesh", "k", "n", "block_size"))
def _old_sharded_topk(queries, db, *, mesh, k, n, block_size):
    """``jretrieval.sharded._topk_impl`` as it stood before this change (restated)."""
    axis = mesh_lib.axis_name(mesh)

    def body(q, x):
        x = x.astype(jnp.float32)
        start = lax.axis_index(axis) * x.shape[0]
        s, i = _old_block_topk(q, x, min(k, x.shape[0]), start=start, n=n, block=block_size)
        s_all = jnp.moveaxis(lax.all_gather(s, axis), 0, 1).reshape(q.shape[0], -1)
        i_all = jnp.moveaxis(lax.all_gather(i, axis), 0, 1).reshape(q.shape[0], -1)
        top, pos = lax.top_k(s_all, k)
        return top, jnp.take_along_axis(i_all, pos, axis=1)

    fn = mesh_lib.shard_map(mesh, body, (P(), P(axis)), (P(), P()))
    return fn(queries.astype(jnp.float32), db)


def old_sharded_topk(queries, rows: mesh_lib.Sharded, k: int, mesh) -> tuple:
    """The old public ``sharded.topk`` minus its eager host-side finiteness pass (in its favour)."""
    q = mesh_lib.replicate(jnp.asarray(queries), mesh)
    return _old_sharded_topk(q, rows.array, mesh=mesh, k=k, n=rows.n, block_size=16384)


# ----------------------------------------------------------------------------- stages


def _agree(ours: np.ndarray, ref: np.ndarray) -> float:
    """Share of equal ids position by position (float rounding may swap near-ties)."""
    return float(np.mean(np.asarray(ours) == np.asarray(ref)))


def run(n: int, large: int, nq: int, repeats: int) -> list[dict]:
    import faiss

    rng = np.random.default_rng(0)
    q, db = unit_rows(rng, nq), unit_rows(rng, n)
    index = faiss.IndexFlatIP(DIM)
    index.add(db)  # untimed, as Index(db) below
    faiss_search = functools.partial(index.search, q, K)
    rows = []

    def stage(name, ours, ref, ref_name, target, reps=repeats):
        first, ms, ref_ms, out, ref_out = timed_pair(ours, ref, reps, reps)
        ids = out[1] if isinstance(out, tuple) else out
        ref_ids = ref_out[1] if isinstance(ref_out, tuple) else ref_out
        rows.append(dict(stage=name, ours_ms=ms, first_ms=first, ref=ref_name, ref_ms=ref_ms,
                         ratio=ms / ref_ms, target=target, agree=_agree(ids, ref_ids)))  # fmt: skip
        print(f"{name}: {ms:.1f} ms vs {ref_name} {ref_ms:.1f} ms -> {ms / ref_ms:.2f}x "
              f"(target {target}); ids agree {rows[-1]['agree']:.4f}", flush=True)  # fmt: skip

    stage(f"a. search.rank(q, db, k={K}), NumPy inputs, N={n:,}",
          lambda: search.rank(q, db, k=K), faiss_search, "faiss IndexFlatIP.search",
          "<= 1.0x")  # fmt: skip
    idx = search.Index(db)
    stage(f"b. Index(db).topk(q, {K}), N={n:,}", lambda: idx.topk(q, K), faiss_search,
          "faiss IndexFlatIP.search", "<= 0.5x")  # fmt: skip
    del idx, index
    if large:
        big = unit_rows(rng, large)
        mesh = mesh_lib.make_mesh(jax.devices()[:1])
        placed = jax.device_put(big)
        shards = mesh_lib.shard_rows(big, mesh)
        stage(f"c. search.topk(q, db, {K}), db placed, N={large:,}",
              lambda: search.topk(q, placed, K), lambda: old_sharded_topk(q, shards, K, mesh),
              "old sharded.topk (1 device)", "<= 1.0x", reps=max(3, repeats // 2))  # fmt: skip
        idx = search.Index(big)
        stage(f"c'. Index(db).topk(q, {K}), N={large:,}", lambda: idx.topk(q, K),
              lambda: old_sharded_topk(q, shards, K, mesh), "old sharded.topk (1 device)",
              "<= 1.0x", reps=max(3, repeats // 2))  # fmt: skip
        del shards, placed, idx
        big_index = faiss.IndexFlatIP(DIM)
        big_index.add(big)
        del big
        stage(f"c''. faiss at N={large:,} (for scale)", functools.partial(big_index.search, q, K),
              functools.partial(big_index.search, q, K), "faiss (itself)", "-", reps=3)  # fmt: skip
    return rows


def write(rows: list[dict], env: dict, command: str, path: str) -> None:
    lines = [
        "# Search benchmark: jretrieval.search vs faiss IndexFlatIP and the old sharded top-k",
        "",
        f"Command: `{command}`. Machine: {env['processor']}, {env['cores']} cores, "
        f"load average {env['load_1min']:.2f} at the end of the run (shared with other jobs), "
        f"JAX {env['jax']} on {', '.join(env['devices'])}. Medians of interleaved runs "
        "(`bench/harness.py`); the ratio is ours / reference.",
        "",
        "| stage | ours ms | reference | reference ms | ratio | target | ids agree |",
        "| --- | ---: | --- | ---: | ---: | --- | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['ours_ms']:.1f} | {r['ref']} | {r['ref_ms']:.1f} | "
            f"{r['ratio']:.2f}x | {r['target']} | {r['agree']:.4f} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--large", type=int, default=500_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(OUT, "bench_search.md"))
    args = parser.parse_args()
    if args.quick:
        args.n, args.large, args.repeats = 2_000, 20_000, 2
    rows = run(args.n, args.large, args.queries, args.repeats)
    env = environment()
    print(f"load average {env['load_1min']:.2f}; {env}")
    if not args.quick:
        flags = " ".join(f"--{k} {v}" for k, v in (("n", args.n), ("large", args.large)))
        write(rows, env, f"python -m bench.search {flags}", args.out)


if __name__ == "__main__":
    main()
