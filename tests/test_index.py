"""The index: build from a dataset's database, query new images, equal to the experiment's ranks.

One index is built by the command line in a fresh process (``python -m jretrieval.index
build`` with the tiny encoder saved as a converted file), from the generated dataset's database
images; the dataset's queries, cropped to their boxes, are then asked through the command line
(another fresh process) and through the Python API. Their top-10 must be the ranks that the
experiment's own functions (``experiment.describe`` -> ``evaluation.postprocess`` ->
``ranking.rank_columns``, as ``experiment.evaluate_row``) give for the same model and settings:
G, G+AQE (``--aqe``) and G+DFS in online mode (``--diffusion``). Exact equality: the same
functions on the same images give the same bits (the database descriptors are compared
exactly too).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from jretrieval import evaluation, experiment, models, ranking
from jretrieval.index import FORMAT, Index, IndexFileError, QueryError
from jretrieval.index import __main__ as cli
from tests.helpers import TinyNet, make_config, make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = {"name": "tiny", "features": 32}
SETTINGS = ["--size=48", "--pca_dim=16"]  # --bn: pytorch, as the experiment's default
# The CLI in a fresh interpreter, with the tests' tiny architecture registered first.
LAUNCH = (
    "import sys; from absl import app; from jretrieval import models; "
    "from tests.helpers import TinyNet; models.ARCHITECTURES['tiny'] = TinyNet; "
    "from jretrieval.index.__main__ import main; sys.argv[0] = 'jretrieval.index'; app.run(main)"
)


def _cli_process(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-c", LAUNCH, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


def _cli(*args: str) -> int:
    """The CLI in this process (flags reset to their defaults first); returns the exit code."""
    flags.FLAGS.unparse_flags()
    rest = flags.FLAGS(["jretrieval.index", *args])
    try:
        cli.main(rest)
    except SystemExit as exit_:
        return int(exit_.code)
    return 0


def _save(path: str, seed: int) -> None:
    enc = models.init_encoder(ARCH, seed=seed)
    models.save(path, enc.architecture, enc.variables, enc.preprocessing, {"seed": seed})


def _tree_digest(folder: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The dataset, two converted tiny encoders, the CLI-built index and the experiment's ranks."""
    tmp = str(tmp_path_factory.mktemp("index"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.ARCHITECTURES, "tiny", TinyNet)
        make_dataset(os.path.join(tmp, "data"), "oxford5k", revisited=False)
        os.makedirs(os.path.join(tmp, "ckpt"))
        _save(os.path.join(tmp, "ckpt", "tiny_a.h5"), seed=0)
        _save(os.path.join(tmp, "ckpt", "tiny_b.h5"), seed=1)
        out = os.path.join(tmp, "index")
        build = _cli_process(
            "build",
            f"--checkpoint={tmp}/ckpt/tiny_a.h5",
            "--dataset=oxford5k",
            f"--data_root={tmp}/data",
            f"--out={out}",
            "--diffusion",
            *SETTINGS,
        )
        assert build.returncode == 0, build.stderr[-2000:]
        assert "images/s" in build.stdout
        # The experiment's columns for the same model (the same file) and settings; online
        # diffusion with the index's default parameters (Yang et al.'s, clipped to 26 images).
        config = make_config(tmp, "oxford5k")
        config.checkpoint_dir = os.path.join(tmp, "ckpt")
        config.model_zoo.tiny_a.file = "tiny_a.h5"
        config.diffusion = {**ranking.RankingParams().diffusion, "mode": "online"}
        dataset = experiment.load_data(config)
        raw = experiment.describe(config, "tiny_a", dataset)
        db, q = evaluation.postprocess(raw.database, raw.queries, dim=16)
        ranks = ranking.rank_columns(q, db, config, ["G", "G+AQE", "G+DFS"])
        yield {
            "tmp": tmp,
            "out": out,
            "dataset": dataset,
            "database": np.asarray(db),
            "ranks": {c: np.asarray(r) for c, r in ranks.items()},
            "aqe_k": int(config.ranking.aqe_k),
        }


def _relative(setup, ids: np.ndarray) -> list[list[str]]:
    ds = setup["dataset"]
    return [[os.path.relpath(ds.db_paths[i], ds.root) for i in row] for row in ids]


def test_cli_query_in_a_fresh_process_equals_experiment_g(setup):
    ds = setup["dataset"]
    boxes = [f"--bbx={','.join(str(v) for v in b)}" for b in ds.query_bbx]
    done = _cli_process("query", f"--index={setup['out']}", "--json", *boxes, *ds.query_paths)
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout)
    assert [a["query"] for a in answer] == ds.query_paths
    expected = _relative(setup, setup["ranks"]["G"][:, :10])
    assert [[r["path"] for r in a["results"]] for a in answer] == expected
    assert [[r["rank"] for r in a["results"]] for a in answer] == [list(range(1, 11))] * 5
    scores = np.asarray([[r["score"] for r in a["results"]] for a in answer])
    assert np.all(np.diff(scores, axis=1) <= 0)


