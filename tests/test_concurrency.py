"""Nothing lost, nothing stale: concurrent runs, content keys, corrupt files, full disks, modes.

Two extraction processes share one store path (``python -m tests.test_concurrency extract``,
a tiny encoder over 24 tiny PNGs; the first run stops after 8 images until the test opens a gate,
which it does once the second run reports that it waits):

- the second run waits for the first (logging who holds the store) and reuses its store;
- the first run killed mid-way: the waiting run takes over, resumes the killed run's rows and
  finishes; a third run (in this process) reuses that store and equals a clean extraction bit for
  bit;
- a write failure (``RLIMIT_FSIZE`` below the store's size, ``SIGXFSZ`` ignored so the write
  returns ``EFBIG`` as on a full disk) raises ``StoreWriteError`` naming the file, exits 1 (no
  segfault), leaves nothing under the final name, and a later run builds the store; a partial
  resumes under a limit equal to its own size (its space is allocated when it is created).

In this process, with the tiny zoo of ``tests/helpers.py``: images rewritten in place give fresh
BN statistics and descriptors (equal to a fresh workdir's); a truncated store and a truncated BN
file are moved aside and rebuilt with equal results; files get the user's umask; the helpers of
``jretrieval.files`` (lock, temporaries) on hand-made cases.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import signal
import subprocess
import sys
import threading
import time

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jretrieval import experiment, files, keys
from jretrieval import store as store_lib
from jretrieval.models import Encoder
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_IMAGES, GATE_AFTER = 24, 8
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ----------------------------------------------------------------------------- the child


def _encoder() -> Encoder:
    module = helpers.TinyNet(features=8)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    return Encoder(module, dict(variables), {"name": "tiny"}, {"mean": MEAN, "std": STD}, {})


def _paths(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))


def _extract(folder: str, store: str, gate: str | None = None):
    from jretrieval.datasets import images as im
    from jretrieval.extract import extract
    from jretrieval.steps import Loading

    calls = []

    def gated(path, *, bbx, policy):
        calls.append(path)
        while len(calls) > GATE_AFTER and not os.path.exists(gate):
            time.sleep(0.02)
        return im.load_image(path, bbx=bbx, policy=policy)

    loading = Loading.of({"mode": "fixed", "size": 16}, batch_size=4, prefetch=1, num_threads=1,
                         loader=gated if gate else None)  # fmt: skip
    return extract(_encoder(), _paths(folder), loading=loading, pooling="mac", store=store)


def _child(argv: list[str]) -> None:
    """``extract IMAGES STORE GATE|- [FSIZE]``: prints the report as JSON; exit 1 on a write
    error."""
    from absl import logging

    logging.set_verbosity(logging.INFO)
    folder, store, gate = argv[2], argv[3], None if argv[4] == "-" else argv[4]
    if len(argv) > 5:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(argv[5]), resource.RLIM_INFINITY))
    try:
        _, report = _extract(folder, store, gate)
    except store_lib.StoreWriteError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps({"reused": report["reused"], "resumed": report["resumed"]}), flush=True)


class _Run:
    """A child extraction whose stderr is collected line by line as it comes."""

    def __init__(self, folder: str, store: str, gate: str | None, *extra: str) -> None:
        cmd = [sys.executable, "-m", "tests.test_concurrency", "extract", folder, store]
        self.proc = subprocess.Popen([*cmd, gate or "-", *extra], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr))
        self.reader.start()

    def wait_for_line(self, text: str, timeout_s: float = 150.0) -> None:
        end = time.time() + timeout_s
        while not any(text in line for line in self.lines):
            if time.time() > end or self.proc.poll() is not None:
                raise AssertionError(f"no {text!r} from the child: {''.join(self.lines)}")
            time.sleep(0.05)

    def finish(self) -> tuple[int, dict, str]:
        out = self.proc.stdout.read()
        self.proc.wait(timeout=180)
        self.reader.join()
        report = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        return self.proc.returncode, report, "".join(self.lines)


def _wait_for(predicate, timeout_s: float = 150.0) -> None:
    end = time.time() + timeout_s
    while not predicate():
        if time.time() > end:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        arr = rng.integers(0, 256, (20 + i % 3 * 4, 24, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"im{i:02d}.png")
    return str(folder)


@pytest.fixture(scope="module")
def clean(images, tmp_path_factory):
    """A clean single-run store of the images: ``(descriptors, path)``."""
    path = str(tmp_path_factory.mktemp("clean") / "store.h5")
    desc, _ = _extract(images, path)
    return desc, path


def _only_complete(folder: str, store: str) -> None:
    assert sorted(os.listdir(folder)) == [os.path.basename(store)], os.listdir(folder)
    with h5py.File(store, "r") as f:
        assert bool(f.attrs["complete"]) and int(f.attrs["completed"]) == N_IMAGES


# ----------------------------------------------------------------------------- two processes


def test_second_run_waits_for_the_first_and_reuses_its_store(images, clean, tmp_path):
    store, gate = str(tmp_path / "store.h5"), str(tmp_path.parent / f"{tmp_path.name}.gate")
    first = _Run(images, store, gate)
    _wait_for(lambda: os.path.exists(store + store_lib.PARTIAL_SUFFIX))
    second = _Run(images, store, None)
    second.wait_for_line("waiting for descriptor store")
    open(gate, "w").close()
    rc1, rep1, err1 = first.finish()
    rc2, rep2, err2 = second.finish()
    assert rc1 == rc2 == 0, err1 + err2
    assert rep1 == {"reused": False, "resumed": 0} and rep2["reused"] is True
    assert f"pid {first.proc.pid}" in err2
    _only_complete(str(tmp_path), store)
    np.testing.assert_array_equal(store_lib.read_store(store)[0], clean[0])


def test_killed_writer_is_resumed_by_the_waiting_run(images, clean, tmp_path):
    store = str(tmp_path / "store.h5")
    first = _Run(images, store, str(tmp_path.parent / "never.gate"))  # stops after 8 images
    _wait_for(lambda: os.path.exists(store + store_lib.PARTIAL_SUFFIX))
    second = _Run(images, store, None)
    second.wait_for_line("waiting for descriptor store")
    first.proc.send_signal(signal.SIGKILL)
    first.finish()
    rc2, rep2, err2 = second.finish()
    assert rc2 == 0, err2
    assert rep2["reused"] is False and 0 < rep2["resumed"] < N_IMAGES, rep2
    _only_complete(str(tmp_path), store)
    third, report = _extract(images, store)  # a third run reuses it and equals a clean one
    assert report["reused"] is True
    np.testing.assert_array_equal(third, clean[0])


def test_write_failure_is_one_clear_error_and_the_next_run_builds(images, clean, tmp_path):
    store = str(tmp_path / "store.h5")
    size = os.path.getsize(clean[1])
    rc, _, err = _Run(images, store, None, str(size // 2)).finish()
    assert rc == 1, err  # not 139 (a segfault in HDF5's close)
    assert "StoreWriteError: could not write descriptor store" in err and store in err
    assert not os.path.exists(store)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(files.TEMP_PREFIX)]
    # A partial with some rows resumes under a limit equal to its own size: the rows only
    # overwrite space the file was given when it was created.
    loader_calls = []

    def crash_after_8(path, *, bbx, policy):
        loader_calls.append(path)
        if len(loader_calls) > 8:
            raise RuntimeError("simulated crash")
        from jretrieval.datasets import images as im

        return im.load_image(path, bbx=bbx, policy=policy)

    from jretrieval.extract import extract
    from jretrieval.steps import Loading

    loading = Loading.of({"mode": "fixed", "size": 16}, batch_size=4, prefetch=0, num_threads=1,
                         loader=crash_after_8)  # fmt: skip
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(_encoder(), _paths(images), loading=loading, pooling="mac", store=store)
    partial = store + store_lib.PARTIAL_SUFFIX
    rc, report, err = _Run(images, store, None, str(os.path.getsize(partial))).finish()
    assert rc == 0, err
    assert report == {"reused": False, "resumed": 8}
    _only_complete(str(tmp_path), store)
    np.testing.assert_array_equal(store_lib.read_store(store)[0], clean[0])


# ----------------------------------------------------------------------------- in this process


def _describe(tmp, workdir=None, **overrides):
    config = helpers.make_config(str(tmp), "oxford5k", **overrides)
    if workdir is not None:
        config.workdir = workdir
    dataset = experiment.load_data(config)
    return experiment.describe(config, "tiny_a", dataset), config


@pytest.fixture
def data(tmp_path, tiny_zoo):
    helpers.make_dataset(str(tmp_path / "data"), "oxford5k", revisited=False)
    return tmp_path


def _bn_files(workdir: str) -> list[str]:
    folder = os.path.join(workdir, "bn")
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".h5"))


def test_images_changed_in_place_give_fresh_results(data, tmp_path_factory):
    first, config = _describe(data)
    jpg = os.path.join(config.data.root, "oxford5k", "jpg")
    victim = sorted(os.listdir(jpg))[0]
    Image.open(os.path.join(jpg, victim)).rotate(90).save(os.path.join(jpg, victim), quality=92)
    again, _ = _describe(data)
    fresh, _ = _describe(data, workdir=str(tmp_path_factory.mktemp("fresh")))
    assert len(_bn_files(config.workdir)) == 2  # new statistics, not "reusing"
    assert not np.allclose(again.database, first.database)
    np.testing.assert_array_equal(again.database, fresh.database)
    np.testing.assert_array_equal(again.queries, fresh.queries)


def test_truncated_store_and_bn_file_are_moved_aside_and_rebuilt(data):
    first, config = _describe(data)
    (bn,) = _bn_files(config.workdir)
    store = first.info["stores"]["database"]
    for path in (bn, store):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    again, _ = _describe(data)
    np.testing.assert_array_equal(again.database, first.database)
    np.testing.assert_array_equal(again.queries, first.queries)
    for path in (bn, store):
        folder, name = os.path.split(path)
        assert [n for n in os.listdir(folder) if n.startswith(name + ".corrupt-")], path


def test_files_get_the_users_umask_and_orphans_are_cleaned(data):
    workdir = str(data / "run")
    orphans = [
        os.path.join(workdir, sub, f"{files.TEMP_PREFIX}killed.h5") for sub in ("bn", "descriptors")
    ]
    for path in orphans:  # a kill during a save, long ago
        os.makedirs(os.path.dirname(path))
        open(path, "w").close()
        os.utime(path, (0, 0))
    umask = 0o027  # neither mkstemp's 0o600 nor the usual 0o644
    old = os.umask(umask)
    try:
        first, config = _describe(data)
    finally:
        os.umask(old)
    assert config.workdir == workdir and not any(os.path.exists(p) for p in orphans)
    for path in [*_bn_files(config.workdir), *first.info["stores"].values()]:
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path


def test_keys_cover_files_weights_and_settings(tmp_path):
    a = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(a)
    before = keys.files_digest([str(a)])
    os.utime(a, ns=(1, 1))
    assert keys.files_digest([str(a)]) != before
    assert keys.files_digest([str(tmp_path / "missing")]) != keys.files_digest([str(a)])
    enc = _encoder()
    w = keys.variables_digest(enc.variables)
    bumped = jax.tree.map(lambda x: x + 1, enc.variables)
    assert keys.variables_digest(bumped) != w
    base = dict(weights=w, files="f", ids=["x"], bbx=None, policy={"mode": "fixed"})
    k = keys.bn_key(enc, **base, mode="exact", momentum=0.1, batch_size=8)
    assert k["momentum"] is None  # not a setting of exact mode
    for change in ({"files": "g"}, {"bbx": [(0, 0, 1, 1)]}, {"weights": "w2"}):
        other = keys.bn_key(enc, **{**base, **change}, mode="exact", momentum=0.1, batch_size=8)
        assert store_lib.settings_digest(other) != store_lib.settings_digest(k), change


# ----------------------------------------------------------------------------- files helpers


def test_writer_lock_blocks_a_second_holder_and_names_the_first(tmp_path, caplog):
    path = str(tmp_path / "x.h5")
    order = []
    entered = threading.Event()

    def hold():
        with files.writer_lock(path):
            entered.set()
            time.sleep(0.5)
            order.append("first done")

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait()
    with caplog.at_level(std_logging.WARNING), files.writer_lock(path, what="thing"):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]
    assert f"waiting for thing {path}" in caplog.text and f"pid {os.getpid()}" in caplog.text
    assert os.listdir(tmp_path) == []  # lock files removed by their holders


def test_clean_temporaries_keeps_live_and_fresh_ones(tmp_path):
    import fcntl

    stale, fresh, live = (str(tmp_path / f"{files.TEMP_PREFIX}{n}.h5") for n in "abc")
    for p in (stale, fresh, live):
        open(p, "w").close()
    os.utime(stale, (0, 0))
    os.utime(live, (0, 0))
    with open(live) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert files.clean_temporaries(tmp_path) == [stale]
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (fresh, live))
    aside = files.move_aside(fresh, "test")
    assert aside.startswith(fresh + ".corrupt-") and not os.path.exists(fresh)


if __name__ == "__main__":
    _child(sys.argv)
