"""Image decoding, query cropping, resizing, and a threaded prefetching batch iterator.

Shape convention: an image is ``np.uint8 [H, W, 3]`` RGB (Pillow ``convert("RGB")``, no EXIF
rotation, as cirtorch); a batch is ``np.uint8 [B, H, W, 3]``. Normalisation (mean/std of the
encoder's ``preprocessing``) is *not* done here: it runs on the device inside the jitted step
(``jretrieval.extract``), so the host only moves bytes.

Resize policies (``ResizePolicy``):

- ``fixed``: every image (queries after their crop) is resized to ``size x size`` ignoring aspect,
  Pillow bilinear with antialiasing (torchvision ``Resize((size, size))`` on PIL images); the
  paper's 724x724. One shape for the whole dataset.
- ``max_side``: cirtorch's ``imresize`` (``PIL.Image.thumbnail`` with Lanczos): the longer side
  becomes ``size`` keeping the aspect ratio, never enlarging. A query cropped to its box uses
  ``size * max(crop side) / max(full image side)`` instead, so it keeps the scale of the
  database images (cirtorch ``ImagesFromList``). ``target_size`` computes the result from the
  image header alone, which lets ``plan_batches`` bucket images by shape before decoding them.

Decoding (``jretrieval.datasets.decoding``, re-exported here): 16-bit and float images are
scaled to 8 bits, query boxes clipped to the image (``InvalidBoxError`` when nothing is left),
images beyond ``set_max_pixels`` refused (``ImageTooLargeError``); both are subclasses of
``CorruptImageError``, which ``skip_corrupt=True`` skips.

Bucketing: ``plan_batches`` groups the images by output shape (in order of first appearance) and
cuts each group into batches of at most ``batch_size``, so every shape is compiled once per
batch size (and the fixed policy yields consecutive chunks of the list). The plan is a
deterministic function of the paths, boxes and headers: a resumed extraction replays it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from jretrieval.datasets.decoding import (
    DEFAULT_MAX_PIXELS,
    CorruptImageError,
    ImageTooLargeError,
    InvalidBoxError,
    clip_box,
    get_max_pixels,
    open_image,
    set_max_pixels,
    to_rgb8,
)

__all__ = [
    "Batch",
    "CorruptImageError",
    "DEFAULT_MAX_PIXELS",
    "ImageTooLargeError",
    "InvalidBoxError",
    "ResizePolicy",
    "as_policy",
    "image_size",
    "iterate_batches",
    "clip_box",
    "get_max_pixels",
    "load_image",
    "plan_batches",
    "set_max_pixels",
    "target_size",
]

Box = tuple[float, float, float, float]

MODES = ("fixed", "max_side")


class ResizePolicy(NamedTuple):
    """How images are resized before the encoder.

    Attributes:
      mode: ``"fixed"`` (``size x size``, aspect ignored) or ``"max_side"`` (longer side
        ``size``, aspect kept, never enlarged).
      size: the side in pixels (724 in the paper; 1024 is the usual ``max_side``).
    """

    mode: str = "fixed"
    size: int = 724

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, e.g. for the descriptor store's settings."""
        return {"mode": self.mode, "size": int(self.size)}


def as_policy(policy: ResizePolicy | Mapping[str, Any]) -> ResizePolicy:
    """A validated ``ResizePolicy`` from itself or a dict/ConfigDict ``{"mode", "size"}``."""
    if not isinstance(policy, ResizePolicy):
        if not hasattr(policy, "keys"):
            raise ValueError(f"policy={policy!r}; expected ResizePolicy or {{'mode', 'size'}}")
        unknown = set(policy.keys()) - {"mode", "size"}
        if unknown:
            raise ValueError(f"policy has unknown keys {sorted(unknown)}; expected mode, size")
        policy = ResizePolicy(**dict(policy.items()))
    if policy.mode not in MODES:
        raise ValueError(f"policy mode={policy.mode!r}; expected one of {MODES}")
    if int(policy.size) != policy.size or policy.size < 1:
        raise ValueError(f"policy size={policy.size!r}; expected a positive integer")
    return ResizePolicy(policy.mode, int(policy.size))


def _thumbnail_size(width: int, height: int, limit: float) -> tuple[int, int]:
    """``PIL.Image.thumbnail((limit, limit))``'s output size (Pillow >= 10 rounding)."""
    x = y = math.floor(limit)
    if x >= width and y >= height:
        return width, height
    aspect = width / height

    def round_aspect(number: float, key: Callable[[int], float]) -> int:
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    if x / y >= aspect:
        x = round_aspect(y * aspect, key=lambda n: abs(aspect - n / y))
    else:
        y = round_aspect(x / aspect, key=lambda n: 0 if n == 0 else abs(aspect - x / n))
    return x, y