@pytest.mark.parametrize(
    ("column", "kwargs"), [("G", {}), ("G+AQE", {"aqe": "aqe_k"}), ("G+DFS", {"diffusion": True})]
)
def test_python_query_equals_experiment_columns(setup, tiny_zoo, column, kwargs):
    index = Index.load(setup["out"])
    np.testing.assert_array_equal(index.database, setup["database"])  # same bits
    ds = setup["dataset"]
    kwargs = {k: setup[v] if v == "aqe_k" else v for k, v in kwargs.items()}
    hits = index.query(images=ds.query_paths, bbx=ds.query_bbx, k=10, **kwargs)
    np.testing.assert_array_equal(hits.ids, setup["ranks"][column][:, :10])
    assert hits.paths == _relative(setup, hits.ids)
    # Scores are inner products of the searched query vectors with the returned rows.
    expect = np.einsum("qd,qkd->qk", hits.queries, index.database[hits.ids])
    np.testing.assert_allclose(hits.scores, expect, atol=1e-5)
    # query_descriptors on the searched (post-processed, expanded) vectors: the same answer.
    diffusion = kwargs.get("diffusion", False)
    again = index.query_descriptors(hits.queries, k=10, postprocessed=True, diffusion=diffusion)
    np.testing.assert_array_equal(again.ids, hits.ids)


def test_interrupted_build_resumes_to_the_same_index(setup, tiny_zoo):
    tmp, ds = setup["tmp"], setup["dataset"]
    out = os.path.join(tmp, "resumed")
    calls = {"n": 0}

    def failing_loader(path, **kw):
        calls["n"] += 1
        if calls["n"] > 12:
            raise KeyboardInterrupt("stopped by the test")
        from jretrieval.datasets.images import load_image

        return load_image(path, **kw)

    common = dict(
        dataset="oxford5k",
        data_root=os.path.join(tmp, "data"),
        checkpoint=os.path.join(tmp, "ckpt", "tiny_a.h5"),
        size=48,
        pca_dim=16,
    )
    with pytest.raises(KeyboardInterrupt):
        Index.build(out, loader=failing_loader, **common)
    assert not os.path.exists(out)  # nothing half-written
    assert os.path.isdir(out + ".build")  # the store to resume from
    index = Index.build(out, **common)
    assert 0 < index.build_stats["resumed"] < len(ds.db_paths)
    assert not os.path.exists(out + ".build")
    np.testing.assert_array_equal(index.database, setup["database"])
    assert index.paths == Index.load(setup["out"]).paths


def test_another_models_checkpoint_is_refused_by_name(setup, tiny_zoo, capsys):
    ds = setup["dataset"]
    code = _cli("query", f"--index={setup['out']}", f"--checkpoint={setup['tmp']}/ckpt/tiny_b.h5",
                ds.query_paths[0])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "'tiny_a'" in err and "--checkpoint=" in err and "tiny_b.h5" in err


def _copy_index(setup, name: str) -> str:
    import shutil

    dst = os.path.join(setup["tmp"], name)
    shutil.copytree(setup["out"], dst)
    return dst


def _bad_cases(setup):
    tmp, ds = setup["tmp"], setup["dataset"]
    index, query = setup["out"], ds.query_paths[0]
    garbage = os.path.join(tmp, "garbage.jpg")
    with open(garbage, "wb") as f:
        f.write(b"not a jpeg at all")
    os.makedirs(os.path.join(tmp, "empty", "sub"), exist_ok=True)
    missing = _copy_index(setup, "missing")
    os.remove(os.path.join(missing, "paths.txt"))
    truncated = _copy_index(setup, "truncated")
    with open(os.path.join(truncated, "database.npy"), "r+b") as f:
        f.truncate(200)
    newer = _copy_index(setup, "newer")
    manifest = os.path.join(newer, "manifest.json")
    with open(manifest) as f:
        data = json.load(f)
    data["format"] = FORMAT + 1
    with open(manifest, "w") as f:
        json.dump(data, f)
    build = ["build", f"--checkpoint={tmp}/ckpt/tiny_a.h5", f"--out={index}", *SETTINGS]
    return {
        "unreadable": (["query", f"--index={index}", garbage], "garbage.jpg"),
        "outside": (["query", f"--index={index}", "--bbx=0,0,5000,20", query], "outside"),
        "empty box": (["query", f"--index={index}", "--bbx=30,0,10,20", query], "x1 < x2"),
        "missing": (["query", f"--index={missing}", query], "paths.txt"),
        "truncated": (["query", f"--index={truncated}", query], "database.npy"),
        "newer": (["query", f"--index={newer}", query], "newer"),
        "k too large": (["query", f"--index={index}", "--k=27", query], "--k=27"),
        "no images": ([*build, f"--images={tmp}/empty"], "no images"),
        "two boxes": (
            ["query", f"--index={index}", "--bbx=0,0,9,9", "--bbx=0,0,9,9", query],
            "--bbx",
        ),  # fmt: skip
    }


