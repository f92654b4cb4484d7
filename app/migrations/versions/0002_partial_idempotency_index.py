"""idempotency keys: a partial unique index instead of a unique constraint

Jobs submitted without a key are most jobs; they need no entry in the uniqueness
index.  Both PostgreSQL and SQLite support partial indexes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 22:35:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHERE = sa.text("idempotency_key IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_constraint("uq_jobs_product_id_idempotency_key", type_="unique")
    op.create_index(
        "uq_jobs_product_idempotency_key", "jobs", ["product_id", "idempotency_key"],
        unique=True, postgresql_where=WHERE, sqlite_where=WHERE,
    )


def downgrade() -> None:
    op.drop_index("uq_jobs_product_idempotency_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.create_unique_constraint(
            "uq_jobs_product_id_idempotency_key", ["product_id", "idempotency_key"]
        )
