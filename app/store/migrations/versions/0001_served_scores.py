"""served_scores: what was served for each request id, and its feedback.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "served_scores",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("request_id", sa.String(64), nullable=False),
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
    )
    op.create_index("ix_served_scores_served_at", "served_scores", ["served_at"])


def downgrade() -> None:
    op.drop_index("ix_served_scores_served_at", table_name="served_scores")
    op.drop_table("served_scores")
