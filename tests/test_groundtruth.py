"""Tests for jretrieval.datasets.groundtruth on small files written here.

The pickles follow the cirtorch/revisitop layout (dict of ``imlist``, ``qimlist`` and ``gnd``
with numpy index arrays) and are written with every pickle protocol 2..5, since each spells
numpy arrays with different globals. The .mat file mimics ``gnd_instre.mat`` of Iscen et al.
(cell arrays of names, a struct array ``gnd`` with 1-based ``ok`` and ``bbx``).
"""

import os
import pickle

import numpy as np
import pytest

from jretrieval.datasets import groundtruth as gt

IMLIST = [f"all_souls_{i:06d}" for i in range(8)]
QIMLIST = ["all_souls_000001", "all_souls_000005"]


def _revisited():
    return {
        "imlist": list(IMLIST),
        "qimlist": list(QIMLIST),
        "gnd": [
            {
                "bbx": [136.5, 34.1, 648.5, 955.7],
                "easy": np.array([1, 4], dtype=np.int64),
                "hard": np.array([7]),
                "junk": np.array([2, 3]),
            },
            {
                "bbx": np.array([10.0, 20.0, 30.0, 40.0]),
                "easy": np.array([], dtype=np.int64),
                "hard": np.array([5, 6], dtype=np.int32),
                "junk": np.array([], dtype=np.int64),
            },
        ],
    }


def _classic():
    return {
        "imlist": list(IMLIST),
        "qimlist": list(QIMLIST),
        "gnd": [
            {"bbx": (1, 2, 3, 4), "ok": np.array([1, 2]), "junk": np.array([0])},
            {"bbx": [5.5, 6.5, 70.0, 80.0], "ok": [5], "junk": []},
        ],
    }


def _write(tmp_path, obj, protocol=4, name="gnd.pkl"):
    path = tmp_path / name
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_load_revisited_pickle(tmp_path, protocol):
    g = gt.load_gnd(_write(tmp_path, _revisited(), protocol))
    assert isinstance(g, gt.GroundTruth)
    assert g.imlist == IMLIST and g.qimlist == QIMLIST
    assert g.gnd[0]["bbx"] == (136.5, 34.1, 648.5, 955.7)
    assert g.gnd[1]["bbx"] == (10.0, 20.0, 30.0, 40.0)
    np.testing.assert_array_equal(g.gnd[0]["easy"], [1, 4])
    np.testing.assert_array_equal(g.gnd[0]["junk"], [2, 3])
    np.testing.assert_array_equal(g.gnd[1]["hard"], [5, 6])
    for entry in g.gnd:
        for key in ("easy", "hard", "junk"):
            assert entry[key].dtype == np.int64 and entry[key].ndim == 1
        assert "ok" not in entry


@pytest.mark.parametrize("protocol", [2, 5])
def test_load_classic_pickle(tmp_path, protocol):
    g = gt.load_gnd(_write(tmp_path, _classic(), protocol))
    np.testing.assert_array_equal(g.gnd[0]["ok"], [1, 2])
    np.testing.assert_array_equal(g.gnd[1]["ok"], [5])
    assert g.gnd[1]["junk"].dtype == np.int64 and g.gnd[1]["junk"].size == 0
    assert g.gnd[0]["bbx"] == (1.0, 2.0, 3.0, 4.0)


def test_numpy_scalars_and_sets_allowed(tmp_path):
    data = _classic()
    data["gnd"][0]["ok"] = [np.int64(1), np.int32(2)]
    data["extra"] = {np.float32(1.5), "x"}
    data["gnd"][0]["bbx"] = [np.float64(1), np.float32(2), 3, 4]
    g = gt.load_gnd(_write(tmp_path, data, protocol=2))
    np.testing.assert_array_equal(g.gnd[0]["ok"], [1, 2])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    for protocol in (2, 4, 5):
        data = _classic()
        data["gnd"][1]["junk"] = [_Evil(marker)]  # hidden deep inside
        path = _write(tmp_path, data, protocol)
        with pytest.raises(gt.UnsafePickleError, match=r"refusing to unpickle .*system from"):
            gt.load_gnd(path)
        with pytest.raises(ValueError, match=str(path)):  # also a ValueError, naming the file
            gt.load_gnd(path)
    assert not marker.exists()
    # Sanity check that the payload is live: plain pickle.load would have run it.
    pickle.loads(pickle.dumps(_Evil(marker)))
    assert marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        (eval, ("1",)),
        (getattr, ("abc", "upper")),
        (np.load, ("x.npy",)),
        (pickle.loads, (b"",)),
    ],
)
def test_other_globals_refused(tmp_path, payload):
    class R:
        def __reduce__(self):
            return payload

    path = _write(tmp_path, {"imlist": [], "qimlist": [], "gnd": [R()]})
    with pytest.raises(gt.UnsafePickleError, match="refusing to unpickle"):
        gt.load_gnd(path)


