"""The websocket options of app.server: permessage-deflate is off unless asked for
(FLEET_WS_PER_MESSAGE_DEFLATE), both stores serve the same way."""

from __future__ import annotations

import pytest

from app.auth.models import Role
from tests.api.ws_client import TRANSPORT_WS, ws_connect


@pytest.mark.parametrize("deflate", [False, True])
async def test_permessage_deflate_is_negotiated_only_when_switched_on(
    live_server, make_token, deflate
):
    server = await live_server(ws_per_message_deflate=deflate)
    token = await make_token("acme", Role.MEMBER)
    # the client offers permessage-deflate (the websockets library does by default)
    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as client:
        names = [extension.name for extension in client.connection.protocol.extensions]
    assert names == (["permessage-deflate"] if deflate else [])
