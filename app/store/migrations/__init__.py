"""Alembic migrations of the state database, run by ``app.store.database.upgrade``."""
