"""Every sharded stage on a 4-device CPU mesh equals one device (and a NumPy float64 reference).

The 4-device run happens in one subprocess (``tests/device_worker.py sharded``) started with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``, so this process keeps its single device
and computes the references: ``jretrieval.search/expansion/diffusion/extract`` on one device and
plain NumPy float64 formulas written here.

Tolerances: indices exactly (the data are tie-free random vectors, plus one set with exact
duplicates where the tie order, lower index first, must match too); scores and vectors
``atol 1e-5`` against float64, ``1e-6`` against the single-device float32 functions; diffusion
values ``atol 1e-5``; descriptors and BN statistics ``rtol 1e-5, atol 1e-6`` (XLA may block the
convolutions of a 1-image shard differently from a 4-image batch).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from jretrieval import diffusion, expansion, recalibration, search, steps
from jretrieval import extract as ex
from tests import device_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    base = _unit(rng.standard_normal((30, 12)))
    dup = np.concatenate([base, base[5:15], base[:4]])[rng.permutation(44)]
    centres = _unit(rng.standard_normal((3, 16)))
    graph = _unit(np.repeat(centres, 50, axis=0) + 0.35 * rng.standard_normal((150, 16)))
    return {
        "queries": _unit(rng.standard_normal((9, 24))),
        "database": _unit(rng.standard_normal((203, 24))),
        "small": _unit(rng.standard_normal((10, 8))),
        "dup": dup,
        "graph": graph,
        "graph_queries": _unit(centres[[0, 1, 2, 0]] + 0.3 * rng.standard_normal((4, 16))),
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sharded"))
    inputs = _inputs()
    np.savez(os.path.join(folder, "inputs.npz"), **inputs)
    worker.make_images(os.path.join(folder, "images"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.device_worker", "sharded", folder],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = dict(np.load(os.path.join(folder, "sharded.npz")))
    return inputs, out, folder


def _np_topk(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q.astype(np.float64) @ db.astype(np.float64).T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, axis=1), idx


def _np_expand(x, db, idx, w):
    y = x.astype(np.float64) + np.einsum("qk,qkd->qd", w, db.astype(np.float64)[idx])
    return y / (np.linalg.norm(y, axis=1, keepdims=True) + 1e-6)


def test_topk_and_rank_equal_one_device(run):
    inp, out, _ = run
    q, db = inp["queries"], inp["database"]
    ref_s, ref_i = _np_topk(q, db, 10)
    for tag in ("big", "small"):
        np.testing.assert_array_equal(out[f"topk_{tag}_i"], ref_i)
        np.testing.assert_allclose(out[f"topk_{tag}_s"], ref_s, atol=1e-5)
        np.testing.assert_array_equal(out[f"topk_{tag}_i"], np.asarray(search.topk(q, db, 10)[1]))
    # k = 8 > 3 rows per shard (10 rows on 4 devices)
    ref_small = _np_topk(q[:, :8], inp["small"], 8)[1]
    np.testing.assert_array_equal(out["topk_small_db_i"], ref_small)
    # the full ranking: same as search.rank, a permutation, non-increasing float64 scores
    full = out["rank_full"]
    np.testing.assert_array_equal(full, np.asarray(search.rank(q, db)))
    assert full.shape == (9, 203) and (np.sort(full, axis=1) == np.arange(203)).all()
    s64 = np.take_along_axis(q.astype(np.float64) @ db.astype(np.float64).T, full, axis=1)
    assert (np.diff(s64, axis=1) <= 1e-6).all()
    np.testing.assert_array_equal(out["rank_k"], full[:, :25])
    # the Index places the sharded database once and answers the same
    np.testing.assert_array_equal(out["index_topk_i"], ref_i)
    np.testing.assert_array_equal(out["index_rank"], full)


def test_bad_arguments_same_messages_on_the_mesh(run):
    inp, out, _ = run
    for key, call in worker.bad_calls(inp["queries"], inp["database"]).items():
        with pytest.raises(ValueError) as one_device:
            call(None)
        assert str(out[f"error/{key}"]) == str(one_device.value), key


def test_diffusion_neighbours_on_the_mesh_equal_one_device_including_ties(run):
    inp, out, _ = run
    for tag in ("db", "dup"):  # "dup": exact duplicates, ties across shards
        x = inp["database"] if tag == "db" else inp["dup"]
        ids, ids_kd, sims_kd = diffusion._neighbours(x, 12, 4)
        np.testing.assert_array_equal(out[f"nbr_{tag}_ids"], ids)
        np.testing.assert_array_equal(out[f"nbr_{tag}_ids_kd"], ids_kd)
        np.testing.assert_allclose(out[f"nbr_{tag}_sims_kd"], sims_kd, atol=1e-6)
        # against NumPy: each node first, then its nearest by (float32 score desc, index asc)
        s = (x @ x.T).astype(np.float32)
        np.fill_diagonal(s, np.inf)
        n = len(x)
        want = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), -s), axis=1)
        np.testing.assert_array_equal(out[f"nbr_{tag}_ids_kd"], want[:, :4])
        np.testing.assert_array_equal(out[f"nbr_{tag}_ids"][:, 0], np.arange(n))
        assert all(
            set(a) == set(b) for a, b in zip(out[f"nbr_{tag}_ids"], want[:, :12], strict=True)
        )
    # search.self_topk on the ring, own index excluded, ties across shards
    dup = inp["dup"]
    np.testing.assert_array_equal(out["self_topk_dup_i"], np.asarray(search.self_topk(dup, 11)[1]))


def test_aqe_dba_equal_one_device_and_numpy(run):
    inp, out, _ = run
    q, db = inp["queries"], inp["database"]
    for key, k, alpha in (("aqe0", 10, 0.0), ("aqe3", 7, 3.0)):
        s, idx = _np_topk(q, db, k)
        ref = _np_expand(q, db, idx, np.maximum(s, 0) ** alpha)
        np.testing.assert_allclose(out[key], ref, atol=1e-5)
        np.testing.assert_allclose(out[key], np.asarray(expansion.aqe(q, db, k, alpha)), atol=1e-6)
    for key, x, k, alpha in (("dba0", db, 20, 0.0), ("dba3", db, 5, 3.0)):
        s, idx = _np_topk(x, x, k + 1)
        w = np.where(idx == np.arange(len(x))[:, None], 0.0, np.maximum(s, 0) ** alpha)
        ref = _np_expand(x, x, idx, w)  # own index (first on tie-free data) weighted 0
        np.testing.assert_allclose(out[key], ref, atol=1e-5)
        np.testing.assert_allclose(out[key], np.asarray(expansion.dba(x, k, alpha)), atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(out[key], axis=1), 1.0, atol=1e-5)
    dup = inp["dup"]
    np.testing.assert_allclose(out["dba_dup"], np.asarray(expansion.dba(dup, 3)), atol=1e-6)
    ref = np.asarray(search.rank(q, expansion.dba(db, 20), 10))
    np.testing.assert_array_equal(out["dba_then_rank"], ref)


def test_diffusion_equals_one_device(run):
    inp, out, _ = run
    g, gq = inp["graph"], inp["graph_queries"]
    off = diffusion.offline(g, truncation=60, kd=10)
    np.testing.assert_array_equal(out["off_i"], np.asarray(off.indices))
    np.testing.assert_allclose(out["off_v"], np.asarray(off.values), atol=1e-5)
    np.testing.assert_allclose(out["off_v_xla"], np.asarray(off.values), atol=1e-5)  # XLA solves
    assert np.abs(out["off_v"]).max() > 0.5  # the solves did something (x[0] ~ 1 + ...)
    for mode in ("joint", "online"):
        ref = diffusion.rank(gq, g, truncation=60, kd=10, kq=5, mode=mode)
        np.testing.assert_array_equal(out[f"dfs_{mode}"], np.asarray(ref))
    ref = diffusion.online_rank(off, gq, g, kq=5)
    np.testing.assert_array_equal(out["dfs_online_rank"], np.asarray(ref))


def test_ranking_columns_on_the_mesh_equal_one_device(run):
    from jretrieval import ranking

    inp, out, _ = run
    params = ranking.RankingParams(diffusion=worker.RANKING_DIFFUSION)
    ref = ranking.rank_columns(inp["graph_queries"], inp["graph"], params)
    assert list(ref) == list(ranking.COLUMN_NAMES)
    for col, ranks in ref.items():
        np.testing.assert_array_equal(out[f"column/{col}"], np.asarray(ranks), err_msg=col)


def test_ring_permutes_and_never_holds_n_by_n(run):
    _, out, _ = run
    assert int(out["ring_permutes"]) > 0
    n = 2048
    # one N x N float32 matrix is 16 MB; a shard against everything 4 MB. The ring's buffers
    # (one 64 x 64 block of scores, [512, 8] state, shard in flight) stay far below both.
    assert 0 < int(out["ring_temp_bytes"]) < n * n * 4 // 16


def test_data_parallel_extraction_and_recalibration(run):
    _, out, folder = run
    enc = worker.encoder()
    paths = worker.image_paths(os.path.join(folder, "images"))
    assert int(out["step_devices"]) == 4
    assert all(shape[0] % 4 == 0 for shape in out["extract_shapes"])
    ref, rep = ex.extract(enc, paths, **worker.EXTRACT_KW)
    np.testing.assert_array_equal(out["extract_kept"], rep["kept"])
    assert 5 not in rep["kept"]  # the corrupt image
    np.testing.assert_allclose(out["extract"], ref, rtol=1e-5, atol=1e-6)
    for mode in ("exact", "pytorch"):
        rec = recalibration.recalibrate_bn(enc, worker.recal_batches(paths), mode=mode)
        for key, value in worker._stats(rec).items():
            np.testing.assert_allclose(out[f"{mode}/{key}"], value, rtol=1e-5, atol=1e-6)
        assert not np.allclose(
            out[f"{mode}/stats/bn2/mean"], np.asarray(enc.variables["batch_stats"]["bn2"]["mean"])
        )
    ref_rec = ex.extract(rec, paths, **worker.EXTRACT_KW)[0]  # rec: the pytorch-mode encoder
    np.testing.assert_allclose(out["recal_extract"], ref_rec, rtol=1e-5, atol=1e-6)
    # bfloat16 convdot convolutions (native.conv_bf16 where it builds: each output pixel's sum
    # runs in one fixed order, whatever the batch or its sharding) equal one device
    step16 = steps.make_step(enc.with_dtype("bfloat16", conv_dot=True), "mac")
    np.testing.assert_allclose(out["bf16_step"], step16(worker.bf16_batch()), rtol=1e-6)


# ----------------------------------------------------------------------------- one device


def test_process_slices_cover_the_list_in_order():
    from jretrieval.mesh import process_slice

    for n, count in ((13, 2), (3, 4), (0, 3), (100, 7)):
        parts = [process_slice(n, process_index=p, process_count=count) for p in range(count)]
        rows = [i for sl in parts for i in range(n)[sl]]
        assert rows == list(range(n))
        assert max(sl.stop - sl.start for sl in parts) <= -(-n // count) if n else True
    with pytest.raises(ValueError, match="process_index=2"):
        process_slice(5, process_index=2, process_count=2)


def test_one_device_mesh_and_bad_arguments():
    import jax

    from jretrieval import mesh as mesh_lib

    mesh = mesh_lib.make_mesh()
    assert mesh.devices.size == jax.device_count() == 1 and mesh.axis_names == ("data",)
    x = _inputs()["database"]
    rows = mesh_lib.shard_rows(x, mesh)
    assert rows.n == 203 and rows.array.shape == (203, 24)
    np.testing.assert_array_equal(rows.to_numpy(), x)
    assert mesh_lib.shard_rows(rows, mesh) is rows  # already placed: not copied again
    q = _inputs()["queries"]
    s, i = search.topk(q, rows, 0, mesh=mesh)
    assert s.shape == i.shape == (9, 0)
    with pytest.raises(ValueError, match="k=204 is out of range"):
        search.topk(q, x, 204, mesh=mesh)
    with pytest.raises(ValueError, match="different descriptor sizes"):
        search.topk(q[:, :8], x, 3, mesh=mesh)
    bad = x.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        expansion.aqe(q, bad, 3, mesh=mesh)
    with pytest.raises(ValueError, match="k=203 is out of range"):
        expansion.dba(x, 203, mesh=mesh)
    # diffusion on a mesh: the same checks and messages as on one device
    with pytest.raises(ValueError, match="kd=61 is out of range"):
        diffusion.offline(x, mesh=mesh, truncation=60, kd=61)
    with pytest.raises(ValueError, match="block_size=0 is out of range"):
        diffusion.offline(x, mesh=mesh, truncation=60, kd=5, block_size=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        diffusion.rank(q, x, mesh=mesh, mode="bogus")
    with pytest.raises(ValueError, match="kq=204 is out of range"):
        diffusion.rank(q, x, mesh=mesh, kq=204)
    with pytest.raises(ValueError, match="queries and database have different descriptor sizes"):
        diffusion.rank(q[:, :8], x, mesh=mesh)
    off = diffusion.offline(x, truncation=20, kd=5)
    with pytest.raises(ValueError, match="other descriptors"):
        diffusion.online_rank(off, q, x[::-1].copy(), mesh=mesh)
