"""The one place where the index calls the rest of jretrieval's pipeline.

Every stage the index shares with the experiment (``jretrieval.experiment``) is called from
here: the encoder (zoo entry or converted file), BN recalibration, extraction into the
resumable store, the multi-scale step, L2 -> PCA-whitening -> L2, DBA, AQE, search and
diffusion. The other modules of ``jretrieval.index`` only call these functions, so a change in
those APIs is followed in this file alone.

Shape convention: descriptor sets ``[N, D]`` rows (database) and ``[Q, D]`` (queries); image
batches ``uint8 [B, H, W, 3]``; ranks and top-k indices ``[Q, k]``, best first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from jretrieval import (
    diffusion,
    evaluation,
    expansion,
    keys,
    models,
    multiscale,
    recalibration,
    search,
    steps,
    whitening,
)
from jretrieval import extract as extract_lib
from jretrieval import store as store_lib
from jretrieval.datasets import images as images_lib
from jretrieval.datasets import load_dataset

__all__ = [
    "CorruptImageError",
    "DIFFUSION_DEFAULTS",
    "ModelSpec",
    "aqe",
    "dba",
    "diffusion_offline",
    "diffusion_rank",
    "extract",
    "frozen",
    "image_list",
    "learn_whitening",
    "load_image",
    "make_step",
    "params_digest",
    "postprocess",
    "place",
    "rank",
    "recalibrate",
    "resolve_model",
    "topk",
]

CorruptImageError = images_lib.CorruptImageError

#: Yang et al. (AAAI 2019) as in the paper and ``configs/common.py`` (kq: online mode).
DIFFUSION_DEFAULTS = {"truncation": 1000, "kd": 50, "kq": 10, "gamma": 3.0, "alpha": 0.99}


class ModelSpec(dict):
    """What identifies a model: ``name``, ``source``, ``pooling``, ``pooling_kwargs``,
    ``map_size`` (a dict, JSON-serialisable)."""


# ----------------------------------------------------------------------------- models


def _zoo() -> Mapping[str, Any]:
    try:
        from configs import common
    except ImportError as err:  # an installed package without the repository's configs/
        raise ValueError(
            "--model needs the model zoo of configs/common.py (run from the repository root), "
            "or pass --checkpoint=FILE.h5"
        ) from err
    return common.model_zoo().to_dict()


def resolve_model(
    *,
    model: str | None = None,
    checkpoint: str | None = None,
    checkpoint_dir: str = "converted",
    pooling: str = "rmac",
    pooling_kwargs: Mapping[str, Any] | None = None,
) -> tuple[models.Encoder, ModelSpec]:
    """The encoder of ``--model`` (zoo name) or ``--checkpoint`` (converted ``.h5`` file)."""
    if (model is None) == (checkpoint is None):
        raise ValueError("give exactly one of --model=NAME (the zoo) or --checkpoint=FILE.h5")
    map_size = None
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"--checkpoint={checkpoint!r}: no such file")
        encoder = models.load(checkpoint)
        name = os.path.splitext(os.path.basename(checkpoint))[0]
        source = {"checkpoint": os.path.abspath(checkpoint)}
    else:
        zoo = _zoo()
        if model not in zoo:
            raise ValueError(f"--model={model!r} is not in the model zoo; known: {sorted(zoo)}")
        spec = zoo[model]
        name = model
        map_size = spec.get("map_size")
        pooling = spec.get("pooling") or pooling
        if spec.get("file"):
            path = os.path.join(checkpoint_dir, spec["file"])
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"--model={model!r}: converted file {path!r} not found "
                    f"(--checkpoint_dir={checkpoint_dir!r}); run bin/convert_checkpoints.sh"
                )
            encoder = models.load(path, expected=spec.get("architecture"))  # the zoo's
            source = {"model": model, "checkpoint": os.path.abspath(path)}
        else:
            logging.warning("model %s: RANDOMLY INITIALISED weights (seed %s)", model, spec["seed"])
            encoder = models.init_encoder(spec["architecture"], seed=int(spec["seed"]))
            source = {"model": model, "random_init": spec["architecture"], "seed": spec["seed"]}
    kwargs = dict(pooling_kwargs or {}) if pooling != steps.MODEL_POOLING else {}
    return encoder, ModelSpec(
        name=name,
        source=source,
        architecture=encoder.architecture,
        pooling=pooling,
        pooling_kwargs=kwargs,
        map_size=None if map_size is None else [int(s) for s in map_size],
        params_sha256=params_digest(encoder),
    )


def params_digest(encoder: models.Encoder) -> str:
    """SHA-256 of the weights without the BN statistics (recalibration changes those)."""
    return keys.variables_digest({k: v for k, v in encoder.variables.items() if k != "batch_stats"})


def frozen(encoder: Any) -> Any:
    """``encoder`` with its final BN statistics folded into the convolutions, as the experiment
    extracts (after recalibration, never before)."""
    return models.fold_batch_norm(encoder)


def with_batch_stats(encoder: models.Encoder, batch_stats: Any) -> models.Encoder:
    """The encoder with stored (recalibrated) BN statistics."""
    if batch_stats is None:
        return encoder
    stats = jax.tree.map(np.asarray, batch_stats)
    return encoder.replace(variables={**encoder.variables, "batch_stats": stats})


# ----------------------------------------------------------------------------- images


def image_list(
    *, images: str | None, dataset: str | None, data_root: str | None
) -> tuple[str, list[str]]:
    """``(root, absolute paths)`` of ``--images=DIR`` (recursive) or a known dataset's database."""
    if (images is None) == (dataset is None):
        raise ValueError("give exactly one of --images=DIR or --dataset=NAME --data_root=DIR")
    if images is not None:
        if not os.path.isdir(images):
            raise FileNotFoundError(f"--images={images!r} is not a directory")
        ds = load_dataset("folder", images)
    else:
        ds = load_dataset(dataset, data_root or "data")
        if not ds.db_paths:
            raise ValueError(f"--dataset={dataset!r} under {data_root!r} has no database images")
    return ds.root, list(ds.db_paths)


