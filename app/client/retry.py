"""Which client failures are worth another try, and how long to wait before it.

A failure is *transient* when the request may well succeed if sent again unchanged: the
service answered `SERVICE_UNAVAILABLE` (its database is down or timed out) or
`RATE_LIMITED`, answered HTTP 5xx/429 without a GraphQL body (a proxy in front of it),
could not be reached (connection refused or reset), or did not answer in time.  Everything
else (`CONFLICT`, `UNAUTHENTICATED`, `BAD_USER_INPUT`…) is an answer, and is raised.

Waits grow exponentially from `initial_seconds`, are capped at `max_seconds`, and carry
up to `jitter_seconds` of random jitter so a fleet of workers does not retry in step
(tenacity's `wait_exponential_jitter`).  Each retry is logged as one warning line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from gql.transport.exceptions import (
    TransportConnectionFailed,
    TransportServerError,
)
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    stop_any,
    stop_never,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

logger = logging.getLogger("app.client")

T = TypeVar("T")

TRANSIENT_CODES = frozenset({"SERVICE_UNAVAILABLE", "RATE_LIMITED"})


class FleetApiError(Exception):
    """The service answered with a GraphQL error; `code` is its `extensions.code`
    (`INTERNAL_SERVER_ERROR` when it has none)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with jitter, in seconds.  `give_up_after` (seconds
    since the first try) ends the retries; None retries for as long as it takes."""

    initial_seconds: float = 0.5
    max_seconds: float = 30.0
    jitter_seconds: float = 1.0
    give_up_after: float | None = None
    # Once set, no further try is made and a wait in progress ends at once (the last
    # failure is raised): a worker being stopped stops retrying.
    interrupt: asyncio.Event | None = field(default=None, compare=False)

    def bounded(self, seconds: float) -> RetryPolicy:
        """The same policy, giving up after `seconds` at the latest and not interrupted."""
        limit = seconds if self.give_up_after is None else min(seconds, self.give_up_after)
        return replace(self, give_up_after=limit, interrupt=None)


NO_RETRY = RetryPolicy(give_up_after=0.0)


def is_transient(exc: BaseException) -> bool:
    """True for a failure that the same request may not meet again (see the module)."""
    if isinstance(exc, FleetApiError):
        return exc.code in TRANSIENT_CODES
    if isinstance(exc, TransportServerError):
        return exc.code is None or exc.code >= 500 or exc.code == 429
    return isinstance(exc, TransportConnectionFailed | TimeoutError | OSError)


def describe(exc: BaseException) -> str:
    """A one-line account of a failure, for a warning or an error message."""
    cause = exc.__cause__
    text = str(exc) or type(exc).__name__
    if isinstance(exc, TransportConnectionFailed) and cause is not None:
        text = f"{text}: {cause}" if str(exc) else str(cause) or type(cause).__name__
    if isinstance(exc, TimeoutError) and not str(exc):
        text = "no answer in time"
    return " ".join(text.split())


async def call_with_retry(
    what: str, policy: RetryPolicy, call: Callable[[], Awaitable[T]]
) -> T:
    """`await call()`, again after each transient failure (one warning line each) until
    it succeeds, fails otherwise, or the policy gives up (the last failure is raised)."""

    def warn(state: RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        logger.warning("%s failed (%s); retry %d in %.1f s", what,
                       describe(error) if error else "?", state.attempt_number, wait)

    interrupt = policy.interrupt

    class interrupted(stop_base):
        def __call__(self, retry_state: RetryCallState) -> bool:
            return interrupt is not None and interrupt.is_set()

    async def sleep(seconds: float) -> None:
        if interrupt is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(interrupt.wait(), seconds)

    retrying = AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential_jitter(
            multiplier=policy.initial_seconds, max=policy.max_seconds,
            jitter=policy.jitter_seconds,
        ),
        stop=stop_any(stop_never if policy.give_up_after is None else stop_after_delay(
            policy.give_up_after), interrupted()),
        before_sleep=warn,
        sleep=sleep,
        reraise=True,
    )
    result: T = await retrying(call)
    return result
