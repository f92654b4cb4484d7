"""`Item.jobs` is a connection like every list (DESIGN §6): oldest first, `first` /
`after`, pages of a list of items read in one query, bounded like every page."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event

from app.auth.models import Role
from app.limits import PAGE_SIZE_MAX
from tests.conftest import error_codes

CREATE = "mutation($title: String!) { createItem(input: {title: $title}) { id } }"
SUBMIT = """mutation($title: String!, $item: ID!) {
  submitJob(input: {title: $title, bodyMd: "x", trackerItemId: $item}) { job { id } } }"""
LIST = """query { items { nodes { id
  jobs(first: 2) { nodes { title } pageInfo { hasNextPage endCursor } } } } }"""
NEXT_PAGE = """query($id: ID!, $first: Int, $after: String) { item(id: $id) {
  jobs(first: $first, after: $after) { nodes { title } pageInfo { hasNextPage } } } }"""


async def test_item_jobs_pages_oldest_first_and_batched(live_server, http_client, make_token):
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    counts = {"none": 0, "two": 2, "three": 3}
    ids = {}
    for title, count in counts.items():
        ids[title] = (await member.data(CREATE, title=title))["createItem"]["id"]
        for n in range(count):
            await member.data(SUBMIT, title=f"{title}-{n}", item=ids[title])

    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    engine = server.services.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        nodes = (await member.data(LIST))["items"]["nodes"]
    finally:
        event.remove(engine, "before_cursor_execute", record)

    pages = {node["id"]: node["jobs"] for node in nodes}
    assert [j["title"] for j in pages[ids["none"]]["nodes"]] == []
    assert [j["title"] for j in pages[ids["two"]]["nodes"]] == ["two-0", "two-1"]
    assert [j["title"] for j in pages[ids["three"]]["nodes"]] == ["three-0", "three-1"]
    assert pages[ids["two"]]["pageInfo"]["hasNextPage"] is False
    assert pages[ids["three"]]["pageInfo"]["hasNextPage"] is True
    job_reads = [s for s in statements if "FROM jobs" in s]
    assert len(job_reads) == 1, job_reads  # one query for all three items

    rest = await member.data(NEXT_PAGE, id=ids["three"], first=2,
                             after=pages[ids["three"]]["pageInfo"]["endCursor"])
    assert [j["title"] for j in rest["item"]["jobs"]["nodes"]] == ["three-2"]
    assert rest["item"]["jobs"]["pageInfo"]["hasNextPage"] is False
    # the default page holds them all, oldest first
    full = await member.data(NEXT_PAGE, id=ids["three"])
    assert [j["title"] for j in full["item"]["jobs"]["nodes"]] == ["three-0", "three-1", "three-2"]

    # bounded like every page; a forged cursor fails that field alone
    for variables, field in (({"first": PAGE_SIZE_MAX + 1}, "first"), ({"first": 0}, "first"),
                             ({"after": "bm9wZTox"}, "after")):
        body = await member.execute(NEXT_PAGE, id=ids["three"], **variables)
        assert error_codes(body) == ["BAD_USER_INPUT"], body
        assert body["errors"][0]["extensions"]["field"] == field
