"""Progress reporting for long loops: items/s and ETA, through absl logging.

A plain iterator wrapper (no dependency on tqdm) so every long loop in the library (BN
recalibration, extraction, diffusion) reports the same way: one log line at most every
``interval`` seconds plus a final summary.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from absl import logging

T = TypeVar("T")


def track(
    items: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "images",
    interval: float = 5.0,
    count=None,
) -> Iterator[T]:
    """Yields ``items`` unchanged, logging throughput along the way.

    Args:
      items: any iterable.
      total: number of units expected, for the percentage and ETA (optional).
      desc: what the loop does, e.g. ``"extract roxford5k"``.
      unit: the unit counted, e.g. ``"images"`` or ``"nodes"``.
      interval: seconds between two log lines.
      count: function mapping an item to the number of units it holds (a batch of images
        counts ``len(batch)``); by default each item counts 1.
    """
    start = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1 if count is None else int(count(item))
        now = time.perf_counter()
        if now - last >= interval:
            last = now
            logging.info("%s", _line(desc, done, total, now - start, unit))
    logging.info("%s (done)", _line(desc, done, total, time.perf_counter() - start, unit))


def _line(desc: str, done: int, total: int | None, elapsed: float, unit: str) -> str:
    rate = done / elapsed if elapsed > 0 else float("inf")
    if total:
        eta = (total - done) / rate if rate > 0 else float("inf")
        pct = 100.0 * done / total
        return f"{desc}: {done}/{total} {unit} ({pct:.0f}%), {rate:.1f} {unit}/s, ETA {eta:.0f}s"
    return f"{desc}: {done} {unit}, {rate:.1f} {unit}/s"
