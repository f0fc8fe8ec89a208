"""Unit tests of jretrieval.store's file protocol on hand-made rows (no encoder, no images).

The extraction-level behaviour (resume bit for bit, reuse, stale keys, corrupt images) is in
``tests/test_extract.py``; two processes, kills and write failures in ``tests/test_concurrency.py``.
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from jretrieval import files
from jretrieval import store as store_lib

KEY = {"model": "m", "n": 3}


def _rows(n: int, dim: int) -> np.ndarray:
    return np.arange(n * dim, dtype=np.float32).reshape(n, dim) / 7


def _write(path: str, n: int = 100, dim: int = 64, key=KEY) -> np.ndarray:
    rows = _rows(n, dim)
    with files.writer_lock(path):
        f = store_lib.open_for_writing(path, ids=[f"i{k}" for k in range(n)], dim=dim, settings=key)
        for start in range(0, n, 16):
            idx = np.arange(start, min(n, start + 16))
            store_lib.mark_batch(f, idx, rows[idx])
        store_lib.finalize(f, path)
    return rows


def test_partial_space_is_allocated_when_created(tmp_path):
    path = str(tmp_path / "s.h5")
    n, dim = 200, 64
    ids = [f"i{k}" for k in range(n)]
    f = store_lib.open_for_writing(path, ids=ids, dim=dim, settings=KEY)
    size = os.path.getsize(f.filename)
    assert size > n * dim * 4  # every row's space is there before any row is written
    rows = _rows(n, dim)
    for start in range(0, n, 32):
        idx = np.arange(start, min(n, start + 32))
        store_lib.mark_batch(f, idx, rows[idx], failed=[(int(idx[0]), "x")] if start == 0 else ())
        assert os.path.getsize(f.filename) == size  # writes never grow the file
    f.close()
    f = store_lib.open_for_writing(path, ids=ids, dim=dim, settings=KEY)  # resumes it
    assert np.asarray(f["done"][...]).all()
    store_lib.finalize(f, path)
    desc, got_ids, info = store_lib.read_store(path, settings=KEY)
    np.testing.assert_array_equal(desc, rows[1:])
    assert got_ids == ids[1:] and info["failed"] == {0: "x"}


def test_corrupt_and_incomplete_finals_are_moved_aside_only_under_the_lock(tmp_path):
    path = str(tmp_path / "s.h5")
    rows = _write(path)
    got = store_lib.reuse(path, settings=KEY, locked=False)
    np.testing.assert_array_equal(got[0], rows)
    with pytest.raises(store_lib.StoreMismatchError, match="n: stored 3, requested 4"):
        store_lib.reuse(path, settings={**KEY, "n": 4}, locked=False)
    with h5py.File(path, "r+") as f:  # the state issue 9 found: incomplete under the final name
        f.attrs["complete"] = False
    with pytest.raises(store_lib.StoreCorruptError, match="incomplete"):
        store_lib.read_store(path)
    assert store_lib.reuse(path, settings=KEY, locked=False) is None
    assert os.path.exists(path)  # without the lock: left alone
    assert store_lib.reuse(path, settings=KEY, locked=True) is None
    assert not os.path.exists(path)
    _write(path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
    with pytest.raises(store_lib.StoreCorruptError, match=f"{path} cannot be read"):
        store_lib.read_store(path)
    assert store_lib.reuse(path, settings=KEY, locked=True) is None
    aside = sorted(n for n in os.listdir(tmp_path) if ".corrupt-" in n)
    assert len(aside) == 2 and all(n.startswith("s.h5.corrupt-") for n in aside)


def test_partial_for_other_settings_is_moved_aside_and_restarted(tmp_path):
    path = str(tmp_path / "s.h5")
    ids = ["a", "b"]
    f = store_lib.open_for_writing(path, ids=ids, dim=4, settings=KEY)
    store_lib.mark_batch(f, np.asarray([0]), _rows(1, 4))
    f.close()
    f = store_lib.open_for_writing(path, ids=ids, dim=4, settings={"other": 1})
    assert not np.asarray(f["done"][...]).any()
    f.close()
    assert [n for n in os.listdir(tmp_path) if n.startswith("s.h5.partial.corrupt-")]


def test_write_error_names_the_file_and_modes_follow_the_umask(tmp_path):
    err = store_lib.StoreWriteError("/x/s.h5.partial", OSError(27, "File too large"))
    assert isinstance(err, OSError) and err.errno == 27 and err.path == "/x/s.h5.partial"
    assert str(err).startswith("could not write descriptor store /x/s.h5.partial: ")
    old = os.umask(0o027)
    try:
        path = str(tmp_path / "s.h5")
        _write(path, n=4, dim=2)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["s.h5"]  # no lock, partial or temporary left
