"""Tests for jretrieval.metrics against revisitop's algorithm and hand-computed cases.

The reference below restates revisitop ``python/evaluate.py`` (``compute_ap``/``compute_map``)
loop for loop, with ``np.isin`` for the ``np.in1d`` that NumPy 2 removed, on revisitop's
``[N, Q]`` layout. The implementation performs the same float64 operations in the same order,
so results are compared for exact equality (tolerance 0).
"""

import numpy as np
import pytest

from jretrieval import metrics


def ref_compute_ap(ranks, nres):
    ap = 0
    recall_step = 1.0 / nres
    for j in np.arange(len(ranks)):
        rank = ranks[j]
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def ref_compute_map(ranks, gnd, kappas=()):
    """revisitop compute_map; ``ranks`` is [N, Q] as in revisitop."""
    mean_ap = 0.0
    nq = len(gnd)
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    prs = np.zeros((nq, len(kappas)))
    nempty = 0
    for i in np.arange(nq):
        qgnd = np.asarray(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue
        qgndj = np.asarray(gnd[i]["junk"]) if "junk" in gnd[i] else np.empty(0)
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = 0
        ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = ref_compute_ap(pos, len(qgnd))
        mean_ap = mean_ap + ap
        aps[i] = ap
        pos += 1
        for j in np.arange(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    mean_ap = mean_ap / (nq - nempty)
    pr = pr / (nq - nempty)
    return mean_ap, aps, pr, prs


# --- hand-computed toy ground truth --------------------------------------------------------
# Database of 10 images. Query 0: ok {2, 5}, junk {1}; query 1: ok {9, 0, 4}, no junk.
TOY_RANKS = np.array(
    [
        [2, 1, 7, 5, 0, 3, 4, 6, 8, 9],
        [3, 0, 6, 9, 1, 2, 5, 7, 8, 4],
    ]
)
TOY_GND = [{"ok": [2, 5], "junk": [1]}, {"ok": [9, 0, 4]}]
# Query 0: positives at 0-based positions 0 and 3; junk image 1 sits at position 1, before the
#   second positive, so after removing it the positives are at 0 and 2. nres = 2, step 1/2.
#   j=0, rank 0: p0 = 1, p1 = 1/1 = 1          -> (1 + 1) * 1/2 / 2     = 1/2
#   j=1, rank 2: p0 = 1/2, p1 = 2/3            -> (1/2 + 2/3) * 1/2 / 2 = 7/24
#   AP0 = 1/2 + 7/24 = 19/24.
#   1-based positions [1, 3]: P@1: kq = min(3, 1) = 1 -> 1/1 = 1;
#   P@5: kq = min(3, 5) = 3 -> #(pos <= 3) / 3 = 2/3 (revisitop's quirk: a plain P@5 is 2/5);
#   P@10: kq = 3 -> 2/3.
# Query 1: positives 0, 9, 4 at positions 1, 3, 9; nres = 3, step 1/3.
#   j=0, rank 1: p0 = 0/1 = 0, p1 = 1/2        -> (0 + 1/2) / 6     = 1/12
#   j=1, rank 3: p0 = 1/3, p1 = 2/4            -> (1/3 + 1/2) / 6   = 5/36
#   j=2, rank 9: p0 = 2/9, p1 = 3/10           -> (2/9 + 3/10) / 6  = 47/540
#   AP1 = 45/540 + 75/540 + 47/540 = 167/540.
#   1-based positions [2, 4, 10]: P@1: kq = 1 -> 0/1 = 0; P@5: kq = 5 -> 2/5; P@10: 3/10.
# mAP = (19/24 + 167/540) / 2 = (855 + 334) / 2160 = 1189/2160.
# mP@1 = (1 + 0)/2 = 1/2; mP@5 = (2/3 + 2/5)/2 = 8/15; mP@10 = (2/3 + 3/10)/2 = 29/60.
TOY_APS = [19 / 24, 167 / 540]
TOY_PRS = [[1, 2 / 3, 2 / 3], [0, 2 / 5, 3 / 10]]
TOY_MAP = 1189 / 2160
TOY_MPR = [1 / 2, 8 / 15, 29 / 60]


def test_toy_by_hand():
    m, aps, mpr, prs = metrics.compute_map(TOY_RANKS, TOY_GND)
    # Rational values computed in float64 along different paths: 1e-15 relative.
    np.testing.assert_allclose(m, TOY_MAP, rtol=1e-15)
    np.testing.assert_allclose(aps, TOY_APS, rtol=1e-15)
    np.testing.assert_allclose(mpr, TOY_MPR, rtol=1e-15)
    np.testing.assert_allclose(prs, TOY_PRS, rtol=1e-15)
    ref = ref_compute_map(TOY_RANKS.T, TOY_GND, [1, 5, 10])
    assert m == ref[0]
    np.testing.assert_array_equal(aps, ref[1])


def test_toy_evaluate_percent():
    out = metrics.evaluate(TOY_RANKS, TOY_GND, "classic")
    assert list(out) == ["mAP"]
    np.testing.assert_allclose(out["mAP"], 100 * TOY_MAP, rtol=1e-15)
    assert metrics.evaluate(TOY_RANKS, TOY_GND, "instre") == out


def test_empty_queries_are_excluded():
    # A third query without positives (its ranking is arbitrary): nan AP and P@k, and the means
    # stay those of the two other queries (revisitop's nempty).
    ranks = np.vstack([TOY_RANKS, np.arange(10)])
    gnd = [*TOY_GND, {"ok": [], "junk": [3]}]
    m, aps, mpr, prs = metrics.compute_map(ranks, gnd)
    assert np.isnan(aps[2]) and np.isnan(prs[2]).all()
    np.testing.assert_allclose(m, TOY_MAP, rtol=1e-15)
    np.testing.assert_allclose(mpr, TOY_MPR, rtol=1e-15)
    ref = ref_compute_map(ranks.T, gnd, [1, 5, 10])
    assert m == ref[0]
    np.testing.assert_array_equal(prs, ref[3])


def test_all_queries_empty_gives_nan():
    m, aps, mpr, _ = metrics.compute_map(TOY_RANKS, [{"ok": []}, {"ok": np.zeros(0)}])
    assert np.isnan(m) and np.isnan(aps).all() and np.isnan(mpr).all()


def test_perfect_and_worst_rankings():
    n = 20
    ok = [3, 7, 11]
    best = np.array([[3, 7, 11, *[i for i in range(n) if i not in ok]]])
    m, _, mpr, _ = metrics.compute_map(best, [{"ok": ok}])
    assert m == 1.0 and (mpr == 1.0).all()
    worst = best[:, ::-1]
    # positives at 0-based 17, 18, 19: sum_j (j/(17+j) + (j+1)/(18+j)) / 6
    expected = sum((j / (17 + j) + (j + 1) / (18 + j)) / 6 for j in range(3))
    m, _, _, _ = metrics.compute_map(worst, [{"ok": ok}])
    np.testing.assert_allclose(m, expected, rtol=1e-15)


def _random_case(rng, q, n, *, allow_empty=True):
    ranks = np.stack([rng.permutation(n) for _ in range(q)])
    gnd = []
    for i in range(q):
        perm = rng.permutation(n)
        n_ok = int(rng.integers(0 if allow_empty else 1, n + 1))
        n_junk = int(rng.integers(0, n - n_ok + 1))
        entry = {"ok": perm[:n_ok]}
        if i % 3:  # some entries without a junk key at all
            entry["junk"] = perm[n_ok : n_ok + n_junk]
        gnd.append(entry)
    if all(len(g["ok"]) == 0 for g in gnd):
        gnd[0]["ok"] = ranks[0, :1]
        gnd[0].pop("junk", None)
    return ranks, gnd


@pytest.mark.parametrize("q,n", [(1, 1), (1, 2), (3, 7), (5, 50), (13, 300), (4, 2000)])
@pytest.mark.parametrize("kappas", [(1, 5, 10), (), (2, 3, 1000)])
def test_random_matches_revisitop_exactly(q, n, kappas):
    rng = np.random.default_rng(1000 * q + n + len(kappas))
    for _ in range(5):
        ranks, gnd = _random_case(rng, q, n)
        got = metrics.compute_map(ranks, gnd, kappas)
        ref = ref_compute_map(ranks.T, gnd, list(kappas))
        assert got[0] == ref[0]
        for a, b in zip(got[1:], ref[1:], strict=True):
            np.testing.assert_array_equal(a, b)
        assert got[1].shape == (q,) and got[3].shape == (q, len(kappas))


def test_sparse_ground_truth_large_database_matches():
    # Few positives and junk in a large database (the Oxford/Paris regime).
    rng = np.random.default_rng(7)
    q, n = 6, 20000
    ranks = np.stack([rng.permutation(n) for _ in range(q)])
    gnd = []
    for _ in range(q):
        ids = rng.choice(n, 80, replace=False)
        gnd.append({"ok": ids[:50], "junk": ids[50:]})
    got = metrics.compute_map(ranks, gnd)
    ref = ref_compute_map(ranks.T, gnd, [1, 5, 10])
    assert got[0] == ref[0]
    np.testing.assert_array_equal(got[3], ref[3])


def test_truncated_ranking_with_num_database():
    # Top-K rankings: positives beyond K are never retrieved (recall step still 1/len(ok));
    # revisitop gives the same numbers on the truncated [K, Q] array.
    rng = np.random.default_rng(3)
    q, n, k = 8, 100, 30
    full = np.stack([rng.permutation(n) for _ in range(q)])
    top = full[:, :k]
    gnd = []
    for i in range(q):
        others = np.setdiff1d(np.arange(n), top[i, :1])
        extra = rng.choice(others, 10, replace=False)
        gnd.append({"ok": np.concatenate([top[i, :1], extra[:6]]), "junk": extra[6:]})
    got = metrics.compute_map(top, gnd, num_database=n)
    ref = ref_compute_map(top.T, gnd, [1, 5, 10])
    assert got[0] == ref[0]
    np.testing.assert_array_equal(got[3], ref[3])
    # A truncated ranking that retrieves no positive scores 0 (revisitop would crash on max([])).
    m, aps, mpr, _ = metrics.compute_map(np.array([[0, 1]]), [{"ok": [5]}], num_database=6)
    assert m == 0.0 and aps[0] == 0.0 and (mpr == 0).all()


def test_jax_and_int32_ranks_accepted():
    jnp = pytest.importorskip("jax.numpy")
    m, *_ = metrics.compute_map(jnp.asarray(TOY_RANKS, dtype=jnp.int32), TOY_GND)
    np.testing.assert_allclose(m, TOY_MAP, rtol=1e-15)


# --- revisited protocol ----------------------------------------------------------------------
REV_GND = [
    {"easy": np.array([0, 4]), "hard": np.array([7]), "junk": np.array([2]), "bbx": [0, 0, 1, 1]},
    {"easy": np.array([], dtype=np.int64), "hard": np.array([1, 8]), "junk": np.array([5, 6])},
    {"easy": np.array([3]), "hard": np.array([], dtype=np.int64), "junk": np.array([], int)},
]


def test_setups_easy_medium_hard():
    s = metrics.setups(REV_GND, "revisited")
    assert list(s) == ["E", "M", "H"]
    for i, g in enumerate(REV_GND):
        assert sorted(s["E"][i]["ok"]) == sorted(g["easy"])
        assert sorted(s["E"][i]["junk"]) == sorted([*g["junk"], *g["hard"]])
        assert sorted(s["M"][i]["ok"]) == sorted([*g["easy"], *g["hard"]])
        assert sorted(s["M"][i]["junk"]) == sorted(g["junk"])
        assert sorted(s["H"][i]["ok"]) == sorted(g["hard"])
        assert sorted(s["H"][i]["junk"]) == sorted([*g["junk"], *g["easy"]])
    classic = metrics.setups(TOY_GND, "classic")
    assert list(classic) == ["all"]
    assert classic["all"][1]["junk"].size == 0 and list(classic["all"][1]["ok"]) == [9, 0, 4]


def test_revisited_evaluate_matches_reference():
    rng = np.random.default_rng(11)
    ranks = np.stack([rng.permutation(10) for _ in range(3)])
    out = metrics.evaluate(ranks, REV_GND, "revisited")
    assert list(out) == list(metrics.PROTOCOLS["revisited"])
    # revisitop example_evaluate.py's setups, written out by hand.
    by_hand = {
        "E": [{"ok": g["easy"], "junk": np.concatenate([g["junk"], g["hard"]])} for g in REV_GND],
        "M": [{"ok": np.concatenate([g["easy"], g["hard"]]), "junk": g["junk"]} for g in REV_GND],
        "H": [{"ok": g["hard"], "junk": np.concatenate([g["junk"], g["easy"]])} for g in REV_GND],
    }
    for name, gnd_t in by_hand.items():
        m, _, mpr, _ = ref_compute_map(ranks.T, gnd_t, [1, 5, 10])
        assert out[f"{name}/mAP"] == 100.0 * m
        for k, p in zip((1, 5, 10), mpr, strict=True):
            assert out[f"{name}/mP@{k}"] == 100.0 * p
    # Query 1 has no easy image: excluded from E only; query 2 has no hard one: from H only.
    _, aps_e, _, _ = metrics.compute_map(ranks, by_hand["E"])
    _, aps_h, _, _ = metrics.compute_map(ranks, by_hand["H"])
    assert np.isnan(aps_e).tolist() == [False, True, False]
    assert np.isnan(aps_h).tolist() == [False, False, True]


def test_revisited_hand_case():
    # One query, database of 6: easy {0}, hard {3}, junk {1}; ranking [1, 3, 0, 2, 4, 5].
    # E: ok {0}, junk {1, 3} -> 0 at position 2, two junk before -> 0: AP 1, P@k 1.
    # M: ok {0, 3}, junk {1} -> positions 1, 2 minus 1 junk -> 0, 1: AP 1, P@k 1.
    # H: ok {3}, junk {1, 0} -> 3 at position 1, one junk before -> 0: AP 1.
    # Ranking [2, 3, 0, 1, 4, 5] instead: E: 0 at 2, junk 3 before -> 1: AP (0 + 1/2)/2 = 1/4,
    # P@1 = 0 (kq 1), P@5 = 1/2 (kq = min(2, 5) = 2). M: 3 at 1, 0 at 2 -> AP
    # (0 + 1/2)/4 + (1/2 + 2/3)/4 = 1/8 + 7/24 = 5/12. H: 3 at 1 -> AP 1/4.
    gnd = [{"easy": [0], "hard": [3], "junk": [1]}]
    out = metrics.evaluate(np.array([[1, 3, 0, 2, 4, 5]]), gnd, "revisited")
    assert all(v == 100.0 for v in out.values())
    out = metrics.evaluate(np.array([[2, 3, 0, 1, 4, 5]]), gnd, "revisited")
    np.testing.assert_allclose(
        [out["E/mAP"], out["E/mP@1"], out["E/mP@5"], out["M/mAP"], out["H/mAP"]],
        [25.0, 0.0, 50.0, 500 / 12, 25.0],
        rtol=1e-15,
    )


# --- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ranks,gnd,match",
    [
        (np.arange(10), TOY_GND, r"2-D \[Q, N\].*shape \(10,\)"),
        (np.zeros((2, 3, 4), int), TOY_GND, r"2-D.*\(2, 3, 4\)"),
        (TOY_RANKS.astype(float), TOY_GND, "integer"),
        (np.zeros((0, 10), int), [], "empty"),
        (TOY_RANKS, TOY_GND[:1], r"len\(gnd\) = 1 .* 2 queries"),
        (TOY_RANKS.T, TOY_GND, r"len\(gnd\) = 2 .* 10 queries"),
        (TOY_RANKS, [TOY_GND[0], {"junk": [1]}], r"gnd\[1\] has no 'ok'"),
        (TOY_RANKS, [TOY_GND[0], {"ok": [10]}], r"gnd\[1\]\['ok'\].*index 10 .*\[0, 10\)"),
        (TOY_RANKS, [TOY_GND[0], {"ok": [-1]}], r"gnd\[1\]\['ok'\].*-1"),
        (TOY_RANKS, [TOY_GND[0], {"ok": [1.5]}], r"gnd\[1\]\['ok'\].*non-integral"),
        (TOY_RANKS, [TOY_GND[0], {"ok": [1, 1]}], r"gnd\[1\]\['ok'\] repeats indices \[1\]"),
        (TOY_RANKS, [TOY_GND[0], {"ok": [1], "junk": [1]}], r"gnd\[1\].*both 'ok' and 'junk'"),
        (np.array([[0, 1, 2], [0, 1, 3]]), [{"ok": [1]}] * 2, r"ranks\[1, 2\] = 3 .*\[0, 3\)"),
        (np.array([[0, 1, 2], [0, 1, 1]]), [{"ok": [1]}] * 2, r"ranks\[1\] repeats .*\[1\]"),
        (np.array([[0, -1, 2]]), [{"ok": [1]}], r"ranks\[0, 1\] = -1"),
    ],
)
def test_bad_input_raises(ranks, gnd, match):
    with pytest.raises(ValueError, match=match):
        metrics.compute_map(ranks, gnd)


def test_bad_kappas_and_num_database():
    with pytest.raises(ValueError, match="kappas"):
        metrics.compute_map(TOY_RANKS, TOY_GND, (0, 5))
    with pytest.raises(ValueError, match="kappas"):
        metrics.compute_map(TOY_RANKS, TOY_GND, (1.5,))
    with pytest.raises(ValueError, match=r"num_database=5 .*\(2, 10\)"):
        metrics.compute_map(TOY_RANKS, TOY_GND, num_database=5)


def test_protocol_errors():
    with pytest.raises(ValueError, match="unknown protocol 'oxford'"):
        metrics.evaluate(TOY_RANKS, TOY_GND, "oxford")
    with pytest.raises(ValueError, match=r"gnd\[0\] has no 'easy'.*use protocol 'classic'"):
        metrics.evaluate(TOY_RANKS, TOY_GND, "revisited")
    with pytest.raises(ValueError, match=r"gnd\[1\] has no 'hard'"):
        metrics.setups([{"easy": [1], "hard": [2]}, {"easy": [3]}], "revisited")
    with pytest.raises(ValueError, match=r"gnd\[0\] has no 'ok'.*'revisited'"):
        metrics.evaluate(np.arange(10)[None].repeat(3, 0), REV_GND, "classic")
    # An image both easy and hard: refused, naming the query and the setup.
    bad = [{"easy": [1], "hard": [1], "junk": []}]
    with pytest.raises(ValueError, match=r"gnd\[0\].*both 'ok' and 'junk'.*setup 'E'"):
        metrics.evaluate(np.arange(10)[None], bad, "revisited")
    bad = [{"easy": [2, 2], "hard": [], "junk": []}]
    with pytest.raises(ValueError, match=r"gnd\[0\]\['ok'\] repeats .*\[2\].*setup 'E'"):
        metrics.evaluate(np.arange(10)[None], bad, "revisited")


def test_per_query_ap_hand_case_and_means():
    # query 0: positives {0, 2} at ranks 1 and 3 (junk 1 removed first: ranks 1, 2):
    #   AP = (1 + 1)/2 * 1/2 + (1/1 + 2/2)/2 * 1/2 = 1.0; query 1: positive 3 at rank 4 of 4:
    #   AP = (0 + 1/4)/2 = 0.125; query 2 has no positives: nan, left out of the mean.
    ranks = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [3, 2, 1, 0]])
    gnd = [{"ok": [0, 2], "junk": [1]}, {"ok": [3]}, {"ok": []}]
    figures, per_query = metrics.evaluate_queries(ranks, gnd, "classic")
    np.testing.assert_allclose(per_query["mAP"][:2], [100.0, 12.5])
    assert np.isnan(per_query["mAP"][2])
    assert figures["mAP"] == pytest.approx(56.25)
    assert set(metrics.per_query_ap(ranks, gnd, "instre")) == {"mAP"}
    # revisited: one AP list per setup, each averaging to its mAP
    rgnd = [{"easy": [0], "hard": [2], "junk": [1]}, {"easy": [3], "hard": [], "junk": []}]
    figures, per_query = metrics.evaluate_queries(ranks[:2], rgnd, "revisited")
    assert set(per_query) == {"E/mAP", "M/mAP", "H/mAP"}
    for key, aps in per_query.items():
        assert np.nanmean(aps) == pytest.approx(figures[key]), key
        _, ref, _, _ = metrics.compute_map(ranks[:2], metrics.setups(rgnd, "revisited")[key[0]])
        np.testing.assert_allclose(aps, 100 * ref)


