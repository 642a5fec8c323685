"""The live-quality state store: what was served per request id, feedback, live figures.

::

    schema.py      the one table (served_scores), as SQLAlchemy Core
    migrations/    Alembic revisions that create and change it, run at start-up
    database.py    engines (SQLite file or PostgreSQL via psycopg 3) and the upgrade
    writer.py      LiveStore: in-memory buffer, writer thread, feedback, retention
    reference.py   the bundle's calibration score distributions (drift reference)
    quality.py     GET /metrics/live's measures: AUROC & co. on labelled rows, drift
    lifespan.py    how an app starts its store and records what it served

Nothing here stores an image. DESIGN.md sections 5 and 9.
"""

from app.store.writer import FeedbackItem, FeedbackOutcome, LiveStore, StoreState, StoreUnavailable

__all__ = ["FeedbackItem", "FeedbackOutcome", "LiveStore", "StoreState", "StoreUnavailable"]