def test_object_array_of_evil_refused(tmp_path):
    marker = tmp_path / "pwned2"
    arr = np.empty(1, dtype=object)
    arr[0] = _Evil(marker)
    data = _classic()
    data["gnd"][0]["ok"] = arr
    with pytest.raises(gt.UnsafePickleError):
        gt.load_gnd(_write(tmp_path, data))
    assert not marker.exists()


def _mutated(fn):
    data = _revisited()
    fn(data)
    return data


@pytest.mark.parametrize(
    "data,match",
    [
        ([1, 2], "expected a dict with imlist"),
        (_mutated(lambda d: d.pop("qimlist")), "missing key 'qimlist'"),
        (_mutated(lambda d: d["gnd"].pop()), "'gnd' has 1 entries but 'qimlist' has 2"),
        (_mutated(lambda d: d["gnd"][1].pop("hard")), r"gnd\[1\] has no 'hard'"),
        (_mutated(lambda d: d["gnd"][1].update(easy=[8])), r"gnd\[1\]\['easy'\].*index 8"),
        (_mutated(lambda d: d["gnd"][0].update(junk=[-1])), r"gnd\[0\]\['junk'\].*index -1"),
        (_mutated(lambda d: d["gnd"][0].update(junk=[1.5])), r"gnd\[0\]\['junk'\].*integral"),
        (_mutated(lambda d: d["gnd"][0].update(junk=["a"])), r"gnd\[0\]\['junk'\].*dtype"),
        (_mutated(lambda d: d["gnd"][1].update(bbx=[1, 2, 3])), r"gnd\[1\]\['bbx'\].*4 numbers"),
        (_mutated(lambda d: d["gnd"][1].update(bbx=[5, 2, 3, 4])), r"gnd\[1\]\['bbx'\].*x1 < x2"),
        (_mutated(lambda d: d["imlist"].__setitem__(3, 7)), r"imlist\[3\] is int"),
        (_mutated(lambda d: d.__setitem__("gnd", {"a": 1})), "'gnd' must be a list"),
        (_mutated(lambda d: d["gnd"].__setitem__(1, {"ok": [1]})), r"gnd\[1\] is classic"),
        # issue 9: duplicate and overlapping indices (a positive counted twice, or also junk)
        (_mutated(lambda d: d["gnd"][0].update(easy=[1, 4, 1])), r"\['easy'\].*index 1 2 times"),
        (_mutated(lambda d: d["gnd"][0].update(junk=[2, 7])), r"gnd\[0\].*7 in both 'hard'"),
        (_mutated(lambda d: d["gnd"][1].update(easy=[6])), r"gnd\[1\].*6 in both 'easy'.*'hard'"),
    ],
)
def test_schema_errors(tmp_path, data, match):
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=match) as info:
        gt.load_gnd(path)
    assert str(path) in str(info.value)


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        gt.load_gnd(tmp_path / "nope.pkl")
    bad = tmp_path / "trunc.pkl"
    bad.write_bytes(pickle.dumps(_classic(), protocol=4)[:50])
    with pytest.raises(ValueError, match="not a readable ground-truth pickle"):
        gt.load_gnd(bad)


# --- INSTRE ----------------------------------------------------------------------------------
INSTRE_DB = [f"INSTRE-S1/01a_canada_book/{i:03d}.jpg" for i in range(6)]
INSTRE_Q = ["INSTRE-S1/01a_canada_book/100.jpg", "INSTRE-S2/02_toy/007.jpg"]


def _write_instre_mat(path, *, ok_lists=((1, 2, 3), (6,)), fields=("ok", "bbx")):
    sio = pytest.importorskip("scipy.io")
    imlist = np.empty((1, len(INSTRE_DB)), dtype=object)
    imlist[0, :] = INSTRE_DB
    qimlist = np.empty((1, len(INSTRE_Q)), dtype=object)
    qimlist[0, :] = INSTRE_Q
    gnd = np.empty((1, len(INSTRE_Q)), dtype=[(f, object) for f in fields])
    for i, ok in enumerate(ok_lists):
        if "ok" in fields:
            gnd[0, i]["ok"] = np.array([ok], dtype=np.float64)  # MATLAB doubles, 1-based
        gnd[0, i]["bbx"] = np.array([[10.0 + i, 20.0, 110.0, 220.0]])
    sio.savemat(path, {"imlist": imlist, "qimlist": qimlist, "gnd": gnd})


