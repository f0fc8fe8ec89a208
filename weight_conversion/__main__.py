"""CLI: ``python -m weight_conversion --src CHECKPOINT --out FILE.h5 [--format auto|...]
[--allow-nonfinite]``.

Shape convention: see ``weight_conversion`` (OIHW -> HWIO etc.). Exit status 0 on success, 1 with
a one-paragraph reason on stderr when the checkpoint is refused (no output file is left): an
``--out`` that is ``--src`` itself or a directory, weights holding NaN/inf (unless
``--allow-nonfinite``), or a checkpoint that cannot be read or mapped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from absl import logging

from weight_conversion import FORMATS, convert_file


def parser() -> argparse.ArgumentParser:
    """The argument parser (``--src``, ``--out``, ``--format``)."""
    p = argparse.ArgumentParser(
        prog="python -m weight_conversion",
        description="Convert a PyTorch checkpoint (torchvision, SimCLR via tonylins/"
        "simclr-converter, MoCo, AMDIM, dirtorch AP-GeM) into a jretrieval encoder file.",
    )
    p.add_argument("--src", required=True, help="the PyTorch checkpoint (.pth/.pt/.pth.tar)")
    p.add_argument("--out", required=True, help="the HDF5 file to write (e.g. converted/x.h5)")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="checkpoint layout")
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="convert weights that hold NaN or infinity (refused by default)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status."""
    args = parser().parse_args(argv)
    logging.set_verbosity(logging.INFO)
    try:
        meta = convert_file(
            args.src, args.out, format=args.format, allow_nonfinite=args.allow_nonfinite
        )
    except (ValueError, OSError) as err:  # refusals, missing files, unwritable --out
        sys.stderr.write(f"weight_conversion: error: {err}\n")
        return 1
    logging.info("%s -> %s (%s, sha256 %s)", args.src, args.out, meta["format"], meta["sha256"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
