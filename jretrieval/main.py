r"""Command line: run one experiment config and print its table.

    python -m jretrieval.main --config=configs/demo.py           # the offline demo (default)
    python -m jretrieval.main --config=configs/oxford.py --config.models=simclr2x \
        --config.whitening.dim=256

Every config field can be overridden with ``--config.<section>.<field>=<value>``; a misspelt
field is an error (``lock_config=True``) and a repeated one replaces the earlier value. Configs
load from any working directory; relative paths written in a config file (``workdir``,
``data.root``, ``checkpoint_dir``, ``output.dir``) resolve against the repository that holds it
(the parent of its ``configs/`` folder; a config file elsewhere: its own folder), relative paths
typed on the command line against the current directory.

A user's mistake (dataset not downloaded, checkpoint missing, a bad config value, an optional
package absent, a full disk) ends with status 1 and one line naming the file, field or value;
``--debug`` (or ``--verbosity=1``) shows its traceback. ``--verbosity=1`` also logs the config.
The devices found are logged at start; the results folder is printed on stdout at the end.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from jretrieval import errors, progress, report
from jretrieval import mesh as mesh_lib

#: the repository this package lives in (a source checkout or an editable install).
_PACKAGE_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the offline demo, named absolutely so that the default loads from any working directory.
DEFAULT_CONFIG = os.path.join(_PACKAGE_REPO, "configs", "demo.py")
if not os.path.isfile(DEFAULT_CONFIG):  # an installed (non-editable) package: from the cwd
    DEFAULT_CONFIG = "configs/demo.py"
#: config fields holding paths; relative ones are resolved by :func:`resolve_paths`.
PATH_FIELDS = ("workdir", "data.root", "checkpoint_dir", "output.dir")

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    DEFAULT_CONFIG,
    "Experiment config file (a get_config() in configs/); fields overridable as --config.x=y.",
    lock_config=True,
)
_DEBUG = flags.DEFINE_bool(
    "debug", False, "Show the Python traceback of a user error (bad config, missing file)."
)


def run(config: Any) -> Any:
    """Runs the experiment of ``config``, prints its tables and writes its report (process 0).

    The tables reach stdout before any file is written, so a read-only output folder loses
    nothing that was computed.
    """
    results = report.run(config, echo=sys.stdout)
    if mesh_lib.is_main_process():
        sys.stdout.write(f"results: {report.output_dir(config)}\n")
    return results


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config = _CONFIG.value
        resolve_paths(config, _config_base(_config_path()), typed=_typed_fields())
        logging.debug("config:\n%s", config)
        mesh_lib.initialize(bool(config.distributed.multihost))  # before any device query
        log_devices()
        progress.log_compilations()
        run(config)
    except errors.USER_ERRORS as err:
        if _DEBUG.value or logging.get_verbosity() >= logging.DEBUG:
            raise
        fail(errors.message(err))


def log_devices() -> None:
    """Logs the accelerators JAX found, e.g. ``devices: 8 x TPU v5 lite (tpu), 2 processes``."""
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    logging.info(
        "devices: %d x %s (%s), %d process%s",
        len(devices),
        " / ".join(kinds),
        jax.default_backend(),
        jax.process_count(),
        "" if jax.process_count() == 1 else "es",
    )


def fail(text: str) -> None:
    """Ends the program with status 1 and the user-facing ``text`` (no traceback)."""
    sys.stdout.flush()
    sys.stderr.write(f"error: {text}\n(--debug shows the traceback)\n")
    sys.exit(1)


# ------------------------------------------------------------------------------- flags, paths


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that ends a user's mistake with one line, no traceback.

    Before absl sees them: a repeated ``--config.<field>=`` keeps only its last value (absl
    would append to a tuple field), and the config file is found (also from another working
    directory: a relative ``--config`` not under the current directory is looked up in this
    package's repository), made importable (``from configs import common``) and loaded once, so
    a missing file or an error raised by its ``get_config`` names the file.
    """
    debug = _wants_traceback(argv)
    argv = last_override_wins(argv)
    try:
        argv = _locate_config(argv)
        sys.argv[:] = argv  # ml_collections reads the overrides from sys.argv when parsing
        return flags.FLAGS(argv)
    except (errors.UserError, flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
        if debug:
            raise
        if isinstance(e, (AttributeError, KeyError)):  # ml_collections: unknown locked field
            fail(f"no config field {_unquote(str(e))}")
        fail(_unquote(str(e)))
    raise AssertionError("unreachable")


def last_override_wins(argv: Sequence[str]) -> list[str]:
    """Drops every ``--config.<field>=value`` that a later one for the same field overrides."""
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    names = [a.split("=", 1)[0] if a.startswith("--config.") and "=" in a else None for a in argv]
    keep = [
        i >= end or names[i] is None or names[i] not in names[i + 1 : end] for i in range(len(argv))
    ]
    return [a for a, k in zip(argv, keep, strict=True) if k]


def resolve_paths(config: Any, base: str, *, typed: Sequence[str] = ()) -> None:
    """Makes the config's relative paths absolute (in place; the config may be locked).

    Args:
      config: the experiment config.
      base: folder that relative paths written in the config file resolve against.
      typed: fields given on the command line; their relative paths resolve against the
        current directory, like any path typed in a shell.
    """
    for field in PATH_FIELDS:
        *parents, key = field.split(".")
        node = config
        for p in parents:
            node = node[p]
        value = node.get(key)
        if not value:
            continue
        value = os.path.expanduser(str(value))
        anchor = os.getcwd() if field in typed else base
        node[key] = os.path.normpath(os.path.join(anchor, value))


def _config_path() -> str:
    return flags.FLAGS["config"].config_filename.split(":", 1)[0]  # "file.py:arg" as absl splits


def _config_base(path: str) -> str:
    """The folder a config file's relative paths are written against (see module doc)."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(folder) if os.path.basename(folder) == "configs" else folder


def _typed_fields() -> list[str]:
    return [
        f
        for f in PATH_FIELDS
        if f"config.{f}" in flags.FLAGS and flags.FLAGS[f"config.{f}"].present
    ]


def _locate_config(argv: list[str]) -> list[str]:
    """Finds, checks and pre-loads the ``--config`` file; returns argv naming it absolutely,
    once, first (an override before ``--config`` is no error then)."""
    argv, words = list(argv[:1]), list(argv[1:])
    while words:  # the two-word form "--config FILE" made one word
        word = words.pop(0)
        if word == "--":
            argv += [word, *words]
            break
        argv.append(f"--config={words.pop(0)}" if word == "--config" and words else word)
    end = argv.index("--") if "--" in argv else len(argv)
    given = [a for a in argv[:end] if a.startswith("--config=")]
    spec = given[-1].split("=", 1)[1] if given else DEFAULT_CONFIG  # the last one wins
    argv = [a for i, a in enumerate(argv) if i >= end or not a.startswith("--config=")]
    path, sep, arg = spec.partition(":")
    found = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(found) and not os.path.isabs(path):
        in_repo = os.path.join(_PACKAGE_REPO, path)
        found = in_repo if os.path.isfile(in_repo) else found
    if not os.path.isfile(found):
        raise errors.UserError(
            f"--config={spec}: no config file at {os.path.abspath(path)}; expected a Python file "
            "with get_config(), e.g. configs/demo.py in the repository"
        )
    _make_configs_importable(found)
    _load_config_file(found, arg if sep else None, spec)
    if not given:  # the default, loaded (absolutely) when the flag was defined
        return argv
    return [*argv[:1], f"--config={found}{sep}{arg}", *argv[1:]]  # before its overrides


def _make_configs_importable(path: str) -> None:
    """Puts the repository holding ``configs/`` on ``sys.path`` (for ``from configs import``)."""
    folder = os.path.dirname(path)
    candidates = [os.path.dirname(folder)] if os.path.basename(folder) == "configs" else []
    for root in (*candidates, _PACKAGE_REPO):
        if os.path.isfile(os.path.join(root, "configs", "common.py")):
            if root not in sys.path:
                sys.path.insert(0, root)
            return


def _load_config_file(path: str, arg: str | None, spec: str) -> None:
    """Runs the config file's ``get_config`` once; an error in it names the file, no traceback."""
    try:
        module_spec = importlib.util.spec_from_file_location("_checked_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise errors.UserError(f"{path} defines no get_config()")
        module.get_config(*([arg] if arg is not None else []))
    except (*errors.USER_ERRORS, SyntaxError) as e:
        if isinstance(e, errors.UserError):
            raise
        raise errors.UserError(f"--config={spec}: {errors.message(e)}") from e


def _wants_traceback(argv: Sequence[str]) -> bool:
    for i, a in enumerate(argv):
        if a == "--debug" or a == "--debug=true":
            return True
        level = a.split("=", 1)[1] if a.startswith("--verbosity=") else None
        if a in ("-v", "--verbosity") and i + 1 < len(argv):
            level = argv[i + 1]
        if level is not None and level.lstrip("-").isdigit() and int(level) >= 1:
            return True
    return False


def _unquote(text: str) -> str:
    """One line from an exception text that may be repr-quoted (KeyError, ml_collections)."""
    while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].replace("\\'", "'").replace("\\n", "\n")
    return " ".join(text.replace("\\n", " ").split())


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
