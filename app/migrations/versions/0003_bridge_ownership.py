"""the bridge's record of what it wrote: items.bridge_status, jobs.echoed_stage and
jobs.echo_retry_stage (DESIGN §4, "Echo rules")

Existing rows are back-filled so that nothing is echoed twice after the upgrade: an
item's bridge status is its latest echoed job's last echoed status; a job whose echo
had caught up (or that had already ended) counts as echoed at its current stage.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 03:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ITEM_STATUS = sa.Enum(
    "TODO", "IN_PROGRESS", "BLOCKED", "DONE", "CANCELLED", name="item_status",
    native_enum=False, length=16,
)
STAGES = ("QUEUED", "ASSIGNED", "BUILDING", "REVIEW", "TESTING", "SHIPPED", "FAILED",
          "CANCELLED")


def _job_stage() -> sa.Enum:
    return sa.Enum(*STAGES, name="job_stage", native_enum=False, length=16)


def upgrade() -> None:
    with op.batch_alter_table("items") as batch_op:
        batch_op.add_column(sa.Column("bridge_status", ITEM_STATUS, nullable=True))
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("echoed_stage", _job_stage(), nullable=True))
        batch_op.add_column(sa.Column("echo_retry_stage", _job_stage(), nullable=True))
    op.execute(
        "UPDATE items SET bridge_status = (SELECT jobs.last_echoed_status FROM jobs"
        " WHERE jobs.tracker_item_id = items.id AND jobs.last_echoed_status IS NOT NULL"
        " ORDER BY jobs.id DESC LIMIT 1)"
    )
    op.execute(
        "UPDATE jobs SET echoed_stage = stage WHERE tracker_item_id IS NOT NULL"
        " AND echo_retry_at IS NULL AND (last_echoed_status IS NOT NULL"
        " OR stage IN ('SHIPPED', 'FAILED', 'CANCELLED'))"
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("echo_retry_stage")
        batch_op.drop_column("echoed_stage")
    with op.batch_alter_table("items") as batch_op:
        batch_op.drop_column("bridge_status")
