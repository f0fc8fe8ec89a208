"""The one timing harness of ``bench/``: interleaved, warmed-up, median timings in one process.

Every benchmark times jretrieval beside the code it replaces *in the same run*, alternating the
two sides (ours, reference, ours, ...) after a warm-up call each, with a short pause before every
call so one library's spinning worker threads do not slow the other. On a shared machine the
absolute times move by up to 2x between runs; the ratio of two interleaved medians does not, so
the ratio is what the reports quote, with the load average beside it (``environment()``).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

#: pause before every timed call, so that the worker threads of the library timed just
#: before (OpenMP/MKL spin-wait up to ~200 ms after a parallel region) are idle again.
PAUSE_S = 0.25


def block(x: Any) -> Any:
    """Waits for every JAX array in ``x`` (a pytree) to be computed; returns ``x``."""
    return jax.block_until_ready(x)


def call_ms(fn: Callable[[], Any], *, pause: float = PAUSE_S) -> tuple[float, Any]:
    """``(milliseconds, result)`` of one call of ``fn`` (results blocked on)."""
    time.sleep(pause)
    t0 = time.perf_counter()
    out = block(fn())
    return (time.perf_counter() - t0) * 1e3, out


def timed_pair(
    ours: Callable[[], Any], ref: Callable[[], Any], repeats: int, ref_repeats: int
) -> tuple[float, float, float, Any, Any]:
    """Times both sides alternately (ours, ref, ours, ...) after one warm-up call each.

    Stages whose two sides both take under 100 ms get 4x the repeats (cheap, and their
    medians are the ones most exposed to a busy machine). Returns (our first-call ms, our
    median ms, reference median ms, our result, reference result).
    """
    first, out = call_ms(ours)
    ref_out = None
    if ref_repeats > 1:  # slow references (one run) get no separate warm-up
        ref_ms, ref_out = call_ms(ref)
        if max(call_ms(ours)[0], ref_ms) < 100:
            repeats, ref_repeats = 4 * repeats, 4 * ref_repeats
    times, ref_times = [], []
    for i in range(max(repeats, ref_repeats)):
        if i < repeats:
            ms, out = call_ms(ours)
            times.append(ms)
        if i < ref_repeats:
            ms, ref_out = call_ms(ref)
            ref_times.append(ms)
    return first, statistics.median(times), statistics.median(ref_times), out, ref_out


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``(result, seconds)`` of one call (results blocked on): for stages too slow to repeat."""
    start = time.perf_counter()
    out = block(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def environment() -> dict[str, Any]:
    """What a reader needs to weigh the figures: CPU, cores, load, library versions."""
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "jax": jax.__version__,
        "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
    }
