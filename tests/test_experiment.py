"""End to end: a tiny generated dataset through ``experiment.run`` / ``main`` and every column.

The test writes a few dozen JPEGs (5 instances x 4 views, 6 distractors, 5 queries with boxes)
and a ground-truth pickle in the cirtorch/revisitop format, registers a tiny two-conv BN
encoder (random weights) so that the run takes seconds, and runs the whole pipeline: encoder,
BN recalibration, extraction with the HDF5 store, whitening, all eight ranking columns,
evaluation, report. The reported figures are then recomputed from the *stored* descriptors with
a plain NumPy float64 pipeline written here (L2, PCA-whitening by ``eigh``, L2, argsort, AQE and
DBA from their definitions; DFS by ``jretrieval.diffusion.rank`` called directly on the
NumPy-expanded inputs) and the revisitop AP formula written here. Figures must agree to 1e-6
percent: both pipelines give the same rankings (the data have no near-ties), so the APs are
the same sums of the same fractions.
"""

from __future__ import annotations

import csv
import json
import os
import pickle

import h5py
import numpy as np
import pytest

from configs import common
from jretrieval import diffusion, evaluation, experiment, metrics, report, whitening
from tests.helpers import DIFF, N_DISTRACTORS, N_INSTANCES, N_VIEWS, make_config, make_dataset

# ----------------------------------------------------------------------------- references


