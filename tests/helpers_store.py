"""Databases for the live-store tests: a SQLite file, or a fresh database on one real
PostgreSQL server started for the whole test run (Debian's binaries, loopback only).

Where PostgreSQL is not installed the PostgreSQL cases skip and say so; ``.ci/run``
installs it. The server is stopped when the test process exits.
"""

from __future__ import annotations

import atexit
import itertools
from pathlib import Path

import pytest

from tools.local_postgres import LocalPostgres, PostgresUnavailable

BACKENDS = ("sqlite", "postgresql")

_server: LocalPostgres | None = None
_failure: str | None = None
_names = itertools.count()


def shared_postgres() -> LocalPostgres:
    """The test run's PostgreSQL server, started on first use; skips where impossible."""
    global _server, _failure
    if _failure is not None:
        pytest.skip(_failure)
    if _server is None:
        try:
            _server = LocalPostgres(fsync=False).start()  # durability is tested elsewhere
        except PostgresUnavailable as error:
            _failure = f"PostgreSQL cannot run here: {error}"
            pytest.skip(_failure)
        atexit.register(_server.cleanup)
    return _server


def own_postgres() -> LocalPostgres:
    """A PostgreSQL server of its own (for tests that stop it); the caller cleans it up."""
    try:
        return LocalPostgres().start()
    except PostgresUnavailable as error:
        pytest.skip(f"PostgreSQL cannot run here: {error}")


def database_url(backend: str, tmp_path: Path) -> str:
    """A fresh, empty database of ``backend``."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'live.sqlite3'}"
    return shared_postgres().create_database(f"test_{next(_names)}")
