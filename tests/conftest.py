"""Fixtures shared by every test package: the tiny synthetic corpus, built once per session.

Helpers that are not fixtures (the tiny config, tree and fake trainer) live in `tiny.py`. Markers (registered
in pyproject.toml): `e2e` for whole runs of the system on the tiny model, `slow` for loopback deployments.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny import make_prepared


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny prepared corpus (`tiny.make_prepared`): four heterogeneous synthetic sources. Read-only: a
    test that needs other sizes or writes into its data builds its own."""
    return make_prepared(tmp_path_factory.mktemp("data") / "d")
