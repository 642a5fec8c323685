"""The state database's schema comes from the Alembic migrations, on SQLite and PostgreSQL.

The migrations must build exactly the table ``app/store/schema.py`` describes (Alembic's
own comparison finds no difference), be safe to run again, be safe to run from several
replicas at once (PostgreSQL advisory lock), and go down again. GRADUNC_DATABASE_URL is
validated at start-up with a message that names it.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from helpers_store import BACKENDS, database_url
from pydantic import ValidationError

from app.config import Settings
from app.store.database import create_store_engine, downgrade, upgrade
from app.store.schema import metadata


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path):
    engine = create_store_engine(database_url(request.param, tmp_path), timeout_s=10)
    yield engine
    engine.dispose()


def schema_differences(engine: sa.Engine) -> list:
    with engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), metadata)


def test_migrations_build_the_declared_schema(engine: sa.Engine) -> None:
    upgrade(engine)
    assert schema_differences(engine) == []
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT version_num FROM alembic_version")).all() == [
            ("0001",)
        ]
        columns = {column["name"] for column in sa.inspect(connection).get_columns("served_scores")}
    # what was served and its feedback; nothing that could hold an image
    assert columns == {
        "seq",
        "request_id",
        "served_at",
        "model_version",
        "prediction",
        "p_correct",
        "p_ood",
        "is_ood",
        "softmax_baseline",
        "entropy",
        "scores",
        "true_label",
        "true_ood",
        "labelled_at",
    }


def test_upgrade_twice_changes_nothing_and_downgrade_removes_the_table(engine: sa.Engine) -> None:
    upgrade(engine)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO served_scores (request_id, served_at, model_version, prediction, "
                "p_correct, p_ood, is_ood, softmax_baseline, entropy) "
                "VALUES ('kept', 1.0, 'm', 3, 0.9, 0.1, false, 0.95, 0.2)"
            )
        )
    upgrade(engine)
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT request_id FROM served_scores")).all() == [
            ("kept",)
        ]
    downgrade(engine, "base")
    assert "served_scores" not in sa.inspect(engine).get_table_names()


def test_replicas_migrating_at_once_do_not_collide(tmp_path: Path) -> None:
    url = database_url("postgresql", tmp_path)
    engines = [create_store_engine(url, timeout_s=30) for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(engines))

    def migrate(engine: sa.Engine) -> None:
        barrier.wait()
        try:
            upgrade(engine)
        except BaseException as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=migrate, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert schema_differences(engines[0]) == []
    for engine in engines:
        engine.dispose()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("mysql://user@host/db", "backend 'mysql' is not supported"),
        ("sqlite://", "an in-memory SQLite database would vanish"),
        ("not a url", "not a database URL"),
    ],
)
def test_a_bad_database_url_is_refused_naming_the_variable(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(f"GRADUNC_DATABASE_URL: {message}")):
        Settings(database_url=value)


def test_postgresql_urls_use_psycopg_3() -> None:
    engine = create_store_engine("postgresql://someone@127.0.0.1:1/db", timeout_s=1)
    assert engine.dialect.driver == "psycopg"
    engine.dispose()


def test_the_default_store_is_a_sqlite_file_in_the_state_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.delenv("GRADUNC_DATABASE_URL", raising=False)
    expected = tmp_path / "gradient-uncertainty" / "live.sqlite3"
    assert Settings().database_url == f"sqlite:///{expected}"
