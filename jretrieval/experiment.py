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
   Steps 4-6 are ``jretrieval.evaluation.evaluate_row``.
6. **Evaluation** with the dataset's protocol (``jretrieval.metrics.evaluate``).

For a row whose model has its own head (AP-GeM, ``model_zoo[m].pooling == "model"``),
``whitening.apgem`` chooses step 4: ``"common"`` (the paper's pipeline above, the default) or
``"shipped"`` (the PCA in the checkpoint, as dirtorch's ``test_dir.py`` applies it).

Unreadable images (``extraction.skip_corrupt=True``) are left out and listed in
``results.skipped``: a skipped database image is absent from every ranking (it counts as a
missed positive, never as a zero vector); a skipped query is left out of the means and of the
chance level.

``run`` returns a ``jretrieval.results.Results`` (figures, per-query AP, the choices made,
timings per stage, provenance) and writes nothing; ``jretrieval.report.run`` runs it and writes
the report.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from jretrieval import evaluation, files, keys, metrics, models, preflight, ranking, recalibration
from jretrieval import extract as extract_lib
from jretrieval import mesh as mesh_lib
from jretrieval import results as results_lib
from jretrieval import store as store_lib
from jretrieval.datasets import Dataset, load_dataset, require_ground_truth
from jretrieval.evaluation import LEARN_ON, NO_PCA, SHIPPED_PCA_POWER, Descriptors, ShippedPCA
from jretrieval.multiscale import extract_at_scales, parse_scales
from jretrieval.results import Results
from jretrieval.steps import Loading, Pooling

__all__ = [
    "APGEM_MODES",
    "describe",
    "load_data",
    "load_encoder",
    "parse_dims",
    "parse_models",
    "recalibrate",
    "run",
    "shipped_pca",
]

BN_MODES = ("exact", "pytorch", "none")
#: ``whitening.apgem``: how rows with their own head (AP-GeM) are post-processed.
APGEM_MODES = ("common", "shipped")


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
    """``whitening.dim`` as a tuple: ints (PCA components) and ``None`` (no PCA).

    Accepts an int, ``None``/``"none"``, a tuple of them, or a comma-separated string as the
    command line gives it (``--config.whitening.dim=16,32,64,none``).
    """
    values: list[Any] = []
    for v in dim if isinstance(dim, (list, tuple)) else [dim]:
        values += [part.strip() for part in v.split(",")] if isinstance(v, str) else [v]
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
        path = preflight.checkpoint_file(config, name, spec)
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
    # Frozen statistics from here on: folded into the convolutions (after recalibration, never
    # before; the cached BN file stays unfolded).
    encoder = models.fold_batch_norm(encoder)
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
        scales = parse_scales(config.extraction.get("scales", (1,)))
        if scales != (1.0,):  # cirtorch's extract_ms; single-scale store keys unchanged
            user["scales"] = list(scales)
        key = extract_lib.store_key(encoder, paths, ids=ids, bbx=bbx, loading=loading,
                                    pooling=pooling, user=user, weights=weights)  # fmt: skip
        store = store_lib.store_path(
            folder, model=name, dataset=f"{dataset.name}-{part}", settings=key
        )
        desc, report = extract_at_scales(  # data parallel; split by process if several
            encoder,
            paths,
            scales=scales,
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


# ----------------------------------------------------------------------------- AP-GeM


def shipped_pca(config: Any, name: str) -> ShippedPCA:
    """The PCA shipped with ``model_zoo[name]``'s converted file (AP-GeM), or a clear error."""
    encoder = load_encoder(config, name)
    if "pca" not in encoder.variables:
        raise ValueError(
            f"whitening.apgem='shipped' but model {name!r} "
            f"({_zoo_entry(config, name).get('file')}) has no shipped PCA; convert the "
            "checkpoint with its 'pca' entry or set --config.whitening.apgem=common"
        )
    return ShippedPCA(
        dict(encoder.variables["pca"]), bool(encoder.architecture.get("pca_whiten", True))
    )


# ----------------------------------------------------------------------------- the run


def _check_config(config: Any) -> None:
    dtype = config.extraction.get("dtype", "float32")
    if dtype not in models.COMPUTE_DTYPES:
        raise ValueError(
            f"extraction.dtype={dtype!r}; expected one of {list(models.COMPUTE_DTYPES)}"
        )
    if config.whitening.learn_on not in LEARN_ON:
        raise ValueError(f"whitening.learn_on={config.whitening.learn_on!r}; expected {LEARN_ON}")
    apgem_mode = config.whitening.get("apgem", "common")
    if apgem_mode not in APGEM_MODES:
        raise ValueError(f"whitening.apgem={apgem_mode!r}; expected one of {APGEM_MODES}")
    if config.bn.mode not in BN_MODES:
        raise ValueError(f"bn.mode={config.bn.mode!r}; expected one of {BN_MODES}")
    for _, members in parse_models(config.models):
        for m in members:
            _zoo_entry(config, m)


def _uses_shipped_pca(config: Any, members: Sequence[str]) -> bool:
    """Whether a row is whitened with its shipped PCA: a single model with its own head."""
    own_head = _zoo_entry(config, members[0]).get("pooling") == "model"
    return len(members) == 1 and own_head and config.whitening.get("apgem", "common") == "shipped"


def _choices(config: Any, rows: Sequence[tuple[str, tuple[str, ...]]], dims: Sequence) -> dict:
    """The open choices of the procedure, as the report states them."""
    bn = config.bn
    images = "database images" if bn.images == "database" else "database then query images"
    choices: dict[str, Any] = {
        "bn": {
            "mode": bn.mode,
            "momentum": bn.momentum if bn.mode == "pytorch" else None,
            "batch_size": bn.batch_size,
            "images": images,
            "order": "the dataset's list order (no shuffling; the last batch may be smaller)",
        },
        "whitening": (
            f"PCA learned on the {config.whitening.learn_on} descriptors (float64), "
            f"dims {[NO_PCA if d is None else d for d in dims]}"
        ),
    }
    own_head = [r for r, m in rows if _zoo_entry(config, m[0]).get("pooling") == "model"]
    if own_head:
        choices["apgem"] = (
            "the checkpoint's shipped PCA as dirtorch's test_dir.py applies it (power "
            f"{SHIPPED_PCA_POWER}, L2)"
            if config.whitening.get("apgem", "common") == "shipped"
            else "the paper's common pipeline (L2, PCA-whitening learned like every other row, "
            "L2); its shipped PCA unused"
        )
    return choices


def run(config: Any) -> Results:
    """Runs the experiment of ``config`` (see ``configs/common.py``); writes no report.

    Returns:
      A ``jretrieval.results.Results`` (``jretrieval.report.run`` writes it).
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
        evaluation.column_key(c, d, sweep=len(dims) > 1, columns=len(columns))
        for d in dims
        for c in columns
    ]
    results = Results(
        dataset=dataset.name,
        protocol=dataset.protocol,
        table=config.get("table", "table1"),
        models={},
        columns=keys,
        metrics=shown,
        dims=list(dims),
        column_dims=dict(zip(keys, [d for d in dims for _ in columns], strict=True)),
        choices=_choices(config, rows, dims),
        settings=config.to_dict() if hasattr(config, "to_dict") else dict(config),
        notes=[str(config.output.note)] if config.output.get("note") else [],
        timings={"models": {}, "rows": {}},
        sizes={"database": len(dataset.db_paths), "queries": len(dataset.query_paths)},
        provenance=results_lib.provenance(),
    )
    cache: dict[str, Descriptors] = {}
    for row, members in rows:
        for m in members:
            if m in cache:
                continue
            cache[m] = describe(config, m, dataset, mesh=mesh)
            results.timings["models"][m] = cache[m].info["seconds"]
            results.stores[m] = cache[m].info["stores"]
            results.encoders[m] = cache[m].info["encoder"]
            if cache[m].info["skipped"]:
                results.skipped[m] = cache[m].info["skipped"]
            spec = _zoo_entry(config, m)
            if not spec.get("file"):
                results.notes.append(
                    f"{m}: randomly initialised weights (seed {spec['seed']}), not trained"
                )
        t0 = time.perf_counter()
        shipped = shipped_pca(config, members[0]) if _uses_shipped_pca(config, members) else None
        out = evaluation.evaluate_row(
            [cache[m] for m in members],
            dataset,
            dims=dims,
            columns=columns,
            params=params,
            learn_on=config.whitening.learn_on,
            top=config.output.top10_queries,
            mesh=mesh,
            shipped=shipped,
        )
        results.models[row] = out.figures
        results.per_query[row] = out.per_query
        results.queries[row] = out.queries
        if out.example:
            results.examples[row] = out.example
        if out.chance is not None and results.chance is None:
            results.chance = {"metric": out.chance[0], "value": out.chance[1]}
        results.labels[row] = "+".join(_zoo_entry(config, m)["label"] for m in members)
        results.timings["rows"][row] = {**out.seconds, "total": time.perf_counter() - t0}
        logging.info("%s: %s", row, {k: round(v[shown[0]], 2) for k, v in out.figures.items()})
    results.timings["total"] = time.perf_counter() - start
    return results
