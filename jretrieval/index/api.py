"""The Python API: ``Index.build``, ``Index.load``, ``index.query`` and ``index.query_descriptors``.

Shape convention: query descriptors ``[Q, C]`` raw (as extracted) or ``[Q, d]`` post-processed;
the index holds ``[N, d]`` unit rows; results are ``[Q, k]`` (best first).

A query goes through exactly what the index stores: the model (checked by its weights' digest),
the recalibrated BN statistics, the fixed ``size x size`` resize (the query cropped to its box
first, as the protocols crop queries), the scales, the PCA-whitening; then AQE (``aqe`` > 0,
against the stored, possibly DBA'd, database), and the search: inner products (``search.topk``)
or, with ``diffusion=True``, the online diffusion of Yang et al. (AAAI 2019) with the stored
offline matrix. Scores are the inner products of the (expanded) query with the database rows
returned; with diffusion the order is the diffusion's and the score is still the inner product.

Example::

    from jretrieval.index import Index
    index = Index.build("runs/my_index", images="photos/", model="baseline")
    index = Index.load("runs/my_index")
    hits = index.query(images=["query.jpg"], bbx=[(10, 20, 300, 400)], k=5)
    hits.paths[0], hits.scores[0]
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from jretrieval.index import build as build_lib
from jretrieval.index import files, wiring

__all__ = ["Index", "QueryError", "Results"]


class QueryError(ValueError):
    """A query the index cannot answer (bad box, ``k`` too large, another model...)."""


class Results(NamedTuple):
    """Top-k results of ``Q`` queries.

    Attributes:
      scores: float32 ``[Q, k]`` inner products, best first.
      ids: int64 ``[Q, k]`` database rows.
      paths: ``Q`` lists of ``k`` image paths relative to the index's images root.
      queries: float32 ``[Q, d]`` the query descriptors searched with (post-processed, and
        expanded with ``aqe``).
      timings: seconds per stage (``decode``, ``encode``, ``postprocess``, ``search``).
    """

    scores: np.ndarray
    ids: np.ndarray
    paths: list[list[str]]
    queries: np.ndarray
    timings: dict[str, float]


def parse_box(text: str, where: str = "--bbx") -> tuple[float, float, float, float]:
    """``"x1,y1,x2,y2"`` as four floats; the error names ``where``."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4 or not all(np.isfinite(box)):
        raise QueryError(f"{where}={text!r}; expected four numbers x1,y1,x2,y2")
    return box  # type: ignore[return-value]


