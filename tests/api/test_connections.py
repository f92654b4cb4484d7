"""Connections follow Relay's cursor connections spec over real HTTP (both stores):
`edges { cursor node }` beside `nodes`, and `pageInfo { startCursor endCursor
hasNextPage hasPreviousPage }`, so Relay's @connection and Apollo's
relayStylePagination page correctly (DESIGN §6, issue 10 item 5)."""

from __future__ import annotations

from typing import Any

from app.auth.models import Role

PAGES = {
    field: f"""
    query($first: Int, $after: String) {{
      {field}(first: $first, after: $after) {{
        nodes {{ id }} edges {{ cursor node {{ id title }} }}
        pageInfo {{ startCursor endCursor hasNextPage hasPreviousPage }}
      }}
    }}
    """
    for field in ("items", "jobs")
}
COMMENTS = """
query($id: ID!, $first: Int, $after: String) {
  item(id: $id) {
    comments(first: $first, after: $after) {
      nodes { id } edges { cursor node { id body } }
      pageInfo { startCursor endCursor hasNextPage hasPreviousPage }
    }
  }
}
"""
CREATE_ITEM = "mutation($title: String!) { createItem(input: {title: $title}) { id } }"
SUBMIT = "mutation($t: String!) { submitJob(input: {title: $t, bodyMd: $t}) { job { id } } }"
COMMENT = "mutation($id: ID!, $b: String!) { addComment(itemId: $id, body: $b) { id } }"


def assert_relay_page(connection: dict[str, Any], *, after: str | None) -> None:
    """The spec's rules for one page read forward with `first`/`after`."""
    edges, info = connection["edges"], connection["pageInfo"]
    assert [edge["node"]["id"] for edge in edges] == [node["id"] for node in connection["nodes"]]
    cursors = [edge["cursor"] for edge in edges]
    assert all(isinstance(cursor, str) and cursor for cursor in cursors)
    assert len(set(cursors)) == len(cursors)
    assert info["startCursor"] == (cursors[0] if cursors else None)
    assert info["endCursor"] == (cursors[-1] if cursors else None)
    assert isinstance(info["hasNextPage"], bool)
    # Forward paging: true only when a page was read after a cursor.
    assert info["hasPreviousPage"] is (after is not None)


async def test_items_and_jobs_page_as_relay_connections(live_server, http_client, make_token):
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    for n in range(5):
        await member.data(CREATE_ITEM, title=f"item {n}")
        await member.data(SUBMIT, t=f"job {n}")

    for field in ("items", "jobs"):
        seen: list[str] = []
        after = None
        pages = 0
        while True:
            page = (await member.data(PAGES[field], first=2, after=after))[field]
            pages += 1
            assert_relay_page(page, after=after)
            seen += [edge["node"]["id"] for edge in page["edges"]]
            if not page["pageInfo"]["hasNextPage"]:
                break
            after = page["pageInfo"]["endCursor"]
        assert pages == 3
        assert len(seen) == len(set(seen)) == 5
        assert seen == sorted(seen, key=int)  # oldest first

        # Any edge's cursor resumes right after that edge (what Relay's and Apollo's
        # caches rely on), not only endCursor.
        everything = (await member.data(PAGES[field], first=5))[field]
        assert_relay_page(everything, after=None)
        assert everything["pageInfo"]["hasNextPage"] is False
        middle = everything["edges"][1]["cursor"]
        rest = (await member.data(PAGES[field], first=50, after=middle))[field]
        assert_relay_page(rest, after=middle)
        assert [edge["node"]["id"] for edge in rest["edges"]] == seen[2:]

        # Past the end: an empty page has null cursors.
        end = everything["pageInfo"]["endCursor"]
        empty = await member.data(PAGES[field], first=2, after=end)
        assert_relay_page(empty[field], after=end)
        assert empty[field]["edges"] == []
        assert empty[field]["pageInfo"]["startCursor"] is None


async def test_comments_page_as_a_relay_connection(live_server, http_client, make_token):
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    item_id = (await member.data(CREATE_ITEM, title="with comments"))["createItem"]["id"]
    bodies = [f"comment {n}" for n in range(3)]
    for body in bodies:
        await member.data(COMMENT, id=item_id, b=body)

    first = (await member.data(COMMENTS, id=item_id, first=2))["item"]["comments"]
    assert_relay_page(first, after=None)
    assert first["pageInfo"]["hasNextPage"] is True
    after = first["pageInfo"]["endCursor"]
    rest = (await member.data(COMMENTS, id=item_id, first=2, after=after))["item"]["comments"]
    assert_relay_page(rest, after=after)
    assert rest["pageInfo"]["hasNextPage"] is False
    assert [edge["node"]["body"] for edge in first["edges"] + rest["edges"]] == bodies
