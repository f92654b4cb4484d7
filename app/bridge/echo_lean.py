"""PostgreSQL: one job's after-commit echo in one guarded statement on the driver.

With FLEET_TRACKER_ECHO on, every stage change of a tracker-linked job is echoed
after it commits and before the mutation answers (DESIGN §4).  The general echo
(`BridgeService._echo_one`) is a unit of work — BEGIN, the read under lock, the
write, COMMIT: four round trips, a SQLAlchemy session, and the product row (the
write bumps its event sequence) held from the write until the COMMIT's answer, while
the product's claims and transitions wait for it.  Here, for the usual case — one
job of a product in a commit, echoed by the bridge's own writer — the echo is:

1. the echo's read without locks (`echo_rows.PG_UNLOCKED_ROW`), on the driver of a
   pooled connection, outside any transaction — with the reads of the process's
   other echoes pending at the same moment in one round trip
   (`app.bridge.echo_groups.read`);
2. the decision in Python, by the same rules (`echo_apply.decide`): nothing to
   write ends the echo there (as the probe of a same-status move always did);
3. ONE statement, its own implicit transaction (`app.lone.on_driver`): its first CTE, `guard`,
   reads the job and its item again, locked `FOR UPDATE OF items, jobs` (the
   item's row before its job's, as every item write), and only if every column the
   decision and the comment rest on is still what step 1 read (`ROW_COLUMNS`: the
   item's status and bridge status, whether the job is the item's latest, its
   stage, echo record, pending retry and metrics); every write — the job's echo
   record, the item's status or the bridge's take-back, the metrics comment, the
   product's sequence bumped for the events, the event rows, their NOTIFY — is
   conditioned on that guard row (`EXISTS (SELECT FROM guard)`, a one-time filter
   evaluated before the write scans anything).

When the guard matches nothing (a person changed the item's status, or anything
else the decision rests on moved, between the read and the write), nothing at all
was written, and the caller echoes the job the general way, under lock — so the
rules decide on what the locked read sees, exactly as before.

The product row is locked by the statement's sequence bump, after the guard's
locks (items, then jobs, then the product row: the order of every other writer),
and released at the statement's commit: held for the server's run of one statement,
not for client round trips.  Sequences stay gap-free and in commit order (the
argument of `app.lone` for an implicit transaction); the events are handed to the
hub only after the commit (`Database.published`, as a unit of work hands them over).

No SQLAlchemy session: the read and the write run on the driver of pooled
connections (`app.lone.on_driver`, which replaces a connection found dead once); the
writes of a product's concurrent echoes commit together (`app.bridge.echo_groups`).
Store failures leave as `StoreUnavailableError`, other errors as the driver's; the
statement is one transaction, so an error the server reports means nothing of it
was written.  A connection lost while it ran may have
committed it: the echo is idempotent (`decide_echo`: a stage echoed already writes
nothing), so the retry the caller schedules writes nothing twice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Integer, String, bindparam, column, text
from sqlalchemy.sql.elements import BindParameter

from app.bridge import echo_groups
from app.bridge.echo_apply import SYSTEM_AUTHOR, ItemSeen, decide, figures, seen_row
from app.bridge.echo_rows import PG_UNLOCKED_ROW, ROW_COLUMNS, EchoRow
from app.bridge.mapping import echo_comment, item_status_for_stage
from app.db import JsonDocument, UTCDateTime, utcnow
from app.events.models import EventType
from app.events.outbox import EVENT_CHANNEL, EventRecord
from app.fleet.changes import EchoSeen
from app.fleet.statements import PgStatement
from app.tasks import run_to_completion
from app.tracker.models import CommentKind, ItemStatus
from app.uow import Database, is_store_failure, store_unavailable


@dataclass
class Stats:
    """Process-wide counters (tests, diagnostics)."""

    written: int = 0  # guarded writes that committed
    nothing: int = 0  # echoes the read found nothing to write for
    refused: int = 0  # guarded writes whose guard matched nothing


STATS = Stats()

_READ = PgStatement.of(PG_UNLOCKED_ROW)
_CHECKED = ROW_COLUMNS[3:]  # product_id, job_id and item_id are the guard's keys

_GUARD_SQL = (
    "SELECT jobs.id FROM jobs JOIN items ON items.id = jobs.tracker_item_id"
    " WHERE jobs.product_id = :product_id AND jobs.id = :job_id AND items.id = :item_id"
    + "".join(f" AND ({sql}) IS NOT DISTINCT FROM :seen_{name}" for name, sql, _ in _CHECKED)
    + " FOR UPDATE OF items, jobs"
)
# The batch variant (app.bridge.echo_groups) never waits for a lock: a member whose item
# or job someone holds matches nothing there, and runs again alone.
_GROUPED_GUARD_SQL = _GUARD_SQL + " SKIP LOCKED"
_GUARDED = "EXISTS (SELECT FROM guard)"
_RECORD_SQL = (
    "UPDATE jobs SET echoed_stage = :echoed_stage, last_echoed_status = :echoed_status,"
    " echo_attempts = 0, echo_retry_at = NULL, echo_retry_stage = NULL"
    f" WHERE jobs.product_id = :product_id AND jobs.id = :job_id AND {_GUARDED}"
    " RETURNING jobs.id"
)
_SET_STATUS_SQL = (
    "UPDATE items SET status = :status, bridge_status = :status, updated_at = :now"
    f" WHERE items.id = :item_id AND {_GUARDED} RETURNING items.id"
)
_TAKE_BACK_SQL = (
    "UPDATE items SET bridge_status = :bridge_status"
    f" WHERE items.id = :item_id AND {_GUARDED} RETURNING items.id"
)
_COMMENT_SQL = (
    "INSERT INTO comments (product_id, item_id, body, author, kind, created_at)"
    " SELECT :product_id, :item_id, :body, :author, :kind, :now FROM guard RETURNING id"
)
_EVENT_COLUMNS = "product_id, seq, type, entity_id, from_state, to_state, payload, created_at"


def _sql(*, comment: bool, status: bool, take_back: bool, grouped: bool = False) -> str:
    """The guarded write: the job's record always; the item's status (with the
    comment) or the bridge's take-back of a status; the comment with its events.
    `grouped`: the batch variant, whose guard skips locked rows."""
    guard = _GROUPED_GUARD_SQL if grouped else _GUARD_SQL
    ctes = [f"guard AS ({guard})", f"job_row AS ({_RECORD_SQL})"]
    if status:
        ctes.append(f"item_row AS ({_SET_STATUS_SQL})")
    elif take_back:
        ctes.append(f"item_row AS ({_TAKE_BACK_SQL})")
    if not comment:
        return "WITH " + ",\n".join(ctes) + (
            "\nSELECT job_row.id, CAST(NULL AS BIGINT) AS seq, CAST(NULL AS INTEGER)"
            " AS entity_id, NULL AS notified FROM job_row")
    events = 2 if status else 1
    status_event = (
        "SELECT event_seq.id, event_seq.last_event_seq - 1,"
        f" '{EventType.ITEM_STATUS_CHANGED.value}', CAST(:item_id AS INTEGER),"
        " CAST(:previous AS VARCHAR), CAST(:status AS VARCHAR), CAST('{}' AS JSONB),"
        " :event_created_at FROM event_seq UNION ALL " if status else "")
    ctes += [
        f"comment_row AS ({_COMMENT_SQL})",
        f"""event_seq AS (
    UPDATE products SET last_event_seq = products.last_event_seq + {events}
    WHERE products.id = :product_id AND {_GUARDED}
    RETURNING products.id, products.last_event_seq
)""",
        f"""event_row AS (
    INSERT INTO events ({_EVENT_COLUMNS})
    {status_event}SELECT event_seq.id, event_seq.last_event_seq,
        '{EventType.COMMENT_ADDED.value}', comment_row.id, NULL, NULL,
        CAST(:comment_payload AS JSONB), :event_created_at
    FROM event_seq CROSS JOIN comment_row
    RETURNING product_id, seq, entity_id
)""",
    ]
    return "WITH " + ",\n".join(ctes) + f"""
