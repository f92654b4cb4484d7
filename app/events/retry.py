"""Riding out a database blip inside a live stream (issue 11 item 2).

A stream's reads (the log after its last cursor, the entity of an event) that fail
because the database is unavailable (`StoreUnavailableError`) are tried again with
jittered exponential backoff for at most `seconds` (FLEET_STREAM_RETRY_SECONDS);
only then does the error reach the client, which sees `SERVICE_UNAVAILABLE` and the
end of the stream.  A read that succeeds on a later attempt continues from the same
cursor, so the client sees no gap and no duplicate.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from app.errors import StoreUnavailableError

logger = logging.getLogger(__name__)
T = TypeVar("T")

INITIAL_BACKOFF_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 2.0


async def with_retry(read: Callable[[], Awaitable[T]], seconds: float) -> T:
    """`await read()`, tried again on StoreUnavailableError with backoff (0.1 s doubling
    to 2 s, jittered) until `seconds` have passed since the first failure; then the
    last StoreUnavailableError is raised."""
    try:
        return await read()  # the usual case, without building a retry loop
    except StoreUnavailableError:
        logger.info("a stream read failed; retrying for up to %.1fs", seconds)
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(StoreUnavailableError),
        stop=stop_after_delay(seconds),
        wait=wait_exponential_jitter(multiplier=INITIAL_BACKOFF_SECONDS, max=MAX_BACKOFF_SECONDS,
                                     jitter=INITIAL_BACKOFF_SECONDS),
        before_sleep=before_sleep_log(logger, logging.INFO),
        reraise=True,
    )
    result: T = await retrying(read)
    return result
