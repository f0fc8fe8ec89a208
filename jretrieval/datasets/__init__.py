"""Retrieval datasets on disk: image paths, query boxes and ground truth, by name.

``load_dataset(name, root)`` returns a :class:`Dataset` (paths, not pixels; images are decoded
by ``jretrieval.datasets.images``). Layouts, ``<root>`` being the data folder:

=============  =====================================================================
name           files
=============  =====================================================================
oxford5k       ``<root>/oxford5k/gnd_oxford5k.pkl``, ``<root>/oxford5k/jpg/<imname>.jpg``
paris6k        ``<root>/paris6k/gnd_paris6k.pkl``, ``<root>/paris6k/jpg/<imname>.jpg``
roxford5k      ``<root>/roxford5k/gnd_roxford5k.pkl``, ``<root>/roxford5k/jpg/<imname>.jpg``
               (or the images of ``<root>/oxford5k/jpg``: they are the same files)
rparis6k       ``<root>/rparis6k/gnd_rparis6k.pkl``, ``<root>/rparis6k/jpg/<imname>.jpg``
               (or ``<root>/paris6k/jpg``)
demo           ``<root>/demo/gnd_demo.pkl``, ``<root>/demo/jpg/<imname>.jpg`` (classic protocol;
               written by ``jretrieval.datasets.demo.build_demo_dataset``)
instre         ``<root>/instre/gnd_instre.mat`` (or ``.pkl``), images ``<root>/instre/<imname>``
               (Iscen et al., CVPR 2017: 1250 queries, 27293 database images)
revisitop1m    ``<root>/revisitop1m/revisitop1m.txt``, ``<root>/revisitop1m/jpg/<name>``
               (database only; also appended to any dataset with ``distractors=True``)
folder         every image under ``root`` itself (database only, no queries)
=============  =====================================================================

These are the cirtorch / revisitop layouts (revisitop ``python/dataset.py``: ``imlist`` and
``qimlist`` names get ``.jpg`` appended, the 1M list carries its own extension). Queries are
separate images (``qimlist``), cropped to ``gnd[i]["bbx"]`` = ``(x1, y1, x2, y2)`` in pixels as in
the standard Oxford/Paris and revisited protocols; ``gnd`` indices refer to positions in
``db_paths``. Distractors are appended after the dataset's own database images, so ``gnd`` stays
valid.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from absl import logging

__all__ = [
    "DATASETS",
    "PROTOCOL",
    "Dataset",
    "check_query_boxes",
    "find_missing",
    "load_dataset",
    "require_ground_truth",
]

#: the metrics protocol of each dataset (``jretrieval.metrics.PROTOCOLS``); ``None`` = no gnd.
PROTOCOL: dict[str, str | None] = {
    "oxford5k": "classic",
    "paris6k": "classic",
    "roxford5k": "revisited",
    "rparis6k": "revisited",
    "instre": "instre",
    "demo": "classic",
    "revisitop1m": None,
    "folder": None,
}

#: image file suffixes; a list entry that ends with one of them gets no ``.jpg`` appended.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

#: how many missing files an error message lists before ``... and N more``.
MAX_LISTED = 10


class Dataset(NamedTuple):
    """A retrieval dataset as paths and ground truth.

    Attributes:
      name: dataset key (``"roxford5k"``...).
      root: the data folder it was loaded from.
      db_paths: ``N`` database image paths, in the ground truth's ``imlist`` order, distractors
        last.
      query_paths: ``Q`` query image paths (``qimlist`` order); empty for database-only sets.
      query_bbx: ``Q`` boxes ``(x1, y1, x2, y2)`` in pixels of the full query image, or ``None``
        when queries are not cropped.
      gnd: ``Q`` dicts of the ground truth (``ok``/``junk`` or ``easy``/``hard``/``junk``: int
        arrays of indices into ``db_paths``; ``bbx``).
      protocol: ``"classic"``, ``"revisited"``, ``"instre"``, or ``None`` (no ground truth).
      n_distractors: how many of the ``db_paths`` (the last ones) are revisitop1m distractors.
    """

    name: str
    root: str
    db_paths: list[str]
    query_paths: list[str]
    query_bbx: list[tuple[float, float, float, float]] | None
    gnd: list[dict[str, Any]]
    protocol: str | None
    n_distractors: int = 0


def _download_hint(name: str) -> str:
    if name == "demo":
        return "build it with `jretrieval.datasets.demo.build_demo_dataset(root)`"
    return f"download it with `bin/download_datasets.sh {name}`"


def _not_found(name: str, root: str, looked: Sequence[str]) -> FileNotFoundError:
    where = ", ".join(looked)
    return FileNotFoundError(
        f"dataset {name!r} not found under root {root!r}: looked for {where}; "
        f"{_download_hint(name)} (or pass the folder that holds it as root)"
    )


def _with_suffix(name: str, ext: str) -> str:
    return name if name.lower().endswith(IMAGE_SUFFIXES) else name + ext


def find_missing(paths: Sequence[str]) -> list[str]:
    """The entries of ``paths`` that are not existing files (one ``listdir`` per folder)."""
    listings: dict[str, set[str] | None] = {}
    missing = []
    for path in paths:
        folder, base = os.path.split(path)
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder or "."))
            except OSError:
                listings[folder] = None
        files = listings[folder]
        if files is None or base not in files:
            missing.append(path)
    return missing


def _check_present(name: str, what: str, paths: Sequence[str], source: str) -> None:
    missing = find_missing(paths)
    if missing:
        shown = "\n  ".join(missing[:MAX_LISTED])
        more = f"\n  ... and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
        raise FileNotFoundError(
            f"dataset {name!r}: {len(missing)} of the {len(paths)} {what} named by {source} are "
            f"missing:\n  {shown}{more}\n{_download_hint(name)}"
        )


def _gt_source(path: str) -> str:
    return f"the ground truth {path}"


def _first_dir(candidates: Sequence[str]) -> str | None:
    return next((c for c in candidates if os.path.isdir(c)), None)


def _load_revisitop(name: str, root: str, *, crop_queries: bool, check_files: bool) -> Dataset:
    """oxford5k / paris6k / roxford5k / rparis6k (and demo) from cirtorch / revisitop pickles."""
    from jretrieval.datasets import groundtruth

    base = os.path.join(root, name)
    gnd_path = os.path.join(base, f"gnd_{name}.pkl")
    image_dirs = [os.path.join(base, "jpg")]
    if name in ("roxford5k", "rparis6k"):  # same photographs as the classic sets
        image_dirs.append(os.path.join(root, name[1:], "jpg"))
    image_dir = _first_dir(image_dirs)
    if not os.path.isfile(gnd_path) or image_dir is None:
        raise _not_found(name, root, [gnd_path, *(d + "/" for d in image_dirs)])
    gt = groundtruth.load_gnd(gnd_path)
    db = [os.path.join(image_dir, _with_suffix(n, ".jpg")) for n in gt.imlist]
    queries = [os.path.join(image_dir, _with_suffix(n, ".jpg")) for n in gt.qimlist]
    if check_files:
        _check_present(name, "images", sorted(set(db) | set(queries)), _gt_source(gnd_path))
    return Dataset(
        name=name,
        root=root,
        db_paths=db,
        query_paths=queries,
        query_bbx=_boxes(name, gt.gnd) if crop_queries else None,
        gnd=list(gt.gnd),
        protocol=PROTOCOL[name],
    )


def _boxes(name: str, gnd: Sequence[dict[str, Any]]) -> list[tuple[float, float, float, float]]:
    boxes = []
    for i, entry in enumerate(gnd):
        bbx = entry.get("bbx")
        if bbx is None or len(bbx) != 4:
            raise ValueError(
                f"dataset {name!r}: gnd[{i}]['bbx'] is {bbx!r}; expected (x1, y1, x2, y2) "
                "(pass crop_queries=False to use full query images)"
            )
        boxes.append(tuple(float(v) for v in bbx))
    return boxes


def check_query_boxes(dataset: Dataset) -> None:
    """Refuses a query whose box has no area inside its image, naming the query.

    Reads only the image headers (``jretrieval.datasets.images.image_size``), so a broken ground
    truth fails before any image is decoded. Headers that cannot be read are left to the
    extraction (which raises, or skips them with ``skip_corrupt``).

    Raises:
      InvalidBoxError: naming the dataset, the query's index and file, its box and image size.
    """
    from jretrieval.datasets import images

    if dataset.query_bbx is None:
        return
    for i, (path, box) in enumerate(zip(dataset.query_paths, dataset.query_bbx, strict=True)):
        try:
            width, height = images.image_size(path)
        except (images.CorruptImageError, OSError):
            continue
        try:
            images.clip_box(box, width, height, path=path)
        except images.InvalidBoxError as err:
            raise images.InvalidBoxError(
                f"dataset {dataset.name!r}: query {i} ({os.path.basename(path)}): {err} "
                f"(fix gnd[{i}]['bbx'] in the ground truth, or pass crop_queries=False)"
            ) from None


def require_ground_truth(dataset: Dataset) -> None:
    """Raises ``ValueError`` unless ``dataset`` has queries and ground truth to evaluate."""
    if dataset.query_paths and dataset.protocol is not None:
        return
    evaluable = sorted(k for k, v in PROTOCOL.items() if v is not None)
    raise ValueError(
        f"dataset {dataset.name!r} (root {dataset.root!r}) is database-only: it has no queries "
        f"and no ground truth, so it cannot be evaluated; evaluation needs one of {evaluable}"
    )


def _load_instre(name: str, root: str, *, crop_queries: bool, check_files: bool) -> Dataset:
    """INSTRE with the split and ground truth of Iscen et al. (CVPR 2017)."""
    from jretrieval.datasets import groundtruth

    base = os.path.join(root, "instre")
    candidates = [os.path.join(base, f) for f in ("gnd_instre.mat", "gnd_instre.pkl")]
    gnd_path = next((c for c in candidates if os.path.isfile(c)), None)
    if gnd_path is None or not os.path.isdir(base):
        raise _not_found(name, root, candidates)
    gt = groundtruth.load_instre(gnd_path)
    image_dir = _first_dir([os.path.join(base, "jpg")]) or base
    db = [os.path.join(image_dir, _with_suffix(n, ".jpg")) for n in gt.imlist]
    queries = [os.path.join(image_dir, _with_suffix(n, ".jpg")) for n in gt.qimlist]
    if check_files:
        _check_present(name, "images", sorted(set(db) | set(queries)), _gt_source(gnd_path))
    with_box = crop_queries and all(e.get("bbx") is not None for e in gt.gnd)
    return Dataset(
        name=name,
        root=root,
        db_paths=db,
        query_paths=queries,
        query_bbx=_boxes(name, gt.gnd) if with_box else None,
        gnd=list(gt.gnd),
        protocol=PROTOCOL[name],
    )


def _distractor_paths(root: str, *, limit: int | None, check_files: bool) -> list[str]:
    from jretrieval.datasets import groundtruth

    name = "revisitop1m"
    base = os.path.join(root, name)
    list_path = os.path.join(base, f"{name}.txt")
    image_dir = os.path.join(base, "jpg")
    if not os.path.isfile(list_path) or not os.path.isdir(image_dir):
        raise _not_found(name, root, [list_path, image_dir + "/"])
    names = groundtruth.load_distractors(list_path)
    if limit is not None:
        if limit < 0 or limit > len(names):
            raise ValueError(f"max_distractors={limit}; expected 0..{len(names)} ({list_path})")
        names = names[:limit]
    paths = [os.path.join(image_dir, n) for n in names]
    if check_files:
        _check_present(name, "distractor images", paths, list_path)
    return paths


def _load_distractors_only(name: str, root: str, *, max_distractors=None, check_files=True):
    paths = _distractor_paths(root, limit=max_distractors, check_files=check_files)
    return Dataset(name, root, paths, [], None, [], None, n_distractors=len(paths))


def _load_folder(name: str, root: str, **_: Any) -> Dataset:
    """Every image under ``root`` (sorted relative paths), database only."""
    from jretrieval.datasets import groundtruth

    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset 'folder': {root!r} is not a directory of images")
    paths = [os.path.join(root, p) for p in groundtruth.list_images(root)]
    if not paths:
        raise FileNotFoundError(
            f"dataset 'folder': no images ({', '.join(IMAGE_SUFFIXES)}) under {root!r}"
        )
    return Dataset(name, root, paths, [], None, [], None)


#: name -> loader ``(name, root, **kw) -> Dataset``.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "oxford5k": _load_revisitop,
    "paris6k": _load_revisitop,
    "roxford5k": _load_revisitop,
    "rparis6k": _load_revisitop,
    "instre": _load_instre,
    "demo": _load_revisitop,
    "revisitop1m": _load_distractors_only,
    "folder": _load_folder,
}


def load_dataset(
    name: str,
    root: str | os.PathLike,
    *,
    distractors: bool = False,
    max_distractors: int | None = None,
    crop_queries: bool = True,
    check_files: bool = True,
) -> Dataset:
    """Loads a dataset's paths and ground truth.

    Args:
      name: one of ``DATASETS``.
      root: the data folder (for ``"folder"``: the folder of images itself).
      distractors: append the revisitop1m distractors (``<root>/revisitop1m``) to the database.
      max_distractors: use only the first this many distractors (e.g. 100000 for R100k).
      crop_queries: crop queries to their ``bbx`` (standard protocol); ``False`` gives
        ``query_bbx=None``.
      check_files: verify that every named image exists (``FileNotFoundError`` listing the
        first missing ones and their count) and that every query box overlaps its image
        (``check_query_boxes``; image headers only).

    Returns:
      The :class:`Dataset`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    root = os.fspath(root)
    if name == "folder":
        if distractors:
            raise ValueError("dataset 'folder' takes no distractors")
        return _load_folder(name, root)
    if name == "revisitop1m":
        return _load_distractors_only(
            name, root, max_distractors=max_distractors, check_files=check_files
        )
    ds = DATASETS[name](name, root, crop_queries=crop_queries, check_files=check_files)
    if distractors:
        extra = _distractor_paths(root, limit=max_distractors, check_files=check_files)
        ds = ds._replace(db_paths=ds.db_paths + extra, n_distractors=len(extra))
    elif max_distractors is not None:
        raise ValueError("max_distractors is set but distractors=False")
    if check_files:
        check_query_boxes(ds)
    logging.info(
        "dataset %s: %d database images (%d distractors), %d queries",
        name,
        len(ds.db_paths),
        ds.n_distractors,
        len(ds.query_paths),
    )
    return ds
