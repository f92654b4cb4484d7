"""Keeping secrets out of logs and banners (issue 10 §4).

`mask_url` hides the password of one database URL; `redact` masks every
`scheme://user:password@` and every fleetbridge bearer secret in free text; the
`RedactSecrets` logging filter applies `redact` to each record (message, arguments
and traceback) on the handlers it is installed on (`install`).
"""

from __future__ import annotations

import logging
import re

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

MASK = "***"
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+(?=@)")
_BEARER = re.compile(r"\bfb_[A-Za-z0-9_-]{16,}")


def mask_url(url: str) -> str:
    """`postgresql+asyncpg://u:secret@db/x` → `postgresql+asyncpg://u:***@db/x`."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return redact(url)


def redact(text: str) -> str:
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK, text)
    return _BEARER.sub("fb_" + MASK, text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install(*loggers: str) -> None:
    """Put the filter on the handlers of the root logger and of `loggers`."""
    targets = [logging.getLogger()] + [logging.getLogger(name) for name in loggers]
    for logger in targets:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(RedactSecrets())
