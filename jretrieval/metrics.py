"""Benchmark metrics: mAP and mP@k exactly as the revisitop protocol code computes them.

Shape convention: ``ranks`` is ``[Q, N]`` (row ``i``: database indices for query ``i``, best
first), the layout of ``jretrieval.search.rank``. revisitop's ``compute_map`` takes the
transpose, ``[N, Q]`` (database x queries); pass ``ranks.T`` of revisitop-style arrays.

``gnd`` is a list of ``Q`` dicts; ``compute_map`` reads ``ok`` (positives) and optional ``junk``
(images removed from the ranking, e.g. the query itself), both sequences of database indices.
The numbers follow revisitop ``python/evaluate.py`` (Radenovic et al., CVPR 2018) to the last
bit: the same float64 operations in the same order (sums are sequential, as in its loops).

* AP: trapezoids in the precision-recall plot over the ranked positives, after removing junk;
  positives missing from a (truncated) ranking contribute 0; recall step ``1/len(ok)``.
* Queries without positives are excluded: their AP and P@k are ``nan`` and the means run over
  the other queries (revisitop's ``nempty``). If no query has a positive the means are ``nan``
  (revisitop divides by zero) and a warning is logged.
* mP@k, with revisitop's quirk kept: over 1-based positions ``pos`` of the positives (junk
  removed), ``kq = min(max(pos), k)`` and ``P@k = #(pos <= kq) / kq``. So the denominator is the
  position of the last positive when that is smaller than ``k``: a query with one positive,
  ranked first, has P@10 = 1. (A positive-less truncated ranking gives P@k = 0.)

Where revisitop's result is an artefact of malformed ground truth, we refuse instead: an index
repeated in ``ok`` (revisitop counts it twice in the recall step, so a perfect ranking gets
AP < 1), an image both in ``ok`` and ``junk``, indices outside the database, and ranking rows
that repeat an index. Each error names the argument, the query and the shapes.

Protocols (``evaluate``): ``"classic"`` (Oxford5k/Paris6k: ``ok`` + ``junk``, mAP, as cirtorch's
``compute_map_and_print``), ``"revisited"`` (rOxford5k/rParis6k, Easy/Medium/Hard as revisitop
``example_evaluate.py``: E = ok easy, junk junk+hard; M = ok easy+hard, junk junk; H = ok hard,
junk junk+easy; mAP and mP@1/5/10 each) and ``"instre"`` (Iscen et al., CVPR 2017: the
``gnd_instre.mat`` positives, no junk since queries are not database images; mAP computed as
their ``compute_map.m``, which is the same formula). Figures are returned in percent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

__all__ = [
    "PROTOCOLS",
    "REVISITED_KAPPAS",
    "chance_level",
    "chance_map",
    "compute_map",
    "evaluate",
    "evaluate_queries",
    "headline_metric",
    "label_results",
    "per_query_ap",
    "setups",
]

#: mP@k cut-offs of the revisited protocol.
REVISITED_KAPPAS = (1, 5, 10)

#: protocol name -> the keys ``evaluate`` returns for it, in table order.
PROTOCOLS: dict[str, tuple[str, ...]] = {
    "classic": ("mAP",),
    "revisited": tuple(
        f"{s}/{m}" for s in "EMH" for m in ("mAP", *(f"mP@{k}" for k in REVISITED_KAPPAS))
    ),
    "instre": ("mAP",),
}

_Setup = list[tuple[np.ndarray, np.ndarray]]  # per query: (ok, junk) int64 index arrays


def _check_ranks(ranks: Any, num_database: int | None) -> tuple[np.ndarray, int]:
    """Validates ``ranks`` ``[Q, K]``; returns it as int64 and the database size."""
    arr = np.asarray(ranks)
    if arr.ndim != 2:
        raise ValueError(
            f"ranks must be 2-D [Q, N] (queries x database positions, the transpose of "
            f"revisitop's layout); got shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ranks must hold integer database indices; got dtype {arr.dtype}")
    q, k = arr.shape
    if q == 0 or k == 0:
        raise ValueError(f"ranks is empty: shape {arr.shape}; expected [Q, N] with Q, N >= 1")
    if num_database is None:
        n_db = k
    else:
        n_db = int(num_database)
        if n_db < k:
            raise ValueError(
                f"num_database={n_db} is smaller than the ranking length (ranks shape {arr.shape})"
            )
    return arr.astype(np.int64, copy=False), n_db


def _check_range(arr: np.ndarray, n_db: int) -> None:
    bad = (arr < 0) | (arr >= n_db)
    if bad.any():
        qi, pi = np.argwhere(bad)[0]
        raise ValueError(
            f"ranks[{qi}, {pi}] = {arr[qi, pi]} is outside the database [0, {n_db}) "
            f"(ranks shape {arr.shape}; pass num_database= for truncated rankings)"
        )


def _index_array(value: Any, *, query: int, key: str, n_db: int) -> np.ndarray:
    """A ground-truth index list as a 1-D int64 array, range-checked."""
    a = np.asarray(value)
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.dtype == bool or not (
        np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
    ):
        raise ValueError(f"gnd[{query}][{key!r}] must hold integer indices; got dtype {a.dtype}")
    a = a.reshape(-1)
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a) & (a == np.round(a))):
            raise ValueError(f"gnd[{query}][{key!r}] holds non-integral values: {a[:8]}")
    a = a.astype(np.int64)
    bad = (a < 0) | (a >= n_db)
    if bad.any():
        raise ValueError(
            f"gnd[{query}][{key!r}] holds index {a[bad][0]} outside the database [0, {n_db}) "
            f"(its shape {a.shape}; the database size is ranks.shape[1] unless num_database= "
            f"is given)"
        )
    return a


def _check_setup(gnd: Any, q: int, n_db: int) -> _Setup:
    """Validates a list of ``{ok, junk?}`` dicts against ``Q`` queries and ``N`` images."""
    if isinstance(gnd, Mapping) or not isinstance(gnd, Sequence):
        raise ValueError(f"gnd must be a list of {q} dicts with 'ok'; got {type(gnd).__name__}")
    if len(gnd) != q:
        raise ValueError(
            f"len(gnd) = {len(gnd)} does not match the {q} queries of ranks (shape [Q, N] "
            f"with Q = {q})"
        )
    out = []
    for i, entry in enumerate(gnd):
        if not isinstance(entry, Mapping) or "ok" not in entry:
            keys = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
            raise ValueError(
                f"gnd[{i}] has no 'ok' (got {keys}); every query needs its positives "
                "('ok', optional 'junk'); revisited ground truth goes through setups()/evaluate()"
            )
        ok = _index_array(entry["ok"], query=i, key="ok", n_db=n_db)
        junk = _index_array(entry.get("junk", ()), query=i, key="junk", n_db=n_db)
        uniq = np.unique(ok)
        if uniq.size != ok.size:
            vals, counts = np.unique(ok, return_counts=True)
            raise ValueError(
                f"gnd[{i}]['ok'] repeats indices {vals[counts > 1][:8].tolist()} (shape "
                f"{ok.shape}); revisitop would count them twice in the recall step"
            )
        both = np.intersect1d(uniq, junk)
        if both.size:
            raise ValueError(
                f"gnd[{i}]: indices {both[:8].tolist()} are in both 'ok' and 'junk' "
                f"(shapes {ok.shape} and {junk.shape})"
            )
        out.append((ok, junk))
    return out


def _check_kappas(kappas: Sequence[int]) -> np.ndarray:
    k = np.asarray(kappas)
    if k.ndim != 1 or (k.size and not np.issubdtype(k.dtype, np.integer)) or np.any(k < 1):
        raise ValueError(f"kappas must be positive integers; got {kappas!r}")
    return k.astype(np.int64)


def _scores(
    ranks: np.ndarray, n_db: int, setup_list: Sequence[_Setup], kappas: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-query AP ``[Q]`` and P@k ``[Q, K]`` for each setup; one inverse ranking per query."""
    q, k = ranks.shape
    results = [(np.zeros(q), np.zeros((q, kappas.size))) for _ in setup_list]  # aps, prs per setup
    positions = np.arange(k, dtype=np.int64)
    where = np.full(n_db, -1, np.int64)  # database index -> 0-based position in the ranking
    for i in range(q):
        row = ranks[i]
        where.fill(-1)
        where[row] = positions
        if np.count_nonzero(where >= 0) != k:
            vals, counts = np.unique(row, return_counts=True)
            raise ValueError(
                f"ranks[{i}] repeats database indices {vals[counts > 1][:8].tolist()}; each row "
                f"must list distinct indices (ranks shape {ranks.shape})"
            )
        for (aps, prs), setup in zip(results, setup_list, strict=True):
            ok, junk = setup[i]
            if ok.size == 0:  # no positives: excluded from the means
                aps[i] = np.nan
                prs[i, :] = np.nan
                continue
            pos = where[ok]
            pos = np.sort(pos[pos >= 0])
            if junk.size:
                jpos = where[junk]
                jpos = np.unique(jpos[jpos >= 0])  # sorted, each ranked junk image once
                # revisitop: every position shifts down by the junk ranked strictly before it
                pos = pos - np.searchsorted(jpos, pos, side="left")
            if pos.size == 0:  # truncated ranking that retrieved no positive
                aps[i] = 0.0
                prs[i, :] = 0.0
                continue
            j = np.arange(pos.size, dtype=np.float64)
            # revisitop compute_ap: precision_0 = j / rank (1 at rank 0), precision_1 =
            # (j + 1) / (rank + 1), ap += (precision_0 + precision_1) * recall_step / 2.
            rank_safe = np.where(pos == 0, 1, pos)
            p0 = np.where(pos == 0, 1.0, j / rank_safe)
            p1 = (j + 1.0) / (pos + 1)
            recall_step = 1.0 / ok.size
            aps[i] = np.cumsum((p0 + p1) * recall_step / 2.0)[-1]  # sequential, like the loop
            pos1 = pos + 1
            kq = np.minimum(pos1[-1], kappas)  # revisitop: min(max(pos), kappa)
            prs[i, :] = np.count_nonzero(pos1[None, :] <= kq[:, None], axis=1) / kq
    return results


