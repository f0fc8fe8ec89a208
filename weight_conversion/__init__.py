"""PyTorch checkpoints -> converted Flax encoder files (HDF5); the only package importing torch.

Shape convention: torch convs OIHW become Flax HWIO, Linear weights are transposed; see the
per-family modules. ``convert_file`` is what ``python -m weight_conversion`` runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
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

__all__ = ["FORMATS", "check_finite", "check_output", "convert_file", "detect", "load_checkpoint"]

#: how many non-finite variables a refusal names before ``... and N more``.
MAX_LISTED = 5


def check_output(src: str, out: str) -> None:
    """Refuses an ``out`` that would overwrite ``src`` or that is a directory (``ValueError``)."""
    if os.path.isdir(out):
        raise ValueError(
            f"--out {out!r} is a directory; expected the .h5 file to write, e.g. "
            f"{os.path.join(out, 'model.h5')!r}"
        )
    same = os.path.realpath(src) == os.path.realpath(out)
    if not same and os.path.exists(src) and os.path.exists(out):
        same = os.path.samefile(src, out)  # a hard link, or another path to the same file
    if same:
        raise ValueError(
            f"--out {out!r} is the checkpoint --src {src!r} itself; converting would overwrite "
            "it: choose another output file (e.g. converted/<model>.h5)"
        )


def check_finite(variables: Mapping[str, Any], *, where: str) -> None:
    """Refuses variables holding NaN or infinity, naming each such variable and its count."""
    bad = []
    for key, value in models.io.flatten(variables).items():
        count = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        if count:
            bad.append(f"{key} ({count} of {np.size(value)} values)")
    if bad:
        more = f" ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise ValueError(
            f"{where}: {len(bad)} variables hold NaN or infinite values: "
            f"{', '.join(bad[:MAX_LISTED])}{more}; the checkpoint is probably damaged or from a "
            "diverged run (pass --allow-nonfinite to convert it anyway)"
        )


def convert_file(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "auto",
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """Converts checkpoint ``src`` into encoder file ``out`` (written atomically).

    Args:
      src: a PyTorch checkpoint (read without running its code).
      out: the ``.h5`` file to write; nothing is written if any check fails. It may not be
        ``src`` itself nor a directory.
      format: ``"auto"`` (detect from the keys) or a key of ``FORMATS``.
      allow_nonfinite: convert weights holding NaN or infinity (refused by default: they would
        only show later as a meaningless ranking).

    Returns:
      The metadata written (source name, SHA-256, format, architecture).
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format {format!r}; expected 'auto' or one of {list(FORMATS)}")
    src, out = os.fspath(src), os.fspath(out)
    check_output(src, out)
    obj = load_checkpoint(src)
    fmt = detect(obj) if format == "auto" else format
    logging.info("converting %s as %s", src, fmt)
    try:
        architecture, variables, preprocessing = FORMATS[fmt](obj)
    except ValueError as err:
        raise ValueError(f"{src} (format {fmt}): {err}") from err
    del obj
    if allow_nonfinite:
        try:
            check_finite(variables, where=src)
        except ValueError as err:
            logging.warning("converting anyway (allow_nonfinite): %s", err)
    else:
        check_finite(variables, where=src)
    metadata = {
        "source": os.path.basename(src),
        "sha256": sha256(src),
        "format": fmt,
        "converter": "weight_conversion",
    }
    models.save(out, architecture, variables, preprocessing, metadata)
    logging.info("wrote %s: %s", out, architecture)
    return {**metadata, "architecture": architecture}
