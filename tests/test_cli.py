"""``python -m jretrieval.main`` as a first-time user meets it.

Each user error runs the real entry point in a subprocess and must end with status 1, a message
naming the file, field or value, and no traceback (``--debug`` brings it back). Every case fails
before any image is decoded, so each process costs little more than importing JAX.
"""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from jretrieval import errors, main
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: runs the entry point after an optional patch (``PATCH`` environment variable, Python code).
WRAPPER = """
import os, runpy, sys
exec(os.environ.get("PATCH", ""))
sys.argv = ["jretrieval.main", *sys.argv[1:]]
runpy.run_module("jretrieval.main", run_name="__main__")
"""


def _main(*args, cwd=REPO, patch=""):
    env = dict(os.environ, PYTHONPATH=REPO, PATCH=patch)  # this checkout, from any folder
    return subprocess.run(
        [sys.executable, "-c", WRAPPER, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _assert_user_error(proc, *needles):
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-2]  # the message, then the --debug hint
    assert last.startswith("error: "), proc.stderr
    for needle in needles:
        assert str(needle) in last, (needle, last)


def test_dataset_not_found_and_bad_values(tmp_path):
    empty = tmp_path / "empty"
    proc = _main("--config=configs/oxford.py", f"--config.data.root={empty}")
    _assert_user_error(proc, "oxford5k", f"{empty}/oxford5k/gnd_oxford5k.pkl", "download")
    bogus = _main("--config=configs/demo.py", "--config.whitening.dim=bogus")
    _assert_user_error(bogus, "whitening.dim", "'bogus'", "expected a positive int")
    debug = _main("--config=configs/demo.py", "--config.whitening.dim=bogus", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    _assert_user_error(_main("--config=configs/demo.py", "--config.bn.batch_size=x"), "batch_size")
    _assert_user_error(_main("--config=configs/nowhere.py"), "configs/nowhere.py")
    _assert_user_error(_main("--config=configs/table3.py:mars"), "table3.py:mars", "'mars'")


def test_missing_checkpoint(tmp_path):
    helpers.make_dataset(str(tmp_path / "data"), "oxford5k", revisited=False)
    proc = _main(
        "--config=configs/oxford.py",
        f"--config.data.root={tmp_path / 'data'}",
        f"--config.workdir={tmp_path / 'run'}",
        f"--config.checkpoint_dir={tmp_path / 'none'}",
        "--config.models=baseline",
        "--config.whitening.dim=16",  # the tiny set has 26 database images
    )
    _assert_user_error(proc, "'baseline'", f"{tmp_path}/none/baseline.h5", "convert_checkpoints")
    assert not (tmp_path / "run" / "descriptors").exists()


def test_missing_optional_package(tmp_path):
    """INSTRE's MATLAB ground truth needs scipy; here scipy is made unimportable."""
    os.makedirs(tmp_path / "instre")
    (tmp_path / "instre" / "gnd_instre.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    block = "sys.modules['scipy'] = None; sys.modules['scipy.io'] = None"
    proc = _main("--config=configs/instre.py", f"--config.data.root={tmp_path}", patch=block)
    _assert_user_error(proc, "gnd_instre.mat", "scipy", "pip install")


def test_store_write_error_and_success_output(tmp_path):
    """A write failure (an OSError, as the store raises) exits 1; success prints the folder."""
    boom = (
        "import jretrieval.experiment as e\n"
        "def run(config): raise OSError(28, 'No space left on device', '/full/store.h5')\n"
        "e.run = run"
    )
    proc = _main("--config=configs/demo.py", patch=boom)
    _assert_user_error(proc, "No space left on device", "/full/store.h5")
    fake = (
        "import jretrieval.experiment as e, jretrieval.report as r\n"
        "e.run = lambda config: {}\n"
        "r.summary = lambda results: 'TABLE'\n"
        "r.write = lambda results, out: None"
    )
    ok = _main(f"--config={REPO}/configs/demo.py", patch=fake, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == ["TABLE", f"results: {REPO}/runs/demo/results"]
    assert "devices: " in ok.stderr and "\nbn:\n" not in ok.stderr  # config dump: -v 1 only
    verbose = _main("--config=configs/demo.py", "--verbosity=1", patch=fake)
    assert "bn:\n" in verbose.stderr


def test_config_from_another_directory(tmp_path):
    """A config file outside the repository imports ``configs``; its paths resolve next to it."""
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "mine.py").write_text(
        "from configs import common\n\n"
        "def get_config():\n"
        "    config = common.base_config('paris6k')\n"
        "    config.data.root = 'mydata'\n"
        "    return config\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _main(f"--config={exp / 'mine.py'}", cwd=elsewhere)
    _assert_user_error(proc, f"{exp}/mydata/paris6k")
    # a repository config named from elsewhere (the two-word form, after an override); a
    # relative path typed on the command line is the shell's
    proc = _main("--config.data.root=typed", "--config", "configs/rparis.py", cwd=elsewhere)
    _assert_user_error(proc, f"{elsewhere}/typed/rparis6k")
    # the default config (the demo) from elsewhere: loaded, then its bad override named
    _assert_user_error(_main("--config.whitening.dim=0", cwd=elsewhere), "whitening.dim", "0")


# ------------------------------------------------------------------------------ in-process


def test_last_override_wins():
    argv = [
        "prog",
        "--config=configs/oxford.py",
        "--config.models=baseline",
        "--config.whitening.dim=64",
        "--config.models=simclr2x,mocov2",
        "--",
        "--config.models=after",
    ]
    assert main.last_override_wins(argv) == [
        "prog",
        "--config=configs/oxford.py",
        "--config.whitening.dim=64",
        "--config.models=simclr2x,mocov2",
        "--",
        "--config.models=after",
    ]
    # parsed as main parses them: absl alone appends the repeated tuple field
    argv = [
        "prog",
        "--config=configs/oxford.py",
        "--config.models=baseline",
        "--config.models=mocov2",
    ]
    assert _parse(argv).models == ("baseline", "mocov2")
    assert _parse(main.last_override_wins(argv)).models == ("mocov2",)


def _parse(argv):
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        "config", None, flag_values=fv, lock_config=True, sys_argv=argv
    )
    fv(argv)
    return holder.value


def test_resolve_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ml_collections.ConfigDict(
        {
            "workdir": "runs/x",
            "checkpoint_dir": "/abs/converted",
            "data": {"root": "data"},
            "output": {"dir": None},
        }
    )
    config.lock()
    main.resolve_paths(config, "/repo", typed=["data.root"])
    assert config.workdir == "/repo/runs/x"
    assert config.checkpoint_dir == "/abs/converted"
    assert config.data.root == f"{tmp_path}/data"
    assert config.output.dir is None


def test_error_messages():
    err = ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")
    assert errors.message(err) == (
        "the optional package 'matplotlib', which is not installed: pip install 'matplotlib' "
        "(or pip install -e '.[plots]')"
    )
    assert "/x/y" in errors.message(FileNotFoundError(2, "No such file", "/x/y"))
    bad = errors.ConfigError("whitening.dim", "bogus", "a positive int or 'none'")
    assert isinstance(bad, ValueError) and isinstance(bad, errors.USER_ERRORS)
    assert str(bad) == "config field whitening.dim='bogus': expected a positive int or 'none'"
    with pytest.raises(errors.MissingPackageError, match=r"pip install 'scikit-image'"):
        errors.require("skimage.not_a_module", purpose="the demo")
    assert errors.require("json", purpose="x").__name__ == "json"
