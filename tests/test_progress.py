"""jretrieval.progress: throughput lines never repeated, compilations announced before they run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jretrieval import progress


@pytest.fixture
def logged(monkeypatch):
    """The lines ``progress`` logs, in order."""
    lines: list[str] = []
    monkeypatch.setattr(progress.logging, "info", lambda fmt, *args: lines.append(fmt % args))
    return lines


@pytest.fixture
def clock(monkeypatch):
    """A clock that moves ``step`` seconds per reading (readings: start, then one per item)."""
    state = {"now": 0.0, "step": 1.0}

    def read():
        state["now"] += state["step"]
        return state["now"]

    monkeypatch.setattr(progress.time, "perf_counter", read)
    return state


@pytest.mark.parametrize("total", [6, None])
def test_track_never_logs_a_line_twice(logged, clock, total):
    items = list(progress.track(range(6), total=total, desc="work", unit="images", interval=2.0))
    assert items == list(range(6))
    counts = [line.split(": ", 1)[1].split(" images")[0] for line in logged]
    # readings at 2, 3, ..., 7 s after the start at 1 s: an interval line every 2 s; the one due
    # after the last item is not logged, the "(done)" line says it
    of = "/6" if total else ""
    assert counts == [f"2{of}", f"4{of}", f"6{of}"]
    assert logged[-1].endswith("(done)") and not logged[-2].endswith("(done)")
    assert len(set(logged)) == len(logged)


def test_track_counts_batches(logged, clock):
    batches = [[1, 2], [3, 4, 5]]
    list(progress.track(batches, total=5, desc="x", count=len, interval=100.0))
    assert logged == ["x: 5/5 images (100%), 1.7 images/s, ETA 0s (done)"]  # 5 in 3 s


def test_compiling_announces_the_first_call_only(logged):
    name = "stage under test (unique name)"
    for _ in range(3):
        with progress.compiling(name):
            pass
    assert len(logged) == 2
    assert logged[0].startswith(f"compiling {name}") and "first call" in logged[1]
    with progress.compiling(name + " at a new size"):
        pass
    assert len(logged) == 4


def test_log_compilations_from_jax_events(logged):
    progress.log_compilations(min_lowering_s=0.0, min_compile_s=0.0)  # every compilation
    try:

        @jax.jit
        def distinctive_stage_name(x):
            return jnp.tanh(x) @ x.T

        distinctive_stage_name(jnp.ones((3, 3)))
        mine = [line for line in logged if "distinctive_stage_name" in line]
        assert mine[0].startswith("compiling jit(distinctive_stage_name)")
        assert mine[1].startswith("compiled jit(distinctive_stage_name) in ")
        distinctive_stage_name(jnp.ones((3, 3)))  # cached: nothing more
        assert len([line for line in logged if "distinctive_stage_name" in line]) == 2
    finally:
        progress.log_compilations()  # the defaults: only large programs
