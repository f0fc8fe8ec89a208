"""Worker processes for tests/test_distributed.py and tests/test_multihost.py.

Run from the repository root, never by pytest itself:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.device_worker sharded DIR
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python -m tests.device_worker multihost DIR PROCESS_ID NUM_PROCESSES PORT

``sharded`` reads ``DIR/inputs.npz`` (descriptor sets written by the test) and the images in
``DIR/images``, runs every stage with ``mesh=`` the 4-device mesh and writes ``DIR/sharded.npz``.
``multihost`` joins a ``jax.distributed`` job on ``127.0.0.1:PORT`` (CPU collectives over gloo),
recalibrates and extracts its share of ``DIR/images`` and writes ``DIR/process<ID>.npz``.

The shared pieces (the tiny encoder, the images, the extraction settings) are defined here so the
test process computes its single-device references with exactly the same objects.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jretrieval.models import Encoder
from jretrieval.steps import Loading
from tests.helpers import TinyNet

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
POLICY = {"mode": "max_side", "size": 20}
EXTRACT_KW = {"loading": Loading.of(POLICY, batch_size=3, skip_corrupt=True), "pooling": "mac"}
BATCH_RECAL = 4
RANKING_DIFFUSION = {"truncation": 60, "kd": 10, "kq": 5, "gamma": 3.0, "alpha": 0.99,
                     "mode": "joint"}  # fmt: skip
RECAL_KW = {"loading": Loading.of(POLICY, batch_size=BATCH_RECAL, skip_corrupt=True)}


def encoder() -> Encoder:
    module = TinyNet(features=16)  # the suite's tiny encoder (tests/helpers.py)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    return Encoder(module, dict(variables), {"name": "tiny"}, {"mean": MEAN, "std": STD}, {})


def bf16_batch() -> np.ndarray:
    """Four ``uint8 [20, 16, 3]`` images for the bfloat16 step."""
    return np.random.default_rng(5).integers(0, 256, (4, 20, 16, 3), dtype=np.uint8)


def make_images(folder: str, n: int = 13) -> list[str]:
    """``n`` random PNGs of three sizes (two shape buckets under ``POLICY``); image 5 corrupt."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = ((24, 32), (32, 24), (20, 20), (30, 40))
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"im{i:02d}.png")
        if i == 5:
            with open(path, "wb") as f:
                f.write(b"not a png")
        else:
            h, w = sizes[i % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def search_inputs() -> tuple[np.ndarray, np.ndarray]:
    """``(database [50, 8], queries [3, 8])``, random unit vectors (tie-free)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((53, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:50], x[50:]


def bad_calls(q: np.ndarray, db: np.ndarray) -> dict:
    """Bad search/expansion calls, ``fn(mesh)``: each must raise the same ``ValueError`` on one
    device (``mesh=None``) and on a mesh."""
    from jretrieval import expansion, search

    bad = db.copy()
    bad[7, 3] = np.nan
    return {
        "k": lambda mesh: search.topk(q, db, len(db) + 1, mesh=mesh),
        "dims": lambda mesh: search.rank(q[:, :8], db, 3, mesh=mesh),
        "empty": lambda mesh: search.topk(q[:0], db, 3, mesh=mesh),
        "block": lambda mesh: search.topk(q, db, 3, mesh=mesh, block_size=0),
        "nan": lambda mesh: expansion.aqe(q, bad, 3, mesh=mesh),
        "nan_index": lambda mesh: search.Index(bad, mesh=mesh),
        "dba_k": lambda mesh: expansion.dba(db, len(db), mesh=mesh),
        "alpha": lambda mesh: expansion.dba(db, 3, -1.0, mesh=mesh),
        "self_k": lambda mesh: search.self_topk(db, len(db), mesh=mesh),
    }


def image_paths(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))


def recal_batches(paths: list[str]):
    return RECAL_KW["loading"].iterate(paths)


def _stats(enc: Encoder) -> dict[str, np.ndarray]:
    from flax import traverse_util

    flat = traverse_util.flatten_dict(enc.variables["batch_stats"])
    return {"stats/" + "/".join(k): np.asarray(v) for k, v in flat.items()}


# ----------------------------------------------------------------------------- sharded


def run_sharded(folder: str) -> None:
    from jretrieval import mesh as mesh_lib

    mesh = mesh_lib.make_mesh()
    assert mesh.devices.size == 4, jax.devices()
    inp = dict(np.load(os.path.join(folder, "inputs.npz")))
    out: dict[str, np.ndarray] = {}
    q, db = inp["queries"], inp["database"]

    # search: default blocks, small blocks (scan), k larger than a shard, full ranking
    from jretrieval import expansion, search

    for tag, bs in (("big", None), ("small", 7)):
        s, i = search.topk(q, db, 10, mesh=mesh, block_size=bs)
        out[f"topk_{tag}_s"], out[f"topk_{tag}_i"] = np.asarray(s), np.asarray(i)
    small = inp["small"]
    out["topk_small_db_i"] = np.asarray(search.topk(q[:, :8], small, 8, mesh=mesh)[1])
    out["rank_full"] = np.asarray(search.rank(q, db, mesh=mesh))
    out["rank_k"] = np.asarray(search.rank(q, db, 25, mesh=mesh, block_size=16))
    index = search.Index(db, mesh=mesh, block_size=7)  # placed once, sharded along N
    out["index_topk_i"] = np.asarray(index.topk(q, np.int64(10))[1])
    out["index_rank"] = np.asarray(index.rank(q))
    ex_i = search.self_topk(inp["dup"], 11, mesh=mesh, block_size=16, query_block=10)[1]
    out["self_topk_dup_i"] = ex_i.to_numpy()
    # diffusion's neighbour stage on the mesh, also with exact duplicates (ties across shards)
    from jretrieval import diffusion

    for tag, x in (("db", db), ("dup", inp["dup"])):
        got = diffusion._neighbours(x, 12, 4, mesh=mesh, block_size=16)
        for name, a in zip(("ids", "ids_kd", "sims_kd"), got, strict=True):
            out[f"nbr_{tag}_{name}"] = a
    # expansion
    out["aqe0"] = np.asarray(expansion.aqe(q, db, 10, mesh=mesh))
    out["aqe3"] = np.asarray(expansion.aqe(q, db, 7, 3.0, mesh=mesh, block_size=16))
    out["dba0"] = expansion.dba(db, 20, mesh=mesh).to_numpy()
    out["dba3"] = expansion.dba(db, 5, 3.0, mesh=mesh, block_size=16, query_block=10).to_numpy()
    out["dba_dup"] = expansion.dba(inp["dup"], 3, mesh=mesh, block_size=16).to_numpy()
    aug = expansion.dba(db, 20, mesh=mesh)  # Sharded output feeds the next stage unchanged
    out["dba_then_rank"] = np.asarray(search.rank(q, aug, 10, mesh=mesh))
    # bad arguments: the messages on the 4-device mesh (compared with one device's)
    for key, call in bad_calls(q, db).items():
        try:
            call(mesh)
            out[f"error/{key}"] = np.asarray("no error")
        except ValueError as e:
            out[f"error/{key}"] = np.asarray(str(e))
    # diffusion
    g = inp["graph"]
    off = diffusion.offline(g, mesh=mesh, truncation=60, kd=10, block_size=32)
    out["off_i"], out["off_v"] = np.asarray(off.indices), np.asarray(off.values)
    kw = dict(truncation=60, kd=10, block_size=32, solver="xla", node_chunk=7)
    out["off_v_xla"] = np.asarray(diffusion.offline(g, mesh=mesh, **kw).values)
    gq = inp["graph_queries"]
    for mode in ("joint", "online"):
        out[f"dfs_{mode}"] = np.asarray(
            diffusion.rank(gq, g, mesh=mesh, truncation=60, kd=10, kq=5, mode=mode)
        )
    out["dfs_online_rank"] = np.asarray(diffusion.online_rank(off, gq, g, kq=5, mesh=mesh))
    # every Table 1 column through ranking.rank_columns on the mesh
    from jretrieval import ranking

    params = ranking.RankingParams(diffusion=RANKING_DIFFUSION)
    for col, r in ranking.rank_columns(gq, g, params, mesh=mesh).items():
        out[f"column/{col}"] = np.asarray(r)
    # structure: the ring uses collective-permute and holds no N x N matrix
    n_big = 2048
    big = np.random.default_rng(1).standard_normal((n_big, 32)).astype(np.float32)
    shards = mesh_lib.shard_rows(big, mesh)
    lowered = search._self_topk_impl.lower(
        shards.array, k=8, n=n_big, block=64, query_block=64, own="keep", mesh=mesh
    )
    hlo = lowered.compile().as_text()
    out["ring_permutes"] = np.asarray(hlo.count("collective-permute"))
    mem = lowered.compile().memory_analysis()
    out["ring_temp_bytes"] = np.asarray(-1 if mem is None else mem.temp_size_in_bytes)

    # data-parallel extraction and BN recalibration
    from jretrieval import extract as ex
    from jretrieval import recalibration, steps

    enc = encoder()
    paths = image_paths(os.path.join(folder, "images"))
    step = steps.make_step(enc, "mac", mesh=mesh)
    probe = step(np.zeros((4, 20, 16, 3), np.uint8))
    out["step_devices"] = np.asarray(len(probe.sharding.device_set))
    desc, rep = ex.extract(enc, paths, mesh=mesh, **EXTRACT_KW)
    out["extract"], out["extract_kept"] = desc, rep["kept"]
    out["extract_shapes"] = np.asarray(rep["shapes"])
    rec = recalibration.recalibrate_bn(enc, recal_batches(paths), mesh=mesh, mode="exact")
    out.update({f"exact/{k}": v for k, v in _stats(rec).items()})
    rec = recalibration.recalibrate_images(enc, paths, mesh=mesh, mode="pytorch", **RECAL_KW)
    out.update({f"pytorch/{k}": v for k, v in _stats(rec).items()})
    out["recal_extract"] = ex.extract(rec, paths, mesh=mesh, **EXTRACT_KW)[0]
    # bfloat16 convdot convolutions (the native kernel, an XLA custom call, where it builds)
    step16 = steps.make_step(enc.with_dtype("bfloat16", conv_dot=True), "mac", mesh=mesh)
    out["bf16_step"] = np.asarray(step16(bf16_batch()))
    np.savez(os.path.join(folder, "sharded.npz"), **out)


# ----------------------------------------------------------------------------- multi-host


def run_multihost(folder: str, process_id: int, num_processes: int, port: int) -> None:
    from jretrieval import extract as ex
    from jretrieval import mesh as mesh_lib
    from jretrieval import recalibration

    mesh_lib.initialize(
        True,
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    assert jax.process_count() == num_processes and jax.process_index() == process_id
    mesh = mesh_lib.make_mesh()
    enc = encoder()
    paths = image_paths(os.path.join(folder, "images"))
    recs = {m: recalibration.recalibrate_images(enc, paths, mesh=mesh, mode=m, **RECAL_KW)
            for m in ("exact", "pytorch")}  # fmt: skip
    rec = recs["exact"]
    store = os.path.join(folder, "store.h5")
    desc, rep = ex.extract(rec, paths, mesh=mesh, store=store, **EXTRACT_KW)
    again, rep2 = ex.extract(rec, paths, mesh=mesh, store=store, **EXTRACT_KW)
    # Sharded retrieval over the global mesh (2 processes x 2 devices): ring across processes.
    from jretrieval import diffusion, expansion, search

    x, q = search_inputs()
    out_search = {
        "mh_topk": np.asarray(search.topk(q, x, 5, mesh=mesh)[1]),
        "mh_index": np.asarray(search.Index(x, mesh=mesh).topk(q, 5)[1]),
        "mh_dba": expansion.dba(x, 3, mesh=mesh, block_size=8, query_block=8).to_numpy(),
        "mh_aqe": np.asarray(expansion.aqe(q, x, 4, mesh=mesh)),
        **{
            f"mh_dfs_{mode}": np.asarray(
                diffusion.rank(q, x, mesh=mesh, truncation=20, kd=5, kq=4, mode=mode)
            )
            for mode in ("joint", "online")
        },
    }
    out = {
        **out_search,
        "extract": desc,
        "kept": rep["kept"],
        "skipped": np.asarray([s[0] for s in rep["skipped"]]),
        "slice": np.asarray([len(paths[mesh_lib.process_slice(len(paths))])]),
        "again": again,
        "reused": np.asarray(rep2["reused"]),
        **{f"{m}/{k}": v for m, r in recs.items() for k, v in _stats(r).items()},
    }
    np.savez(os.path.join(folder, f"process{process_id}.npz"), **out)
    jax.distributed.shutdown()


def main(argv: list[str]) -> None:
    if argv[1] == "sharded":
        run_sharded(argv[2])
    elif argv[1] == "multihost":
        run_multihost(argv[2], int(argv[3]), int(argv[4]), int(argv[5]))
    else:
        raise SystemExit(f"unknown command {argv[1]!r}; expected sharded or multihost")


if __name__ == "__main__":
    main(sys.argv)
