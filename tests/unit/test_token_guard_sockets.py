"""TokenGuard's bookkeeping of open websockets: forgetting one connection is O(1)
(10,000 closing connections used to scan each other: issue 12 fan-out)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from app.auth.guard import TokenGuard


class Socket:  # what TokenGuard keeps of a websocket: itself and its scope
    def __init__(self) -> None:
        self.scope: dict[str, Any] = {"type": "websocket"}


def token(token_id: int) -> Any:
    return SimpleNamespace(token_id=token_id)


def test_a_connection_is_forgotten_under_every_token_it_was_tracked_with() -> None:
    guard = TokenGuard(db=None)  # type: ignore[arg-type]
    a, b, c = Socket(), Socket(), Socket()
    guard.track(a, token(1))  # type: ignore[arg-type]
    guard.track(b, token(1))  # type: ignore[arg-type]
    guard.track(b, token(2))  # type: ignore[arg-type]  # a second init, another token
    guard.track(c, token(2))  # type: ignore[arg-type]
    assert (guard.open_sockets(1), guard.open_sockets(2)) == (2, 2)
    guard.forget(b.scope)
    assert (guard.open_sockets(1), guard.open_sockets(2)) == (1, 1)
    guard.forget(b.scope)  # twice: nothing more
    guard.forget({"type": "websocket"})  # never tracked (refused at connection_init)
    guard.forget(a.scope)
    guard.forget(c.scope)
    assert (guard.open_sockets(1), guard.open_sockets(2)) == (0, 0)
    assert not guard._sockets
    assert not guard._tokens_of