def l2(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_whiten(db, q, dim):
    """L2 -> PCA-whitening learned on ``db`` (float64 eigh) keeping ``dim`` -> L2."""
    db, q = l2(db.astype(np.float64)), l2(q.astype(np.float64))
    if dim is None:
        return db, q
    mean = db.mean(0)
    cov = (db - mean).T @ (db - mean) / len(db)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(-eigval)[:dim]
    proj = eigvec[:, order] / np.sqrt(eigval[order])
    return l2((db - mean) @ proj), l2((q - mean) @ proj)


def knn_sum(a, b, k, exclude_self=False):
    s = a @ b.T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return b[idx].sum(1)


def np_column(name, q, db):
    """Ranks of a column from the NumPy definitions (paper parameters)."""
    dba, aqe, dfs = "DBA" in name, "AQE" in name, "DFS" in name
    if dba:
        db = l2(db + knn_sum(db, db, 20, exclude_self=True))
    if aqe:
        q = l2(q + knn_sum(q, db, 1 if dba else 10))
    if dfs:
        return np.asarray(diffusion.rank(q.astype(np.float32), db.astype(np.float32), **DIFF))
    return np.argsort(-(q @ db.T), axis=1, kind="stable")


def revisitop_ap(ranks, ok, junk):
    """revisitop ``compute_ap`` on 0-based positions of the positives, junk removed."""
    ranks = ranks[~np.isin(ranks, junk)]
    pos = np.flatnonzero(np.isin(ranks, ok))
    ap = 0.0
    for j, r in enumerate(pos):
        p0 = 1.0 if r == 0 else j / r
        p1 = (j + 1) / (r + 1)
        ap += (p0 + p1) / (2 * len(ok))
    return ap


def np_map(ranks, gnd, setup="classic"):
    return 100 * float(np.mean(np_aps(ranks, gnd, setup)))


def np_aps(ranks, gnd, setup="classic"):
    """AP of each query (a fraction) under one setup of the protocol."""
    aps = []
    for row, g in zip(ranks, gnd, strict=True):
        if setup == "classic":
            ok, junk = g["ok"], g["junk"]
        elif setup == "E":
            ok, junk = g["easy"], np.concatenate([g["junk"], g["hard"]])
        elif setup == "M":
            ok, junk = np.concatenate([g["easy"], g["hard"]]), g["junk"]
        else:
            ok, junk = g["hard"], np.concatenate([g["junk"], g["easy"]])
        aps.append(revisitop_ap(np.asarray(row), ok, junk))
    return aps


def stored(path):
    with h5py.File(path, "r") as f:
        return np.asarray(f["descriptors"], np.float32)


def gnd_of(tmp, name):
    with open(os.path.join(tmp, "data", name, f"gnd_{name}.pkl"), "rb") as f:
        return pickle.load(f)["gnd"]


# ----------------------------------------------------------------------------- tests


def test_every_column_matches_a_numpy_pipeline(tmp_path, tiny_zoo):
    tmp = str(tmp_path)
    make_dataset(os.path.join(tmp, "data"), "oxford5k", revisited=False)
    config = make_config(tmp, "oxford5k", **{"output.top10_queries": 2})
    results = report.run(config)

    assert results.dataset == "oxford5k" and results.protocol == "classic"
    assert results.columns == list(common.COLUMNS)
    assert list(results.models) == ["tiny_a"]
    stores = results.stores["tiny_a"]
    db, q = stored(stores["database"]), stored(stores["queries"])
    assert db.shape == (N_INSTANCES * N_VIEWS + N_DISTRACTORS, 32) and q.shape == (N_INSTANCES, 32)
    wdb, wq = np_whiten(db, q, 16)
    gnd = gnd_of(tmp, "oxford5k")
    figures = []
    assert results.queries["tiny_a"] == list(range(N_INSTANCES))
    for column in common.COLUMNS:
        ranks = np_column(column, wq, wdb)
        expected = np_map(ranks, gnd)
        got = results.models["tiny_a"][column]["mAP"]
        assert got == pytest.approx(expected, abs=1e-6), column
        figures.append(got)
        # per-query AP: the reference's, query by query, averaging to the reported mAP
        per_query = results.per_query["tiny_a"][column]["mAP"]
        np.testing.assert_allclose(per_query, 100 * np.array(np_aps(ranks, gnd)), atol=1e-6)
        assert np.mean(per_query) == pytest.approx(got, abs=1e-9)
    chance = 100 * np.mean([3 / (len(wdb) - 1)] * N_INSTANCES)
    assert max(figures) > chance  # not a degenerate run
    assert len(set(np.round(figures, 6))) > 1  # the columns do differ

    # The report's JSON, CSV and Markdown table hold the same numbers.
    out = os.path.join(config.workdir, "results")
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    with open(os.path.join(out, "results.csv"), newline="") as f:
        rows = {
            (r["model"], r["column"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)
        }
    with open(os.path.join(out, "table.md")) as f:
        markdown = f.read()
    for column, value in zip(common.COLUMNS, figures, strict=True):
        assert saved["models"]["tiny_a"][column]["mAP"] == pytest.approx(value, abs=1e-9)
        assert rows[("tiny_a", column, "mAP")] == pytest.approx(value, abs=1e-9)
        assert f"{value:.2f}" in markdown
    assert "randomly initialised" in markdown
    assert config.bn.mode == "pytorch"  # the paper's procedure, inherited from configs/common.py
    assert "BN recalibration: PyTorch model.train() forward pass" in markdown
    assert "batch size 8" in markdown and "list order" in markdown
    assert saved["per_query"]["tiny_a"]["G"]["mAP"] == results.per_query["tiny_a"]["G"]["mAP"]
    assert saved["provenance"]["versions"]["jax"] and saved["provenance"]["devices"]["count"] >= 1
    assert set(saved["timings"]["rows"]["tiny_a"]) >= {"whitening", "ranking", "evaluation"}
    assert saved["chance"]["value"] == pytest.approx(metrics.chance_map(gnd, len(wdb)))
    assert sorted(saved["examples"]["tiny_a"]["queries"]) == [0, 1]
    assert os.path.isfile(os.path.join(out, "top10_tiny_a.png"))

    # A second run reuses the BN statistics and the descriptor stores, agrees exactly, and
    # (experiment.run alone) writes no report.
    mtimes = {p: os.path.getmtime(p) for p in stores.values()}
    reports = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
    again = experiment.run(config)
    assert again.models == results.models
    assert {p: os.path.getmtime(p) for p in stores.values()} == mtimes
    assert {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)} == reports


def test_ensemble_sweep_and_revisited_protocol(tmp_path, tiny_zoo, monkeypatch):
    tmp = str(tmp_path)
    learned = []
    learn_pca = whitening.learn_pca
    monkeypatch.setattr(whitening, "learn_pca", lambda x, **kw: learned.append(1) or learn_pca(x))
    make_dataset(os.path.join(tmp, "data"), "roxford5k", revisited=True, seed=1)
    config = make_config(
        tmp,
        "roxford5k",
        **{
            "models": ("tiny_a", "tiny_a+tiny_b"),
            "whitening.dim": "4,8,none",  # as --config.whitening.dim=4,8,none gives it
            "ranking.columns": ("G", "G+AQE"),
            "bn.mode": "pytorch",
        },
    )
    results = experiment.run(config)
    assert len(learned) == 2  # one PCA per row (model, ensemble), shared by dims 4 and 8
    assert results["protocol"] == "revisited"
    assert results["columns"] == [
        f"{c} @ {d}" for d in ("4", "8", "True dim.") for c in ("G", "G+AQE")
    ]
    assert results["labels"]["tiny_a+tiny_b"] == "TINY_A+TINY_B"
    gnd = gnd_of(tmp, "roxford5k")
    parts = {}
    for m in ("tiny_a", "tiny_b"):
        s = results["stores"][m]
        parts[m] = (l2(stored(s["database"])), l2(stored(s["queries"])))
    rows = {
        "tiny_a": parts["tiny_a"],
        "tiny_a+tiny_b": tuple(
            np.concatenate([parts["tiny_a"][i], parts["tiny_b"][i]], 1) for i in (0, 1)
        ),
    }
    for row, (db, q) in rows.items():
        for dim, label in ((4, "4"), (8, "8"), (None, "True dim.")):
            wdb, wq = np_whiten(db, q, dim)
            for column in ("G", "G+AQE"):
                ranks = np_column(column, wq, wdb)
                figures = results["models"][row][f"{column} @ {label}"]
                assert set(figures) == {
                    f"{s}/{m}" for s in "EMH" for m in ("mAP", "mP@1", "mP@5", "mP@10")
                }
                per_query = results.per_query[row][f"{column} @ {label}"]
                for setup in "EMH":
                    assert figures[f"{setup}/mAP"] == pytest.approx(
                        np_map(ranks, gnd, setup), abs=1e-6
                    ), (row, dim, column, setup)
                    np.testing.assert_allclose(
                        per_query[f"{setup}/mAP"],
                        100 * np.array(np_aps(ranks, gnd, setup)),
                        atol=1e-6,
                    )
    medium = metrics.setups(gnd, "revisited")["M"]
    assert results.chance == {
        "metric": "M/mAP",
        "value": pytest.approx(metrics.chance_map(medium, len(rows["tiny_a"][0]))),
    }


def test_main_runs_in_process(tmp_path, tiny_zoo, monkeypatch, capsys):
    """``jretrieval.main.main`` on a parsed config prints the table and writes the report."""
    from absl import flags

    from jretrieval import main as main_lib

    tmp = str(tmp_path)
    make_dataset(os.path.join(tmp, "data"), "oxford5k", revisited=False, seed=2)
    config = make_config(tmp, "oxford5k", **{"ranking.columns": ("G", "G+DFS")})
    config.lock()
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["jretrieval.main"])  # the default, configs/demo.py (only get_config runs)
    monkeypatch.setattr(flags.FLAGS["config"], "value", config)
    main_lib.main(["jretrieval.main"])
    printed = capsys.readouterr().out
    assert "G+DFS" in printed and "TINY_A" in printed
    assert os.listdir(os.path.join(config.workdir, "results"))


