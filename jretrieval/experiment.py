"""The paper's pipeline for one dataset: encoders -> descriptors -> whitening -> ranking -> metrics.

Shape convention: descriptor sets are row-major ``[N, D]`` (database) and ``[Q, D]`` (queries);
ranks are ``[Q, N]`` database indices, best first; figures are in percent.

``run(config)`` does, for each row of ``config.models`` (a model name, or ``"a+b"`` for an
ensemble):

1. **Encoder**: the converted file ``<checkpoint_dir>/<model_zoo[m].file>``
   (``jretrieval.models.load``), or a random init of ``model_zoo[m].architecture`` with
   ``model_zoo[m].seed`` (the offline demo).
2. **BN recalibration** (``config.bn.mode`` ``exact`` | ``pytorch`` | ``none``): training-mode
   passes over the database images (``bn.images``) with ``jretrieval.recalibration``.
   The recalibrated encoder is saved under ``<workdir>/bn/`` (one file per model, dataset and
   settings) and reused by later runs.
3. **Extraction** of the database and of the queries (cropped to their ``bbx``) with
   ``jretrieval.extract.extract`` into the resumable HDF5 stores under ``<workdir>/descriptors/``,
   named by a digest of every setting the numbers depend on (weights included).
4. **Post-processing**: each member's vectors L2-normalised; an ensemble concatenates its
   members' (L2-normalised) vectors and L2-normalises the concatenation; then PCA-whitening
   learned on ``whitening.learn_on`` (``"database"``: the database descriptors, our choice, since
   the paper does not say; ``"database+queries"``), keeping ``whitening.dim`` components, and
   L2 (``jretrieval.whitening.apply``). ``dim`` ``"none"`` (or ``None``) skips PCA: L2 only,
   Table 3's "True dim."; a tuple of dims sweeps them (Table 3).
5. **Ranking**: every column of ``config.ranking.columns`` (``jretrieval.ranking``).
6. **Evaluation** with the dataset's protocol (``jretrieval.metrics.evaluate``).

Unreadable images (``extraction.skip_corrupt=True``) are left out and listed in
``results["skipped"]``: a skipped database image is absent from every ranking (it counts as a
missed positive, never as a zero vector); a skipped query is left out of the means.

The results are a JSON-serialisable dict::

    {"dataset": "oxford5k", "protocol": "classic", "table": "table1",
     "models": {row: {column: {metric: value in percent}}},
     "labels": {row: label}, "columns": [column keys in order], "metrics": [metric keys],
     "dims": [whitening dims swept, None = no PCA], "column_dims": {column key: dim},
     "settings": config as a dict, "notes": [...], "skipped": {model: [(part, path, why)]},
     "timings": {"models": {...}, "rows": {...}, "total": s}, "stores": {model: {part: path}},
     "encoders": {model: models.provenance: architecture, weights_file, weights_sha256...},
     "examples": {row: {"column", "queries", "ranks": top-10 database indices}},
     "sizes": {"database": N, "queries": Q}}

handed to ``jretrieval.report`` (tables like the paper's, JSON, CSV, plots) and returned.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jretrieval import extract as extract_lib
from jretrieval import files, keys, metrics, models, preflight, ranking, recalibration, whitening
from jretrieval import mesh as mesh_lib
from jretrieval import store as store_lib
from jretrieval.datasets import Dataset, load_dataset, require_ground_truth
from jretrieval.steps import Loading, Pooling

__all__ = [
    "Descriptors",
    "column_key",
    "describe",
    "evaluate_row",
    "load_data",
    "load_encoder",
    "parse_dims",
    "parse_models",
    "postprocess",
    "recalibrate",
    "run",
]

BN_MODES = ("exact", "pytorch", "none")
LEARN_ON = ("database", "database+queries")
NO_PCA = "True dim."


class Descriptors(NamedTuple):
    """One model's raw (pooled, not normalised) descriptors of a dataset.

    Attributes:
      database: float32 ``[N_kept, C]`` rows for ``dataset.db_paths[db_kept]``.
      queries: float32 ``[Q_kept, C]`` rows for ``dataset.query_paths[q_kept]``.
      db_kept: int64 ``[N_kept]`` indices of the database images described.
      q_kept: int64 ``[Q_kept]`` indices of the queries described.
      info: stores, timings and skipped images.
    """

    database: np.ndarray
    queries: np.ndarray
    db_kept: np.ndarray
    q_kept: np.ndarray
    info: dict[str, Any]


# ----------------------------------------------------------------------------- parsing


def _as_dict(value: Any) -> dict[str, Any]:
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def parse_models(models_field: Sequence[str] | str) -> list[tuple[str, tuple[str, ...]]]:
    """Rows ``(name, members)`` from ``config.models``; ``"a+b"`` is an ensemble of a and b.

    Entries may be comma-separated strings (``--config.models=baseline,simclr2x+simclr4x``).
    """
    if isinstance(models_field, str):
        models_field = [models_field]
    rows = []
    for entry in models_field:
        for name in str(entry).split(","):
            name = name.strip()
            if not name:
                continue
            members = tuple(m.strip() for m in name.split("+"))
            if any(not m for m in members) or len(set(members)) != len(members):
                raise ValueError(f"config.models entry {name!r}: expected 'model' or 'a+b'")
            rows.append(("+".join(members), members))
    if not rows:
        raise ValueError(f"config.models={models_field!r} names no model")
    names = [r[0] for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"config.models lists {dup} more than once")
    return rows


def parse_dims(dim: Any) -> tuple[int | None, ...]:
    """``whitening.dim`` as a tuple: ints (PCA components) and ``None`` (no PCA)."""
    values = dim if isinstance(dim, (list, tuple)) else [dim]
    out: list[int | None] = []
    for v in values:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "true", "")):
            out.append(None)
            continue
        try:
            d = int(v)
        except (TypeError, ValueError):
            d = -1
        if isinstance(v, bool) or d < 1 or (isinstance(v, float) and v != d):
            raise ValueError(
                f"whitening.dim entry {v!r}; expected a positive int or 'none' (no PCA)"
            )
        out.append(d)
    if not out:
        raise ValueError("whitening.dim is an empty tuple; expected at least one dimension")
    if len(set(out)) != len(out):
        raise ValueError(f"whitening.dim={dim!r} repeats a dimension")
    return tuple(out)


def column_key(column: str, dim: int | None, *, sweep: bool, columns: int) -> str:
    """Name of a result column: the ranking column, the dim of a sweep, or both."""
    dim_name = NO_PCA if dim is None else str(dim)
    if not sweep:
        return column
    return dim_name if columns == 1 else f"{column} @ {dim_name}"


# ----------------------------------------------------------------------------- data, encoders


def load_data(config: Any) -> Dataset:
    """The dataset of ``config.data``; the demo set is built first when asked and absent."""
    data = config.data
    kwargs: dict[str, Any] = {}
    if data.name not in ("folder", "revisitop1m"):
        kwargs.update(crop_queries=data.crop_queries, check_files=data.check_files)
    if data.distractors:
        kwargs.update(distractors=True, max_distractors=data.max_distractors)
    if data.get("build_demo", False):
        from jretrieval.datasets import demo

        if data.name != demo.DEMO_NAME:
            raise ValueError(
                f"data.build_demo needs data.name={demo.DEMO_NAME!r}; got {data.name!r}"
            )
        demo.build_demo_dataset(data.root, **_as_dict(data.get("demo_kwargs", {})))
    dataset = load_dataset(data.name, data.root, **kwargs)
    require_ground_truth(dataset)
    return dataset


def _zoo_entry(config: Any, name: str) -> dict[str, Any]:
    zoo = config.model_zoo
    if name not in zoo:
        raise ValueError(f"model {name!r} is not in config.model_zoo; known: {sorted(zoo)}")
    return _as_dict(zoo[name])


def load_encoder(config: Any, name: str) -> models.Encoder:
    """The encoder of ``model_zoo[name]``: its converted file, or a random init."""
    spec = _zoo_entry(config, name)
    if spec.get("file"):
        path = os.path.join(config.checkpoint_dir, spec["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"converted encoder for model {name!r} not found at {path!r} "
                f"(checkpoint_dir={config.checkpoint_dir!r}); run `bin/download_checkpoints.sh` "
                "and `bin/convert_checkpoints.sh`, or set --config.checkpoint_dir"
            )
        return models.load(path, expected=spec.get("architecture"))  # the zoo's architecture
    if spec.get("architecture"):
        logging.warning("model %s: RANDOMLY INITIALISED weights (seed %s)", name, spec["seed"])
        return models.init_encoder(_as_dict(spec["architecture"]), seed=int(spec["seed"]))
    raise ValueError(f"model_zoo[{name!r}] has neither 'file' nor 'architecture': {spec}")


def _relative(paths: Sequence[str], root: str) -> list[str]:
    return [os.path.relpath(p, root) for p in paths]


def recalibrate(
    config: Any, name: str, encoder: models.Encoder, dataset: Dataset, *, mesh: Any = None
) -> models.Encoder:
    """BN recalibration per ``config.bn``, cached as an encoder file under ``<workdir>/bn/``.

    The file is named by ``keys.bn_key`` (the weights' digest, the images' ids, boxes and file
    fingerprint, every setting), written atomically by the holder of its writer lock (a second
    run waits and reuses it) and moved aside and rebuilt when it cannot be read.
    """
    bn = config.bn
    if bn.mode not in BN_MODES:
        raise ValueError(f"bn.mode={bn.mode!r}; expected one of {BN_MODES}")
    if bn.mode == "none":
        return encoder
    if bn.images not in ("database", "database+queries"):
        raise ValueError(f"bn.images={bn.images!r}; expected 'database' or 'database+queries'")
    paths = list(dataset.db_paths)
    boxes: list | None = None
    if bn.images == "database+queries":
        paths += dataset.query_paths
        if dataset.query_bbx is not None:
            boxes = [None] * len(dataset.db_paths) + list(dataset.query_bbx)
    loading = _loading(config, batch_size=bn.batch_size)
    key = keys.bn_key(
        encoder,
        weights=keys.variables_digest(encoder.variables),
        files=keys.files_digest(paths),
        ids=_relative(paths, dataset.root),
        bbx=boxes,
        policy=loading.policy.to_dict(),
        mode=bn.mode,
        momentum=bn.momentum,
        batch_size=bn.batch_size,
    )
    folder = os.path.join(config.workdir, "bn")
    files.clean_temporaries(folder)
    path = store_lib.store_path(folder, model=name, dataset=dataset.name, settings=key)
    cached = _load_bn(path, name, locked=False)
    if cached is not None:
        return cached
    # One process: the writer lock makes a second run wait for this one's file. Several
    # processes recalibrate together (collectives); process 0 writes atomically.
    alone = jax.process_count() == 1
    with files.writer_lock(path, what="BN statistics") if alone else contextlib.nullcontext():
        cached = _load_bn(path, name, locked=alone)  # several: process 0 overwrites it
        if cached is not None:
            return cached
        # Data parallel over the mesh; with several processes each decodes its rows of each batch.
        encoder = recalibration.recalibrate_images(
            encoder,
            paths,
            loading=loading,
            bbx=boxes,
            mesh=mesh,
            mode=bn.mode,
            momentum=bn.momentum,
            desc=f"recalibrate BN {name} on {dataset.name}",
        )
        metadata = {**encoder.metadata, "bn_recalibration": key, "dataset": dataset.name}
        if mesh_lib.is_main_process():  # one writer when several processes run
            with store_lib.writing(path, what="BN statistics"):
                os.makedirs(folder, exist_ok=True)
                models.save(
                    path, encoder.architecture, encoder.variables, encoder.preprocessing, metadata
                )
                files.apply_umask(path)
    mesh_lib.sync(f"saved {path}")
    return encoder.replace(metadata=metadata)


def _load_bn(path: str, name: str, *, locked: bool) -> models.Encoder | None:
    """The cached recalibrated encoder at ``path``; ``None`` if absent or (moved aside when
    ``locked``) unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        encoder = models.load(path)
    except (OSError, ValueError, KeyError) as err:
        if locked:
            files.move_aside(path, f"unreadable BN statistics: {err}")
        return None
    logging.info("model %s: reusing recalibrated BN statistics %s", name, path)
    return encoder


