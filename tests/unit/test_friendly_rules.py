"""Pure rules of the token lifecycle and of friendly configuration (issue 10 §2, §4)."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from pydantic import ValidationError

from app.auth.models import Role, Token
from app.auth.service import TokenState, parse_duration, token_state
from app.config import Settings
from app.config_errors import describe_allowed, env_name, explain
from app.db import utcnow
from app.errors import BadUserInputError
from app.redact import RedactSecrets, mask_url, redact


@pytest.mark.parametrize(("text", "seconds"), [
    ("30d", 30 * 86_400), ("12h", 43_200), ("45m", 2_700), ("90s", 90), ("2w", 1_209_600),
    (" 7D ", 7 * 86_400),
])
def test_durations(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "30", "d", "1.5h", "-1d", "0s", "3651d", "1y", "1d2h"])
def test_bad_durations_name_the_option(text):
    with pytest.raises(BadUserInputError) as error:
        parse_duration(text)
    assert error.value.field == "expires-in"


def test_token_state_revoked_wins_and_expiry_is_exclusive():
    now = utcnow()
    token = Token(product_id="p", role=Role.MEMBER, name="n", token_hash="h")
    assert token_state(token, now) is TokenState.ACTIVE
    token.expires_at = now + timedelta(seconds=1)
    assert token_state(token, now) is TokenState.ACTIVE
    token.expires_at = now
    assert token_state(token, now) is TokenState.EXPIRED
    token.revoked_at = now - timedelta(days=1)
    assert token_state(token, now) is TokenState.REVOKED


def test_allowed_values_in_words():
    fields = Settings.model_fields
    assert describe_allowed(fields["port"]) == "an integer from 1 to 65535"
    assert describe_allowed(fields["reaper_interval_seconds"]) == "a number greater than 0"
    assert describe_allowed(fields["aging_seconds"]) == "an integer at least 1"
    assert describe_allowed(fields["tracker_echo"]).startswith("true or false")
    assert describe_allowed(fields["log_level"]) == (
        "one of debug, info, warning, error (any case)")
    assert env_name("port", fields["port"]) == "FLEET_PORT"
    assert env_name("database_url", fields["database_url"]) == "DATABASE_URL"


def test_explain_names_each_variable(monkeypatch):
    monkeypatch.setenv("FLEET_PORT", "abc")
    monkeypatch.setenv("DATABASE_URL", "nonsense")
    with pytest.raises(ValidationError) as error:
        Settings(_env_file=None)
    lines = explain(error.value).splitlines()
    assert "FLEET_PORT='abc' is not valid: expected an integer from 1 to 65535" in lines
    assert any(line.startswith("DATABASE_URL='nonsense' is not valid: expected a URL such as")
               for line in lines)


@pytest.mark.parametrize(("given", "used"), [
    ("postgresql://u:p@h:5432/db", "postgresql+asyncpg://u:p@h:5432/db"),
    ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
    ("sqlite:///./x.db", "sqlite+aiosqlite:///./x.db"),
    ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
])
def test_database_urls_get_the_async_driver(given, used):
    assert Settings(database_url=given, _env_file=None).database_url == used


def test_log_level_takes_any_case():
    assert Settings(log_level="WARNING", _env_file=None).log_level == "warning"


def test_secrets_are_masked():
    assert mask_url("postgresql+asyncpg://fleet:hunter2@db:5432/x") == (
        "postgresql+asyncpg://fleet:***@db:5432/x")
    assert mask_url("sqlite+aiosqlite:///./fleetbridge.db") == (
        "sqlite+aiosqlite:///./fleetbridge.db")
    text = ("connect to postgresql://a:p%40ss@h/db failed; redis://:pw@cache:6379 too; "
            "token fb_AbCdEfGhIjKlMnOpQrStUv")
    assert redact(text) == ("connect to postgresql://a:***@h/db failed; redis://:***@cache:6379 "
                            "too; token fb_***")


def test_the_log_filter_masks_messages_arguments_and_tracebacks():
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "url %s", ("pg://u:pw@h/d",),
                               None)
    assert RedactSecrets().filter(record)
    assert record.getMessage() == "url pg://u:***@h/d"
    try:
        raise RuntimeError("cannot reach pg://u:pw@h/d")
    except RuntimeError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    RedactSecrets().filter(record)
    assert record.exc_text is not None
    assert "pw@" not in record.exc_text
    assert "pg://u:***@h/d" in record.exc_text