def test_bad_inputs_are_named(tmp_path, tiny_zoo):
    tmp = str(tmp_path)
    make_dataset(os.path.join(tmp, "data"), "oxford5k", revisited=False)
    with pytest.raises(ValueError, match="unknown ranking column"):
        experiment.run(make_config(tmp, "oxford5k", **{"ranking.columns": ("G", "G+XYZ")}))
    with pytest.raises(ValueError, match="not in config.model_zoo"):
        experiment.run(make_config(tmp, "oxford5k", models=("tiny_a", "nonexistent")))
    with pytest.raises(FileNotFoundError, match="baseline"):
        experiment.run(make_config(tmp, "oxford5k", models=("baseline",)))
    with pytest.raises(ValueError, match="bn.mode"):
        experiment.run(make_config(tmp, "oxford5k", **{"bn.mode": "torch"}))
    with pytest.raises(ValueError, match="exceeds"):
        experiment.run(make_config(tmp, "oxford5k", **{"whitening.dim": 64}))
    with pytest.raises(FileNotFoundError, match="paris6k"):
        experiment.run(make_config(tmp, "paris6k"))
    with pytest.raises(ValueError, match="whitening.apgem='dirtorch'"):
        experiment.run(make_config(tmp, "oxford5k", **{"whitening.apgem": "dirtorch"}))


