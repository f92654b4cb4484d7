"""Group commit: requests pending at the same moment are served by one run.

SQLite has one writer connection (`app.db.sqlite_writer`): the echoes of concurrent
stage changes queue for it one unit of work after another, each paying for its own
BEGIN, COMMIT and session.  `GroupCommit` lets the echoes that are waiting at the
same moment share one: the first request starts a run in a task of its own; the run
waits for what it needs (the writer) and then calls `take()`, which hands it every
request that arrived until then; requests that arrive meanwhile wait for the next
run.  A run may call `take()` again, for the requests that arrived since (an empty
list: none); each call serves the requests the previous one took.  Each caller
awaits its own request until it is served: when the run took the next ones or
ended — its echo committed, or handled on its own after a failure (the `run`
decides how; it must not raise).

The same shape serves PostgreSQL's lone job changes (app.fleet.change_groups): one
group per product and statement, whose run commits what it took in one batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

R = TypeVar("R")
logger = logging.getLogger(__name__)

Take = Callable[[], list[R]]


class GroupCommit(Generic[R]):
    """Requests of type R served in runs of `run(take)`; see the module docstring."""

    def __init__(self, run: Callable[[Take[R]], Awaitable[None]], *,
                 name: str = "echo-group-commit") -> None:
        self._run = run
        self._name = name
        self._pending: list[tuple[R, asyncio.Future[None]]] = []
        self._taken: list[asyncio.Future[None]] = []
        self._took = False
        self._runner: asyncio.Task[None] | None = None
        self.runs = 0  # runs so far (tests, diagnostics)
        self.served = 0  # requests served so far

    async def submit(self, request: R) -> None:
        """Queue `request` and wait until a run has served it.  A cancelled caller
        stops waiting; its request is served all the same."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        if self._runner is None:
            self._took = False
            self._runner = asyncio.create_task(self._drain(), name=self._name)
        await future

    @property
    def pending(self) -> int:
        """Requests waiting for a run to take them."""
        return len(self._pending)

    @property
    def busy(self) -> bool:
        """A run has started and not ended."""
        return self._runner is not None

    async def idle(self) -> None:
        """Wait until no run is left (a shutdown)."""
        while self._runner is not None:
            await asyncio.shield(self._runner)

    def waiting(self) -> bool:
        """A request submitted now adds no run: one has started and not taken its
        requests yet, or requests already wait for the next run."""
        return self._runner is not None and (not self._took or bool(self._pending))

    def _take(self) -> list[R]:
        """The requests pending now, for the calling run to serve; those it took
        before are served."""
        self._serve()
        self._took = True
        taken, self._pending = self._pending, []
        self._taken.extend(future for _, future in taken)
        return [request for request, _ in taken]

    def _serve(self) -> None:
        self.served += len(self._taken)
        for future in self._taken:
            if not future.done():
                future.set_result(None)
        self._taken = []

    async def _drain(self) -> None:
        try:
            while self._pending:
                self.runs += 1
                self._took = False
                try:
                    await self._run(self._take)
                except Exception:  # a run handles its failures; this is a bug's last stop
                    logger.exception("a group commit run failed")
                finally:
                    if not self._took:
                        # A run always takes its requests, even to fail them one by one;
                        # should one not, its callers are not kept waiting: their
                        # echoes were not recorded, so the sweeper catches them up.
                        logger.error("a group commit run did not take its requests")
                        self._take()
                    self._serve()
        finally:
            self._runner = None
