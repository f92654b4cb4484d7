"""Token checks for one running instance: a short cache, open websockets, last use.

`TokenGuard.authenticate(secret)` is what the GraphQL view calls on every HTTP
request and websocket `connection_init` (DESIGN §1, issue 10 §2, issue 12 §3):

* **Cache.** A token check is kept for `FLEET_TOKEN_CACHE_SECONDS` (default 5), so
  a busy client does not cost a database read per request — on both stores, and
  only while revokes can reach this instance at once.  `live()` names the channel
  that tells of revokes, as an *epoch*: None while it is down (nothing is cached);
  any new value empties the cache.
  - PostgreSQL: the event hub's LISTEN connection, epoch = its server pid (a new pid
    is a reconnect, when revokes may have been missed).  A revoke sends a NOTIFY in
    its transaction (app.auth.service `revoke_tokens`); `revoked()` drops the token
    the moment it arrives.
  - SQLite: the revoking process (`fleetbridge token revoke`) cannot reach this
    one's memory, so after its commit it bumps the database's sidecar file
    (app.auth.revocations); epoch = that file's stat, one `stat` per request.
  An entry never outlives its token's `expires_at`.
* **The fill race.** A read that began before a revoke committed may still return
  the token as active; caching it would hide the revoke for the whole TTL.  The
  signal always comes *after* the commit (NOTIFY is delivered at commit; the sidecar
  is bumped after it), and every request looks at the epoch before it reads.  Each
  change seen — a notification (`revoked()`) or a new epoch (`_caching()`) — bumps
  `_generation`; a read caches its result only if the generation it started under
  is still current.  So, with R a read that saw the token active, begun before the
  revoke's commit C, and S the signal after C: if S was observed while R ran, the
  generation moved and R caches nothing; if not, R may cache, but the next request
  observes S first (new epoch: cache emptied; or the notification dropped the
  entry).  A revoke is therefore in force on this instance from its signal on — on
  SQLite, from when `fleetbridge token revoke` returns; a request answered from the
  cache between C and S is answered as if it had come just before C
  (tests/service/test_token_cache.py drives both orders).
* **Open websockets** are tracked per token.  A revoke notification closes them at
  once with 4403; every `FLEET_TOKEN_CHECK_SECONDS` (default 1) the tokens of open
  websockets are re-read, so an expiry, a revoke on SQLite, a deleted row or a lost
  notification closes them within that period too.
* **Last use** is remembered in memory and written in one batch on that same tick,
  at most once a minute per token (`LAST_USED_RESOLUTION`): never a write per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from starlette.types import Scope
from starlette.websockets import WebSocket

from app.auth import repository
from app.auth.service import Principal, authenticate, hash_token, inactive_tokens
from app.db import utcnow
from app.tasks import cancel_and_wait
from app.uow import Database

logger = logging.getLogger(__name__)

CLOSE_CODE = 4403
CLOSE_REASON = "Forbidden: the token was revoked or has expired"
CACHE_MAX_ENTRIES = 10_000
LAST_USED_RESOLUTION = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class _Entry:
    principal: Principal
    fetched: float  # time.monotonic()


class TokenGuard:
    def __init__(
        self,
        db: Database,
        *,
        cache_seconds: float = 0.0,
        check_seconds: float = 1.0,
        live: Callable[[], object | None] | None = None,
    ) -> None:
        """`live()` names the channel that delivers revoke notifications (None while
        it is down); without it nothing is cached."""
        self.db = db
        self.cache_seconds = cache_seconds
        self.check_seconds = check_seconds
        self._live = live
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._cache_epoch: object | None = None
        self._generation = 0  # bumped by every revoke; a read begun before it is not cached
        self._sockets: dict[int, set[WebSocket]] = {}
        # The tokens each open connection is tracked under, by id() of its ASGI scope
        # (alive as long as the connection): forgetting one is O(1), not a scan of all.
        self._tokens_of: dict[int, tuple[WebSocket, set[int]]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._used: dict[int, datetime] = {}  # waiting to be written
        self._written: dict[int, float] = {}  # monotonic time of the last write per token
        self._task: asyncio.Task[None] | None = None
        self.cache_hits = 0  # observable (tests, metrics)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch_forever(), name="token-guard")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        await cancel_and_wait(list(self._closing))
        with contextlib.suppress(Exception):
            await self._write_last_used()

    # -- authentication ----------------------------------------------------------

    async def authenticate(self, secret: str | None, *,
                           key: str | None = None) -> Principal | None:
        """The caller's principal, or None for a missing, unknown, expired or revoked
        token.  `key`: `hash_token(secret)` when the caller has it already.  Raises
        StoreUnavailableError when the database cannot answer."""
        if not secret or len(secret) > 200:
            return None
        key = key or hash_token(secret)
        now = utcnow()
        caching = self._caching()
        if caching:
            entry = self._cache.get(key)
            if entry is not None and time.monotonic() - entry.fetched < self.cache_seconds:
                if entry.principal.expired(now):
                    self._cache.pop(key, None)
                    return None
                self.cache_hits += 1
                self._note_use(entry.principal, now)
                return entry.principal
        generation = self._generation
        async with self.db.read() as session:
            principal = await authenticate(session, secret, now)
        if principal is None:
            self._cache.pop(key, None)
            return None
        if caching and generation == self._generation:
            self._cache[key] = _Entry(principal, time.monotonic())
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_MAX_ENTRIES:
                self._cache.popitem(last=False)
        self._note_use(principal, now)
        return principal

    def _caching(self) -> bool:
        if self.cache_seconds <= 0 or self._live is None:
            return False
        epoch = self._live()
        if epoch != self._cache_epoch:
            self._cache.clear()
            self._cache_epoch = epoch
            self._generation += 1  # a read begun under the old epoch caches nothing
        return epoch is not None

    # -- revocation --------------------------------------------------------------

    def revoked(self, token_ids: set[int]) -> None:
        """Forget these tokens and close their websockets (4403).  Safe to call from
        a notification callback: the closing runs in tasks."""
        if not token_ids:
            return
        self._generation += 1
        for key in [k for k, e in self._cache.items() if e.principal.token_id in token_ids]:
            del self._cache[key]
        for token_id in token_ids:
            for websocket in self._sockets.pop(token_id, set()):
                task = asyncio.create_task(self._close(websocket))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def on_notification(self, payload: str) -> None:
        """The TOKEN_CHANNEL callback: `payload` is comma-separated token ids."""
        ids = {int(part) for part in payload.split(",") if part.strip().isdigit()}
        if not ids:
            logger.warning("ignoring malformed token notification %r", payload)
            return
        self.revoked(ids)

    @staticmethod
    async def _close(websocket: WebSocket) -> None:
        # The socket may be closing already (client gone): nothing to do then.
        with contextlib.suppress(RuntimeError, OSError):
            await websocket.close(code=CLOSE_CODE, reason=CLOSE_REASON)

    # -- websockets --------------------------------------------------------------

    def track(self, websocket: WebSocket, principal: Principal) -> None:
        self._sockets.setdefault(principal.token_id, set()).add(websocket)
        entry = self._tokens_of.get(id(websocket.scope))
        if entry is None or entry[0] is not websocket:
            entry = self._tokens_of[id(websocket.scope)] = (websocket, set())
        entry[1].add(principal.token_id)

    def forget(self, scope: Scope) -> None:
        """The websocket connection of this ASGI `scope` has ended."""
        websocket, tokens = self._tokens_of.pop(id(scope), (None, set()))
        for token_id in tokens:
            sockets = self._sockets.get(token_id)
            if sockets is not None:
                sockets.discard(websocket)
                if not sockets:
                    del self._sockets[token_id]

    def open_sockets(self, token_id: int) -> int:
        return len(self._sockets.get(token_id, ()))

    # -- the periodic pass -------------------------------------------------------

    def _note_use(self, principal: Principal, now: datetime) -> None:
        last = self._written.get(principal.token_id)
        if last is None or time.monotonic() - last >= LAST_USED_RESOLUTION.total_seconds():
            self._used[principal.token_id] = now

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(self.check_seconds)
            try:
                await self.check_open_sockets()
                await self._write_last_used()
            except Exception as exc:  # the database may be down; try again next tick
                logger.warning("token check failed (%s); retrying", type(exc).__name__)

    async def check_open_sockets(self) -> None:
        """Close the websockets of tokens that are no longer active."""
        ids = [token_id for token_id, sockets in self._sockets.items() if sockets]
        if not ids:
            return
        async with self.db.read() as session:
            gone = await inactive_tokens(session, ids)
        self.revoked(gone)

    async def _write_last_used(self) -> None:
        if not self._used:
            return
        used, self._used = self._used, {}
        marked = time.monotonic()
        try:
            async with self.db.unit_of_work() as session:
                await repository.touch_tokens(
                    session, used, older_than=utcnow() - LAST_USED_RESOLUTION
                )
        except BaseException:
            for token_id, at in used.items():  # keep them for the next tick
                self._used.setdefault(token_id, at)
            raise
        self._written.update(dict.fromkeys(used, marked))