def target_size(
    width: int, height: int, *, bbx: Sequence[float] | None, policy: ResizePolicy
) -> tuple[int, int]:
    """Output ``(width, height)`` of ``load_image`` for an image of ``width x height`` pixels."""
    policy = as_policy(policy)
    crop_w, crop_h = width, height
    if bbx is not None:
        x1, y1, x2, y2 = clip_box(bbx, width, height)
        crop_w, crop_h = x2 - x1, y2 - y1
    if policy.mode == "fixed":
        return policy.size, policy.size
    limit = policy.size if bbx is None else policy.size * max(crop_w, crop_h) / max(width, height)
    return _thumbnail_size(crop_w, crop_h, limit)


def image_size(path: str | os.PathLike, *, max_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` from the header only (no decoding); ``ImageTooLargeError`` beyond
    ``max_pixels`` (default: the ``set_max_pixels`` limit)."""
    path = os.fspath(path)
    with open_image(path, max_pixels) as img:
        return img.size


def load_image(
    path: str | os.PathLike,
    *,
    bbx: Sequence[float] | None = None,
    policy: ResizePolicy | Mapping[str, Any],
    max_pixels: int | None = None,
) -> np.ndarray:
    """Decodes, crops and resizes one image.

    Args:
      path: image file.
      bbx: optional crop box ``(x1, y1, x2, y2)`` in pixels (``PIL.Image.crop``: coordinates
        rounded, right/bottom exclusive), clipped to the image, applied before resizing.
      policy: a ``ResizePolicy`` or ``{"mode", "size"}``.
      max_pixels: refuse larger images (default: the ``set_max_pixels`` limit).

    Returns:
      ``np.uint8 [H, W, 3]`` RGB with ``(W, H) == target_size(...)``; 16-bit and float images
      scaled to 8 bits (module docstring).

    Raises:
      FileNotFoundError: the file does not exist.
      CorruptImageError: the file cannot be decoded (the message names it); its subclasses
        ``InvalidBoxError`` (``bbx`` has no area inside the image) and ``ImageTooLargeError``
        (more than ``max_pixels`` pixels). Both are raised before any pixel is decoded.
    """
    path = os.fspath(path)
    policy = as_policy(policy)
    with open_image(path, max_pixels) as raw:
        full_w, full_h = raw.size
        crop = None if bbx is None else clip_box(bbx, full_w, full_h, path=path)
        try:
            img = to_rgb8(raw)  # decodes the whole file
        except (OSError, SyntaxError, ValueError) as err:
            raise CorruptImageError(f"cannot decode image {path}: {err}") from err
    size = target_size(full_w, full_h, bbx=crop, policy=policy)
    if crop is not None:
        img = img.crop(crop)
    if img.size != size:
        resample = Image.Resampling.BILINEAR
        if policy.mode == "max_side":
            resample = Image.Resampling.LANCZOS  # cirtorch: thumbnail(..., Image.ANTIALIAS)
        img = img.resize(size, resample)
    out = np.asarray(img, dtype=np.uint8)
    if out.shape != (size[1], size[0], 3):  # pragma: no cover - Pillow contract
        raise RuntimeError(f"{path}: decoded shape {out.shape}, expected {(size[1], size[0], 3)}")
    return out


def plan_batches(
    paths: Sequence[str],
    *,
    bbx: Sequence[Sequence[float] | None] | None = None,
    policy: ResizePolicy | Mapping[str, Any],
    batch_size: int,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> list[tuple[tuple[int, int], np.ndarray]]:
    """Cuts the image list into batches of one output shape each.

    Args:
      paths: ``N`` image paths.
      bbx: ``None`` or ``N`` boxes (``None`` entries for uncropped images).
      policy: resize policy; ``fixed`` needs no header, ``max_side`` reads every header (or
        uses ``sizes``, ``N`` original ``(width, height)``).
      batch_size: largest batch.

    Returns:
      ``[((H, W), indices int64 [b]), ...]`` with ``1 <= b <= batch_size``; groups in order of
      first appearance, indices ascending within a group; every index appears once.
    """
    policy = as_policy(policy)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    if bbx is not None and len(bbx) != len(paths):
        raise ValueError(f"bbx has {len(bbx)} boxes for {len(paths)} paths")
    if sizes is not None and len(sizes) != len(paths):
        raise ValueError(f"sizes has {len(sizes)} entries for {len(paths)} paths")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, path in enumerate(paths):
        box = None if bbx is None else bbx[i]
        if policy.mode == "fixed":
            shape = (policy.size, policy.size)
        else:
            try:
                width, height = sizes[i] if sizes is not None else image_size(path)
                w, h = target_size(width, height, bbx=box, policy=policy)
                shape = (h, w)
            except CorruptImageError:  # bad header or box: load_image raises (or skips) later
                shape = (-1, -1)
        groups.setdefault(shape, []).append(i)
    plan = []
    for shape, members in groups.items():
        idx = np.asarray(members, dtype=np.int64)
        for start in range(0, len(idx), batch_size):
            plan.append((shape, idx[start : start + batch_size]))
    return plan


class Batch(NamedTuple):
    """A decoded batch.

    Attributes:
      indices: ``int64 [b]`` positions in the path list of the images held.
      images: ``uint8 [b, H, W, 3]``.
      failed: ``(index, message)`` of the images of this planned batch that could not be read
        (only with ``skip_corrupt=True``; they are absent from ``indices``/``images``).
    """

    indices: np.ndarray
    images: np.ndarray
    failed: tuple[tuple[int, str], ...] = ()


def _load_into(
    buf: np.ndarray, slot: int, path: str, box: Any, policy: ResizePolicy, loader: Callable
) -> None:
    img = loader(path, bbx=box, policy=policy)
    if img.shape != buf.shape[1:]:
        raise RuntimeError(f"{path}: loaded shape {img.shape}, planned {buf.shape[1:]}")
    buf[slot] = img


def iterate_batches(
    paths: Sequence[str],
    *,
    bbx: Sequence[Sequence[float] | None] | None = None,
    policy: ResizePolicy | Mapping[str, Any],
    batch_size: int,
    plan: Sequence[tuple[tuple[int, int], np.ndarray]] | None = None,
    num_threads: int | None = None,
    prefetch: int = 2,
    skip_corrupt: bool = False,
    loader: Callable[..., np.ndarray] | None = None,
) -> Iterator[Batch]:
    """Decodes batches in a thread pool, ``prefetch`` batches ahead of the consumer.

    Each image is decoded by a pool thread straight into its slot of a preallocated batch
    buffer (Pillow releases the GIL while decoding and resizing), and at most ``prefetch + 1``
    batches are in flight, so memory stays bounded while the device never waits on decoding
    when decoding keeps up.

    Args:
      paths: ``N`` image paths.
      bbx: ``None`` or ``N`` crop boxes.
      policy: resize policy.
      batch_size: largest batch (ignored when ``plan`` is given).
      plan: the output of ``plan_batches`` (computed here when ``None``); batches are yielded in
        its order, so passing a subset of it resumes a run.
      num_threads: decoding threads (default ``min(8, cpu count)``).
      prefetch: batches decoded ahead of the one being consumed.
      skip_corrupt: leave unreadable images out of their batch and list them in
        ``Batch.failed`` instead of raising ``CorruptImageError``.
      loader: replacement for ``load_image`` (same signature), e.g. in tests.

    Yields:
      ``Batch`` in plan order; a batch may hold fewer images than planned (or none) when
      ``skip_corrupt`` dropped some.
    """
    policy = as_policy(policy)
    if prefetch < 0:
        raise ValueError(f"prefetch={prefetch}; expected >= 0")
    if plan is None:
        plan = plan_batches(paths, bbx=bbx, policy=policy, batch_size=batch_size)
    loader = load_image if loader is None else loader
    threads = num_threads or min(8, os.cpu_count() or 1)
    pending: collections.deque = collections.deque()
    steps = iter(plan)
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:

        def submit() -> bool:
            step = next(steps, None)
            if step is None:
                return False
            (height, width), idx = step
            buf = np.empty((len(idx), max(height, 0), max(width, 0), 3), np.uint8)
            futures = [
                pool.submit(
                    _load_into,
                    buf,
                    j,
                    paths[i],
                    None if bbx is None else bbx[i],
                    policy,
                    loader,
                )
                for j, i in enumerate(idx)
            ]
            pending.append((idx, buf, futures))
            return True

        try:
            while len(pending) <= prefetch and submit():
                pass
            while pending:
                idx, buf, futures = pending.popleft()
                submit()
                keep, failed = [], []
                for j, (i, future) in enumerate(zip(idx, futures, strict=True)):
                    err = future.exception()
                    if err is None:
                        keep.append(j)
                    elif skip_corrupt and isinstance(err, (CorruptImageError, OSError)):
                        failed.append((int(i), str(err)))
                    else:
                        raise err
                if failed:
                    yield Batch(idx[keep], buf[keep], tuple(failed))
                else:
                    yield Batch(idx, buf)
        finally:
            for _, _, futures in pending:
                for future in futures:
                    future.cancel()
