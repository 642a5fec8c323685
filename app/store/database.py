"""Connecting to the state database and bringing its schema up to date.

SQLite (a file, nothing to start) is the default; PostgreSQL, through psycopg 3, is for
several replicas sharing one store. ``postgresql://`` URLs are mapped to the psycopg
driver, so the usual URL form works. The schema belongs to the Alembic migrations in
``migrations/``; :func:`upgrade` runs them programmatically, under a PostgreSQL advisory
lock so that replicas starting together do not race each other.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

__all__ = [
    "MIGRATIONS_DIR",
    "SUPPORTED_BACKENDS",
    "alembic_config",
    "create_store_engine",
    "display_url",
    "downgrade",
    "parse_database_url",
    "upgrade",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SUPPORTED_BACKENDS = ("sqlite", "postgresql")
#: Key of the advisory lock that serialises migrations across replicas (any constant).
_MIGRATION_LOCK_KEY = 7_201_415


def parse_database_url(value: str) -> URL:
    """``value`` as a SQLAlchemy URL for a supported backend, else ``ValueError``."""
    try:
        url = sa.make_url(value)
    except sa.exc.ArgumentError as error:
        raise ValueError(f"not a database URL ({error})") from None
    backend = url.get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"backend {backend!r} is not supported; use sqlite:///<file> or "
            "postgresql://<user>@<host>/<database>"
        )
    if backend == "postgresql" and url.drivername in ("postgresql", "postgresql+psycopg2"):
        url = url.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and url.database in (None, "", ":memory:"):
        raise ValueError(
            "an in-memory SQLite database would vanish with each connection; name a file, "
            "e.g. sqlite:///var/live.sqlite3"
        )
    return url


def display_url(url: URL | str) -> str:
    """The URL with its password masked, for logs and GET /readyz."""
    return sa.make_url(url).render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets GET /metrics/live read while the writer writes; synchronous stays FULL (the
    # default), so an acknowledged feedback item survives a crash.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def create_store_engine(database_url: str, timeout_s: float) -> Engine:
    """An engine for ``database_url``; connecting (and waiting for SQLite's lock) gives up
    after ``timeout_s``, so an unreachable store is noticed instead of hanging the writer."""
    url = parse_database_url(database_url)
    if url.get_backend_name() == "sqlite":
        engine = sa.create_engine(
            url, connect_args={"timeout": timeout_s, "check_same_thread": False}
        )
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(
        url,
        pool_pre_ping=True,  # a connection that died with the server is replaced, not reused
        pool_size=4,
        max_overflow=4,
        pool_timeout=timeout_s,
        connect_args={"connect_timeout": max(1, math.ceil(timeout_s))},
    )


def alembic_config(connection: sa.Connection) -> Any:
    """An Alembic configuration that migrates ``connection`` (no alembic.ini needed)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the migrations up to ``revision`` in one transaction."""
    _migrate(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Undo the migrations after ``revision`` ("base": all of them), in one transaction."""
    _migrate(engine, "downgrade", revision)


def _migrate(engine: Engine, direction: str, revision: str) -> None:
    from alembic import command

    if engine.url.get_backend_name() == "sqlite":
        # The file's folder is made here, in the writer's first attempt, not when the
        # engine is made: a folder that cannot be created is a store fault like any other.
        Path(engine.url.database or "").expanduser().parent.mkdir(parents=True, exist_ok=True)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Held to the end of the transaction: the second replica waits, then finds
            # the schema already at head and does nothing.
            connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
            )
        getattr(command, direction)(alembic_config(connection), revision)
