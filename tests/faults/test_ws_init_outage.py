"""A store outage while a websocket authenticates (issue 12 fan-out runs at S=10,000:
the token read waited out the pool and the error escaped `on_ws_connect`, so uvicorn
logged "Exception in ASGI application" and dropped the connection).  Now the socket is
closed with 1013 "try again later" and the reason, on both protocols, and the next
connection once the store answers again is served."""

from __future__ import annotations

from typing import Any

import pytest

from app.auth.models import Role
from app.errors import StoreUnavailableError
from app.graphql.view import STORE_UNAVAILABLE_CLOSE
from app.uow import UNAVAILABLE_MESSAGE
from tests.api.ws_client import LEGACY_WS, TRANSPORT_WS, InitRefusedError, ws_connect

# Transport-level behaviour with a fault injected at the token check: one store is enough.
pytestmark = pytest.mark.parametrize("store", ["sqlite"], indirect=True)


@pytest.mark.parametrize("protocol", [TRANSPORT_WS, LEGACY_WS])
async def test_store_outage_at_connection_init_closes_with_try_again_later(
    live_server: Any, make_token: Any, protocol: str, caplog: pytest.LogCaptureFixture,
) -> None:
    server = await live_server()
    token = await make_token("acme", Role.MEMBER)
    tokens = server.services.tokens
    real_authenticate = tokens.authenticate

    async def unavailable(secret: str | None) -> Any:
        raise StoreUnavailableError(UNAVAILABLE_MESSAGE)

    tokens.authenticate = unavailable  # the fault seam: the token read fails
    try:
        with pytest.raises(InitRefusedError) as refused:
            async with ws_connect(server.ws_url, protocol, token):
                pass
    finally:
        tokens.authenticate = real_authenticate
    assert refused.value.code == STORE_UNAVAILABLE_CLOSE, refused.value
    assert "unavailable" in refused.value.reason
    if protocol == LEGACY_WS:  # the legacy protocol says why in a connection_error first
        assert refused.value.message is not None
        assert refused.value.message["payload"]["extensions"]["code"] == "SERVICE_UNAVAILABLE"
    assert "Exception in ASGI application" not in caplog.text

    async with ws_connect(server.ws_url, protocol, token):  # served again once it answers
        pass
