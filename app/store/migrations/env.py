"""Alembic environment: migrate the connection that ``app.store.database.upgrade`` hands in.

The service runs the migrations itself at start-up, on its own engine, so there is no
``alembic.ini`` and no URL here. To write a new revision against a scratch database::

    python -m app.store revision -m "what changes" --autogenerate

(``app/store/__main__.py``), then review the file it writes under ``versions/``.
"""

from __future__ import annotations

from alembic import context

from app.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "app/store/migrations runs through app.store.database.upgrade (or "
        "`python -m app.store`), which hands Alembic a connection; it has no URL of its own"
    )

context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite can alter tables only by copying them; batch mode does that for it.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
