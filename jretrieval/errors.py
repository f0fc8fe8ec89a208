"""Errors a user can fix, told apart from bugs, and the one-line message the command line shows.

A user's mistake (a dataset not downloaded, a checkpoint not converted, a config value of the
wrong kind, an optional package not installed, a full disk) ends ``python -m jretrieval.main``
with status 1 and a message naming the file, field or value and what was expected; a bug ends
with Python's traceback. The library raises:

- :class:`UserError` (and its kinds :class:`ConfigError`, :class:`MissingPackageError`) where it
  knows the input is at fault; they also subclass the built-in type callers already catch
  (``ValueError``, ``ImportError``), so ``except ValueError`` keeps working;
- the built-in ``ValueError`` (a validator's complete message), ``OSError`` (a file missing or
  unwritable: ``FileNotFoundError``, ``PermissionError``, the store's write errors) and
  ``ImportError`` (an optional package absent) for the same purpose, throughout the library.

:data:`USER_ERRORS` is that set of types; :func:`message` turns one into the text shown.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = [
    "USER_ERRORS",
    "ConfigError",
    "MissingPackageError",
    "UserError",
    "message",
    "require",
]


class UserError(Exception):
    """A mistake in the user's input that they can fix; the message says what and how."""


class ConfigError(UserError, ValueError):
    """A config field holds a value the pipeline cannot use.

    Args:
      field: dotted name, e.g. ``"whitening.dim"``.
      value: the value found.
      expected: what would have been accepted, e.g. ``"a positive int or 'none'"``.
    """

    def __init__(self, field: str, value: object, expected: str):
        super().__init__(f"config field {field}={value!r}: expected {expected}")
        self.field, self.value, self.expected = field, value, expected


class MissingPackageError(UserError, ImportError):
    """An optional package needed for what was asked is not installed."""


#: import name -> (pip requirement, extra of pyproject.toml that brings it).
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "plots"),
    "skimage": ("scikit-image", "demo"),
    "scipy": ("scipy", "test"),
    "torch": ("torch==2.13.0", "convert"),
    "gdown": ("gdown", "test"),
}

#: Exception types shown to the user as one line (status 1) instead of a traceback. ValueError,
#: OSError and ImportError are included because the library's validators, file checks and
#: optional imports raise them with complete messages; ``--debug`` shows the traceback of any.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError, ImportError)


def require(module: str, *, purpose: str) -> ModuleType:
    """Imports an optional package, or raises :class:`MissingPackageError` saying how to get it.

    Args:
      module: the import name, e.g. ``"matplotlib"``.
      purpose: what needs it, e.g. ``"the dimension-sweep plot"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingPackageError(f"{purpose} needs {_install_hint(module)}") from err


def _install_hint(module: str) -> str:
    top = module.split(".")[0]
    requirement, extra = OPTIONAL_PACKAGES.get(top, (top, ""))
    hint = f"the optional package {top!r}, which is not installed: pip install '{requirement}'"
    return hint + (f" (or pip install -e '.[{extra}]')" if extra else "")


def message(err: BaseException) -> str:
    """The text shown for a user error: its own message, completed where Python's is bare."""
    text = str(err).strip()
    if isinstance(err, ModuleNotFoundError) and err.name and text.startswith("No module named"):
        return _install_hint(err.name)  # a bare import failure: say how to install
    if isinstance(err, OSError) and not isinstance(err, UserError):
        if err.filename and str(err.filename) not in text:
            text = f"{err.filename}: {text}"
        if not text:
            text = type(err).__name__
    return text or type(err).__name__
