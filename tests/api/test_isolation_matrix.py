"""Product isolation, enumerated from the schema (DESIGN §6, issue 11), both stores.

Every root field of Query, Mutation and Subscription has a case here in which a
rival product's tokens aim it at the victim product's ids.  Each answer must be
`null`, an empty list, `NOT_FOUND`, or the rival's own data — never a victim's row,
never `FORBIDDEN` (which would say the id exists) — and the victim's state must not
change.  A root field without a case fails `test_every_root_field_has_a_case`, so a
new field cannot ship without saying how it keeps products apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from app.auth.models import Role
from app.graphql.schema import schema
from tests.api.ws_client import ITEM_EVENTS, JOB_EVENTS, TRANSPORT_WS, ws_connect

SECRET = "SECRET-acme"
VICTIM_STATE = """{
  items(first: 200) { nodes { id title description status labels updatedAt
    comments(first: 20) { nodes { id body } } jobs(first: 20) { nodes { id } } } }
  jobs(first: 200) { nodes { id title stage attempts fence: lease { fence } updatedAt
    failureReason lastEchoedStatus } }
  viewer { eventCursor }
}"""


@dataclass(frozen=True)
class Case:
    """`query` run by the rival's `role` with victim ids ("$item", "$claimed_job"…);
    `expect`: "null" (data at `field` is null), "not_found", "empty" (no nodes), or
    "own" (allowed, it acts on the rival's product; nothing of the victim's shows)."""

    query: str
    variables: dict[str, Any]
    expect: str
    role: Role = Role.MEMBER


QUERY_CASES = {
    "viewer": Case("{ viewer { productId role eventCursor } }", {}, "own"),
    "item": Case("query($id: ID!) { item(id: $id) { id title } }", {"id": "$item"}, "null"),
    "items": Case("{ items(first: 200) { nodes { id title description } } }", {}, "own"),
    "job": Case("query($id: ID!) { job(id: $id) { id title } }", {"id": "$queued_job"}, "null"),
    "jobs": Case("""query($item: ID) { jobs(trackerItemId: $item, first: 200) {
        nodes { id title } } }""", {"item": "$item"}, "empty"),
}
MUTATION_CASES = {
    "createItem": Case('mutation { createItem(input: {title: "mine"}) { id title } }', {},
                       "own"),
    "updateItem": Case("""mutation($id: ID!) { updateItem(id: $id, input: {title: "pwned",
        status: DONE}) { id } }""", {"id": "$item"}, "not_found"),
    "addComment": Case("""mutation($id: ID!) { addComment(itemId: $id, body: "pwned") {
        id } }""", {"id": "$item"}, "not_found"),
    "submitJob": Case("""mutation($item: ID!) { submitJob(input: {title: "t", bodyMd: "b",
        trackerItemId: $item}) { job { id } } }""", {"item": "$item"}, "not_found"),
    "ingestItemAsJob": Case("""mutation($id: ID!) { ingestItemAsJob(itemId: $id) {
        job { id } } }""", {"id": "$fresh_item"}, "not_found"),
    "echoJobToItem": Case("""mutation($id: ID!) { echoJobToItem(jobId: $id) {
        echoed error item { id title } } }""", {"id": "$claimed_job"}, "not_found"),
    "claimNextJob": Case("""mutation { claimNextJob(worker: {workerId: "rival-w"}) {
        job { id title } lease { fence } } }""", {}, "own", Role.WORKER),
    "heartbeat": Case("""mutation($id: ID!, $fence: Int!) { heartbeat(jobId: $id,
        fence: $fence) { fence } }""", {"id": "$claimed_job", "fence": "$fence"},
                      "not_found", Role.WORKER),
    "transitionJob": Case("""mutation($id: ID!, $fence: Int!) { transitionJob(jobId: $id,
        fence: $fence, to: FAILED, reason: "pwned") { id } }""",
                          {"id": "$claimed_job", "fence": "$fence"}, "not_found", Role.WORKER),
    "releaseJob": Case("""mutation($id: ID!, $fence: Int!) { releaseJob(jobId: $id,
        fence: $fence) { id } }""", {"id": "$claimed_job", "fence": "$fence"}, "not_found",
                       Role.WORKER),
    "cancelJob": Case("""mutation($id: ID!) { cancelJob(jobId: $id, reason: "pwned") {
        id } }""", {"id": "$queued_job"}, "not_found"),
    "retryJob": Case("mutation($id: ID!) { retryJob(jobId: $id) { id } }",
                     {"id": "$cancelled_job"}, "not_found"),
}
# Subscriptions are checked over a websocket (below); these name their cases.
SUBSCRIPTION_CASES = {"jobStageChanged": "jobId", "itemStatusChanged": "itemId"}


def _root_fields() -> dict[str, set[str]]:
    graphql = schema._schema
    roots = {"query": graphql.query_type, "mutation": graphql.mutation_type,
             "subscription": graphql.subscription_type}
    return {kind: set(root.fields) if root is not None else set() for kind, root in roots.items()}


def test_every_root_field_has_a_case():
    fields = _root_fields()
    assert fields["query"] == set(QUERY_CASES), "a query field without an isolation case"
    assert fields["mutation"] <= set(MUTATION_CASES), (
        f"mutation fields without an isolation case: {fields['mutation'] - set(MUTATION_CASES)}")
    # a case may wait for a field that is still being built (releaseJob)
    assert set(MUTATION_CASES) - fields["mutation"] <= {"releaseJob"}
    assert fields["subscription"] == set(SUBSCRIPTION_CASES)


class Victim:
    """The product `acme`, with something of every kind a rival could aim at."""

    def __init__(self, member: Any, worker: Any) -> None:
        self.member, self.worker = member, worker
        self.ids: dict[str, Any] = {}

    async def build(self) -> Victim:
        member = self.member

        async def item(title: str) -> str:
            data = await member.data("""mutation($t: String!) { createItem(input: {title: $t,
                description: "SECRET-acme description", labels: ["SECRET-acme"]}) { id } }""",
                                     t=title)
            return str(data["createItem"]["id"])

        item_id = await item(f"{SECRET} item")
        await member.data('mutation($id: ID!) { addComment(itemId: $id, body: "SECRET-acme") '
                          "{ id } }", id=item_id)
        claimed = (await member.data("mutation($id: ID!) { ingestItemAsJob(itemId: $id) "
                                     "{ job { id } } }", id=item_id))
        claim = (await self.worker.data('mutation { claimNextJob(worker: {workerId: "w"}) '
                                        "{ job { id } lease { fence } } }"))["claimNextJob"]
        assert claim["job"]["id"] == claimed["ingestItemAsJob"]["job"]["id"]

        async def job(title: str) -> str:
            data = await member.data("""mutation($t: String!) { submitJob(input: {title: $t,
                bodyMd: "SECRET-acme body"}) { job { id } } }""", t=title)
            return str(data["submitJob"]["job"]["id"])

        cancelled = await job(f"{SECRET} cancelled")
        await member.data('mutation($id: ID!) { cancelJob(jobId: $id) { id } }', id=cancelled)
        self.ids = {
            "item": item_id, "fresh_item": await item(f"{SECRET} fresh"),
            "claimed_job": claim["job"]["id"], "fence": claim["lease"]["fence"],
            "queued_job": await job(f"{SECRET} queued"), "cancelled_job": cancelled,
        }
        return self

    def resolve(self, variables: dict[str, Any]) -> dict[str, Any]:
        return {key: self.ids[value[1:]] if isinstance(value, str) and value.startswith("$")
                else value for key, value in variables.items()}

    async def state(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.member.data(VICTIM_STATE)
        return data


@pytest.fixture
async def world(live_server, http_client, make_token) -> dict[str, Any]:
    server = await live_server()
    victim = await Victim(http_client(server, await make_token("acme", Role.MEMBER)),
                          http_client(server, await make_token("acme", Role.WORKER))).build()
    rival = {role: http_client(server, await make_token("rival", role))
             for role in (Role.MEMBER, Role.WORKER)}
    # the rival has data of its own, so "own" answers are not trivially empty
    await rival[Role.MEMBER].data('mutation { submitJob(input: {title: "rival job", '
                                  'bodyMd: "b"}) { job { id } } }')
    return {"server": server, "victim": victim, "rival": rival}


def _check(name: str, case: Case, body: dict[str, Any]) -> str | None:
    """None when the answer keeps the products apart; else what is wrong."""
    errors = body.get("errors") or []
    codes = [e.get("extensions", {}).get("code") for e in errors]
    data = body.get("data") or {}
    if SECRET in str(body):
        return "leaked the victim's data"
    if "FORBIDDEN" in codes:
        return "FORBIDDEN says the id exists"
    if case.expect == "not_found":
        return None if codes == ["NOT_FOUND"] and not data else f"expected NOT_FOUND: {body}"
    if codes:
        return f"unexpected errors {codes}"
    if case.expect == "null":
        return None if data.get(name) is None else f"expected null: {body}"
    if case.expect == "empty":
        return None if data[name]["nodes"] == [] else f"expected no nodes: {body}"
    return None  # "own": allowed, and nothing of the victim's showed


async def test_another_products_ids_are_not_found_and_nothing_leaks(world):
    victim: Victim = world["victim"]
    before = await victim.state()
    failures = []
    for name, case in {**QUERY_CASES, **MUTATION_CASES}.items():
        if name not in _root_fields()["query"] | _root_fields()["mutation"]:
            continue
        client = world["rival"][case.role]
        body = await client.execute(case.query, **victim.resolve(case.variables))
        problem = _check(name, case, body)
        if problem is not None:
            failures.append(f"{name}: {problem}")
    assert not failures, "\n".join(failures)
    assert await victim.state() == before
    # the victim's own view is intact: its claimed job is still the worker's
    job = await victim.worker.data("query($id: ID!) { job(id: $id) { stage lease { fence } } }",
                                   id=victim.ids["claimed_job"])
    assert job["job"]["lease"]["fence"] == victim.ids["fence"]


async def test_subscriptions_to_another_products_ids_see_nothing(world, make_token):
    victim: Victim = world["victim"]
    server = world["server"]
    cursor = (await victim.member.data("{ viewer { eventCursor } }"))["viewer"]["eventCursor"]
    rival_token = await make_token("rival", Role.MEMBER)
    async with ws_connect(server.ws_url, TRANSPORT_WS, rival_token) as rival:
        aimed = {
            "jobStageChanged": await rival.subscribe(JOB_EVENTS,
                                                     jobId=victim.ids["claimed_job"]),
            "itemStatusChanged": await rival.subscribe(ITEM_EVENTS, itemId=victim.ids["item"]),
        }
        # From the rival's own cursor, not "from now": a subscribe is not acknowledged,
        # so under load it could start after the rival's change below and miss it.
        rival_cursor = (await world["rival"][Role.MEMBER].data(
            "{ viewer { eventCursor } }"))["viewer"]["eventCursor"]
        everything = await rival.subscribe(ITEM_EVENTS, after=rival_cursor)
        replayed = await rival.subscribe(JOB_EVENTS, after=cursor)  # a victim's cursor
        assert set(aimed) == set(SUBSCRIPTION_CASES)
        # the victim changes what the rival aimed at…
        await victim.worker.data("""mutation($id: ID!, $fence: Int!) { transitionJob(jobId: $id,
            fence: $fence, to: BUILDING) { stage } }""", id=victim.ids["claimed_job"],
                                 fence=victim.ids["fence"])
        await victim.member.data('mutation($id: ID!) { updateItem(id: $id, input: {status: '
                                 "DONE}) { id } }", id=victim.ids["item"])
        # …then the rival changes something of its own, which it does see
        mine = (await world["rival"][Role.MEMBER].data(
            'mutation { createItem(input: {title: "rival item"}) { id } }'))["createItem"]["id"]
        event = await rival.next_event(everything, "itemStatusChanged")
        assert event["itemId"] == mine
        assert event["item"]["title"] == "rival item"
        # the aimed subscriptions got nothing, and a victim's cursor replays nothing of
        # the victim's (every message that arrived so far has been read and sorted)
        for name, operation in aimed.items():
            assert not rival._pending[operation], (name, rival._pending[operation])
        assert SECRET not in str(rival._pending[replayed])
