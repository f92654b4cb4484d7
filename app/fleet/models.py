from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, JsonDocument, UTCDateTime, utcnow
from app.tracker.models import ITEM_STATUS, ItemStatus


class JobStage(enum.StrEnum):
    QUEUED = "QUEUED"
    ASSIGNED = "ASSIGNED"
    BUILDING = "BUILDING"
    REVIEW = "REVIEW"
    TESTING = "TESTING"
    SHIPPED = "SHIPPED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class Priority(enum.StrEnum):
    LOW = "LOW"
    NORMAL = "NORMAL"
    HIGH = "HIGH"
    URGENT = "URGENT"


JOB_STAGE = Enum(JobStage, native_enum=False, length=16, name="job_stage")


class Job(Base):
    """A unit of fleet work.

    `queued_at` is when the job last became *eligible* to be claimed: its creation,
    or, after a retry or an expired lease, the end of its backoff.  The scheduler
    ages a job from that moment, and the claim index orders by it.
    The lease is the `lease_*` columns; `fence` only ever grows.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        # Idempotency: one job per (product, key); jobs without a key stay out of it.
        Index(
            "uq_jobs_product_idempotency_key", "product_id", "idempotency_key", unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
            sqlite_where=text("idempotency_key IS NOT NULL"),
        ),
        Index("ix_jobs_claim", "product_id", "stage", "priority", "queued_at", "id"),
        Index("ix_jobs_product_id_id", "product_id", "id"),
        Index("ix_jobs_tracker_item_id", "tracker_item_id"),
        Index("ix_jobs_stage_lease_expires_at", "stage", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_id: Mapped[str] = mapped_column(ForeignKey("products.id"))
    title: Mapped[str] = mapped_column(String(200))
    body_md: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(64), default="code")
    stage: Mapped[JobStage] = mapped_column(JOB_STAGE, default=JobStage.QUEUED)
    priority: Mapped[Priority] = mapped_column(
        Enum(Priority, native_enum=False, length=16, name="job_priority"),
        default=Priority.NORMAL,
    )
    capabilities: Mapped[list[str]] = mapped_column(JsonDocument, default=list)
    engine_class: Mapped[str | None] = mapped_column(String(100))
    profile: Mapped[str | None] = mapped_column(String(100))
    budget: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    tracker_item_id: Mapped[int | None] = mapped_column(ForeignKey("items.id"))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))

    lease_worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_fence: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    tokens_in: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_out: Mapped[int] = mapped_column(BigInteger, default=0)

    last_echoed_status: Mapped[ItemStatus | None] = mapped_column(ITEM_STATUS)
    echo_attempts: Mapped[int] = mapped_column(Integer, default=0)
    echo_retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The last stage whose echo wrote something (its terminal comment, once, included;
    # a move the item already shows writes nothing and leaves it behind, see
    # app.bridge.mapping `echo_covered`), and
    # the stage a failed echo attempted (what the sweeper retries with the flag off).
    echoed_stage: Mapped[JobStage | None] = mapped_column(JOB_STAGE)
    echo_retry_stage: Mapped[JobStage | None] = mapped_column(JOB_STAGE)

    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
