"""The offline demo dataset: layout, ground truth, determinism, reuse, and its chance level.

``chance_map``'s closed form is checked against ``jretrieval.metrics.compute_map`` averaged
over every permutation of small databases (exact, to 1e-12) and against hand-computed cases.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from jretrieval import metrics
from jretrieval.datasets import demo
from jretrieval.datasets.groundtruth import load_gnd

SMALL = dict(
    instances=("astronaut", "coffee", "motorcycle"),
    distractors=("brick", "text"),
    n_views=3,
    n_junk=1,
    n_distractor_views=2,
    max_side=96,
)


def _files(folder: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if name != demo.INFO_FILE:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, folder)] = f.read()
    return out


def test_small_build_layout_and_ground_truth(tmp_path):
    folder = demo.build_demo_dataset(tmp_path, seed=3, **SMALL)
    assert folder == os.path.join(str(tmp_path), "demo")
    gt = load_gnd(os.path.join(folder, "gnd_demo.pkl"))
    assert gt.qimlist == ["query_astronaut", "query_coffee", "query_motorcycle"]
    # 3 instances x (3 views + 1 junk) + 2 distractors x 2 views
    assert len(gt.imlist) == 3 * 4 + 2 * 2 == len(set(gt.imlist))
    jpg = os.path.join(folder, "jpg")
    assert sorted(os.listdir(jpg)) == sorted(f"{n}.jpg" for n in gt.imlist + gt.qimlist)
    for inst, entry in zip(("astronaut", "coffee", "motorcycle"), gt.gnd, strict=True):
        assert sorted(gt.imlist[i] for i in entry["ok"]) == [f"{inst}_v0{j}" for j in (1, 2, 3)]
        assert [gt.imlist[i] for i in entry["junk"]] == [f"{inst}_junk01"]
        with Image.open(os.path.join(jpg, f"query_{inst}.jpg")) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= 96
            x1, y1, x2, y2 = entry["bbx"]
            assert 0 <= x1 < x2 <= im.width and 0 <= y1 < y2 <= im.height
            # the box covers 60-90% of each side (rounded to whole pixels)
            assert 0.6 * im.width - 1 <= x2 - x1 <= 0.9 * im.width + 1
    info = demo.read_demo_info(folder)
    assert info["n_queries"] == 3 and info["n_database"] == 16 and info["n_distractors"] == 4
    assert info["chance_map"] == pytest.approx(demo.chance_map(gt.gnd, len(gt.imlist)))
    # the motorcycle's views alternate between the two stereo photographs
    assert info["sources"]["motorcycle"] == [
        ["skimage", "data/motorcycle_left.png"],
        ["skimage", "data/motorcycle_right.png"],
    ]


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path):
    a = demo.build_demo_dataset(tmp_path / "a", seed=1, **SMALL)
    b = demo.build_demo_dataset(tmp_path / "b", seed=1, **SMALL)
    c = demo.build_demo_dataset(tmp_path / "c", seed=2, **SMALL)
    files_a, files_b, files_c = _files(a), _files(b), _files(c)
    assert files_a == files_b  # byte-identical JPEGs and pickle
    differ = [k for k in files_a if k.endswith(".jpg") and files_a[k] != files_c.get(k)]
    assert len(differ) == len([k for k in files_a if k.endswith(".jpg")])


def test_reuses_a_complete_build_and_rebuilds_on_new_parameters(tmp_path):
    folder = demo.build_demo_dataset(tmp_path, **SMALL)
    gnd_path = os.path.join(folder, "gnd_demo.pkl")
    stamp = os.stat(gnd_path).st_mtime_ns
    os.utime(gnd_path, ns=(stamp - 10**9, stamp - 10**9))
    assert demo.build_demo_dataset(tmp_path, **SMALL) == folder
    assert os.stat(gnd_path).st_mtime_ns == stamp - 10**9  # untouched

    # a missing image makes the build incomplete: it is rebuilt
    os.remove(os.path.join(folder, "jpg", "coffee_v02.jpg"))
    assert demo.read_demo_info(folder) is None
    demo.build_demo_dataset(tmp_path, **SMALL)
    assert os.path.isfile(os.path.join(folder, "jpg", "coffee_v02.jpg"))

    # other parameters replace the old build (no stale images left behind)
    demo.build_demo_dataset(tmp_path, **{**SMALL, "n_views": 2})
    names = os.listdir(os.path.join(folder, "jpg"))
    assert "coffee_v03.jpg" not in names and "coffee_v02.jpg" in names
    with open(os.path.join(folder, demo.INFO_FILE)) as f:
        assert json.load(f)["params"]["n_views"] == 2
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temp folders


def test_default_set_size_and_chance(tmp_path):
    folder = demo.build_demo_dataset(tmp_path)
    info = demo.read_demo_info(folder)
    assert (info["n_queries"], info["n_database"], info["n_distractors"]) == (12, 104, 32)
    gt = load_gnd(os.path.join(folder, "gnd_demo.pkl"))
    # every query: 5 positives, 1 junk among 104 -> M = 103 ranked images
    m, n = 103, 5
    h = sum(1 / i for i in range(1, m + 1))
    expected = 100 * ((h + (n - 1) / (m - 1) * (m - h)) / m + n / m) / 2
    assert info["chance_map"] == pytest.approx(expected, rel=1e-12)
    assert demo.chance_map(gt.gnd, len(gt.imlist)) == pytest.approx(expected, rel=1e-12)
    assert 6.5 < expected < 7.0


def test_refuses_a_foreign_folder_and_bad_arguments(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "demo")
    (tmp_path / "demo" / "mine.txt").write_text("not a demo build")
    with pytest.raises(FileExistsError, match="not a demo dataset build"):
        demo.build_demo_dataset(tmp_path, **SMALL)
    with pytest.raises(ValueError, match="instances"):
        demo.build_demo_dataset(tmp_path / "x", instances=("astronaut", "unicorn"))
    with pytest.raises(ValueError, match="distractors"):
        demo.build_demo_dataset(tmp_path / "x", distractors=("nope",))
    with pytest.raises(ValueError, match="n_views"):
        demo.build_demo_dataset(tmp_path / "x", n_views=0)
    with pytest.raises(ValueError, match="max_side"):
        demo.build_demo_dataset(tmp_path / "x", max_side=10)

    real = demo.importlib.util.find_spec
    monkeypatch.setattr(
        demo.importlib.util, "find_spec", lambda n: None if n == "skimage" else real(n)
    )
    with pytest.raises(ImportError, match="pip install scikit-image"):
        demo.build_demo_dataset(tmp_path / "y", **SMALL)
    assert not os.path.exists(tmp_path / "y" / "demo")  # nothing half-written


def _mean_ap_over_permutations(n_db: int, ok: list[int], junk: list[int]) -> float:
    ranks = np.array(list(itertools.permutations(range(n_db))), dtype=np.int64)
    gnd = [{"ok": np.array(ok), "junk": np.array(junk, dtype=np.int64)}] * len(ranks)
    _, aps, _, _ = metrics.compute_map(ranks, gnd)
    return 100 * float(np.mean(aps))


@pytest.mark.parametrize(
    "n_db, ok, junk",
    [
        (2, [0], []),
        (5, [1], []),
        (6, [0, 3], []),
        (6, [2, 4, 5], [1]),
        (7, [6], [0, 1]),
        (7, [0, 1, 2, 3, 4, 5, 6], []),
    ],
)
def test_chance_map_equals_exhaustive_average(n_db, ok, junk):
    expected = _mean_ap_over_permutations(n_db, ok, junk)
    got = demo.chance_map([{"ok": ok, "junk": junk}], n_db)
    assert got == pytest.approx(expected, abs=1e-12)


def test_chance_map_hand_cases_and_errors():
    # one positive among two: rank 1 gives AP 1, rank 2 gives (0 + 1/2)/2 = 1/4 -> 62.5%
    assert demo.chance_map([{"ok": [1]}], 2) == pytest.approx(62.5)
    # queries without positives are skipped; the others averaged
    both = demo.chance_map([{"ok": [1]}, {"ok": [], "junk": [0]}], 2)
    assert both == pytest.approx(62.5)
    assert demo.chance_map([{"ok": [0], "junk": [1]}], 2) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="outside"):
        demo.chance_map([{"ok": [2]}], 2)
    with pytest.raises(ValueError, match="'ok'"):
        demo.chance_map([{"easy": [0]}], 2)
    with pytest.raises(ValueError, match="no query has positives"):
        demo.chance_map([{"ok": []}], 3)


def test_pickle_holds_only_plain_types(tmp_path):
    """The gnd pickle is readable by revisitop-style code (lists, dicts, int64 arrays)."""
    folder = demo.build_demo_dataset(tmp_path, **SMALL)
    with open(os.path.join(folder, "gnd_demo.pkl"), "rb") as f:
        raw = pickle.load(f)  # our own file, just written
    assert set(raw) == {"imlist", "qimlist", "gnd"}
    assert all(isinstance(n, str) for n in raw["imlist"] + raw["qimlist"])
    assert raw["gnd"][0]["ok"].dtype == np.int64 and isinstance(raw["gnd"][0]["bbx"], list)
