"""Progress reporting: items/s and ETA for long loops, and a word before a long compilation.

- :func:`track`: a plain iterator wrapper (no dependency on tqdm) so every long loop in the
  library (BN recalibration, extraction, diffusion) reports the same way: one log line at most
  every ``interval`` seconds plus a final summary, never the same line twice.
- :func:`compiling`: wraps the first call of a jitted stage (``with progress.compiling("extract
  resnet50"): step(batch)``) so the 20-35 s XLA compilation is announced, not silent.
- :func:`log_compilations`: the same for every jitted function, from JAX's own compilation
  events (installed once by ``python -m jretrieval.main``).
"""

from __future__ import annotations

import contextlib
import threading
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
    pending = None  # an interval line, logged only if more items follow (else "(done)" says it)
    for item in items:
        if pending is not None:
            logging.info("%s", pending)
            pending = None
        yield item
        done += 1 if count is None else int(count(item))
        now = time.perf_counter()
        if now - last >= interval:
            last = now
            pending = _line(desc, done, total, now - start, unit)
    logging.info("%s (done)", _line(desc, done, total, time.perf_counter() - start, unit))


def _line(desc: str, done: int, total: int | None, elapsed: float, unit: str) -> str:
    rate = done / elapsed if elapsed > 0 else float("inf")
    if total:
        eta = (total - done) / rate if rate > 0 else float("inf")
        pct = 100.0 * done / total
        return f"{desc}: {done}/{total} {unit} ({pct:.0f}%), {rate:.1f} {unit}/s, ETA {eta:.0f}s"
    return f"{desc}: {done} {unit}, {rate:.1f} {unit}/s"


# ------------------------------------------------------------------------------- compilation

_announced: set[str] = set()
_lock = threading.Lock()


@contextlib.contextmanager
def compiling(name: str) -> Iterator[None]:
    """Announces the first call of the jitted stage ``name``, and how long it took.

    The first time a process enters ``compiling(name)`` it logs ``compiling <name> ...`` before
    the body runs and ``<name>: first call (compilation included) took X s`` after it; later
    entries with the same name log nothing. Name the stage by everything that triggers a new
    compilation (model, image size, batch size) so a new shape is announced again.
    """
    with _lock:
        first = name not in _announced
        _announced.add(name)
    if not first:
        yield
        return
    logging.info("compiling %s (first call; XLA compilation can take a minute) ...", name)
    start = time.perf_counter()
    yield
    logging.info(
        "%s: first call (compilation included) took %.1f s", name, time.perf_counter() - start
    )


#: JAX's monitoring events: lowering a traced function to MLIR (just before XLA compiles it),
#: and XLA's compilation itself.
_LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_COMPILED = "/jax/core/compile/backend_compile_duration"
_listening = False
_thresholds = {"lowering": 0.2, "compile": 2.0}


def log_compilations(*, min_lowering_s: float = 0.2, min_compile_s: float = 2.0) -> None:
    """Logs ``compiling <function> ...`` before JAX compiles a large jitted function.

    Installed once per process (later calls only change the thresholds). JAX reports each
    lowering to MLIR when it ends, that is just before XLA compiles; a lowering slower than
    ``min_lowering_s`` marks a large program (an encoder, a diffusion solve), whose compilation
    is announced; the small jitted helpers (a few ms) are not. A compilation longer than
    ``min_compile_s`` is followed by ``compiled <function> in X s``.
    """
    global _listening
    with _lock:
        _thresholds.update(lowering=min_lowering_s, compile=min_compile_s)
        if _listening:
            return
        _listening = True
    from jax import monitoring

    monitoring.register_event_duration_secs_listener(_on_compile_event)


def _on_compile_event(event: str, seconds: float, **kwargs) -> None:
    name = kwargs.get("fun_name", "a jitted function")
    if event == _LOWERED and seconds >= _thresholds["lowering"]:
        logging.info("compiling %s (XLA, once per shape; can take a minute) ...", name)
    elif event == _COMPILED and seconds >= _thresholds["compile"]:
        logging.info("compiled %s in %.1f s", name, seconds)
