"""The offline demo dataset: views of real photographs that ship inside installed packages.

``build_demo_dataset(root)`` writes a small instance-retrieval set in the cirtorch / revisitop
layout (``jretrieval.datasets``, classic protocol: ``ok`` / ``junk``):

* ``<root>/demo/jpg/<name>.jpg``: every image (queries and database), JPEG.
* ``<root>/demo/gnd_demo.pkl``: ``{"imlist": [N names], "qimlist": [Q names], "gnd": [Q dicts]}``
  with ``gnd[q]["ok"]`` / ``["junk"]`` int64 arrays of 0-based positions in ``imlist`` and
  ``gnd[q]["bbx"] = [x1, y1, x2, y2]`` (floats, pixels of the full query image).
* ``<root>/demo/demo_info.json``: the build parameters, the set's sizes and its chance-level
  mAP; written last, it marks the build complete.

Instances are the photographs bundled with scikit-image (``skimage/data``: astronaut, coffee,
chelsea, rocket, camera, coins, moon, immunohistochemistry, retina, Hubble deep field, the
motorcycle stereo pair) and matplotlib (``sample_data/grace_hopper.jpg``); files are read from
the installed packages, never fetched. Each instance gives one query (a mild view, with a box
around the object) and ``n_views`` database views made by a random homography (a crop of
45-90% of the photograph, scale, rotation up to 12 degrees, perspective), colour changes
(brightness, contrast, saturation, hue, occasional greyscale or blur) and JPEG re-encoding;
``n_junk`` extreme close-ups (less than 10% of the photograph visible, like Oxford's "junk")
are ignored by the protocol. Distractors are views of held-out photographs and textures
(clock, page, text, cell, brick, grass, gravel, microaneurysms). Everything is a deterministic
function of ``seed`` and the parameters (one NumPy generator per image, keyed by
``(seed, image name)``).

Default size: 12 instances x (1 query + 5 views + 1 junk) + 8 x 4 distractors = 12 queries and
104 database images (per query 5 positives and 1 junk; 32 distractors); built in about 2 s.
Its chance level (the expected mAP of a random ranking, ``chance_map``) is 6.82%. Measured
with ``configs/demo.py`` (a randomly initialised ResNet-50, exact BN recalibration, 362x362,
R-MAC, PCA-whitening to 64 dims): global search 36.08% mAP, 5.3 times chance.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import shutil
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image, ImageEnhance, ImageFilter

from jretrieval.metrics import chance_map  # the formula lives with the metrics
from jretrieval.progress import track

__all__ = [
    "DEMO_NAME",
    "DISTRACTORS",
    "INSTANCES",
    "build_demo_dataset",
    "chance_map",
    "read_demo_info",
]

#: the dataset's folder name under ``root`` (and its name for ``jretrieval.datasets``).
DEMO_NAME = "demo"
#: bump when the generated images change for the same parameters (forces a rebuild).
FORMAT_VERSION = 1
INFO_FILE = "demo_info.json"

#: instance name -> photographs of it, as ``(package, path inside the package)``; views cycle
#: through them (the motorcycle has two real viewpoints: the stereo pair).
INSTANCES: dict[str, tuple[tuple[str, str], ...]] = {
    "astronaut": (("skimage", "data/astronaut.png"),),
    "coffee": (("skimage", "data/coffee.png"),),
    "chelsea": (("skimage", "data/chelsea.png"),),
    "rocket": (("skimage", "data/rocket.jpg"),),
    "camera": (("skimage", "data/camera.png"),),
    "coins": (("skimage", "data/coins.png"),),
    "moon": (("skimage", "data/moon.png"),),
    "ihc": (("skimage", "data/ihc.png"),),
    "retina": (("skimage", "data/retina.jpg"),),
    "hubble": (("skimage", "data/hubble_deep_field.jpg"),),
    "motorcycle": (
        ("skimage", "data/motorcycle_left.png"),
        ("skimage", "data/motorcycle_right.png"),
    ),
    "grace_hopper": (("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),),
}

#: held-out photographs and textures whose views are the distractors.
DISTRACTORS: dict[str, tuple[str, str]] = {
    "clock": ("skimage", "data/clock_motion.png"),
    "page": ("skimage", "data/page.png"),
    "text": ("skimage", "data/text.png"),
    "cell": ("skimage", "data/cell.png"),
    "brick": ("skimage", "data/brick.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
    "microaneurysms": ("skimage", "data/microaneurysms.png"),
}

_INSTALL_HINT = {
    "skimage": "pip install scikit-image",
    "matplotlib": "pip install matplotlib",
}

#: view kind -> (crop area fraction range, max |rotation| degrees, perspective jitter,
#: output long side as a fraction of ``max_side``, colour strength).
_VIEW_KINDS: dict[str, tuple[tuple[float, float], float, float, tuple[float, float], float]] = {
    "query": ((0.8, 1.0), 4.0, 0.02, (0.9, 1.0), 0.3),
    "view": ((0.45, 0.9), 12.0, 0.06, (0.55, 1.0), 0.6),
    "junk": ((0.03, 0.08), 12.0, 0.06, (0.55, 1.0), 0.6),
    "distractor": ((0.45, 0.9), 12.0, 0.06, (0.55, 1.0), 0.6),
}


def _package_file(package: str, relative: str) -> str:
    """The path of a data file shipped inside an installed package (the package not imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the demo dataset reads photographs bundled with {package!r}, which is not installed: "
            f"{_INSTALL_HINT.get(package, 'pip install ' + package)} (or pip install -e '.[demo]')"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"the demo dataset expected the photograph {relative!r} inside the installed "
            f"{package!r} package, at {path}; this version does not ship it"
        )
    return path


