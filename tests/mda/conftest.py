"""Fixtures of the delivery tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mda.helpers import Deliver


@pytest.fixture
def deliver(tmp_path: Path) -> Deliver:
    """Run `filterd deliver` with a configuration file written for the test."""
    return Deliver(tmp_path)
