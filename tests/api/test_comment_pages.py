"""`Item.comments` over a list of items: right pages per item, read in one query."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event

from app.auth.models import Role

CREATE = "mutation($title: String!) { createItem(input: {title: $title}) { id } }"
COMMENT = "mutation($id: ID!, $body: String!) { addComment(itemId: $id, body: $body) { id } }"
LIST = """query { items { nodes { id
  comments(first: 2) { nodes { body } pageInfo { hasNextPage endCursor } } } } }"""
NEXT_PAGE = """query($id: ID!, $after: String) { item(id: $id) {
  comments(first: 2, after: $after) { nodes { body } pageInfo { hasNextPage } } } }"""


async def test_comment_pages_of_a_list_of_items_are_batched(
    live_server, http_client, make_token
) -> None:
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    counts = {"none": 0, "two": 2, "three": 3}
    ids = {}
    for title, count in counts.items():
        ids[title] = (await member.data(CREATE, title=title))["createItem"]["id"]
        for n in range(count):
            await member.data(COMMENT, id=ids[title], body=f"{title}-{n}")

    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    engine = server.services.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        nodes = (await member.data(LIST))["items"]["nodes"]
    finally:
        event.remove(engine, "before_cursor_execute", record)

    pages = {node["id"]: node["comments"] for node in nodes}
    assert [c["body"] for c in pages[ids["none"]]["nodes"]] == []
    assert [c["body"] for c in pages[ids["two"]]["nodes"]] == ["two-0", "two-1"]
    assert [c["body"] for c in pages[ids["three"]]["nodes"]] == ["three-0", "three-1"]
    assert pages[ids["two"]]["pageInfo"]["hasNextPage"] is False
    assert pages[ids["three"]]["pageInfo"]["hasNextPage"] is True
    comment_reads = [s for s in statements if "FROM comments" in s]
    assert len(comment_reads) == 1, comment_reads  # one query for all three items

    rest = (await member.data(NEXT_PAGE, id=ids["three"],
                              after=pages[ids["three"]]["pageInfo"]["endCursor"]))
    assert [c["body"] for c in rest["item"]["comments"]["nodes"]] == ["three-2"]
    assert rest["item"]["comments"]["pageInfo"]["hasNextPage"] is False
