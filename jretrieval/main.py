r"""Command line: run one experiment config and print its table.

    python -m jretrieval.main --config=configs/demo.py           # the offline demo (default)
    python -m jretrieval.main --config=configs/oxford.py --config.models=simclr2x \
        --config.whitening.dim=256

Every config field can be overridden with ``--config.<section>.<field>=<value>``; a misspelt
field is an error (``lock_config=True``). The work is done by ``jretrieval.report.run``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from jretrieval import report

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    "configs/demo.py",
    "Experiment config file (a get_config() in configs/); fields overridable as --config.x=y.",
    lock_config=True,
)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing; a misspelt ``--config.x`` override exits with one line, no traceback."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as err:  # ml_collections: unknown field of a locked config
        text = str(err)
        while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1].replace("\\'", "'").replace("\\n", "\n")
        message = " ".join(text.replace("\\n", " ").split())
        sys.stderr.write(f"FATAL Flags parsing error: no config field {message}\n")
        sys.exit(1)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    logging.info("config:\n%s", config)
    results = report.run(config)  # runs the experiment, writes its report on process 0
    sys.stdout.write(report.summary(results) + "\n")


def _plain_table(results: dict) -> str:
    """A fallback text table (the report module writes the real ones)."""
    lines = [f"{results['dataset']} ({results['protocol']})"]
    for row, table in results["models"].items():
        cells = [f"{col}: {vals[results['metrics'][0]]:.2f}" for col, vals in table.items()]
        lines.append(f"{results['labels'][row]}  " + "  ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