def test_parse_models_and_column_keys():
    assert experiment.parse_models(("a", "b+c", "d,e")) == [
        ("a", ("a",)),
        ("b+c", ("b", "c")),
        ("d", ("d",)),
        ("e", ("e",)),
    ]
    with pytest.raises(ValueError, match="more than once"):
        experiment.parse_models(("a", "a"))
    with pytest.raises(ValueError, match="a\\+b"):
        experiment.parse_models(("a+",))
    assert evaluation.column_key("G", 512, sweep=False, columns=8) == "G"
    assert evaluation.column_key("G", None, sweep=True, columns=1) == "True dim."
    assert evaluation.column_key("G+AQE", 64, sweep=True, columns=2) == "G+AQE @ 64"


def test_parse_dims():
    assert experiment.parse_dims("16,32,64,none") == (16, 32, 64, None)
    assert experiment.parse_dims((32, "none")) == (32, None)
    assert experiment.parse_dims(512) == (512,)
    with pytest.raises(ValueError, match="whitening.dim entry 'x'"):
        experiment.parse_dims("16,x")
    with pytest.raises(ValueError, match="repeats"):
        experiment.parse_dims("16,16")


def test_shipped_pca_is_dirtorch_whitening():
    """``whitening.apgem="shipped"``: dirtorch's whiten_features (power 0.25), restated here."""
    rng = np.random.default_rng(0)
    db, q = rng.standard_normal((30, 12)), rng.standard_normal((4, 12))
    comps = np.linalg.qr(rng.standard_normal((12, 12)))[0][:10]
    pca = evaluation.ShippedPCA(
        {
            "mean": rng.standard_normal(12) * 0.1,
            "components": comps,
            "explained_variance": np.geomspace(1, 1e-3, 10),
        },
        whiten=True,
    )
    for dim in (10, 6):
        got_db, got_q = evaluation.postprocess_shipped(db, q, pca, dim=dim)
        for x, got in ((db, got_db), (q, got_q)):
            y = (
                (l2(x) - pca.arrays["mean"])
                @ comps[:dim].T
                / pca.arrays["explained_variance"][:dim] ** 0.25
            )
            np.testing.assert_allclose(np.asarray(got), l2(y), atol=1e-5)
    got_db, _ = evaluation.postprocess_shipped(db, q, pca, dim=None)
    np.testing.assert_allclose(np.asarray(got_db), l2(db), atol=1e-6)
    with pytest.raises(ValueError, match="exceeds the 10 components of the shipped PCA"):
        evaluation.postprocess_shipped(db, q, pca, dim=11)
