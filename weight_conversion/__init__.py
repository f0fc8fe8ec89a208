"""PyTorch checkpoints -> converted Flax encoder files (HDF5); the only package importing torch.

Shape convention: torch convs OIHW become Flax HWIO, Linear weights are transposed; see the
per-family modules. ``convert_file`` is what ``python -m weight_conversion`` runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging

from jretrieval import models
from weight_conversion import amdim, apgem, resnet
from weight_conversion.checkpoint import load_checkpoint, sha256
from weight_conversion.detect import detect

Converter = Callable[[Mapping[str, Any]], tuple[dict, dict, dict]]

#: ``--format`` name -> converter returning ``(architecture, variables, preprocessing)``.
FORMATS: dict[str, Converter] = {
    "torchvision": resnet.convert_torchvision,
    "simclr": resnet.convert_simclr,
    "moco": resnet.convert_moco,
    "amdim": amdim.convert,
    "apgem": apgem.convert,
}

__all__ = ["FORMATS", "convert_file", "detect", "load_checkpoint"]


def convert_file(
    src: str | os.PathLike, out: str | os.PathLike, *, format: str = "auto"
) -> dict[str, Any]:
    """Converts checkpoint ``src`` into encoder file ``out`` (written atomically).

    Args:
      src: a PyTorch checkpoint (read without running its code).
      out: the ``.h5`` file to write; nothing is written if any check fails.
      format: ``"auto"`` (detect from the keys) or a key of ``FORMATS``.

    Returns:
      The metadata written (source name, SHA-256, format, architecture).
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format {format!r}; expected 'auto' or one of {list(FORMATS)}")
    src, out = os.fspath(src), os.fspath(out)
    obj = load_checkpoint(src)
    fmt = detect(obj) if format == "auto" else format
    logging.info("converting %s as %s", src, fmt)
    try:
        architecture, variables, preprocessing = FORMATS[fmt](obj)
    except ValueError as err:
        raise ValueError(f"{src} (format {fmt}): {err}") from err
    del obj
    metadata = {
        "source": os.path.basename(src),
        "sha256": sha256(src),
        "format": fmt,
        "converter": "weight_conversion",
    }
    models.save(out, architecture, variables, preprocessing, metadata)
    logging.info("wrote %s: %s", out, architecture)
    return {**metadata, "architecture": architecture}
