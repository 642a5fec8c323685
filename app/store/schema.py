"""The state database's one table: what was served for each request id, and its feedback.

One row per scored image (never the image itself). The feedback columns stay null until
POST /feedback names the request id; then they hold the ground truth the live quality
figures (GET /metrics/live) are computed from. ``seq`` orders the rows for retention by
count; ``served_at`` (Unix seconds, wall clock, so that replicas sharing a database agree)
bounds the window and retention by age.

The schema is created and changed only by the Alembic migrations in
``app/store/migrations``; ``tests/test_store_migrations.py`` checks that they produce
exactly this table.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["REQUEST_ID_MAX_LENGTH", "metadata", "served_scores"]

#: Longest request id the table (and POST /feedback) accepts; the service's ids are 32.
REQUEST_ID_MAX_LENGTH = 64

metadata = sa.MetaData()

#: 64-bit on PostgreSQL; SQLite's autoincrementing key must be exactly INTEGER.
_SEQUENCE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

served_scores = sa.Table(
    "served_scores",
    metadata,
    sa.Column("seq", _SEQUENCE, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(REQUEST_ID_MAX_LENGTH), nullable=False),
    sa.Column("served_at", sa.Double(), nullable=False, comment="Unix time, seconds"),
    sa.Column("model_version", sa.String(200), nullable=False),
    sa.Column("prediction", sa.SmallInteger(), nullable=False),
    sa.Column("p_correct", sa.Double(), nullable=False),
    sa.Column("p_ood", sa.Double(), nullable=False),
    sa.Column("is_ood", sa.Boolean(), nullable=False),
    sa.Column("softmax_baseline", sa.Double(), nullable=False),
    sa.Column("entropy", sa.Double(), nullable=False),
    sa.Column("scores", sa.JSON(), nullable=True, comment="the score object's `scores`"),
    sa.Column("true_label", sa.SmallInteger(), nullable=True, comment="from POST /feedback"),
    sa.Column("true_ood", sa.Boolean(), nullable=True, comment="from POST /feedback"),
    sa.Column("labelled_at", sa.Double(), nullable=True, comment="Unix time of the feedback"),
    sa.UniqueConstraint("request_id", name="uq_served_scores_request_id"),
    sa.Index("ix_served_scores_served_at", "served_at"),
)
