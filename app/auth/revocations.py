"""How a token revoke on SQLite reaches the running servers at once (issue 12 §3).

On PostgreSQL a revoke sends a NOTIFY in its transaction (app.auth.repository).  On
SQLite the revoking process (`fleetbridge token revoke`, `token create --replace`)
is usually not the server, and there is nothing to deliver a message with; so a
revoke — any unit of work that revokes tokens (`app.auth.service.revoke_tokens`) or
deletes a `Token` row through the ORM (which on PostgreSQL also sends the NOTIFY)
— *after its commit* touches a small sidecar
file next to the database, `<database>.tokens` (`sidecar_path`).  Its contents are
empty and meaningless; what changes is its stat: the modification time is set to
`max(now, old + 1 ns)` (`bump`), so it changes even when two revokes fall on one
clock tick.

A server's token cache (app.auth.guard) takes the file's stat as its epoch
(`epoch`: one `stat` system call per request) and empties itself whenever it
changes.  The guard's race argument (a cache fill from a read begun before the
revoke committed) is in its docstring; in short, the bump happens after the
commit, so any read that could still have seen the token active began before the
bump, and the guard's next look at the epoch drops what that read cached.

What this does not cover, by design: a revoke written by hand in SQL (`UPDATE
tokens SET revoked_at = …` in the `sqlite3` shell) or a bulk Core `DELETE` — those
are noticed when the cache entry expires (FLEET_TOKEN_CACHE_SECONDS); a revoking
process killed between its commit and the bump, likewise.  A directory the revoker
may not write in is logged as a warning, with the same consequence.  An in-memory
or URI-style database has no sidecar, and its servers cache nothing.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Final

from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.orm import Mapper, Session, object_session

from app.auth.models import Token
from app.auth.repository import TOKEN_CHANNEL

logger = logging.getLogger(__name__)

SUFFIX: Final = ".tokens"
# `session.info` key: this transaction revoked or deleted tokens (bump after commit).
_PENDING: Final = "fleet_tokens_revoked"
# The epoch of a sidecar that does not exist yet (no revoke ever signalled): a
# value like any other, so that its creation by the first revoke is a change.
ABSENT: Final = "absent"
# When a file system keeps coarse modification times, `old + 1 ns` may round back to
# `old`; then the time is moved on by this much instead.
COARSE_STEP_NS: Final = 2_000_000_000


def sidecar_path(database_url: str | URL) -> Path | None:
    """`<database file>.tokens` for a SQLite file database (relative paths stay
    relative, as SQLite resolves the database itself); None for other stores, for
    in-memory and for URI-style (`file:…`) databases."""
    url = make_url(database_url)
    if not url.drivername.startswith("sqlite"):
        return None
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    if str(url.query.get("uri", "")).lower() in {"true", "1"}:
        return None
    return Path(database + SUFFIX)


def epoch(path: Path) -> object | None:
    """What the sidecar's stat says now: (inode, mtime ns, ctime ns), ABSENT when
    there is no file yet, None when it cannot be read (the caller then caches
    nothing)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return ABSENT
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)


def bump(path: Path) -> None:
    """Make the sidecar's stat change: create it if missing, and set its modification
    time to max(now, old + 1 ns) — moved on further when the file system rounded
    that back to the old value.  Raises OSError."""
    try:
        old = os.stat(path).st_mtime_ns
    except FileNotFoundError:
        with open(path, "a"):
            pass
        old = os.stat(path).st_mtime_ns - 1  # the creation itself is the change
    new = max(time.time_ns(), old + 1)
    os.utime(path, ns=(new, new))
    if os.stat(path).st_mtime_ns <= old:
        new = old + COARSE_STEP_NS
        os.utime(path, ns=(new, new))


def announce_after_commit(session: Session | Any) -> None:
    """Mark `session`'s transaction as one that revokes or deletes tokens: after it
    commits, the sidecar is bumped (SQLite; a no-op elsewhere).  `session` is an ORM
    Session or an AsyncSession (they share `info`)."""
    session.info[_PENDING] = True


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    if session.in_nested_transaction():  # a savepoint: wait for the real commit
        return
    if not session.info.pop(_PENDING, False):
        return
    path = sidecar_path(session.get_bind().engine.url)
    if path is None:
        return
    try:
        bump(path)
    except OSError as exc:
        logger.warning(
            "could not signal the token revoke to running servers (%s: %s); they may "
            "accept the token until their cache expires (FLEET_TOKEN_CACHE_SECONDS)",
            path, exc,
        )


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    # After a savepoint's rollback the flag stays: at worst a spurious bump, which
    # only empties the servers' caches.
    if not session.in_nested_transaction():
        session.info.pop(_PENDING, None)


@event.listens_for(Token, "after_delete")
def _token_deleted(_mapper: Mapper[Token], connection: Connection, target: Token) -> None:
    """A token row deleted through the ORM is announced like a revoke: on PostgreSQL
    by a NOTIFY in the same transaction, on SQLite by the sidecar after the commit."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_notify(:channel, :payload)"),
                           {"channel": TOKEN_CHANNEL, "payload": str(target.id)})
    session = object_session(target)
    if session is not None:
        announce_after_commit(session)
