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

import flax.linen as nn
import h5py
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import common
from jretrieval import diffusion, experiment, models

DIFF = {"truncation": 24, "kd": 6, "kq": 4, "gamma": 3.0, "alpha": 0.99, "mode": "joint"}
N_INSTANCES, N_VIEWS, N_DISTRACTORS = 5, 4, 6


class TinyNet(nn.Module):
    """Two strided 3x3 convs with BatchNorm (torch eps) and ReLU: ``[B,H,W,3] -> [B,H/4,W/4,C]``."""

    features: int = 32
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        stages = {}
        for i, feat in enumerate((16, self.features)):
            x = nn.Conv(feat, (3, 3), (2, 2), padding=((1, 1), (1, 1)), use_bias=False)(x)
            x = nn.BatchNorm(
                use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5
            )(x)
            x = nn.relu(x)
            stages[f"layer{i + 1}"] = x
        return x, stages


@pytest.fixture
def tiny_zoo(monkeypatch):
    monkeypatch.setitem(models.ARCHITECTURES, "tiny", TinyNet)


def _pattern(rng: np.random.Generator) -> Image.Image:
    """A 96x96 colour image: smooth random field plus a few rectangles."""
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((96, 96), Image.Resampling.BICUBIC)
    arr = np.asarray(im).copy()
    for _ in range(4):
        x, y = rng.integers(0, 80, 2)
        w, h = rng.integers(8, 24, 2)
        arr[y : y + h, x : x + w] = rng.integers(0, 256, 3)
    return Image.fromarray(arr)


def _view(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = im.size
    cw, ch = (rng.uniform(0.7, 0.9, 2) * (w, h)).astype(int)
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    out = im.crop((x, y, x + cw, y + ch)).resize(tuple(rng.integers(56, 80, 2)))
    arr = np.asarray(out).astype(np.float32) * rng.uniform(0.8, 1.2)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_dataset(root: str, name: str, *, revisited: bool, seed: int = 0) -> None:
    """Writes ``<root>/<name>/jpg/*.jpg`` and ``gnd_<name>.pkl`` (cirtorch/revisitop format)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, name, "jpg")
    os.makedirs(folder)
    imlist, qimlist, owners = [], [], []
    sources = [_pattern(rng) for _ in range(N_INSTANCES + N_DISTRACTORS)]
    for i in range(N_INSTANCES):
        for v in range(N_VIEWS):
            imlist.append(f"inst{i}_v{v}")
            owners.append(i)
        qimlist.append(f"query{i}")
    for d in range(N_DISTRACTORS):
        imlist.append(f"distractor{d}")
        owners.append(-1)
    order = rng.permutation(len(imlist))
    imlist, owners = [imlist[k] for k in order], [owners[k] for k in order]
    for n, owner in zip(imlist, owners, strict=True):
        src = sources[owner if owner >= 0 else N_INSTANCES + int(n[len("distractor") :])]
        _view(src, rng).save(os.path.join(folder, n + ".jpg"), quality=92)
    gnd = []
    for i in range(N_INSTANCES):
        q = _view(sources[i], rng)
        q.save(os.path.join(folder, f"query{i}.jpg"), quality=92)
        w, h = q.size
        bbx = [float(w // 10), float(h // 10), float(w - w // 8), float(h - h // 8)]
        mine = [k for k, o in enumerate(owners) if o == i]
        if revisited:
            gnd.append(
                {
                    "bbx": bbx,
                    "easy": np.array(mine[:2]),
                    "hard": np.array(mine[2:3]),
                    "junk": np.array(mine[3:]),
                }
            )
        else:
            gnd.append({"bbx": bbx, "ok": np.array(mine[:3]), "junk": np.array(mine[3:])})
    with open(os.path.join(root, name, f"gnd_{name}.pkl"), "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)


def make_config(tmp: str, dataset: str, **overrides) -> ml_collections.ConfigDict:
    config = common.base_config(dataset)
    config.workdir = os.path.join(tmp, "run")
    config.data.root = os.path.join(tmp, "data")
    for m, seed in (("tiny_a", 0), ("tiny_b", 1)):
        config.model_zoo[m] = {
            "label": m.upper(),
            "file": None,
            "architecture": {"name": "tiny", "features": 32},
            "seed": seed,
            "pooling": None,
            "map_size": None,
        }
    config.models = ("tiny_a",)
    config.extraction.policy.size = 48
    config.extraction.batch_size = 8
    config.bn.batch_size = 8
    config.whitening.dim = 16
    config.diffusion = ml_collections.ConfigDict(DIFF)
    config.output.top10_queries = 2
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return config


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
    return 100 * float(np.mean(aps))


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
    config = make_config(tmp, "oxford5k")
    results = experiment.run(config)

    assert results["dataset"] == "oxford5k" and results["protocol"] == "classic"
    assert results["columns"] == list(common.COLUMNS)
    assert list(results["models"]) == ["tiny_a"]
    stores = results["stores"]["tiny_a"]
    db, q = stored(stores["database"]), stored(stores["queries"])
    assert db.shape == (N_INSTANCES * N_VIEWS + N_DISTRACTORS, 32) and q.shape == (N_INSTANCES, 32)
    wdb, wq = np_whiten(db, q, 16)
    gnd = gnd_of(tmp, "oxford5k")
    figures = []
    for column in common.COLUMNS:
        expected = np_map(np_column(column, wq, wdb), gnd)
        got = results["models"]["tiny_a"][column]["mAP"]
        assert got == pytest.approx(expected, abs=1e-6), column
        figures.append(got)
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

    # A second run reuses the BN statistics and the descriptor stores and agrees exactly.
    mtimes = {p: os.path.getmtime(p) for p in stores.values()}
    again = experiment.run(config)
    assert again["models"] == results["models"]
    assert {p: os.path.getmtime(p) for p in stores.values()} == mtimes


def test_ensemble_sweep_and_revisited_protocol(tmp_path, tiny_zoo):
    tmp = str(tmp_path)
    make_dataset(os.path.join(tmp, "data"), "roxford5k", revisited=True, seed=1)
    config = make_config(
        tmp,
        "roxford5k",
        **{
            "models": ("tiny_a", "tiny_a+tiny_b"),
            "whitening.dim": (8, None),
            "ranking.columns": ("G", "G+AQE"),
            "bn.mode": "pytorch",
        },
    )
    results = experiment.run(config)
    assert results["protocol"] == "revisited"
    assert results["columns"] == ["G @ 8", "G+AQE @ 8", "G @ True dim.", "G+AQE @ True dim."]
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
        for dim, label in ((8, "8"), (None, "True dim.")):
            wdb, wq = np_whiten(db, q, dim)
            for column in ("G", "G+AQE"):
                ranks = np_column(column, wq, wdb)
                figures = results["models"][row][f"{column} @ {label}"]
                assert set(figures) == {
                    f"{s}/{m}" for s in "EMH" for m in ("mAP", "mP@1", "mP@5", "mP@10")
                }
                for setup in "EMH":
                    assert figures[f"{setup}/mAP"] == pytest.approx(
                        np_map(ranks, gnd, setup), abs=1e-6
                    ), (row, dim, column, setup)


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
    assert experiment.column_key("G", 512, sweep=False, columns=8) == "G"
    assert experiment.column_key("G", None, sweep=True, columns=1) == "True dim."
    assert experiment.column_key("G+AQE", 64, sweep=True, columns=2) == "G+AQE @ 64"
