"""Tests for jretrieval.datasets: layouts, distractors, folders, missing-data messages.

Each test writes a tiny dataset in the cirtorch / revisitop layout (``<root>/<name>/jpg/*.jpg``
and ``gnd_<name>.pkl``) and checks the paths, boxes and ground truth that come back.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from jretrieval.datasets import MAX_LISTED, images, load_dataset, require_ground_truth

IMLIST = ["all_souls_000001", "all_souls_000002", "ashmolean_000000", "balliol_000003"]
QIMLIST = ["all_souls_000013", "ashmolean_000007"]


def _jpg(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 6), (10, 20, 30)).save(path)


def _revisited(root, name="roxford5k", images=True, skip=(), box=(0, 0, 4, 4)):
    base = root / name
    gnd = [
        {
            "bbx": np.array([1.0, 2.0, 7.5, 5.0]),
            "easy": np.array([0]),
            "hard": [1],
            "junk": np.array([], np.int64),
        },
        {"bbx": box, "easy": [2, 3], "hard": [], "junk": [0]},
    ]
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": IMLIST, "qimlist": QIMLIST, "gnd": gnd}, f)
    if images:
        for n in IMLIST + QIMLIST:
            if n not in skip:
                _jpg(str(base / "jpg" / f"{n}.jpg"))
    return base


def test_revisited_layout(tmp_path):
    base = _revisited(tmp_path)
    ds = load_dataset("roxford5k", tmp_path)
    assert ds.name == "roxford5k" and ds.protocol == "revisited" and ds.n_distractors == 0
    assert ds.db_paths == [str(base / "jpg" / f"{n}.jpg") for n in IMLIST]
    assert ds.query_paths == [str(base / "jpg" / f"{n}.jpg") for n in QIMLIST]
    assert ds.query_bbx == [(1.0, 2.0, 7.5, 5.0), (0.0, 0.0, 4.0, 4.0)]
    np.testing.assert_array_equal(ds.gnd[1]["easy"], [2, 3])
    np.testing.assert_array_equal(ds.gnd[1]["junk"], [0])
    assert load_dataset("roxford5k", tmp_path, crop_queries=False).query_bbx is None


def test_classic_layout_and_shared_images(tmp_path):
    base = tmp_path / "oxford5k"
    base.mkdir()
    gnd = [{"bbx": [1, 1, 5, 5], "ok": [0, 2], "junk": [1]}, {"bbx": [0, 0, 3, 3], "ok": [3]}]
    with open(base / "gnd_oxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": IMLIST, "qimlist": QIMLIST, "gnd": gnd}, f)
    for n in IMLIST + QIMLIST:
        _jpg(str(base / "jpg" / f"{n}.jpg"))
    ds = load_dataset("oxford5k", tmp_path)
    assert ds.protocol == "classic" and len(ds.db_paths) == 4 and len(ds.gnd) == 2
    # roxford5k's pickle beside oxford5k's images (the same photographs) is found too
    _revisited(tmp_path, images=False)
    rds = load_dataset("roxford5k", tmp_path)
    assert rds.db_paths == ds.db_paths


def test_missing_dataset_names_place_and_command(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("rparis6k", tmp_path)
    msg = str(err.value)
    assert "bin/download_datasets.sh rparis6k" in msg
    assert str(tmp_path / "rparis6k" / "gnd_rparis6k.pkl") in msg
    assert str(tmp_path / "rparis6k" / "jpg") in msg
    with pytest.raises(FileNotFoundError, match=r"download_datasets.sh instre"):
        load_dataset("instre", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'oxford105k'"):
        load_dataset("oxford105k", tmp_path)


def test_missing_images_are_listed(tmp_path):
    skip = [IMLIST[1], QIMLIST[0]]
    _revisited(tmp_path, skip=skip)
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("roxford5k", tmp_path)
    msg = str(err.value)
    assert "2 of the 6 images" in msg
    for n in skip:
        assert f"{n}.jpg" in msg
    assert "ashmolean_000000.jpg" not in msg
    assert (
        load_dataset("roxford5k", tmp_path, check_files=False)
        .db_paths[1]
        .endswith(skip[0] + ".jpg")
    )


def test_many_missing_images_are_counted(tmp_path):
    _revisited(tmp_path, images=False)
    (tmp_path / "roxford5k" / "jpg").mkdir()
    names = [f"im{i:03d}" for i in range(25)]
    with open(tmp_path / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": names, "qimlist": [], "gnd": []}, f)
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("roxford5k", tmp_path)
    msg = str(err.value)
    assert "25 of the 25 images" in msg and f"and {25 - MAX_LISTED} more" in msg
    assert "im009.jpg" in msg and "im010.jpg" not in msg


def test_distractors_are_appended(tmp_path):
    _revisited(tmp_path)
    r1m = tmp_path / "revisitop1m"
    names = ["a/1.jpg", "a/2.jpg", "b/3.jpg"]
    for n in names:
        _jpg(str(r1m / "jpg" / n))
    (r1m / "revisitop1m.txt").write_text("\n".join(names) + "\n")
    ds = load_dataset("roxford5k", tmp_path, distractors=True)
    assert len(ds.db_paths) == 7 and ds.n_distractors == 3
    assert ds.db_paths[4:] == [str(r1m / "jpg" / n) for n in names]
    assert ds.db_paths[:4] == load_dataset("roxford5k", tmp_path).db_paths  # gnd stays valid
    ds = load_dataset("roxford5k", tmp_path, distractors=True, max_distractors=2)
    assert ds.n_distractors == 2 and len(ds.db_paths) == 6
    only = load_dataset("revisitop1m", tmp_path)
    assert only.query_paths == [] and only.protocol is None and len(only.db_paths) == 3
    os.remove(r1m / "jpg" / "b" / "3.jpg")
    with pytest.raises(FileNotFoundError, match=r"(?s)1 of the 3 distractor images.*b/3.jpg"):
        load_dataset("roxford5k", tmp_path, distractors=True)
    _revisited(tmp_path / "no_r1m")
    with pytest.raises(FileNotFoundError, match="download_datasets.sh revisitop1m"):
        load_dataset("roxford5k", tmp_path / "no_r1m", distractors=True)


def test_instre_pickle_layout(tmp_path):
    base = tmp_path / "instre"
    imlist = ["INSTRE-S1/01a/001.jpg", "INSTRE-S1/01a/002.jpg", "INSTRE-M/01/003.jpg"]
    qimlist = ["INSTRE-S1/01a/000.jpg"]
    for n in imlist + qimlist:
        _jpg(str(base / n))
    gnd = [{"ok": [0, 1], "bbx": [0, 0, 5, 5]}]
    with open(base / "gnd_instre.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    ds = load_dataset("instre", tmp_path)
    assert ds.protocol == "instre"
    assert ds.db_paths == [str(base / n) for n in imlist]  # names keep their own extension
    assert ds.query_bbx == [(0.0, 0.0, 5.0, 5.0)]


def test_folder(tmp_path):
    for n in ["b.jpg", "a.png", "sub/c.JPG", "notes.txt"]:
        if n.endswith("txt"):
            (tmp_path / n).write_text("x")
        else:
            _jpg(str(tmp_path / n))
    ds = load_dataset("folder", tmp_path)
    assert ds.db_paths == [str(tmp_path / n) for n in ["a.png", "b.jpg", "sub/c.JPG"]]
    assert ds.query_paths == [] and ds.gnd == [] and ds.protocol is None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        load_dataset("folder", empty)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_dataset("folder", tmp_path / "nope")


def test_demo_dataset_loads_in_the_classic_layout(tmp_path):
    pytest.importorskip("skimage")  # the demo's photographs ship inside scikit-image
    from jretrieval.datasets.demo import INSTANCES, build_demo_dataset

    with pytest.raises(FileNotFoundError, match="build_demo_dataset"):
        load_dataset("demo", tmp_path)
    names = list(INSTANCES)[:2]
    build_demo_dataset(tmp_path, instances=names, distractors=[], n_views=2, max_side=64)
    ds = load_dataset("demo", tmp_path)
    assert ds.protocol == "classic" and len(ds.query_paths) == 2 and len(ds.query_bbx) == 2
    assert all(p.startswith(str(tmp_path / "demo" / "jpg")) for p in ds.db_paths)
    assert all(len(g["ok"]) == 2 for g in ds.gnd)


def test_query_box_outside_its_image_names_the_query(tmp_path):
    """issue 9 item 4: a box outside the image made the query a black image, silently."""
    _revisited(tmp_path, box=(100, 100, 200, 200))  # the query images are 8x6
    with pytest.raises(images.InvalidBoxError) as info:
        load_dataset("roxford5k", tmp_path)
    message = str(info.value)
    for part in (
        "'roxford5k'",
        "query 1",
        "ashmolean_000007.jpg",
        "(100.0, 100.0, 200.0, 200.0)",
        "8x6",
        "gnd[1]",
    ):
        assert part in message
    assert load_dataset("roxford5k", tmp_path, crop_queries=False).query_bbx is None
    # a box partly outside is clipped, not refused
    _revisited(tmp_path, box=(-5, -5, 1e9, 1e9))
    assert load_dataset("roxford5k", tmp_path).query_bbx[1] == (-5.0, -5.0, 1e9, 1e9)


def test_database_only_dataset_named_when_evaluated(tmp_path):
    _jpg(str(tmp_path / "a.jpg"))
    ds = load_dataset("folder", tmp_path)
    with pytest.raises(ValueError, match=r"dataset 'folder' \(root .*\) is database-only"):
        require_ground_truth(ds)
    _revisited(tmp_path)
    require_ground_truth(load_dataset("roxford5k", tmp_path))  # no error
