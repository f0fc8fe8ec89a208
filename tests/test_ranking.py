"""Table 1's columns against plain NumPy (float64) compositions of search, AQE and DBA.

The references here are written from the definitions (issue 2): AQE ``q' = L2(q + sum of the
k nearest database vectors)``, DBA ``d_i' = L2(d_i + sum of its k nearest other database
vectors)``, search = argsort of ``-q @ db.T``. Rankings are compared through the reference
scores (the reference similarity of the item at each rank equals the sorted reference
similarities, atol 1e-5: float32 vs float64 may swap items whose scores differ by less), and
the DFS columns against ``jretrieval.diffusion.rank`` called directly on the expanded inputs.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from jretrieval import diffusion, expansion, ranking

DIFF = {"truncation": 40, "kd": 8, "kq": 5, "gamma": 3.0, "alpha": 0.99, "mode": "joint"}


def _cfg(**ranking_kw) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.ranking = ml_collections.ConfigDict(
        {
            "columns": ranking.COLUMN_NAMES,
            "aqe_k": 10,
            "dba_k": 20,
            "combined_aqe_k": 1,
            "combined_dba_k": 20,
            "aqe_alpha": 0.0,
            "dba_alpha": 0.0,
            **ranking_kw,
        }
    )
    cfg.diffusion = ml_collections.ConfigDict(DIFF)
    return cfg


def _l2(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _knn(a, b, k, exclude_self=False):
    s = a @ b.T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def np_aqe(q, db, k):
    if k == 0:
        return _l2(q)
    return _l2(q + db[_knn(q, db, k)].sum(1))


def np_dba(db, k):
    if k == 0:
        return _l2(db)
    return _l2(db + db[_knn(db, db, k, exclude_self=True)].sum(1))


def stages(name):
    """``(dba, aqe, dfs)`` read from a column's name ("G+DBA+AQE": global search, then DBA and
    AQE), independently of ``ranking.SPECS``, the table under test."""
    parts = name.split("+")
    assert parts[0] == "G" and set(parts[1:]) <= {"AQE", "DBA", "DFS"}, name
    return "DBA" in parts, "AQE" in parts, "DFS" in parts


def np_reference(name, q, db, cfg):
    """(queries, database) the column searches with, from the NumPy definitions: DBA first
    (on the database), then AQE against the database as it then is (Gordo et al. 2017)."""
    r = cfg.ranking
    dba, aqe, _ = stages(name)
    both = dba and aqe
    if dba:
        db = np_dba(db, r.combined_dba_k if both else r.dba_k)
    if aqe:
        q = np_aqe(q, db, r.combined_aqe_k if both else r.aqe_k)
    return q, db


def _data(seed, q=6, n=50, d=12):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, d))
    db = centres[rng.integers(0, 5, n)] + 0.6 * rng.normal(size=(n, d))
    qs = centres[rng.integers(0, 5, q)] + 0.6 * rng.normal(size=(q, d))
    return _l2(qs), _l2(db)


def _assert_same_ranking(ranks, scores):
    ranks = np.asarray(ranks)
    qn, n = scores.shape
    assert ranks.shape == (qn, n)
    assert (np.sort(ranks, axis=1) == np.arange(n)).all(), "rows are not permutations"
    got = np.take_along_axis(scores, ranks, axis=1)
    np.testing.assert_allclose(got, -np.sort(-scores, axis=1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", [n for n in ranking.COLUMN_NAMES if "DFS" not in n])
def test_search_columns_match_numpy(name, seed):
    q, db = _data(seed)
    cfg = _cfg()
    ranks = ranking.COLUMNS[name](q.astype(np.float32), db.astype(np.float32), cfg)
    rq, rdb = np_reference(name, q, db, cfg)
    _assert_same_ranking(ranks, rq @ rdb.T)


@pytest.mark.parametrize("name", [n for n in ranking.COLUMN_NAMES if "DFS" in n])
def test_diffusion_columns_are_diffusion_of_expanded_inputs(name):
    q, db = _data(3)
    q32, db32 = q.astype(np.float32), db.astype(np.float32)
    cfg = _cfg()
    ranks = np.asarray(ranking.COLUMNS[name](q32, db32, cfg))
    # The library's expansions are the NumPy definitions (to 1e-5)...
    (dba, aqe, _), r = stages(name), cfg.ranking
    both = dba and aqe
    eq, edb = q32, db32
    if dba:
        edb = expansion.dba(db32, k=r.combined_dba_k if both else r.dba_k)
    if aqe:
        eq = expansion.aqe(q32, edb, k=r.combined_aqe_k if both else r.aqe_k)
    rq, rdb = np_reference(name, q, db, cfg)
    np.testing.assert_allclose(np.asarray(eq), rq, atol=1e-5)
    np.testing.assert_allclose(np.asarray(edb), rdb, atol=1e-5)
    # ... and the column is diffusion over exactly those inputs.
    expected = np.asarray(diffusion.rank(eq, edb, **DIFF))
    np.testing.assert_array_equal(ranks, expected)


def test_rank_columns_equals_each_column_alone():
    q, db = _data(4)
    cfg = _cfg(aqe_k=3, dba_k=4, combined_aqe_k=2, combined_dba_k=5)
    together = ranking.rank_columns(q, db, cfg)
    assert list(together) == list(ranking.COLUMN_NAMES)
    for name in ranking.COLUMN_NAMES:
        np.testing.assert_array_equal(
            np.asarray(together[name]), np.asarray(ranking.rank_column(name, q, db, cfg))
        )
    # Non-default neighbour counts are honoured (vs the NumPy reference).
    rq, rdb = np_reference("G+DBA+AQE", q, db, cfg)
    _assert_same_ranking(together["G+DBA+AQE"], rq @ rdb.T)


def test_hand_made_aqe_changes_the_order():
    """2-D unit vectors at angles: q at 50 deg; database at 0, 30 and 85 deg.

    G: similarities cos 50, cos 20, cos 35 -> order [1, 2, 0]. AQE with k=1 adds d1 (30 deg):
    q' at 40 deg, similarities cos 40, cos 10, cos 45 -> order [1, 0, 2].
    """
    ang = np.deg2rad
    q = np.array([[np.cos(ang(50)), np.sin(ang(50))]], np.float32)
    db = np.array([[np.cos(ang(a)), np.sin(ang(a))] for a in (0, 30, 85)], np.float32)
    cfg = _cfg(aqe_k=1)
    np.testing.assert_array_equal(np.asarray(ranking.COLUMNS["G"](q, db, cfg)), [[1, 2, 0]])
    np.testing.assert_array_equal(np.asarray(ranking.COLUMNS["G+AQE"](q, db, cfg)), [[1, 0, 2]])


def test_every_column_name_reads_as_its_stages():
    # the table under test agrees with what each name says
    for name in ranking.COLUMN_NAMES:
        assert tuple(ranking.SPECS[name]) == stages(name), name
    assert len(set(map(stages, ranking.COLUMN_NAMES))) == 8


@pytest.mark.parametrize("block_size", [None, 7])
def test_columns_with_any_block_size_and_a_one_device_mesh(block_size):
    # A one-device mesh runs as one device (the full ranking's host sort is faster than a
    # sharded top-k); the four-device mesh is tests/test_distributed.py's.
    import jax

    from jretrieval import mesh as mesh_lib

    q, db = _data(7)
    cfg = _cfg(block_size=block_size)
    names = [n for n in ranking.COLUMN_NAMES if "DFS" not in n]
    plain = ranking.rank_columns(q, db, cfg, names)
    meshed = ranking.rank_columns(q, db, cfg, names, mesh=mesh_lib.make_mesh(jax.devices()[:1]))
    for name in names:
        np.testing.assert_array_equal(np.asarray(meshed[name]), np.asarray(plain[name]))
        rq, rdb = np_reference(name, q, db, cfg)
        _assert_same_ranking(plain[name], rq @ rdb.T)


def test_paper_parameters_are_the_defaults():
    p = ranking.params_from_config(_cfg())
    assert (p.aqe_k, p.dba_k, p.combined_aqe_k, p.combined_dba_k) == (10, 20, 1, 20)
    assert ranking.RankingParams().diffusion == {
        "truncation": 1000,
        "kd": 50,
        "kq": 10,
        "gamma": 3.0,
        "alpha": 0.99,
        "mode": "joint",
        "solver": "auto",
    }


def test_unknown_column_lists_the_valid_ones():
    q, db = _data(5)
    with pytest.raises(ValueError, match=r"G\+AQE\+DFS"):
        ranking.rank_column("G+QE", q, db, _cfg())
    with pytest.raises(ValueError, match="unknown ranking column"):
        ranking.rank_columns(q, db, _cfg(), ["G", "DFS"])
    assert ranking.check_columns("G, G+DBA") == ("G", "G+DBA")


def test_bad_config_values_raise():
    q, db = _data(6)
    with pytest.raises(ValueError, match="aqe_k"):
        ranking.rank_columns(q, db, _cfg(aqe_k=-1), ["G+AQE"])
    cfg = _cfg()
    cfg.diffusion.tol = 1e-3
    with pytest.raises(ValueError, match="tol"):
        ranking.rank_columns(q, db, cfg, ["G+DFS"])
    with pytest.raises(ValueError, match="diffusion"):
        ranking.rank_columns(q, db, {"ranking": {}}, ["G"])


@pytest.mark.parametrize(("key", "value"), [("mode", "both"), ("solver", "scipy")])
def test_bad_diffusion_choice_is_refused_before_any_work(key, value):
    cfg = {"ranking": {}, "diffusion": {key: value}}
    with pytest.raises(ValueError, match=rf"diffusion.{key}='{value}'; expected one of"):
        ranking.params_from_config(cfg)