def check_box(box: Sequence[float], path: str, where: str = "--bbx") -> tuple[float, ...]:
    """A crop box inside the image ``path`` with ``x1 < x2`` and ``y1 < y2``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        raise QueryError(
            f"{where}={x1:g},{y1:g},{x2:g},{y2:g} for {path}: expected x1 < x2, y1 < y2"
        )
    width, height = wiring.image_size(path)
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise QueryError(
            f"{where}={x1:g},{y1:g},{x2:g},{y2:g} lies outside {path} ({width}x{height} pixels); "
            f"expected 0 <= x1 < x2 <= {width}, 0 <= y1 < y2 <= {height}"
        )
    return x1, y1, x2, y2


class Index:
    """A built index (see ``jretrieval.index.files`` for the directory it lives in)."""

    def __init__(self, path: str, data: dict[str, Any]) -> None:
        self.path = path
        self.manifest: dict[str, Any] = data["manifest"]
        self.settings: dict[str, Any] = self.manifest["settings"]
        self.database: np.ndarray = np.asarray(data["database"], np.float32)
        self.paths: list[str] = list(data["paths"])
        self._whitening = data["whitening"]
        self._bn_stats = data["bn_stats"]
        self._diffusion = data["diffusion"]
        self._step = None  # the query encoder's extraction step, made on first use
        self._on_device = None  # (database array, its device copy), made on first search

    # ------------------------------------------------------------------------- build / load

    @classmethod
    def build(cls, out: str, **kwargs: Any) -> Index:
        """Builds the index directory ``out`` and loads it.

        Keyword arguments (``jretrieval.index.build.build_index``): the images (``images=DIR``
        or ``dataset=NAME, data_root=DIR``), the model (``model=`` zoo name with
        ``checkpoint_dir=``, ``checkpoint=FILE.h5``, or ``encoder=`` an ``Encoder`` with
        ``model_name=``), ``size=724``, ``pca_dim=512`` (0: none), ``bn="pytorch"``, ``dba=0``,
        ``diffusion=False`` (``True`` or a dict of Yang et al.'s parameters), ``scales=(1,)``,
        ``batch_size=8``.
        """
        stats = build_lib.build_index(out, **kwargs)
        index = cls.load(out)
        index.build_stats = stats
        if kwargs.get("encoder") is not None:
            index.use_encoder(kwargs["encoder"])
        return index

    @classmethod
    def load(cls, path: str) -> Index:
        """Reads an index directory; ``files.IndexFileError`` names a missing/truncated file."""
        return cls(path, files.read(path))

    def __len__(self) -> int:
        return len(self.paths)

    # ------------------------------------------------------------------------- the model

    def use_encoder(self, encoder: Any, *, given: str = "the given encoder") -> None:
        """Uses ``encoder`` for queries after checking it is the index's model."""
        model = self.manifest["model"]
        digest = wiring.params_digest(encoder)
        if digest != model["params_sha256"]:
            raise QueryError(
                f"index {self.path} was built with model {model['name']!r} (weights sha256 "
                f"{model['params_sha256'][:12]}); {given} has other weights (sha256 "
                f"{digest[:12]}); query with the model the index was built with"
            )
        encoder = wiring.frozen(wiring.with_batch_stats(encoder, self._bn_stats))
        self._step = wiring.make_step(encoder, model, self.settings["scales"])

    def use_model(
        self,
        *,
        model: str | None = None,
        checkpoint: str | None = None,
        checkpoint_dir: str = "converted",
    ) -> None:
        """The query model from ``--model``/``--checkpoint``; by default the index's source."""
        source = self.manifest["model"]["source"]
        given = f"--checkpoint={checkpoint}" if checkpoint else f"--model={model}"
        if model is None and checkpoint is None:
            if source.get("object"):
                raise QueryError(
                    f"index {self.path} was built from an Encoder object; pass the same encoder "
                    "(Index.use_encoder) or its file (--checkpoint)"
                )
            if source.get("checkpoint") and not source.get("model"):
                checkpoint = source["checkpoint"]
            else:
                model = source["model"]
                checkpoint_dir = os.path.dirname(source.get("checkpoint", "")) or checkpoint_dir
            given = f"the index's model {self.manifest['model']['name']!r}"
        encoder, _ = wiring.resolve_model(
            model=model, checkpoint=checkpoint, checkpoint_dir=checkpoint_dir
        )
        self.use_encoder(encoder, given=given)

    # ------------------------------------------------------------------------- queries

    def describe(
        self, images: Sequence[str], bbx: Sequence[Sequence[float] | None] | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Raw descriptors ``[Q, C]`` of query images (cropped to ``bbx``) and stage timings."""
        if self._step is None:
            self.use_model()
        if bbx is not None and len(bbx) != len(images):
            raise QueryError(f"--bbx: {len(bbx)} boxes for {len(images)} images; expected one each")
        timings = {"decode": 0.0, "encode": 0.0}
        rows = []
        for i, path in enumerate(images):
            box = None if bbx is None or bbx[i] is None else check_box(bbx[i], path)
            t0 = time.perf_counter()
            pixels = wiring.load_image(path, bbx=box, size=self.settings["size"])
            t1 = time.perf_counter()
            rows.append(np.asarray(self._step(pixels[None]))[0])
            timings["decode"] += t1 - t0
            timings["encode"] += time.perf_counter() - t1
        return np.stack(rows).astype(np.float32), timings

    def postprocess(self, raw: np.ndarray) -> np.ndarray:
        """L2 -> the index's PCA-whitening -> L2: ``[Q, C] -> [Q, d]``."""
        raw = np.asarray(raw, np.float32)
        if raw.ndim != 2 or raw.shape[1] != self.manifest["raw_dim"]:
            raise QueryError(
                f"descriptors of shape {raw.shape}; expected [Q, {self.manifest['raw_dim']}] "
                "(raw, as extracted by the index's model)"
            )
        pca = None
        if self._whitening is not None:
            from jretrieval.whitening import PCAWhitening

            pca = PCAWhitening(**self._whitening)
        return wiring.postprocess(raw, pca, self.settings["pca_dim"])

    def query(
        self,
        images: Sequence[str] | str,
        bbx: Sequence[Sequence[float] | None] | None = None,
        k: int = 10,
        *,
        aqe: int = 0,
        diffusion: bool = False,
    ) -> Results:
        """The ``k`` nearest indexed images of each query image (see the module docstring)."""
        images = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        self._check_search(k, aqe, diffusion)
        if not images:
            raise QueryError("no query image given; expected at least one IMAGE")
        raw, timings = self.describe([os.fspath(p) for p in images], bbx)
        out = self.query_descriptors(raw, k, aqe=aqe, diffusion=diffusion)
        return out._replace(timings={**timings, **out.timings})

    def query_descriptors(
        self,
        vectors: Any,
        k: int = 10,
        *,
        aqe: int = 0,
        diffusion: bool = False,
        postprocessed: bool = False,
    ) -> Results:
        """Top-k of descriptor vectors: raw ``[Q, C]`` (post-processed here) or, with
        ``postprocessed=True``, ``[Q, d]`` unit rows in the index's space."""
        self._check_search(k, aqe, diffusion)
        t0 = time.perf_counter()
        q = np.asarray(vectors, np.float32)
        if postprocessed:
            if q.ndim != 2 or q.shape[1] != self.database.shape[1]:
                raise QueryError(
                    f"vectors of shape {q.shape}; expected [Q, {self.database.shape[1]}]"
                )
        else:
            q = self.postprocess(q)
        t1 = time.perf_counter()
        placed = self._placed()
        if aqe:
            q = wiring.aqe(q, placed.database, aqe)
        if diffusion:
            meta = self.manifest["diffusion"]
            off = wiring.rebuild_offline(self._diffusion, meta)
            ids = wiring.diffusion_rank(off, q, self.database, kq=meta["kq"])[:, :k]
            scores = np.einsum("qd,qkd->qk", q, self.database[ids])
        else:
            scores, ids = wiring.topk(q, placed, k)
        ids = np.asarray(ids, np.int64)
        timings = {"postprocess": t1 - t0, "search": time.perf_counter() - t1}
        paths = [[self.paths[j] for j in row] for row in ids]
        return Results(np.asarray(scores, np.float32), ids, paths, q, timings)

    def _placed(self) -> Any:
        """The database as a ``search.Index``, placed once (not per query: 100 MB at 50k x 512)."""
        if self._on_device is None or self._on_device[0] is not self.database:
            self._on_device = (self.database, wiring.place(self.database))
        return self._on_device[1]

    def _check_search(self, k: int, aqe: int, diffusion: bool) -> None:
        n = len(self.paths)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
            raise QueryError(f"--k={k!r}; expected 1 <= k <= {n}, the number of indexed images")
        if isinstance(aqe, bool) or not isinstance(aqe, (int, np.integer)) or not 0 <= aqe <= n:
            raise QueryError(f"--aqe={aqe!r}; expected 0 <= aqe <= {n}")
        if diffusion and self._diffusion is None:
            raise QueryError(
                f"--diffusion: index {self.path} has no offline diffusion matrix; rebuild it with "
                "`python -m jretrieval.index build --diffusion ...`"
            )
