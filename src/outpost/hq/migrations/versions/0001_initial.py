"""Initial schema: hq_meta (with the HQ id), admins, agents, connections, jobs, job_pages.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    meta = op.create_table(
        "hq_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.bulk_insert(meta, [{"key": "hq_id", "value": str(uuid.uuid4())}])
    op.create_table(
        "admins",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "agents",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float),
        sa.Column("version", sa.Text),
        sa.Column("read_only", sa.Boolean),
        sa.Column("transport", sa.String(16)),
    )
    op.create_table(
        "connections",
        sa.Column(
            "agent",
            sa.String(63),
            sa.ForeignKey("agents.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("slug", sa.String(200), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("driver", sa.Text, nullable=False),
        sa.Column("up", sa.Boolean),
        sa.Column("checked_at", sa.Float),
        sa.Column("on_agent", sa.Boolean, nullable=False),
        sa.Column("declared", sa.Boolean, nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "agent",
            sa.String(63),
            sa.ForeignKey("agents.name", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("connection", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("sent_at", sa.Float),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("timeout", sa.Float, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("result", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("row_count", sa.Integer),
        sa.Column("duration_seconds", sa.Float),
    )
    op.create_index("ix_jobs_agent_state", "jobs", ["agent", "state"])
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"])
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])
    op.create_table(
        "job_pages",
        sa.Column(
            "job_id",
            sa.String(36),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("first_row", sa.Integer, nullable=False),
        sa.Column("row_count", sa.Integer, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("job_pages", "jobs", "connections", "agents", "admins", "hq_meta"):
        op.drop_table(table)