def test_chance_level_uses_the_headline_setup_and_the_queries_given():
    gnd = [{"ok": [1]}, {"ok": [0, 2], "junk": [3]}]
    assert metrics.chance_level(gnd, "classic", 4) == ("mAP", metrics.chance_map(gnd, 4))
    # a skipped query is simply not passed: the level is that of the queries evaluated
    assert metrics.chance_level(gnd[1:], "classic", 4)[1] == pytest.approx(
        metrics.chance_map(gnd[1:], 4)
    )
    # one positive in 2: rank 1 (AP 1) or rank 2 (AP (0 + 1/2) / 2), each with probability 1/2
    assert metrics.chance_map([{"ok": [1]}], 2) == pytest.approx(62.5)
    rgnd = [{"easy": [0], "hard": [2], "junk": [1]}]
    metric, value = metrics.chance_level(rgnd, "revisited", 4)
    assert metric == "M/mAP"
    assert value == pytest.approx(metrics.chance_map([{"ok": [0, 2], "junk": [1]}], 4))


def test_label_results():
    ranks = np.array([[0, 1, 2], [2, 1, 0]])
    gnd = [{"easy": [0], "hard": [2], "junk": [1]}, {"easy": [], "hard": [1], "junk": [0]}]
    assert metrics.label_results(ranks, gnd, "revisited") == [
        ["positive", "junk", "positive"],
        ["negative", "positive", "junk"],
    ]
    with pytest.raises(ValueError, match="does not match 1 queries"):
        metrics.label_results(ranks, gnd[:1], "revisited")