def _loading(config: Any, *, batch_size: int) -> Loading:
    ex = config.extraction
    return Loading.of(
        _as_dict(ex.policy),
        batch_size=batch_size,
        skip_corrupt=ex.skip_corrupt,
        num_threads=ex.num_threads,
    )


def _pooling(config: Any, spec: Mapping[str, Any]) -> Pooling:
    name = spec.get("pooling") or config.pooling.name
    kwargs = {"rmac": {"levels": config.pooling.levels}, "gem": {"p": config.pooling.p}}
    map_size = tuple(spec["map_size"]) if spec.get("map_size") else None
    return Pooling.of(name, kwargs.get(name, {}), map_size, "linear")


def describe(config: Any, name: str, dataset: Dataset, *, mesh: Any = None) -> Descriptors:
    """Raw descriptors of one model (encoder, BN recalibration, extraction with the store)."""
    start = time.perf_counter()
    spec = _zoo_entry(config, name)
    encoder = load_encoder(config, name)
    provenance = models.provenance(encoder)  # architecture and weight digests, for results
    t_load = time.perf_counter()
    encoder = recalibrate(config, name, encoder, dataset, mesh=mesh)  # BN statistics in float32
    encoder = encoder.with_dtype(config.extraction.get("dtype", "float32"))
    t_bn = time.perf_counter()
    pooling = _pooling(config, spec)
    loading = _loading(config, batch_size=config.extraction.batch_size)
    weights = keys.variables_digest(encoder.variables)  # once for both parts
    folder = os.path.join(config.workdir, "descriptors")
    files.clean_temporaries(folder)
    out, info = {}, {"seconds": {}, "stores": {}, "skipped": []}
    parts = {
        "database": (dataset.db_paths, None),
        "queries": (dataset.query_paths, dataset.query_bbx),
    }
    for part, (paths, bbx) in parts.items():
        ids = _relative(paths, dataset.root)
        # The recalibrated statistics are in the weights' digest; "bn" only names the mode.
        user = {"model": name, "dataset": dataset.name, "part": part, "bn": config.bn.mode}
        key = extract_lib.store_key(encoder, paths, ids=ids, bbx=bbx, loading=loading,
                                    pooling=pooling, user=user, weights=weights)  # fmt: skip
        store = store_lib.store_path(
            folder, model=name, dataset=f"{dataset.name}-{part}", settings=key
        )
        desc, report = extract_lib.extract(  # data parallel; split by process if several
            encoder,
            paths,
            loading=loading,
            pooling=pooling,
            bbx=bbx,
            ids=ids,
            store=store,
            key=key,
            mesh=mesh,
            desc=f"extract {name} {dataset.name} {part}",
        )
        out[part] = (desc, np.asarray(report["kept"], np.int64))
        info["seconds"][part] = report["seconds"]
        info["stores"][part] = store
        info["skipped"] += [(part, p, m) for p, m in report["skipped"]]
    info["seconds"].update(load=t_load - start, bn=t_bn - t_load)
    info["encoder"] = provenance
    logging.info(
        "model %s: descriptors %s (%.1fs)",
        name,
        out["database"][0].shape,
        time.perf_counter() - start,
    )
    return Descriptors(
        out["database"][0], out["queries"][0], out["database"][1], out["queries"][1], info
    )


