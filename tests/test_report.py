"""Report: paper-shaped tables from hand-made results, JSON/CSV round trips, PNG pictures.

Expected tables are literal strings written from the rules in ``jretrieval.tables``'
docstring (values to 2 decimals; best per column in Tables 1/2, ensembles ranked apart from
single models, the upper bound not ranked; best per row in Table 3). Published figures are
those of ``jretrieval.paper``, typed again here where a test compares with them.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image

from jretrieval import metrics, paper, pictures, report, results_files, tables
from jretrieval.results import Results

TABLE1 = {
    "dataset": "toy",
    "protocol": "classic",
    "models": {
        "a": {"G": {"mAP": 50.0}, "G+AQE": {"mAP": 61.234}},
        "b": {"G": {"mAP": 52.5}, "G+AQE": {"mAP": 61.2345}},  # ties with a at 2 decimals
        "a+b": {"G": {"mAP": 40.0}, "G+AQE": {"mAP": 41.0}},  # lone ensemble: not bold
        "apgem": {"G": {"mAP": 90.0}},  # upper bound: never bold; G+AQE missing
    },
    "labels": {"a": "Model A", "b": "Model B", "a+b": "A+B", "apgem": "GeM (AP)"},
    "notes": ["toy note"],
}


def test_table1_markdown_and_console():
    md = tables.format_markdown(TABLE1)
    expected = "\n".join(
        [
            "## Table 1: toy, mAP (%)",
            "",
            "| Method | G | G+AQE |",
            "| :-- | --: | --: |",
            "| Model A | 50.00 | **61.23** |",
            "| Model B | **52.50** | **61.23** |",
            "| A+B | 40.00 | 41.00 |",
            "| GeM (AP) | 90.00 | - |",
            "",
            "Best per column in bold.",
        ]
    )
    assert expected in md
    assert md.startswith("# toy: retrieval results\n\n> toy note\n")
    console = tables.format_table(TABLE1)
    assert console == "\n".join(
        [
            "Table 1: toy, mAP (%)",
            "Method        G   G+AQE",
            "Model A   50.00   61.23*",
            "Model B   52.50*  61.23*",
            "A+B       40.00   41.00",
            "GeM (AP)  90.00       -",
            "",
            "toy note",
        ]
    )


def test_table1_column_order_follows_results_columns_and_paper_reference():
    results = {
        "dataset": "oxford5k",
        "protocol": "classic",
        "columns": ["G+DFS", "G"],
        "models": {"baseline": {"G": {"mAP": 1.0}, "G+DFS": {"mAP": 2.0}}},
    }
    [ours, ref] = tables.tables(results)
    assert ours.header == ["Method", "G+DFS", "G"]
    assert ours.rows == [("baseline", "baseline", [2.0, 1.0])]
    assert ref.reference and "as published in the paper" in ref.title
    assert ref.rows == [("baseline", "baseline", [74.29, 55.12])]  # paper Table 1, Oxford5k
    assert len(tables.tables(results, paper_tables=False)) == 1
    assert len(tables.tables({**results, "dataset": "demo"})) == 1  # nothing published


def test_table2_revisited_layout():
    figures = {
        f"{s}/{m}": 10.0 * i + j
        for i, s in enumerate("EMH")
        for j, m in enumerate(("mAP", "mP@1", "mP@5", "mP@10"))
    }
    results = {
        "dataset": "roxford5k",
        "protocol": "revisited",
        "models": {"mocov2": {"G": figures}, "simclr2x": {"G": {k: 0.5 for k in figures}}},
    }
    [ours, ref] = tables.tables(results)
    assert ours.layout == "table2"
    assert ours.header == ["Method", *paper.TABLE2_METRICS]
    assert ours.header[1:4] == ["E/mAP", "E/mP@5", "E/mP@10"]
    assert ours.rows[0][2] == [0.0, 2.0, 3.0, 10.0, 12.0, 13.0, 20.0, 22.0, 23.0]
    assert ours.bold[0] == [False] + [True] * 8  # 0.0 < 0.5 in the first column
    assert ref.rows[0] == (
        "mocov2",
        "mocov2",
        [52.69, 72.33, 65.86, 36.49, 67.24, 59.24, 10.72, 23.38, 18.67],
    )
    md = tables.format_markdown(results)
    assert "| mocov2 | 0.00 | **2.00** | **3.00** | **10.00** |" in md


def test_table3_sweep_sorted_with_true_dim_last_and_bold_per_row():
    results = {
        "dataset": "toy",
        "protocol": "classic",
        "columns": ["512", "True dim.", "32", "2048"],
        "models": {
            "a": {"512": {"mAP": 5.0}, "True dim.": {"mAP": 9.0}, "32": {"mAP": 1.0}},
            "b": {"512": {"mAP": 7.0}, "True dim.": {"mAP": 3.0}, "2048": {"mAP": 7.001}},
        },
    }
    [table] = tables.tables(results)
    assert table.layout == "table3"
    assert table.header == ["Method", "32", "512", "2048", "True dim."]
    assert table.rows[0][2] == [1.0, 5.0, None, 9.0]
    assert table.bold == [[False, False, False, True], [False, True, True, False]]
    md = tables.format_markdown(results)
    assert "| b | - | **7.00** | **7.00** | 3.00 |" in md and "Best per row in bold." in md
    # "<column> @ <dim>" keys: one Table 3 per ranking column; "none" is the no-PCA column
    multi = {
        "dataset": "oxford5k",
        "protocol": "classic",
        "models": {"baseline": {"G @ 64": {"mAP": 1.0}, "G @ none": {"mAP": 2.0}}},
    }
    ours, ref = tables.tables(multi)
    assert ours.title == "Table 3: oxford5k, G, mAP (%) by PCA-whitening dimension"
    assert ours.header == ["Method", "64", "True dim."]
    assert ref.rows == [("baseline", "baseline", [54.61, 58.47])]  # paper Table 3


def test_bad_results_are_named():
    with pytest.raises(ValueError, match="'models'"):
        tables.tables({"dataset": "x"})
    with pytest.raises(ValueError, match=r"\['a'\]\['G'\]\['mAP'\]"):
        tables.tables({"dataset": "x", "models": {"a": {"G": {"mAP": "high"}}}})
    with pytest.raises(ValueError, match="metric"):
        tables.tables({"dataset": "x", "models": {"a": {"G": 3.0}}})
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        Results.from_dict({"dataset": "x", "models": {}, "bogus": 1})
    with pytest.raises(ValueError, match="not a results.json"):
        path = os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")
        results_files.read_results(path)


def test_write_report_round_trips_json_and_csv(tmp_path):
    results = {
        "dataset": "toy",
        "protocol": "classic",
        "models": {
            "a": {"G": {"mAP": np.float32(12.345678)}, "G+AQE": {"mAP": float("nan")}},
            "b+c": {"G": {"mAP": 1 / 3}},
        },
        "settings": {"whitening": {"dim": 512}, "dims": (32, None)},
    }
    paths = report.write(results, tmp_path / "out")
    assert set(paths) == {"json", "csv", "markdown"}  # no sweep, no plot
    back = results_files.read_csv(paths["csv"])
    assert back == {
        "dataset": "toy",
        "models": {
            "a": {"G": {"mAP": float(np.float32(12.345678))}, "G+AQE": {"mAP": None}},
            "b+c": {"G": {"mAP": 1 / 3}},  # exact: values are written with repr
        },
    }
    with open(paths["csv"]) as f:
        assert f.readline() == "dataset,model,column,metric,value\n"
    saved = results_files.read_json(paths["json"])
    assert saved["models"]["a"]["G+AQE"]["mAP"] is None  # NaN -> null (strict JSON)
    assert saved["models"]["b+c"]["G"]["mAP"] == 1 / 3
    assert saved["settings"] == {"whitening": {"dim": 512}, "dims": [32, None]}
    with open(paths["markdown"]) as f:
        assert "| b+c | 0.33 | - |" in f.read()  # a lone ensemble is not bold
    assert sorted(os.listdir(tmp_path / "out")) == ["results.csv", "results.json", "table.md"]


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = str(tmp_path / "results.json")
    results_files.write_atomic(path, lambda f: f.write("old"))

    def broken(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        results_files.write_atomic(path, broken)
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["results.json"]


def _sweep():
    dims = ["32", "64", "128", "none"]
    return {
        "dataset": "toy",
        "protocol": "classic",
        "models": {
            m: {d: {"mAP": 10.0 * k + i} for i, d in enumerate(dims)} for k, m in enumerate("ab")
        },
    }


def test_dimension_sweep_plot_is_a_png_of_the_requested_size(tmp_path):
    paths = report.write(_sweep(), tmp_path)
    with Image.open(paths["plot"]) as im:
        assert im.format == "PNG" and im.size == (640, 400)
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10  # something was drawn
    small = pictures.plot_dimension_sweep(_sweep(), tmp_path / "s.png", size=(320, 240))
    with Image.open(small) as im:
        assert im.size == (320, 240)
    with pytest.raises(ValueError, match="no Table 3 sweep"):
        pictures.plot_dimension_sweep(TABLE1, tmp_path / "x.png")


def test_dimension_sweep_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        pictures.plot_dimension_sweep(_sweep(), tmp_path / "x.png")
    paths = report.write(_sweep(), tmp_path)  # plot=None: warns, writes the rest
    assert "plot" not in paths and os.path.isfile(paths["markdown"])
    with pytest.raises(ImportError):
        report.write(_sweep(), tmp_path, plot=True)


COLOURS = [(250, 200, 0), (0, 200, 250), (120, 0, 200), (255, 128, 128), (30, 30, 30)]


def _images(folder, n):
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"im{i}.jpg")
        Image.new("RGB", (60 + 10 * i, 40), COLOURS[i % len(COLOURS)]).save(path, quality=95)
        paths.append(path)
    return paths


def test_top_results_picture_marks_positives_negatives_and_junk(tmp_path):
    db = _images(tmp_path, 5)
    queries = db[:2]
    ranks = np.array([[0, 3, 1], [2, 1, 0]])
    gnd = [
        {"ok": np.array([0, 1]), "junk": np.array([3])},
        {"ok": np.array([2, 0]), "junk": np.array([], np.int64)},
    ]
    labels = metrics.label_results(ranks, gnd, "classic")
    assert labels == [["positive", "junk", "positive"], ["positive", "negative", "positive"]]
    paths = [[db[j] for j in row] for row in ranks]
    out = pictures.plot_top_results(
        queries, paths, labels, tmp_path / "top.png", aps=[87.5, None], bbx=[(2, 2, 15, 15), None]
    )
    # width 2*8 + 4 cells of 136 + 16 (after the query) + 2*4; height 2*8 + legend 22 +
    # 2 * (title 16 + cell 136 + captions 26) + 4
    assert pictures.top_results_size(2, 3, 128) == (584, 398)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (584, 398)
        px = np.asarray(im.convert("RGB"))
    frames = [
        [pictures.QUERY, pictures.POSITIVE, pictures.JUNK, pictures.POSITIVE],
        [pictures.QUERY, pictures.POSITIVE, pictures.NEGATIVE, pictures.POSITIVE],
    ]
    for i, row in enumerate(frames):
        for t, colour in enumerate(row):
            x, y = pictures.cell_origin(i, t, 128)
            assert tuple(px[y + 1, x + 1]) == colour, (i, t)
            image_index = i if t == 0 else ranks[i, t - 1]
            centre = px[y + 4 + 64, x + 4 + 64].astype(int)
            assert np.abs(centre - COLOURS[image_index]).max() <= 8, (i, t)
            # text (rank, file name) under each frame: dark pixels in the caption band
            caption = px[y + 136 + 1 : y + 136 + 26, x : x + 136]
            assert (caption.min(axis=2) < 100).any(), (i, t)
        x, y = pictures.cell_origin(i, 0, 128)
        title = px[y - 16 : y, x : x + 300]  # the query's title line (name and AP)
        assert (title.min(axis=2) < 100).any()
    legend = px[8:30, 8:20]
    assert (np.abs(legend.astype(int) - pictures.QUERY).max(axis=2) == 0).any()
    with pytest.raises(ValueError, match="labels"):
        pictures.plot_top_results(queries, paths, [["maybe"] * 3] * 2, tmp_path / "x.png")
    with pytest.raises(ValueError, match="result_paths must be 2 lists of 3"):
        pictures.plot_top_results(queries, [paths[0]], labels, tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        pictures.plot_top_results(["nope.jpg"], paths[:1], labels[:1], tmp_path / "x.png")


def test_write_draws_the_examples_and_summary_compares_with_the_paper(tmp_path):
    db = _images(tmp_path, 5)
    results = Results(
        dataset="oxford5k",
        protocol="classic",
        models={"baseline": {"G": {"mAP": 55.0}, "G+AQE": {"mAP": 70.0}}},
        labels={"baseline": "Baseline"},
        chance={"metric": "mAP", "value": 1.5},
        examples={
            "baseline": {
                "column": "G",
                "queries": [1],
                "query_paths": [db[1]],
                "bbx": None,
                "ap": [50.0],
                "ranks": [[2, 0]],
                "paths": [[db[2], db[0]]],
                "labels": [["negative", "positive"]],
            }
        },
    )
    paths = report.write(results, tmp_path / "out")
    with Image.open(paths["top10/baseline"]) as im:
        assert im.size == pictures.top_results_size(1, 2, 128)
    assert results_files.read_results(paths["json"]) == results
    assert report.summary(results) == "\n".join(
        [
            "Table 1: oxford5k, mAP (%)",
            "Method        G   G+AQE",
            "Baseline  55.00   70.00",
            "  paper   55.12   67.85",
            "  diff    -0.12   +2.15",
            f"paper: {paper.CITATION}; diff: ours minus the paper's.",
            "",
            "Chance level (expected mAP of a random ranking): 1.50%",
        ]
    )


def test_instre_note_replaces_the_comparison_of_its_doubtful_column():
    results = {
        "dataset": "instre",
        "protocol": "instre",
        "models": {"baseline": {"G+DBA": {"mAP": 60.0}, "G+DBA+DFS": {"mAP": 70.0}}},
    }
    console = tables.format_table(results)
    assert "  paper   63.96       16.41" in console
    assert "  diff    -3.96           †" in console  # no difference for the noted column
    note = paper.PUBLISHED_NOTES[("table1", "instre", "G+DBA+DFS")]
    assert f"† G+DBA+DFS: {note}" in console
    md = tables.format_markdown(results)
    assert "| Method | G+DBA | G+DBA+DFS† |" in md and f"† G+DBA+DFS: {note}" in md
    # Paris6k's Baseline row, once missing, is now compared
    paris = {**results, "dataset": "paris6k", "protocol": "classic"}
    assert "  paper   64.71       90.17" in tables.format_table(paris)


def test_result_files_get_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        paths = report.write(TABLE1, tmp_path / "out")
    finally:
        os.umask(old)
    for path in paths.values():
        assert os.stat(path).st_mode & 0o777 == 0o640, path