def test_bad_input_exits_with_one_line_and_leaves_the_index(setup, tiny_zoo, capsys):
    before = _tree_digest(setup["out"])
    for case, (argv, needle) in _bad_cases(setup).items():
        code = _cli(*argv)
        err = capsys.readouterr().err.strip()
        assert code == 1, (case, err)
        assert len(err.splitlines()) == 1 and err.startswith("error: "), (case, err)
        assert needle in err, (case, err)
        assert _tree_digest(setup["out"]) == before, case


def test_bad_input_in_a_fresh_process_has_no_traceback(setup):
    done = _cli_process("query", f"--index={setup['tmp']}/nowhere", setup["dataset"].query_paths[0])
    assert done.returncode == 1
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and "nowhere" in lines[-1]
    assert "Traceback" not in done.stderr


def test_diffusion_query_needs_the_offline_stage(setup, tiny_zoo, tmp_path):
    ds = setup["dataset"]
    index = Index.build(
        str(tmp_path / "plain"),
        dataset="oxford5k",
        data_root=os.path.join(setup["tmp"], "data"),
        checkpoint=os.path.join(setup["tmp"], "ckpt", "tiny_a.h5"),
        size=48,
        pca_dim=0,
        dba=2,
    )
    assert index.database.shape == (len(ds.db_paths), 32)  # no PCA: the raw 32-d, L2
    with pytest.raises(QueryError, match="no offline diffusion matrix"):
        index.query(ds.query_paths[:1], k=3, diffusion=True)
    with pytest.raises(IndexFileError, match="manifest.json is missing"):
        Index.load(str(tmp_path))


def test_exports_and_picture(setup, tiny_zoo, tmp_path, capsys):
    ds = setup["dataset"]
    out = str(tmp_path / "export")
    picture = str(tmp_path / "top.png")
    code = _cli("query", f"--index={setup['out']}", "--export=npy", f"--out={out}", "--k=3",
                f"--picture={picture}", *ds.query_paths[:2])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and "rank" in text and "score" in text
    index = Index.load(setup["out"])
    np.testing.assert_array_equal(np.load(f"{out}/database.npy"), index.database)
    ranks = np.load(f"{out}/ranks.npy")
    queries = np.load(f"{out}/queries.npy")
    assert ranks.shape == (len(index), 2)
    expect = np.argsort(-(queries @ index.database.T), axis=1, kind="stable").T
    np.testing.assert_array_equal(ranks[:5], expect[:5])
    with open(f"{out}/database_paths.txt") as f:
        assert f.read().splitlines() == index.paths
    from PIL import Image

    with Image.open(picture) as im:
        assert im.width > 4 * 160 and im.height > 2 * 160
    faiss = pytest.importorskip("faiss")
    assert _cli("query", f"--index={setup['out']}", "--export=faiss", f"--out={out}", "--k=3",
                ds.query_paths[0]) == 0  # fmt: skip
    flat = faiss.read_index(f"{out}/database.faiss")
    scores, ids = flat.search(queries[:1], 3)
    np.testing.assert_array_equal(ids[0], ranks[:3, 0])


def test_multiscale_index_equals_the_experiment_hook(setup, tiny_zoo, tmp_path):
    """``--scales`` in the index and ``config.extraction.scales`` in the experiment agree."""
    tmp = setup["tmp"]
    index = Index.build(
        str(tmp_path / "ms"),
        dataset="oxford5k",
        data_root=os.path.join(tmp, "data"),
        checkpoint=os.path.join(tmp, "ckpt", "tiny_a.h5"),
        size=48,
        pca_dim=16,
        bn="none",
        scales="ms",
    )
    config = make_config(str(tmp_path), "oxford5k", **{"bn.mode": "none"})
    config.data.root = os.path.join(tmp, "data")
    config.checkpoint_dir = os.path.join(tmp, "ckpt")
    config.model_zoo.tiny_a.file = "tiny_a.h5"
    config.extraction.scales = (1.0, 2**-0.5, 0.5)
    raw = experiment.describe(config, "tiny_a", setup["dataset"])
    np.testing.assert_allclose(np.linalg.norm(raw.database, axis=1), 1.0, atol=1e-5)
    db, _ = evaluation.postprocess(raw.database, raw.queries, dim=16)
    np.testing.assert_array_equal(index.database, np.asarray(db))