SELECT job_row.id, event_row.seq, event_row.entity_id,
       pg_notify('{EVENT_CHANNEL}', event_row.product_id || ':' || event_row.seq) AS notified
FROM job_row CROSS JOIN event_row ORDER BY event_row.seq"""


def _statement(*, comment: bool, status: bool, take_back: bool,
               grouped: bool = False) -> PgStatement:
    binds: list[BindParameter[Any]] = [
        bindparam("job_id", type_=Integer()), bindparam("item_id", type_=Integer()),
        bindparam("now", type_=UTCDateTime()), bindparam("event_created_at", type_=UTCDateTime()),
        bindparam("comment_payload", type_=JsonDocument),
        bindparam("echoed_stage", type_=String()), bindparam("echoed_status", type_=String()),
        bindparam("status", type_=String()), bindparam("bridge_status", type_=String()),
        *(bindparam(f"seen_{name}", type_=type_) for name, _, type_ in _CHECKED),
    ]
    sql = _sql(comment=comment, status=status, take_back=take_back, grouped=grouped)
    used = [bind for bind in binds if re.search(rf":{bind.key}\b", sql)]
    return PgStatement.of(
        text(sql).bindparams(*used).columns(
            column("job_id", Integer), column("seq", BigInteger),
            column("entity_id", Integer), column("notified", String)))


# (comment, status, take_back) → statement; a status is only ever set with a comment,
# and a take-back never comes with a status (`echo_apply.apply_echoes`).
_WRITES = {key: tuple(_statement(comment=key[0], status=key[1], take_back=key[2],
                                  grouped=grouped) for grouped in (False, True))
           for key in ((True, True, False), (True, False, False), (True, False, True),
                       (False, False, False), (False, False, True))}


@dataclass(frozen=True, slots=True)
class Write:
    """The guarded write one echo decided on, and what its events will say."""

    statement: PgStatement
    grouped: PgStatement  # its batch variant
    params: dict[str, Any]
    status: ItemStatus | None  # the status set on the item (None: left as is)
    previous: ItemStatus


def plan_write(row: EchoRow) -> Write | None:
    """The guarded write for the echo of `row`'s job at its current stage, decided by
    `echo_apply.decide` as `apply_echoes` decides one job alone; None when there is
    nothing to write at all."""
    stage = row.stage
    plan = decide(row, stage, ItemSeen(row.item_status, row.bridge_status))
    if plan is None:
        return None
    mapped = item_status_for_stage(stage)
    now = utcnow()
    # the bridge's status after a status write is that status (plan.bridge_status)
    take_back = plan.set_status is None and plan.bridge_status != row.bridge_status
    params: dict[str, Any] = {
        "product_id": row.product_id, "job_id": row.job_id, "item_id": row.item_id,
        "echoed_stage": stage.value,
        "echoed_status": _value(mapped if mapped is not None else row.last_echoed_status),
        "bridge_status": _value(plan.bridge_status),
        "now": now, "event_created_at": now,
        **{f"seen_{name}": getattr(row, name) for name, _, _ in _CHECKED},
    }
    if plan.comment:
        params.update(
            body=echo_comment(figures(row, stage), plan.set_status, now),
            author=SYSTEM_AUTHOR, kind=CommentKind.SYSTEM.value,
            comment_payload={"itemId": row.item_id, "kind": CommentKind.SYSTEM.value})
    if plan.set_status is not None:
        params.update(status=plan.set_status.value, previous=row.item_status.value)
    key = (plan.comment, plan.set_status is not None, take_back)
    statement, grouped = _WRITES[key]
    return Write(statement, grouped, params, plan.set_status, row.item_status)


def _value(status: ItemStatus | None) -> str | None:
    return None if status is None else status.value


def _events(write: Write, rows: Sequence[Sequence[Any]]) -> list[EventRecord]:
    """The events the write appended (ITEM_STATUS_CHANGED first, then COMMENT_ADDED),
    from its rows (seq, entity id), as `echo_writes.write_onto_item` makes them."""
    params = write.params
    product_id, item_id, now = params["product_id"], params["item_id"], params["now"]
    events = []
    seqs = [(row[1], row[2]) for row in rows if row[1] is not None]
    if write.status is not None:
        events.append(EventRecord(
            product_id=product_id, seq=seqs[0][0], type=EventType.ITEM_STATUS_CHANGED,
            entity_id=item_id, from_state=write.previous.value, to_state=write.status.value,
            created_at=now, payload={}))
    if seqs:
        seq, comment_id = seqs[-1]
        events.append(EventRecord(
            product_id=product_id, seq=seq, type=EventType.COMMENT_ADDED,
            entity_id=comment_id, from_state=None, to_state=None, created_at=now,
            payload=params["comment_payload"]))
    return events


async def echo_alone(
    db: Database, product_id: str, job_id: int, seen: EchoSeen | None = None
) -> bool:
    """Echo job `job_id` of `product_id` at its current stage (see the module
    docstring) on pooled connections' drivers, with no session: the read, and when
    there is something to write the guarded write; once that has committed, its
    events handed to the hub (`Database.published`) — the write and the publishing
    to completion even if the caller is cancelled meanwhile.  True when the echo is
    done (written, or nothing to write — also for a job with no item); False when
    the guard matched nothing, with nothing written: the caller then echoes the job
    under lock.  Store failures leave as `StoreUnavailableError`, other errors as
    the driver's.

    `seen`: what the stage change's own statement read (the job as changed, its
    item's status, bridge status and latest job; `app.fleet.changes.EchoSeen`): the
    echo decides on it and reads nothing — the same decision the read would have
    given as of that statement, with the guard checking it as any other read."""
    if seen is not None:
        row: EchoRow | None = seen_row(seen)
    else:
        try:
            found = await echo_groups.read(db.engine, _READ, product_id, job_id)
        except Exception as exc:
            if is_store_failure(exc):
                raise store_unavailable(exc) from exc
            raise
        row = EchoRow(*found[0]) if found else None
    write = plan_write(row) if row is not None else None
    if write is None:
        STATS.nothing += 1
        return True
    return await run_to_completion(_write(db, write))


async def _write(db: Database, write: Write) -> bool:
    try:
        rows = await echo_groups.write(db.engine, write)
    except Exception as exc:
        if is_store_failure(exc):
            raise store_unavailable(exc) from exc
        raise
    if not rows:
        STATS.refused += 1
        return False
    STATS.written += 1
    await db.published(_events(write, rows))
    return True