def test_load_instre_mat(tmp_path):
    path = tmp_path / "gnd_instre.mat"
    _write_instre_mat(path)
    g = gt.load_instre(path)
    assert g.imlist == INSTRE_DB and g.qimlist == INSTRE_Q
    np.testing.assert_array_equal(g.gnd[0]["ok"], [0, 1, 2])  # 1-based -> 0-based
    np.testing.assert_array_equal(g.gnd[1]["ok"], [5])
    assert g.gnd[0]["ok"].dtype == np.int64 and g.gnd[0]["junk"].size == 0
    assert g.gnd[1]["bbx"] == (11.0, 20.0, 110.0, 220.0)


def test_load_instre_mat_errors(tmp_path):
    path = tmp_path / "repeated.mat"
    _write_instre_mat(path, ok_lists=((1, 2, 2), (6,)))
    with pytest.raises(ValueError, match=r"gnd\[0\]\['ok'\] lists 1-based index 2 2 times"):
        gt.load_instre(path)
    path = tmp_path / "zero_based.mat"
    _write_instre_mat(path, ok_lists=((0, 1), (2,)))  # a 0 cannot be a MATLAB index
    with pytest.raises(ValueError, match=r"gnd\[0\]\['ok'\] holds 1-based index 0"):
        gt.load_instre(path)
    path = tmp_path / "nook.mat"
    _write_instre_mat(path, fields=("bbx",))
    with pytest.raises(ValueError, match="no field 'ok'"):
        gt.load_instre(path)


def test_load_instre_pickle(tmp_path):
    g = gt.load_instre(_write(tmp_path, _classic(), name="gnd_instre.pkl"))
    np.testing.assert_array_equal(g.gnd[0]["ok"], [1, 2])


def test_load_instre_without_scipy(tmp_path, monkeypatch):
    path = tmp_path / "gnd_instre.mat"
    _write_instre_mat(path)
    import builtins

    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError("No module named 'scipy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    with pytest.raises(ImportError, match="needs scipy: pip install scipy"):
        gt.load_instre(path)


# --- distractors and folders -----------------------------------------------------------------
def test_load_distractors(tmp_path):
    path = tmp_path / "revisitop1m.txt"
    path.write_text("0/00/a.jpg\n0/00/b.jpg\r\n\n1/x.png\n")
    assert gt.load_distractors(path) == ["0/00/a.jpg", "0/00/b.jpg", "1/x.png"]
    path.write_text("ok.jpg\n../etc/passwd\n")
    with pytest.raises(ValueError, match=r"revisitop1m.txt:2: '../etc/passwd'"):
        gt.load_distractors(path)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no image names"):
        gt.load_distractors(path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        gt.load_distractors(tmp_path / "missing.txt")


def test_list_images(tmp_path):
    for rel in ["b.jpg", "a/z.PNG", "a/y.jpeg", "a/notes.txt", ".hidden/x.jpg", "a/.x.jpg"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    (tmp_path / "c" / "d").mkdir(parents=True)
    (tmp_path / "c" / "d" / "e.webp").write_bytes(b"")
    assert gt.list_images(tmp_path) == ["a/y.jpeg", "a/z.PNG", "b.jpg", "c/d/e.webp"]
    assert gt.list_images(tmp_path / "c" / "d") == ["e.webp"]
    (tmp_path / "empty").mkdir()
    assert gt.list_images(tmp_path / "empty") == []
    with pytest.raises(FileNotFoundError, match="nowhere"):
        gt.list_images(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError, match="b.jpg"):
        gt.list_images(tmp_path / "b.jpg")


def test_loaded_gnd_feeds_metrics(tmp_path):
    # The loader's output is what metrics.evaluate consumes.
    from jretrieval import metrics

    g = gt.load_gnd(_write(tmp_path, _revisited()))
    ranks = np.tile(np.arange(len(IMLIST)), (2, 1))
    out = metrics.evaluate(ranks, g.gnd, "revisited")
    # Query 0, ranking 0..7: E ok {1, 4}, junk {2, 3, 7} -> positions 1, 4 - 2 = 2: AP =
    # (0 + 1/2)/4 + (1/2 + 2/3)/4 = 5/12; query 1 has no easy image and is excluded.
    np.testing.assert_allclose(out["E/mAP"], 500 / 12, rtol=1e-15)


def test_numpy1_module_names_accepted(tmp_path):
    # Pickles written by NumPy 1.x name numpy.core.multiarray (NumPy 2 writes numpy._core).
    blob = pickle.dumps(_revisited(), protocol=2)
    assert b"numpy._core.multiarray" in blob
    path = tmp_path / "np1.pkl"
    path.write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    g = gt.load_gnd(path)
    np.testing.assert_array_equal(g.gnd[1]["hard"], [5, 6])
