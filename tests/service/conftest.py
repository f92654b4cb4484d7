"""Fixtures shared by the service tests of the lease holder's path (test_cycle,
test_lone, test_lone_faults, test_change_groups); a module that needs other tokens
or settings defines its own `runtime`."""

from __future__ import annotations

from typing import Any

import pytest

from app.auth.models import Role
from app.main import Runtime


@pytest.fixture
async def runtime(make_runtime: Any, make_token: Any) -> Runtime:
    """A runtime on the test's store, with worker tokens for products `acme` and
    `globex`."""
    await make_token("acme", Role.WORKER)
    await make_token("globex", Role.WORKER)
    result: Runtime = await make_runtime()
    return result
