"""Helpers for the service's own background asyncio tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar


async def cancel_and_wait(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel every task, then wait until each has finished unwinding."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task



logger = logging.getLogger(__name__)
T = TypeVar("T")

# Tasks started by `run_to_completion` whose caller went away: kept referenced until done.
_UNFINISHED: set[asyncio.Future[Any]] = set()


async def run_to_completion(awaitable: Awaitable[T]) -> T:
    """Await `awaitable` in a task of its own that the caller's cancellation cannot
    stop: if the caller is cancelled meanwhile, wait until the task has finished, then
    let the cancellation through.  Returns the task's result (or raises its error).

    For work that must not be cut in half by a client going away, such as a commit
    and the publishing of its events (DESIGN §5; issue 11 "no lost live event").
    """
    task = asyncio.ensure_future(awaitable)
    _UNFINISHED.add(task)
    task.add_done_callback(_UNFINISHED.discard)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as exc:
            if task.cancelled():  # the task itself was cancelled (the loop is closing)
                raise
            cancelled = exc
        except Exception:
            break  # raised below, from the task
    if cancelled is not None:
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.warning("work finished after its caller was cancelled failed: %r", error)
        raise cancelled
    return task.result()
