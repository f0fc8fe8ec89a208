"""Reading one image file safely: size limit, crop box, bit depth (then ``images`` resizes).

Shape convention: ``to_rgb8`` returns a Pillow ``RGB`` image (8 bits per channel); boxes are
``(x1, y1, x2, y2)`` in pixels of the full image, right/bottom exclusive.

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
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "CorruptImageError",
    "ImageTooLargeError",
    "InvalidBoxError",
    "clip_box",
    "get_max_pixels",
    "open_image",
    "set_max_pixels",
    "to_rgb8",
]

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


def _too_large(path: str, pixels: int | str, limit: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{path}: image of {pixels} pixels exceeds the limit of {limit} pixels (a possible "
        "decompression bomb); raise extraction.max_pixels if the file is trusted"
    )


def open_image(path: str, max_pixels: int | None = None) -> Image.Image:
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


def to_rgb8(img: Image.Image) -> Image.Image:
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