def _means(aps: np.ndarray, prs: np.ndarray) -> tuple[float, np.ndarray]:
    valid = ~np.isnan(aps)
    n = int(valid.sum())
    if n == 0:
        logging.warning("no query has a positive image: mAP and mP@k are nan")
        return float("nan"), np.full(prs.shape[1], np.nan)
    # cumulative sums in query order reproduce revisitop's `map = map + ap` bit for bit.
    m = float(np.cumsum(aps[valid])[-1] / n)
    mpr = np.cumsum(prs[valid], axis=0)[-1] / n if prs.shape[1] else np.zeros(0)
    return m, mpr


def compute_map(
    ranks: Any,
    gnd: Sequence[Mapping[str, Any]],
    kappas: Sequence[int] = (1, 5, 10),
    *,
    num_database: int | None = None,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP and mP@k of a ranking, revisitop's numbers (see the module docstring).

    Args:
      ranks: ``[Q, K]`` integer database indices, best first (``jretrieval.search.rank``); the
        transpose of revisitop's ``[N, Q]``. Each row lists distinct indices.
      gnd: ``Q`` dicts with ``ok`` (positives) and optional ``junk``, database indices.
      kappas: the ``k`` of mP@k.
      num_database: database size ``N``. By default ``N = K``: rows are full rankings
        (permutations of ``range(N)``). Give it for truncated rankings (``K < N``), where
        positives beyond position ``K`` count as never retrieved.

    Returns:
      ``(map, aps, mpr, prs)``: mAP in [0, 1] (float); AP per query ``[Q]`` (``nan`` for
      queries without positives); mean P@k ``[len(kappas)]``; P@k per query
      ``[Q, len(kappas)]`` (``nan`` rows for queries without positives).

    Raises:
      ValueError: malformed ranks or ground truth (message names the argument and query).
    """
    arr, n_db = _check_ranks(ranks, num_database)
    setup = _check_setup(gnd, arr.shape[0], n_db)
    _check_range(arr, n_db)
    kap = _check_kappas(kappas)
    [(aps, prs)] = _scores(arr, n_db, [setup], kap)
    m, mpr = _means(aps, prs)
    return m, aps, mpr, prs


def _index_list(entry: Mapping[str, Any], key: str) -> np.ndarray:
    """``entry[key]`` as a 1-D array (an empty int64 array when absent or empty)."""
    a = np.asarray(entry.get(key, ()))
    return a.reshape(-1) if a.size else np.zeros(0, np.int64)


def setups(
    gnd: Sequence[Mapping[str, Any]], protocol: str
) -> dict[str, list[dict[str, np.ndarray]]]:
    """The evaluation setups of a protocol, as lists of ``{ok, junk}`` dicts for compute_map.

    Args:
      gnd: ``Q`` ground-truth dicts: ``ok``/``junk`` (classic, instre) or
        ``easy``/``hard``/``junk`` (revisited).
      protocol: a key of ``PROTOCOLS``.

    Returns:
      ``{"all": [...]}`` for ``"classic"``/``"instre"``; ``{"E": [...], "M": [...], "H": [...]}``
      for ``"revisited"`` (Easy: ok easy, junk junk+hard; Medium: ok easy+hard, junk junk;
      Hard: ok hard, junk junk+easy). Each list has ``Q`` dicts of 1-D index arrays.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    if isinstance(gnd, Mapping) or not isinstance(gnd, Sequence):
        raise ValueError(f"gnd must be a list of dicts; got {type(gnd).__name__}")
    needed = ("easy", "hard") if protocol == "revisited" else ("ok",)
    for i, entry in enumerate(gnd):
        missing = [key for key in needed if not isinstance(entry, Mapping) or key not in entry]
        if missing:
            got = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
            hint = {
                "revisited": " (classic ground truth has 'ok'/'junk': use protocol 'classic')",
                "classic": " (revisited ground truth has 'easy'/'hard': use 'revisited')",
                "instre": "",
            }[protocol]
            raise ValueError(
                f"gnd[{i}] has no {missing[0]!r} (keys {got}); protocol {protocol!r} needs "
                f"{list(needed)}{hint}"
            )
    if protocol != "revisited":
        return {"all": [{"ok": _index_list(e, "ok"), "junk": _index_list(e, "junk")} for e in gnd]}
    out: dict[str, list[dict[str, np.ndarray]]] = {"E": [], "M": [], "H": []}
    for e in gnd:
        easy, hard, junk = (_index_list(e, key) for key in ("easy", "hard", "junk"))
        out["E"].append({"ok": easy, "junk": np.concatenate([junk, hard])})
        out["M"].append({"ok": np.concatenate([easy, hard]), "junk": junk})
        out["H"].append({"ok": hard, "junk": np.concatenate([junk, easy])})
    return out


def evaluate_queries(
    ranks: Any,
    gnd: Sequence[Mapping[str, Any]],
    protocol: str,
    *,
    num_database: int | None = None,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """``evaluate``'s figures and the per-query AP behind each mAP, from one pass.

    Returns:
      ``(figures, per_query)``: ``figures`` as ``evaluate``; ``per_query`` maps each mAP key of
      the protocol (``"mAP"``, or ``"E/mAP"``, ``"M/mAP"``, ``"H/mAP"``) to float64 ``[Q]`` AP
      in percent, ``nan`` for queries without positives (left out of the mean).
    """
    named = setups(gnd, protocol)
    arr, n_db = _check_ranks(ranks, num_database)
    checked = {}
    for name, lst in named.items():
        try:
            checked[name] = _check_setup(lst, arr.shape[0], n_db)
        except ValueError as e:
            raise ValueError(f"{e} [protocol {protocol!r}, setup {name!r}]") from None
    _check_range(arr, n_db)
    kap = _check_kappas(REVISITED_KAPPAS if protocol == "revisited" else ())
    scores = _scores(arr, n_db, list(checked.values()), kap)
    out: dict[str, float] = {}
    per_query: dict[str, np.ndarray] = {}
    for name, (aps, prs) in zip(checked, scores, strict=True):
        m, mpr = _means(aps, prs)
        prefix = "" if name == "all" else f"{name}/"
        out[f"{prefix}mAP"] = 100.0 * m
        per_query[f"{prefix}mAP"] = 100.0 * aps
        for k, p in zip(kap.tolist(), mpr.tolist(), strict=True):
            out[f"{prefix}mP@{k}"] = 100.0 * p
    return {key: out[key] for key in PROTOCOLS[protocol]}, per_query


def evaluate(
    ranks: Any,
    gnd: Sequence[Mapping[str, Any]],
    protocol: str,
    *,
    num_database: int | None = None,
) -> dict[str, float]:
    """All figures of a protocol, in percent, keyed as ``PROTOCOLS[protocol]``.

    Args:
      ranks: ``[Q, K]`` database indices, best first (see ``compute_map``).
      gnd: ``Q`` ground-truth dicts in the protocol's format (see ``setups``).
      protocol: ``"classic"`` -> ``{"mAP"}``; ``"revisited"`` -> ``{"E/mAP", "E/mP@1",
        "E/mP@5", "E/mP@10", "M/...", "H/..."}``; ``"instre"`` -> ``{"mAP"}``.
      num_database: database size when ``ranks`` is truncated (see ``compute_map``).

    Returns:
      Flat dict of floats in percent (mAP x 100 etc.), in ``PROTOCOLS[protocol]`` order.
    """
    return evaluate_queries(ranks, gnd, protocol, num_database=num_database)[0]


def per_query_ap(
    ranks: Any,
    gnd: Sequence[Mapping[str, Any]],
    protocol: str,
    *,
    num_database: int | None = None,
) -> dict[str, np.ndarray]:
    """AP of every query, in percent, per mAP key of the protocol (see ``evaluate_queries``)."""
    return evaluate_queries(ranks, gnd, protocol, num_database=num_database)[1]


def headline_metric(protocol: str | None) -> str:
    """The metric of Tables 1 and 3: ``"mAP"``, or ``"M/mAP"`` (Medium) for the revisited one."""
    return "M/mAP" if protocol == "revisited" else "mAP"


def label_results(ranks: Any, gnd: Sequence[Mapping[str, Any]], protocol: str) -> list[list[str]]:
    """``"positive"``, ``"junk"`` or ``"negative"`` for each ranked index, as the headline
    metric sees it (classic / INSTRE: ``ok`` / ``junk``; revisited: the Medium setup).

    Args:
      ranks: ``[Q, k]`` database indices, best first.
      gnd: ``Q`` ground-truth dicts (see ``setups``).
      protocol: a key of ``PROTOCOLS``.
    """
    named = setups(gnd, protocol)
    setup = named.get("M", named.get("all"))
    rows = np.asarray(ranks)
    if rows.ndim != 2 or len(setup) != rows.shape[0]:
        raise ValueError(f"ranks shape {rows.shape} does not match {len(setup)} queries of gnd")
    out = []
    for row, entry in zip(rows.tolist(), setup, strict=True):
        ok, junk = set(entry["ok"].tolist()), set(entry["junk"].tolist())
        out.append(["positive" if j in ok else "junk" if j in junk else "negative" for j in row])
    return out


# ----------------------------------------------------------------------------- chance level


def chance_map(gnd: Sequence[Mapping[str, Any]], num_database: int) -> float:
    """Expected mAP (percent) of a uniformly random ranking, under the revisitop AP.

    For a query with ``n`` positives among the ``M`` database images left after removing its
    junk, the positive at rank ``r`` has on average ``(r - 1)(n - 1)/(M - 1)`` positives above
    it, so the usual (non-interpolated) AP has expectation
    ``E0 = (H_M + (n - 1)/(M - 1) * (M - H_M)) / M`` (``H_M`` the harmonic number), and
    revisitop's trapezoidal AP, the mean of the precisions just before and at each positive,
    ``(E0 + n / M) / 2``. Queries without positives are skipped, as in ``compute_map``.

    Args:
      gnd: ``Q`` dicts with ``ok`` (and optional ``junk``) index arrays (classic protocol).
      num_database: ``N``, the number of database images.

    Returns:
      The mean over queries, in percent.
    """
    if num_database < 1:
        raise ValueError(f"num_database must be positive; got {num_database}")
    values = []
    for i, entry in enumerate(gnd):
        if "ok" not in entry:
            raise ValueError(f"gnd[{i}] has no 'ok' (keys {sorted(entry)}); expected classic gnd")
        ok = np.unique(np.asarray(entry["ok"], dtype=np.int64).reshape(-1))
        junk = np.unique(np.asarray(entry.get("junk", []), dtype=np.int64).reshape(-1))
        junk = np.setdiff1d(junk, ok)
        if ((ok < 0) | (ok >= num_database)).any() or ((junk < 0) | (junk >= num_database)).any():
            raise ValueError(f"gnd[{i}] holds indices outside 0..{num_database - 1}")
        n, m = ok.size, num_database - junk.size
        if n == 0:
            continue
        if m == 1:
            values.append(1.0)
            continue
        harmonic = float(np.sum(1.0 / np.arange(1, m + 1)))
        e0 = (harmonic + (n - 1) / (m - 1) * (m - harmonic)) / m
        values.append((e0 + n / m) / 2)
    if not values:
        raise ValueError("no query has positives; chance mAP is undefined")
    return 100.0 * float(np.mean(values))


def chance_level(
    gnd: Sequence[Mapping[str, Any]], protocol: str, num_database: int
) -> tuple[str, float]:
    """``(headline metric, its expected value for a random ranking)`` in percent.

    ``gnd`` should hold only the queries that are evaluated (not those skipped as unreadable),
    so that the level is the one of the same mean. The revisited protocol's headline is the
    Medium setup (positives easy + hard, junk junk), as in ``setups``.
    """
    named = setups(gnd, protocol)
    return headline_metric(protocol), chance_map(named.get("M", named.get("all")), num_database)