def _load_source(package: str, relative: str, max_side: int) -> Image.Image:
    """An RGB photograph, downscaled so its long side is at most ``2 * max_side``."""
    path = _package_file(package, relative)
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        im = im.convert("RGB")
    limit = 2 * max_side
    if max(im.size) > limit:
        scale = limit / max(im.size)
        im = im.resize(
            (max(1, round(im.width * scale)), max(1, round(im.height * scale))),
            Image.Resampling.LANCZOS,
        )
    return im


def _rng(seed: int, name: str) -> np.random.Generator:
    """The generator of one image: independent of build order and of the other images."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))


def _homography(src: np.ndarray, dst: np.ndarray) -> tuple[float, ...]:
    """Pillow PERSPECTIVE coefficients mapping output points ``dst`` [4,2] to input ``src``."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for i, ((x, y), (u, v)) in enumerate(zip(dst, src, strict=True)):
        a[2 * i] = (x, y, 1, 0, 0, 0, -u * x, -u * y)
        a[2 * i + 1] = (0, 0, 0, x, y, 1, -v * x, -v * y)
        b[2 * i], b[2 * i + 1] = u, v
    return tuple(float(c) for c in np.linalg.solve(a, b))


def _source_quad(
    width: int, height: int, rng: np.random.Generator, area: tuple[float, float], rot: float, jit
) -> tuple[np.ndarray, float]:
    """A quadrilateral [4,2] inside the image (TL, TR, BR, BL) and its width/height ratio."""
    frac = rng.uniform(*area)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3))) * width / height
    w = min(math.sqrt(frac * width * height * aspect), width)
    h = min(w / aspect, height)
    corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
    corners += rng.uniform(-jit, jit, size=(4, 2)) * (w, h)
    theta = math.radians(rng.uniform(-rot, rot))
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    corners = corners @ rotation.T
    half = np.abs(corners).max(axis=0)
    shrink = min(1.0, (width / 2 - 0.5) / half[0], (height / 2 - 0.5) / half[1])
    corners *= shrink
    half *= shrink
    centre = rng.uniform(half, (width - half[0], height - half[1]))
    return corners + centre, w / h


def _recolour(im: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """Brightness, contrast, saturation and hue changes; sometimes greyscale or a light blur."""
    s = strength
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(1 - 0.3 * s, 1 + 0.3 * s))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(1 - 0.3 * s, 1 + 0.3 * s))
    im = ImageEnhance.Color(im).enhance(rng.uniform(1 - 0.5 * s, 1 + 0.5 * s))
    hsv = np.asarray(im.convert("HSV")).copy()
    shift = round(rng.uniform(-0.06, 0.06) * s * 256)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 256).astype(np.uint8)
    im = Image.fromarray(hsv, "HSV").convert("RGB")
    if rng.uniform() < 0.1 * s:
        im = im.convert("L").convert("RGB")
    if rng.uniform() < 0.3 * s:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return im


def _render(src: Image.Image, rng: np.random.Generator, kind: str, max_side: int) -> Image.Image:
    """One view of ``src``: homography (crop, scale, rotation, perspective), then colour."""
    area, rot, jit, side, strength = _VIEW_KINDS[kind]
    quad, aspect = _source_quad(src.width, src.height, rng, area, rot, jit)
    long_side = rng.uniform(*side) * max_side
    if aspect >= 1:
        size = (round(long_side), max(32, round(long_side / aspect)))
    else:
        size = (max(32, round(long_side * aspect)), round(long_side))
    out = np.array([[0, 0], [size[0], 0], [size[0], size[1]], [0, size[1]]], dtype=float)
    view = src.transform(
        size,
        Image.Transform.PERSPECTIVE,
        _homography(quad, out),
        resample=Image.Resampling.BICUBIC,
        fillcolor=(0, 0, 0),
    )
    return _recolour(view, rng, strength)


