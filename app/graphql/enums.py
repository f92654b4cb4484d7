"""The domain enums as GraphQL enums (same names, same values), with descriptions.

Imported before any GraphQL type that uses them (app.graphql.inputs, .types), so
strawberry sees one definition of each.
"""

from __future__ import annotations

from enum import Enum

import strawberry

from app.auth.models import Role
from app.fleet.models import JobStage, Priority
from app.fleet.service import SubmitOutcome
from app.tracker.models import CommentKind, ItemStatus


def describe_enum(cls: type[Enum], description: str, values: dict[str, str]) -> None:
    """Register a domain enum as the GraphQL enum of the same name and values, with a
    description for the enum and for each of its values (KeyError when one is missing)."""
    strawberry.enum(cls, description=description)
    definition = cls.__strawberry_definition__  # type: ignore[attr-defined]
    for value in definition.values:
        value.description = values[value.name]


# The domain enums are the GraphQL enums (same names, same values).
describe_enum(ItemStatus, "Where a tracker item stands.", {
    "TODO": "Not started.",
    "IN_PROGRESS": "Someone (or a job) is working on it.",
    "BLOCKED": "Work stopped: waiting on something, or its job failed.",
    "DONE": "Finished.",
    "CANCELLED": "Abandoned; no work will be done.",
})
describe_enum(CommentKind, "Who wrote a comment.", {
    "USER": "A person (or client) wrote it with `addComment`.",
    "SYSTEM": "fleetbridge wrote it, echoing a job's progress onto its item.",
})
describe_enum(JobStage, "A job's stage in its life cycle (DESIGN §2).", {
    "QUEUED": "Waiting for a worker (not claimed before `notBefore`, if set).",
    "ASSIGNED": "Claimed: a worker holds its lease.",
    "BUILDING": "The worker is building the change.",
    "REVIEW": "The change is being reviewed (may go back to BUILDING).",
    "TESTING": "The change is being tested (may go back to BUILDING).",
    "SHIPPED": "Done and delivered (final).",
    "FAILED": "Failed for good (final; `retryJob` queues it again).",
    "CANCELLED": "Cancelled by a member or with its item (final; `retryJob` queues it again).",
})
describe_enum(Priority, "How urgent a job is; the scheduler claims the highest first, "
              "and a waiting job gains one level every FLEET_AGING_SECONDS.", {
    "LOW": "Weight 0.",
    "NORMAL": "Weight 1 (the default).",
    "HIGH": "Weight 2.",
    "URGENT": "Weight 3.",
})
describe_enum(SubmitOutcome, "What a submit did.", {
    "CREATED": "A new job was created.",
    "DEDUPED": "The idempotency key names an existing job, answered instead; nothing written.",
})
describe_enum(Role, "What a token may do.", {
    "MEMBER": "Read; work the tracker and the bridge; submit, cancel and retry jobs.",
    "WORKER": "Read; claim, heartbeat and transition jobs.",
    "ADMIN": "All of it.",
})
