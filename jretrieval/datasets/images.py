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

High bit depth: 16-bit grey (Pillow modes ``I;16*``) and 32-bit integer (``I``) images are
scaled to 8 bits as ``round(v / 257)`` (65535 -> 255, so a 16-bit copy of an 8-bit picture,
``v = 257 * b``, decodes to the same bytes), float (``F``) images as ``round(255 * v)`` when
their values lie in [0, 1] and as grey levels (clipped to 0..255) otherwise. Pillow's own
``convert("RGB")`` clips these modes at 255 instead (a dark 16-bit picture turns white).

Boxes and limits: a query box is rounded as ``PIL.Image.crop`` does and clipped to the image; a
box with no area inside the image raises :class:`InvalidBoxError` (naming the file, the box and
the image size). An image of more than ``max_pixels`` pixels (``set_max_pixels``, default
Pillow's 89,478,485) raises :class:`ImageTooLargeError` before it is decoded. Both are
subclasses of ``CorruptImageError``, so ``skip_corrupt=True`` skips them like an undecodable file.

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
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

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


#: Pillow's own decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``), our default.
DEFAULT_MAX_PIXELS = 89_478_485

#: the limit ``load_image`` applies when given none; changed only by ``set_max_pixels``.
_max_pixels = DEFAULT_MAX_PIXELS
#: Pillow's limit as this module found it; ``set_max_pixels`` raises it, never below this.
_PILLOW_LIMIT = Image.MAX_IMAGE_PIXELS

#: Pillow modes whose samples are wider than 8 bits, and the divisor that maps them to 0..255.
_WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SIXTEEN_BIT_TO_EIGHT = 257.0  # 65535 / 255


class CorruptImageError(ValueError):
    """An image file that cannot be opened or decoded; the message names the file."""


class InvalidBoxError(CorruptImageError):
    """A crop box with no area inside its image; the message names the file, box and size."""


class ImageTooLargeError(CorruptImageError):
    """An image of more pixels than the limit (a decompression bomb); names file and count."""


def set_max_pixels(limit: int | None) -> int:
    """Sets the largest image (in pixels) ``load_image`` decodes; returns the previous limit.

    ``None`` restores ``DEFAULT_MAX_PIXELS``. Pillow's own limit is raised to match when
    ``limit`` is larger, so that Pillow does not refuse first with a message that names no file.
    The setting is process-wide, as Pillow's is (``extraction.max_pixels`` in the configs).
    """
    global _max_pixels
    limit = DEFAULT_MAX_PIXELS if limit is None else limit
    if isinstance(limit, bool) or int(limit) != limit or limit < 1:
        raise ValueError(f"max_pixels={limit!r}; expected a positive integer")
    previous, _max_pixels = _max_pixels, int(limit)
    if _PILLOW_LIMIT is not None:  # None: the user switched Pillow's check off already
        Image.MAX_IMAGE_PIXELS = max(_PILLOW_LIMIT, _max_pixels)
    return previous


def get_max_pixels() -> int:
    """The current limit of ``set_max_pixels``."""
    return _max_pixels


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


def clip_box(
    bbx: Sequence[float], width: int, height: int, *, path: str = "image"
) -> tuple[int, int, int, int]:
    """A crop box ``(x1, y1, x2, y2)`` rounded as ``PIL.Image.crop`` does, clipped to the image.

    Args:
      bbx: the box in pixels of the full image, right/bottom exclusive.
      width, height: the image's size.
      path: named in the error message.

    Returns:
      Integer ``(x1, y1, x2, y2)`` with ``0 <= x1 < x2 <= width`` and ``0 <= y1 < y2 <= height``.

    Raises:
      InvalidBoxError: not four finite numbers, an empty box, or no area inside the image.
    """
    values = tuple(bbx) if isinstance(bbx, Sequence | np.ndarray) else (bbx,)
    try:
        coords = [float(v) for v in values]
    except (TypeError, ValueError):
        coords = []
    if len(coords) != 4 or not all(math.isfinite(v) for v in coords):
        raise InvalidBoxError(f"{path}: bbx={values!r}; expected 4 finite numbers (x1, y1, x2, y2)")
    x1, y1, x2, y2 = (int(round(v)) for v in coords)
    if x2 <= x1 or y2 <= y1:
        raise InvalidBoxError(f"{path}: bbx={values!r} is empty; expected x1 < x2 and y1 < y2")
    clipped = (min(max(x1, 0), width), min(max(y1, 0), height))
    clipped += (min(max(x2, 0), width), min(max(y2, 0), height))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise InvalidBoxError(
            f"{path}: bbx={values!r} has no area inside the {width}x{height} image; expected a "
            "box (x1, y1, x2, y2) in pixels that overlaps it"
        )
    return clipped


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


def _too_large(path: str, pixels: int | str, limit: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{path}: image of {pixels} pixels exceeds the limit of {limit} pixels (a possible "
        "decompression bomb); raise extraction.max_pixels if the file is trusted"
    )


def _open(path: str, max_pixels: int | None = None) -> Image.Image:
    """Opens (reads the header of) an image, refusing one of more than ``max_pixels``."""
    limit = _max_pixels if max_pixels is None else max_pixels
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as err:  # beyond twice Pillow's own limit
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise _too_large(path, found.group(1) if found else "too many", limit) from err
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's "cannot identify" etc.
        raise CorruptImageError(f"cannot open image {path}: {err}") from err
    width, height = img.size
    if width * height > limit:
        img.close()
        raise _too_large(path, width * height, limit)
    return img


def _to_rgb8(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB, scaling wide grey modes instead of clipping them."""
    if img.mode in _WIDE_INTEGER_MODES:
        values = np.asarray(img, dtype=np.float64) / _SIXTEEN_BIT_TO_EIGHT
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255, neginf=0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0  # a [0, 1] float image
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def image_size(path: str | os.PathLike, *, max_pixels: int | None = None) -> tuple[int, int]:
    """``(width, height)`` from the header only (no decoding); ``ImageTooLargeError`` beyond
    ``max_pixels`` (default: the ``set_max_pixels`` limit)."""
    path = os.fspath(path)
    with _open(path, max_pixels) as img:
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
    with _open(path, max_pixels) as raw:
        full_w, full_h = raw.size
        crop = None if bbx is None else clip_box(bbx, full_w, full_h, path=path)
        try:
            img = _to_rgb8(raw)  # decodes the whole file
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