# ----------------------------------------------------------------------------- post-processing


def postprocess(
    database: Any, queries: Any, *, dim: int | None, learn_on: str = "database"
) -> tuple[jax.Array, jax.Array]:
    """L2 -> PCA-whitening (``dim`` components, learned on ``learn_on``) -> L2.

    Args:
      database: ``[N, D]`` descriptors (already L2-normalised per member for ensembles).
      queries: ``[Q, D]`` descriptors.
      dim: kept components, or ``None`` for no PCA (L2 only).
      learn_on: ``"database"`` or ``"database+queries"``.

    Returns:
      ``(database [N, dim or D], queries [Q, dim or D])``, rows of unit norm.
    """
    if learn_on not in LEARN_ON:
        raise ValueError(f"whitening.learn_on={learn_on!r}; expected one of {LEARN_ON}")
    db, q = (
        whitening.l2_normalize(jnp.asarray(database, jnp.float32)),
        whitening.l2_normalize(jnp.asarray(queries, jnp.float32)),
    )
    if dim is None:
        return db, q
    train = db if learn_on == "database" else jnp.concatenate([db, q])
    pca = whitening.learn_pca(train)
    components = int(pca.projection.shape[1])
    if dim > components:
        raise ValueError(
            f"whitening.dim={dim} exceeds the {components} components of a PCA learned on "
            f"{train.shape[0]} descriptors of size {train.shape[1]} ({learn_on}); "
            f"expected a dim <= min(N, D) = {components}, or 'none'"
        )
    return whitening.apply(pca, db, dim=dim), whitening.apply(pca, q, dim=dim)