def load_image(path: str, *, bbx: Sequence[float] | None, size: int) -> np.ndarray:
    """One query image, cropped to ``bbx`` and resized as the index's database images."""
    return images_lib.load_image(path, bbx=bbx, policy={"mode": "fixed", "size": size})


def image_size(path: str) -> tuple[int, int]:
    return images_lib.image_size(path)


# ----------------------------------------------------------------------------- extraction


def _loading(size: int, batch_size: int, loader: Any = None) -> steps.Loading:
    """The experiment's decoding: fixed ``size x size`` resize, batches of ``batch_size``."""
    return steps.Loading.of({"mode": "fixed", "size": size}, batch_size=batch_size, loader=loader)


def _pooling(spec: Mapping[str, Any]) -> steps.Pooling:
    return steps.Pooling.of(spec["pooling"], spec["pooling_kwargs"], spec.get("map_size"))


def recalibrate(
    encoder: models.Encoder, paths: Sequence[str], *, mode: str, size: int, batch_size: int
) -> models.Encoder:
    """BN statistics re-estimated over ``paths`` (``exact`` | ``pytorch``; ``none``: as is)."""
    if mode == "none":
        return encoder
    return recalibration.recalibrate_images(
        encoder,
        list(paths),
        loading=_loading(size, batch_size),
        mode=mode,
        momentum=0.1,
        desc="recalibrate BN",
    )


def make_step(encoder: models.Encoder, spec: Mapping[str, Any], scales: Sequence[float]):
    """The extraction step (single- or multi-scale) of ``spec``'s pooling."""
    return multiscale.make_step(encoder, scales=scales, pooling=_pooling(spec))


