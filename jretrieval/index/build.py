"""Building an index: BN recalibration, resumable extraction, whitening, DBA, offline diffusion.

Shape convention: raw descriptors ``[N, C]`` (pooled, as extracted), post-processed database
``[N, d]`` (unit rows; ``d = pca_dim``, or ``C`` without PCA).

The stages are those of the experiment (``jretrieval.experiment``) for a dataset's database,
in the same order and with the same functions (through ``wiring``), so an index built from a
dataset's database ranks that dataset's queries exactly as the experiment's columns:

1. BN recalibration over the indexed images (``bn`` ``exact`` | ``pytorch`` | ``none``), cached;
2. extraction with the resumable HDF5 store (``jretrieval.store``) at ``size x size``, one or
   several scales (``jretrieval.multiscale``);
3. L2 -> PCA-whitening learned on the indexed images (``pca_dim`` components; 0: none) -> L2;
4. DBA with ``dba`` neighbours (0: off), as the experiment's G+DBA;
5. the offline diffusion matrix of the (augmented) database when ``diffusion`` is asked.

Work in progress (the store and the BN statistics) lives in ``<out>.build/`` beside the
index, so a build that is interrupted resumes where it stopped when run again with the same
settings; the directory is removed once the index is written (``files.write``, atomic).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from jretrieval.index import files, wiring
from jretrieval.multiscale import parse_scales

__all__ = ["BN_MODES", "build_index", "check_settings"]

BN_MODES = ("exact", "pytorch", "none")


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"--{name}={value!r}; expected an integer >= {low}")
    return int(value)


def check_settings(
    *, size: int, pca_dim: int, bn: str, dba: int, scales: Any, batch_size: int
) -> dict[str, Any]:
    """The build settings, validated (each error names its flag)."""
    if bn not in BN_MODES:
        raise ValueError(f"--bn={bn!r}; expected one of {'|'.join(BN_MODES)}")
    return {
        "size": _int("size", size, 1),
        "pca_dim": _int("pca_dim", pca_dim, 0),
        "bn": bn,
        "dba": _int("dba", dba, 0),
        "scales": list(parse_scales(scales)),
        "batch_size": _int("batch_size", batch_size, 1),
    }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _recalibrated(encoder, spec, paths, ids, settings, workdir):
    """BN statistics of the indexed images, cached in the work directory for a resumed build."""
    if settings["bn"] == "none":
        return encoder, None
    key = [spec["params_sha256"], _digest(ids), settings["bn"], settings["size"]]
    cache = os.path.join(workdir, f"bn-{_digest(key + [settings['batch_size']])}.npz")
    if os.path.isfile(cache):
        logging.info("reusing BN statistics %s", cache)
        with np.load(cache, allow_pickle=False) as z:
            stats = files.unflatten_tree({k: z[k] for k in z.files})
        return wiring.with_batch_stats(encoder, stats), stats
    encoder = wiring.recalibrate(
        encoder,
        paths,
        mode=settings["bn"],
        size=settings["size"],
        batch_size=settings["batch_size"],
    )
    stats = encoder.variables["batch_stats"]
    np.savez(cache + ".tmp.npz", **files.flatten_tree(stats))
    os.replace(cache + ".tmp.npz", cache)
    return encoder, stats


def build_index(
    out: str,
    *,
    images: str | None = None,
    dataset: str | None = None,
    data_root: str | None = None,
    model: str | None = None,
    checkpoint: str | None = None,
    checkpoint_dir: str = "converted",
    encoder: Any = None,
    model_name: str | None = None,
    size: int = 724,
    pca_dim: int = 512,
    bn: str = "pytorch",
    dba: int = 0,
    diffusion: bool | Mapping[str, Any] = False,
    scales: Sequence[float] | str = (1.0,),
    pooling: str = "rmac",
    pooling_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    loader: Callable[..., np.ndarray] | None = None,
) -> dict[str, Any]:
    """Builds the index directory ``out`` (see ``jretrieval.index.Index.build``).

    Returns:
      Build statistics: ``count``, ``seconds`` (per stage and total), ``images_per_s`` (the
      whole build), ``resumed`` (descriptor rows found done from an interrupted build).
    """
    start = time.perf_counter()
    settings = check_settings(
        size=size, pca_dim=pca_dim, bn=bn, dba=dba, scales=scales, batch_size=batch_size
    )
    root, paths = wiring.image_list(images=images, dataset=dataset, data_root=data_root)
    n = len(paths)
    if settings["dba"] >= n:
        raise ValueError(f"--dba={dba} needs more than {dba} images; the index has {n}")
    if settings["pca_dim"] and n < 2:
        raise ValueError(f"--pca_dim={pca_dim} needs at least 2 images to learn; found {n}")
    if encoder is None:
        encoder, spec = wiring.resolve_model(
            model=model,
            checkpoint=checkpoint,
            checkpoint_dir=checkpoint_dir,
            pooling=pooling,
            pooling_kwargs=pooling_kwargs,
        )
    else:  # Python API: an Encoder object (e.g. after custom conversion)
        spec = wiring.ModelSpec(
            name=model_name or "encoder",
            source={"object": True},
            architecture=encoder.architecture,
            pooling=pooling,
            pooling_kwargs=dict(pooling_kwargs or {}),
            map_size=None,
            params_sha256=wiring.params_digest(encoder),
        )
    if diffusion:
        params = {
            **wiring.DIFFUSION_DEFAULTS,
            **(diffusion if isinstance(diffusion, Mapping) else {}),
        }
        unknown = sorted(set(params) - set(wiring.DIFFUSION_DEFAULTS))
        if unknown:
            raise ValueError(f"diffusion parameters {unknown}; expected {sorted(params)}")
        params = wiring.clip_diffusion(params, n)
    ids = [os.path.relpath(p, root) for p in paths]
    workdir = os.path.abspath(out) + ".build"
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    encoder, stats = _recalibrated(encoder, spec, paths, ids, settings, workdir)
    encoder = wiring.frozen(encoder)  # the saved statistics stay unfolded
    t_bn = time.perf_counter()
    raw, report = wiring.extract(
        encoder,
        paths,
        ids,
        spec=spec,
        scales=settings["scales"],
        size=settings["size"],
        batch_size=settings["batch_size"],
        workdir=workdir,
        loader=loader,
    )
    t_extract = time.perf_counter()
    pca = wiring.learn_whitening(raw, settings["pca_dim"])
    database = wiring.postprocess(raw, pca, settings["pca_dim"])
    if settings["dba"]:
        database = wiring.dba(database, settings["dba"])
    t_post = time.perf_counter()
    diff_arrays, diff_meta = None, None
    if diffusion:
        diff_arrays, diff_meta = wiring.diffusion_offline(database, params)
        diff_meta["kq"] = int(params["kq"])
    t_diff = time.perf_counter()
    manifest = {
        "model": dict(spec),
        "settings": settings,
        "count": n,
        "dim": int(database.shape[1]),
        "raw_dim": int(raw.shape[1]),
        "images_root": os.path.abspath(root),
        "diffusion": diff_meta,
    }
    whitening = None if pca is None else {k: np.asarray(v) for k, v in pca._asdict().items()}
    files.write(
        out,
        manifest=manifest,
        database=database,
        paths=ids,
        whitening=whitening,
        bn_stats=stats,
        diffusion=diff_arrays,
    )
    shutil.rmtree(workdir, ignore_errors=True)
    total = time.perf_counter() - start
    seconds = {
        "bn": t_bn - t0,
        "extract": t_extract - t_bn,
        "postprocess": t_post - t_extract,
        "diffusion": t_diff - t_post,
        "total": total,
    }
    logging.info(
        "index %s: %d images, %d-d, %.1f s (%.1f images/s; BN %.1f s, extraction %.1f s)",
        out, n, database.shape[1], total, n / total, seconds["bn"], seconds["extract"],
    )  # fmt: skip
    return {
        "count": n,
        "seconds": seconds,
        "images_per_s": n / total,
        "resumed": int(report.get("resumed", 0)),
    }