# ----------------------------------------------------------------------------- the run


def _row_descriptors(
    rows: Descriptors | Sequence[Descriptors],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Concatenated, per-member L2-normalised descriptors over the images all members kept."""
    members = [rows] if isinstance(rows, Descriptors) else list(rows)
    db_kept = members[0].db_kept
    q_kept = members[0].q_kept
    for m in members[1:]:
        db_kept = np.intersect1d(db_kept, m.db_kept)
        q_kept = np.intersect1d(q_kept, m.q_kept)
    db_parts, q_parts = [], []
    for m in members:
        db_rows = np.searchsorted(m.db_kept, db_kept)
        q_rows = np.searchsorted(m.q_kept, q_kept)
        db_parts.append(np.asarray(whitening.l2_normalize(jnp.asarray(m.database[db_rows]))))
        q_parts.append(np.asarray(whitening.l2_normalize(jnp.asarray(m.queries[q_rows]))))
    return np.concatenate(db_parts, 1), np.concatenate(q_parts, 1), db_kept, q_kept


def evaluate_row(
    descriptors: Sequence[Descriptors],
    dataset: Dataset,
    *,
    dims: Sequence[int | None],
    columns: Sequence[str],
    params: ranking.RankingParams,
    learn_on: str = "database",
    top: int = 0,
    mesh: Any = None,
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Figures of one row (a model or an ensemble) for every whitening dim and column.

    Args:
      descriptors: the members' raw descriptors (one for a single model).
      dataset: the dataset (ground truth, protocol, database size).
      dims: whitening dims (``None``: no PCA); columns: ranking column names.
      params: ranking parameters; learn_on: see ``postprocess``.
      top: queries whose top-10 lists are returned (for the report's picture).
      mesh: device mesh; with several devices the ranking runs sharded along N
        (``ranking.rank_columns(mesh=...)``).

    Returns:
      ``({column key: {metric: percent}}, examples)``; column keys from ``column_key``;
      ``examples`` holds the first column's top-10 database indices of the first ``top``
      queries (``{"column", "queries", "ranks"}``).
    """
    db_raw, q_raw, db_kept, q_kept = _row_descriptors(descriptors)
    gnd = [dataset.gnd[i] for i in q_kept]
    sweep = len(dims) > 1
    table: dict[str, dict[str, float]] = {}
    examples: dict[str, Any] = {}
    for dim in dims:
        db, q = postprocess(db_raw, q_raw, dim=dim, learn_on=learn_on)
        for col, r in ranking.rank_columns(q, db, params, columns, mesh=mesh).items():
            key = column_key(col, dim, sweep=sweep, columns=len(columns))
            full = db_kept[np.asarray(r)]  # indices into dataset.db_paths
            table[key] = metrics.evaluate(
                full, gnd, dataset.protocol, num_database=len(dataset.db_paths)
            )
            if not examples:
                examples = {
                    "column": key,
                    "queries": q_kept[:top].tolist(),
                    "ranks": full[:top, :10].tolist(),
                }
    return table, examples


def _check_config(config: Any) -> None:
    dtype = config.extraction.get("dtype", "float32")
    if dtype not in models.COMPUTE_DTYPES:
        raise ValueError(
            f"extraction.dtype={dtype!r}; expected one of {list(models.COMPUTE_DTYPES)}"
        )
    if config.whitening.learn_on not in LEARN_ON:
        raise ValueError(f"whitening.learn_on={config.whitening.learn_on!r}; expected {LEARN_ON}")
    if config.bn.mode not in BN_MODES:
        raise ValueError(f"bn.mode={config.bn.mode!r}; expected one of {BN_MODES}")
    for _, members in parse_models(config.models):
        for m in members:
            _zoo_entry(config, m)


def run(config: Any) -> dict[str, Any]:
    """Runs the experiment of ``config`` (see ``configs/common.py``) and reports it.

    Returns:
      The results dict described in the module docstring (also written by
      ``jretrieval.report`` under ``config.output.dir`` or ``<workdir>/results``).
    """
    start = time.perf_counter()
    mesh_lib.initialize(bool(config.get("distributed", {}).get("multihost", False)))
    mesh = mesh_lib.make_mesh()  # every device of every process; passed down
    rows = parse_models(config.models)
    dims = parse_dims(config.whitening.dim)
    columns = ranking.check_columns(config.ranking.columns)
    params = ranking.params_from_config(config)
    _check_config(config)
    dataset = load_data(config)
    preflight.check(config, dataset, rows=rows, dims=dims)  # before the hours of work
    shown = list(config.eval.metrics or metrics.PROTOCOLS[dataset.protocol])
    unknown = [m for m in shown if m not in metrics.PROTOCOLS[dataset.protocol]]
    if unknown:
        raise ValueError(
            f"eval.metrics {unknown} are not figures of protocol {dataset.protocol!r}: "
            f"{metrics.PROTOCOLS[dataset.protocol]}"
        )
    keys = [
        column_key(c, d, sweep=len(dims) > 1, columns=len(columns)) for d in dims for c in columns
    ]
    results: dict[str, Any] = {
        "dataset": dataset.name,
        "protocol": dataset.protocol,
        "table": config.get("table", "table1"),
        "models": {},
        "labels": {},
        "columns": keys,
        "metrics": shown,
        "dims": list(dims),
        "column_dims": dict(zip(keys, [d for d in dims for _ in columns], strict=True)),
        "settings": config.to_dict() if hasattr(config, "to_dict") else dict(config),
        "notes": [str(config.output.note)] if config.output.get("note") else [],
        "skipped": {},
        "timings": {"models": {}, "rows": {}},
        "stores": {},
        "encoders": {},
        "examples": {},
        "sizes": {"database": len(dataset.db_paths), "queries": len(dataset.query_paths)},
    }
    cache: dict[str, Descriptors] = {}
    for row, members in rows:
        for m in members:
            if m in cache:
                continue
            cache[m] = describe(config, m, dataset, mesh=mesh)
            results["timings"]["models"][m] = cache[m].info["seconds"]
            results["stores"][m] = cache[m].info["stores"]
            results["encoders"][m] = cache[m].info["encoder"]
            if cache[m].info["skipped"]:
                results["skipped"][m] = cache[m].info["skipped"]
            spec = _zoo_entry(config, m)
            if not spec.get("file"):
                results["notes"].append(
                    f"{m}: randomly initialised weights (seed {spec['seed']}), not trained"
                )
        t0 = time.perf_counter()
        table, examples = evaluate_row(
            [cache[m] for m in members],
            dataset,
            dims=dims,
            columns=columns,
            params=params,
            learn_on=config.whitening.learn_on,
            top=config.output.top10_queries,
            mesh=mesh,
        )
        results["models"][row] = table
        results["examples"][row] = examples
        results["labels"][row] = "+".join(_zoo_entry(config, m)["label"] for m in members)
        results["timings"]["rows"][row] = time.perf_counter() - t0
        logging.info("%s: %s", row, {k: round(v[shown[0]], 2) for k, v in table.items()})
    results["timings"]["total"] = time.perf_counter() - start
    if mesh_lib.is_main_process():  # every process computed the same; one writes
        _write_report(config, dataset, results)
    return results


def _write_report(config: Any, dataset: Dataset, results: dict[str, Any]) -> None:
    from jretrieval import report

    out = config.output.dir or os.path.join(config.workdir, "results")
    with files.writer_lock(os.path.join(out, "results"), what="results"):  # one run at a time
        report.write(results, out, dataset=dataset, config=config)