def extract(
    encoder: models.Encoder,
    paths: Sequence[str],
    ids: Sequence[str],
    *,
    spec: Mapping[str, Any],
    scales: Sequence[float],
    size: int,
    batch_size: int,
    workdir: str,
    loader: Any = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Raw descriptors ``[N, C]`` of ``paths`` through the resumable store under ``workdir``."""
    loading = _loading(size, batch_size, loader)
    pooling = _pooling(spec)
    user = {"model": spec["name"], "part": "index", "scales": list(scales)}
    key = extract_lib.store_key(
        encoder, paths, ids=ids, bbx=None, loading=loading, pooling=pooling, user=user
    )
    store = store_lib.store_path(workdir, model=spec["name"], dataset="index", settings=key)
    return multiscale.extract_at_scales(
        encoder,
        list(paths),
        scales=scales,
        loading=loading,
        pooling=pooling,
        ids=list(ids),
        store=store,
        key=key,
        desc="index images",
    )


# ----------------------------------------------------------------------------- post-processing


def learn_whitening(raw: np.ndarray, dim: int) -> whitening.PCAWhitening | None:
    """PCA-whitening learned on the database as the experiment learns it (``dim`` 0: none).

    ``evaluation.learn_whitening`` on the L2-normalised descriptors, exactly the call
    ``evaluation.postprocess`` makes (it L2-normalises its input once more), so the index's
    whitening is bit-identical to the experiment's.
    """
    if dim == 0:
        return None
    pca = evaluation.learn_whitening(whitening.l2_normalize(raw), None, learn_on="database")
    components = int(pca.projection.shape[1])
    if dim > components:
        raise ValueError(
            f"--pca_dim={dim} exceeds the {components} components a PCA learns from "
            f"{raw.shape[0]} descriptors of size {raw.shape[1]}; expected at most {components} "
            "(or 0: no PCA)"
        )
    return pca


def postprocess(raw: Any, pca: whitening.PCAWhitening | None, dim: int) -> np.ndarray:
    """L2 -> PCA-whitening (``dim`` components) -> L2, as ``experiment.postprocess``."""
    x = whitening.l2_normalize(np.asarray(raw, np.float32))
    if pca is not None:
        x = whitening.apply(pca, x, dim=dim)
    return np.asarray(x, np.float32)


def dba(database: np.ndarray, k: int) -> np.ndarray:
    return np.asarray(expansion.dba(database, k=k, alpha=0.0, block_size=16384), np.float32)


def aqe(queries: np.ndarray, database: np.ndarray, k: int) -> np.ndarray:
    return np.asarray(
        expansion.aqe(queries, database, k=k, alpha=0.0, block_size=16384), np.float32
    )


def place(x: np.ndarray) -> search.Index:
    """The database placed on the device once, for repeated searches (as faiss's ``add``)."""
    return search.Index(np.asarray(x, np.float32))


def rank(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Every database row per query, best first (``[Q, N]``)."""
    return np.asarray(search.rank(queries, database))


def topk(queries: np.ndarray, index: search.Index, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores, idx = index.topk(queries, k)
    return np.asarray(scores), np.asarray(idx)


def diffusion_offline(
    database: np.ndarray, params: Mapping[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The offline diffusion matrix of the database: ``(arrays, parameters)`` to store."""
    off = diffusion.offline(
        database,
        truncation=params["truncation"],
        kd=params["kd"],
        gamma=params["gamma"],
        alpha=params["alpha"],
    )
    meta = {f: getattr(off, f) for f in ("truncation", "kd", "gamma", "alpha", "tol", "max_iter")}
    meta["fingerprint"] = off.fingerprint
    arrays = {"indices": np.asarray(off.indices), "values": np.asarray(off.values)}
    return arrays, meta


def diffusion_rank(
    off: diffusion.Offline, queries: np.ndarray, database: np.ndarray, *, kq: int
) -> np.ndarray:
    """Online diffusion ranks ``[Q, N]`` of unseen queries (the paper's algorithm)."""
    return np.asarray(diffusion.online_rank(off, queries, database, kq=kq))


def rebuild_offline(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Any:
    """An ``Offline`` from stored arrays and parameters; ``online_rank`` checks its recorded
    fingerprint against the database it is given, so an edited database file is refused."""
    return diffusion.Offline(
        indices=jax.numpy.asarray(arrays["indices"]),
        values=jax.numpy.asarray(arrays["values"]),
        truncation=int(meta["truncation"]),
        kd=int(meta["kd"]),
        gamma=float(meta["gamma"]),
        alpha=float(meta["alpha"]),
        tol=float(meta["tol"]),
        max_iter=int(meta["max_iter"]),
        fingerprint=str(meta["fingerprint"]),
    )


def clip_diffusion(params: Mapping[str, Any], n: int) -> dict[str, Any]:
    """kd and kq clipped to a small database, as the experiment does (``ranking``)."""
    out = dict(params)
    for key, limit in (("kd", min(int(out["truncation"]), n)), ("kq", n)):
        if out[key] > limit:
            logging.warning(
                "diffusion %s=%d > %d for %d images; using %d", key, out[key], limit, n, limit
            )
            out[key] = limit
    return out