def _query_box(size: tuple[int, int], rng: np.random.Generator) -> list[float]:
    """``[x1, y1, x2, y2]`` covering 60-90% of each side of the query image."""
    box = []
    for extent in size:
        length = rng.uniform(0.6, 0.9) * extent
        start = rng.uniform(0, extent - length)
        box.append((float(round(start)), float(round(start + length))))
    return [box[0][0], box[1][0], box[0][1], box[1][1]]


def _params(
    seed: int,
    instances: Sequence[str],
    distractors: Sequence[str],
    n_views: int,
    n_junk: int,
    n_distractor_views: int,
    max_side: int,
    quality: int,
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "instances": list(instances),
        "distractors": list(distractors),
        "n_views": int(n_views),
        "n_junk": int(n_junk),
        "n_distractor_views": int(n_distractor_views),
        "max_side": int(max_side),
        "quality": int(quality),
    }


def read_demo_info(dataset_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``demo_info.json`` of a complete build (parameters, sizes, chance mAP), else None."""
    path = os.path.join(os.fspath(dataset_dir), INFO_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("images"), list):
        return None
    jpg = os.path.join(os.fspath(dataset_dir), "jpg")
    try:
        present = set(os.listdir(jpg))
    except OSError:
        return None
    expected = {f"{n}.jpg" for n in info["images"]}
    if not expected <= present or not os.path.isfile(os.path.join(dataset_dir, "gnd_demo.pkl")):
        return None
    return info


def _check_args(
    instances: Sequence[str],
    distractors: Sequence[str],
    n_views: int,
    n_junk: int,
    n_distractor_views: int,
    max_side: int,
    quality: int,
) -> None:
    unknown = [n for n in instances if n not in INSTANCES]
    if unknown or not instances:
        raise ValueError(
            f"instances={list(instances)}: expected a non-empty subset of {sorted(INSTANCES)}"
        )
    unknown = [n for n in distractors if n not in DISTRACTORS]
    if unknown:
        raise ValueError(
            f"distractors={list(distractors)}: unknown {unknown}; expected names "
            f"from {sorted(DISTRACTORS)}"
        )
    if len(set(instances)) != len(instances) or len(set(distractors)) != len(distractors):
        raise ValueError("instances and distractors must not repeat names")
    if n_views < 1 or n_junk < 0 or n_distractor_views < 0:
        raise ValueError(
            f"n_views={n_views} (>= 1), n_junk={n_junk} (>= 0), "
            f"n_distractor_views={n_distractor_views} (>= 0): out of range"
        )
    if not 64 <= max_side <= 4096:
        raise ValueError(f"max_side={max_side}; expected 64..4096 pixels")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality={quality}; expected a JPEG quality 1..100")


def _write_jpeg(im: Image.Image, path: str, quality: int) -> None:
    im.save(path, "JPEG", quality=quality)


def _generate(folder: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Writes the images and the gnd into ``folder`` (a fresh directory); returns the info."""
    seed, max_side, quality = params["seed"], params["max_side"], params["quality"]
    jpg = os.path.join(folder, "jpg")
    os.makedirs(jpg)
    jobs: list[tuple[str, tuple[str, str], str, str | None]] = []  # name, source, kind, inst
    for inst in params["instances"]:
        sources = INSTANCES[inst]
        jobs.append((f"query_{inst}", sources[0], "query", inst))
        for j in range(params["n_views"]):
            jobs.append((f"{inst}_v{j + 1:02d}", sources[(j + 1) % len(sources)], "view", inst))
        for j in range(params["n_junk"]):
            jobs.append((f"{inst}_junk{j + 1:02d}", sources[j % len(sources)], "junk", inst))
    for name in params["distractors"]:
        for j in range(params["n_distractor_views"]):
            jobs.append((f"distractor_{name}_v{j + 1:02d}", DISTRACTORS[name], "distractor", None))

    cache: dict[tuple[str, str], Image.Image] = {}
    bbx: dict[str, list[float]] = {}
    for name, source, kind, _ in track(jobs, total=len(jobs), desc="build demo dataset"):
        if source not in cache:
            cache[source] = _load_source(*source, max_side)
        rng = _rng(seed, name)
        view = _render(cache[source], rng, kind, max_side)
        if kind == "query":
            bbx[name] = _query_box(view.size, rng)
        _write_jpeg(
            view, os.path.join(jpg, f"{name}.jpg"), int(rng.integers(quality - 15, quality + 1))
        )

    db = [(name, kind, inst) for name, _, kind, inst in jobs if kind != "query"]
    order = _rng(seed, "database order").permutation(len(db))
    db = [db[i] for i in order]
    imlist = [name for name, _, _ in db]
    qimlist = [f"query_{inst}" for inst in params["instances"]]
    gnd = []
    for inst in params["instances"]:
        ok = [i for i, (_, kind, owner) in enumerate(db) if owner == inst and kind == "view"]
        junk = [i for i, (_, kind, owner) in enumerate(db) if owner == inst and kind == "junk"]
        gnd.append(
            {
                "bbx": bbx[f"query_{inst}"],
                "ok": np.asarray(ok, dtype=np.int64),
                "junk": np.asarray(junk, dtype=np.int64),
            }
        )
    with open(os.path.join(folder, f"gnd_{DEMO_NAME}.pkl"), "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f, protocol=4)
    return {
        "params": dict(params),
        "n_queries": len(qimlist),
        "n_database": len(imlist),
        "n_instances": len(params["instances"]),
        "n_distractors": len(params["distractors"]) * params["n_distractor_views"],
        "chance_map": chance_map(gnd, len(imlist)),
        "images": sorted(qimlist + imlist),
        "sources": {
            **{k: [list(s) for s in INSTANCES[k]] for k in params["instances"]},
            **{k: [list(DISTRACTORS[k])] for k in params["distractors"]},
        },
    }


def build_demo_dataset(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    instances: Sequence[str] | None = None,
    distractors: Sequence[str] | None = None,
    n_views: int = 5,
    n_junk: int = 1,
    n_distractor_views: int = 4,
    max_side: int = 480,
    quality: int = 90,
) -> str:
    """Builds (or reuses) the offline demo dataset under ``<root>/demo``.

    Args:
      root: the data folder (``config.data.root``); the set goes to ``<root>/demo``.
      seed: fixes every view, box and the database order.
      instances: names from ``INSTANCES`` (default: all 12), one query each.
      distractors: names from ``DISTRACTORS`` (default: all 8).
      n_views: database views per instance, the query's positives (``ok``).
      n_junk: extreme close-ups per instance, the query's ``junk``.
      n_distractor_views: views per distractor photograph.
      max_side: long side of the generated images in pixels (views are 55-100% of it).
      quality: JPEG quality of the queries; views draw theirs from ``quality - 15 .. quality``.

    Returns:
      The dataset folder ``<root>/demo`` (``jpg/``, ``gnd_demo.pkl``, ``demo_info.json``).

    A complete build with the same parameters is reused as it is. Otherwise the set is written
    to a temporary folder beside it and moved into place, so an interrupted build never
    leaves a folder that looks complete; a previous build with other parameters is replaced.
    """
    instances = list(INSTANCES) if instances is None else list(instances)
    distractors = list(DISTRACTORS) if distractors is None else list(distractors)
    _check_args(instances, distractors, n_views, n_junk, n_distractor_views, max_side, quality)
    params = _params(
        seed, instances, distractors, n_views, n_junk, n_distractor_views, max_side, quality
    )
    root = os.fspath(root)
    target = os.path.join(root, DEMO_NAME)
    info = read_demo_info(target)
    if info is not None and info.get("params") == params:
        logging.info("demo dataset: reusing %s (%d images)", target, len(info["images"]))
        return target
    if os.path.exists(target) and not _is_demo_folder(target):
        raise FileExistsError(
            f"{target} exists and is not a demo dataset build (no {INFO_FILE} or "
            f"gnd_{DEMO_NAME}.pkl); move it away or pass another root"
        )
    os.makedirs(root, exist_ok=True)
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=f".{DEMO_NAME}.tmp-", dir=root)
    try:
        info = _generate(tmp, params)
        info["build_seconds"] = round(time.perf_counter() - start, 3)
        with open(os.path.join(tmp, INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        _move_into_place(tmp, target, params)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    logging.info(
        "demo dataset: %d queries, %d database images (%d distractors) in %s, built in %.1f s; "
        "chance mAP %.2f%%",
        info["n_queries"],
        info["n_database"],
        info["n_distractors"],
        target,
        info["build_seconds"],
        info["chance_map"],
    )
    return target


def _is_demo_folder(path: str) -> bool:
    names = set(os.listdir(path)) if os.path.isdir(path) else set()
    return bool(names & {INFO_FILE, f"gnd_{DEMO_NAME}.pkl"}) or not names


def _move_into_place(tmp: str, target: str, params: Mapping[str, Any]) -> None:
    """Replaces ``target`` by the finished build ``tmp`` (another process may race us)."""
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=f".{DEMO_NAME}.old-", dir=os.path.dirname(target))
        os.rmdir(old)
        try:
            os.rename(target, old)
        except FileNotFoundError:  # another process moved it first
            old = None
    try:
        os.rename(tmp, target)
    except OSError:
        info = read_demo_info(target)  # a concurrent build finished first
        if info is None or info.get("params") != params:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
