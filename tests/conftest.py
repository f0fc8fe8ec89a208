"""Fixtures shared by the test modules; plain helpers live in ``tests/helpers.py``."""

from __future__ import annotations

import pytest

from jretrieval import models
from tests.helpers import TinyNet


@pytest.fixture
def tiny_zoo(monkeypatch):
    """Registers ``TinyNet`` as the zoo architecture ``"tiny"`` for one test."""
    monkeypatch.setitem(models.ARCHITECTURES, "tiny", TinyNet)
