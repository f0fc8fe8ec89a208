"""Two processes on localhost (``jax.distributed``, CPU collectives over gloo) extract jointly.

Each worker (``tests/device_worker.py multihost``) has 2 CPU devices, so the global mesh has 4:
each process recalibrates the BatchNorms on its own slice of the 13 images (one corrupt,
skipped) and extracts its slice data-parallel over its 2 devices; the descriptors are gathered
and process 0 writes the one HDF5 store. This process (one device, no ``jax.distributed``)
computes the single-process reference. Only the loopback address is used; both workers are
killed after ``TIMEOUT_S``.

The workers also run ``search.topk``/``Index``, DBA, AQE and ``jretrieval.diffusion.rank``
(joint and online, ``mesh=``) on the 4-device global mesh (shards travel between the
processes), compared with the one-device functions.

Tolerances: recalibrated statistics ``rtol 1e-5, atol 1e-6`` (float64 merges of per-process
population statistics vs one pass); descriptors ``rtol 1e-5, atol 1e-6``; the store's ids,
settings, row order and skipped images exactly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest

from jretrieval import diffusion, expansion, recalibration, search
from jretrieval import extract as ex
from jretrieval import store as store_lib
from tests import device_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("multihost"))
    worker.make_images(os.path.join(folder, "images"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.device_worker",
                "multihost",
                folder,
                str(i),
                "2",
                str(port),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=TIMEOUT_S)
            logs.append(err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, err in zip(procs, logs, strict=True):
        assert p.returncode == 0, err[-4000:]
    outs = [dict(np.load(os.path.join(folder, f"process{i}.npz"))) for i in range(2)]
    return folder, outs


def _encoder_with(stats: dict[str, np.ndarray]):
    enc = worker.encoder()
    batch_stats = {
        layer: {k: stats[f"exact/stats/{layer}/{k}"] for k in ("mean", "var")}
        for layer in ("bn1", "bn2")
    }
    return enc.replace(variables={**enc.variables, "batch_stats": batch_stats})


def test_joint_recalibration_equals_one_process(job):
    folder, outs = job
    paths = worker.image_paths(os.path.join(folder, "images"))
    assert [int(o["slice"][0]) for o in outs] == [7, 6]
    for mode in ("exact", "pytorch"):
        rec = recalibration.recalibrate_bn(worker.encoder(), worker.recal_batches(paths), mode=mode)
        for key, value in worker._stats(rec).items():
            for out in outs:
                np.testing.assert_allclose(out[f"{mode}/{key}"], value, rtol=1e-5, atol=1e-6)


def test_joint_extraction_equals_one_process(job, tmp_path):
    folder, outs = job
    paths = worker.image_paths(os.path.join(folder, "images"))
    # The single-process run with the same (merged) statistics the workers used.
    enc = _encoder_with(outs[0])
    ref_store = str(tmp_path / "ref.h5")
    ref, rep = ex.extract(enc, paths, store=ref_store, **worker.EXTRACT_KW)
    for out in outs:  # every process returns the full array, in the single-process order
        np.testing.assert_allclose(out["extract"], ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["kept"], rep["kept"])
        assert list(out["skipped"]) == [paths[5]] == [s[0] for s in rep["skipped"]]
        assert bool(out["reused"])  # the second call found process 0's store
        np.testing.assert_array_equal(out["again"], out["extract"])
    store = os.path.join(folder, "store.h5")
    desc, ids, info = store_lib.read_store(store)
    ref_desc, ref_ids, ref_info = store_lib.read_store(ref_store)
    assert ids == ref_ids
    assert info["settings"] == ref_info["settings"]  # a single-process run would reuse it
    assert info["failed"] == ref_info["failed"] and list(info["failed"]) == [5]
    np.testing.assert_allclose(desc, ref_desc, rtol=1e-5, atol=1e-6)
    with h5py.File(store) as f:
        assert bool(f.attrs["complete"]) and json.loads(f.attrs["settings"])["n_images"] == 13
    assert not [f for f in os.listdir(folder) if ".part" in f]  # part stores removed


def test_sharded_search_across_processes(job):
    _, outs = job
    x, q = worker.search_inputs()
    for out in outs:  # every process holds the replicated results / gathers the sharded ones
        np.testing.assert_array_equal(out["mh_topk"], np.asarray(search.topk(q, x, 5)[1]))
        np.testing.assert_array_equal(out["mh_index"], out["mh_topk"])
        np.testing.assert_allclose(out["mh_dba"], np.asarray(expansion.dba(x, 3)), atol=1e-6)
        np.testing.assert_allclose(out["mh_aqe"], np.asarray(expansion.aqe(q, x, 4)), atol=1e-6)
        for mode in ("joint", "online"):
            ref = diffusion.rank(q, x, truncation=20, kd=5, kq=4, mode=mode)
            np.testing.assert_array_equal(out[f"mh_dfs_{mode}"], np.asarray(ref), err_msg=mode)
