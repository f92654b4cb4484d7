"""Bad input over real HTTP (DESIGN §8), on both stores: every bounded argument is a
BAD_USER_INPUT naming the field; unknown ids are NOT_FOUND (mutations) or null
(reads); wrong types, parser limits and unexpected errors are answered with a code,
never a 500 or a stack trace; and no refused request writes anything."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import pytest

from app import limits
from app.auth.models import Role
from app.graphql.schema import MAX_ALIASES, MAX_DEPTH, MAX_TOKENS
from app.pagination import encode_cursor
from tests.conftest import error_codes

LONG_TITLE = "t" * (limits.TITLE_MAX + 1)
LONG_NAME = "n" * (limits.NAME_MAX + 1)
TOO_MANY_NAMES = [f"name-{n}" for n in range(limits.NAMES_MAX + 1)]
LONG_REASON = "r" * (limits.REASON_MAX + 1)
LONG_DESCRIPTION = "d" * (limits.DESCRIPTION_MAX + 1)
LONG_LABEL = "l" * (limits.LABEL_MAX + 1)
LONG_KEY = "k" * (limits.IDEMPOTENCY_KEY_MAX + 1)
TOO_MANY_LABELS = [f"l{n}" for n in range(limits.LABELS_MAX + 1)]

# Everything a refused request could have touched, including the event log's head.
STATE = """{
  viewer { eventCursor }
  items(first: 200) { nodes { id title description labels status updatedAt
    comments(first: 200) { nodes { id body } } } }
  jobs(first: 200) { nodes { id title stage attempts updatedAt failureReason
    lease { workerId fence expiresAt } metrics { costUsd tokensIn tokensOut } } }
}"""

CREATE_ITEM = "mutation($input: CreateItemInput!) { createItem(input: $input) { id } }"
UPDATE_ITEM = """mutation($id: ID!, $input: UpdateItemInput!) {
  updateItem(id: $id, input: $input) { id } }"""
ADD_COMMENT = "mutation($id: ID!, $body: String!) { addComment(itemId: $id, body: $body) { id } }"
SUBMIT = "mutation($input: SubmitJobInput!) { submitJob(input: $input) { outcome job { id } } }"
INGEST = """mutation($id: ID!, $options: IngestOptions) {
  ingestItemAsJob(itemId: $id, options: $options) { outcome job { id } } }"""
ECHO = "mutation($id: ID!) { echoJobToItem(jobId: $id) { echoed error } }"
CLAIM = """mutation($worker: WorkerInput!) { claimNextJob(worker: $worker) {
  job { id } lease { fence } } }"""
HEARTBEAT = """mutation($id: ID!, $fence: Int!, $leaseSeconds: Int) {
  heartbeat(jobId: $id, fence: $fence, leaseSeconds: $leaseSeconds) { fence expiresAt } }"""
TRANSITION = """mutation($id: ID!, $fence: Int!, $to: JobStage!, $metrics: JobMetricsInput,
  $reason: String) {
  transitionJob(jobId: $id, fence: $fence, to: $to, metrics: $metrics, reason: $reason) {
    stage } }"""
CANCEL = "mutation($id: ID!, $reason: String) { cancelJob(jobId: $id, reason: $reason) { stage } }"
RETRY = "mutation($id: ID!) { retryJob(jobId: $id) { stage } }"
ITEMS = """query($first: Int, $after: String, $label: String) {
  items(first: $first, after: $after, label: $label) { nodes { id } } }"""
JOBS = "query($first: Int, $after: String) { jobs(first: $first, after: $after) { nodes { id } } }"
COMMENTS = """query($id: ID!, $first: Int, $after: String) {
  item(id: $id) { comments(first: $first, after: $after) { nodes { id } } } }"""


@dataclass(frozen=True)
class Case:
    """One bad request: `variables` may name scene ids as "$item", "$claimed_job"…"""

    operation: str
    variables: dict[str, Any]
    field: str
    message: str | None = None  # a fragment the error message must hold


def _role_for(operation: str) -> str:
    """Fleet work is the worker's; everything else here is the member's."""
    return "worker" if operation in (CLAIM, HEARTBEAT, TRANSITION) else "member"


def _item_input(**overrides: Any) -> dict[str, Any]:
    return {"input": {"title": "ok", **overrides}}


def _update(**changes: Any) -> dict[str, Any]:
    return {"id": "$item", "input": changes}


def _job_input(**overrides: Any) -> dict[str, Any]:
    return {"input": {"title": "ok", "bodyMd": "ok", **overrides}}


def _worker(**overrides: Any) -> dict[str, Any]:
    return {"worker": {"workerId": "w-bad", **overrides}}


def _options(**options: Any) -> dict[str, Any]:
    return {"id": "$fresh_item", "options": options}  # an item without a job yet


def _lease(seconds: int) -> dict[str, Any]:
    return {"id": "$claimed_job", "fence": "$fence", "leaseSeconds": seconds}


def _transition(**overrides: Any) -> dict[str, Any]:
    return {"id": "$claimed_job", "fence": "$fence", "to": "BUILDING", **overrides}


CASES: dict[str, list[Case]] = {
    "createItem": [
        Case(CREATE_ITEM, _item_input(title=""), "input.title"),
        Case(CREATE_ITEM, _item_input(title="   "), "input.title"),
        Case(CREATE_ITEM, _item_input(title=LONG_TITLE), "input.title"),
        Case(CREATE_ITEM, _item_input(title="nul\x00byte"), "input.title"),
        Case(CREATE_ITEM, _item_input(description=LONG_DESCRIPTION), "input.description"),
        Case(CREATE_ITEM, _item_input(labels=TOO_MANY_LABELS), "input.labels"),
        Case(CREATE_ITEM, _item_input(labels=["ok", LONG_LABEL]), "input.labels"),
        Case(CREATE_ITEM, _item_input(labels=[""]), "input.labels"),
    ],
    "updateItem": [
        Case(UPDATE_ITEM, _update(title=""), "input.title"),
        Case(UPDATE_ITEM, _update(title=LONG_TITLE), "input.title"),
        Case(UPDATE_ITEM, _update(description=LONG_DESCRIPTION), "input.description"),
        Case(UPDATE_ITEM, _update(labels=TOO_MANY_LABELS), "input.labels"),
        Case(UPDATE_ITEM, _update(labels=[LONG_LABEL]), "input.labels"),
        # a valid change next to a bad one is not half-applied
        Case(UPDATE_ITEM, _update(status="DONE", title=""), "input.title"),
    ],
    "addComment": [
        Case(ADD_COMMENT, {"id": "$item", "body": ""}, "body"),
        Case(ADD_COMMENT, {"id": "$item", "body": " \n "}, "body"),
        Case(ADD_COMMENT, {"id": "$item", "body": "b" * (limits.COMMENT_MAX + 1)}, "body"),
    ],
    "submitJob": [
        Case(SUBMIT, _job_input(title=""), "input.title"),
        Case(SUBMIT, _job_input(title=LONG_TITLE), "input.title"),
        Case(SUBMIT, _job_input(bodyMd=""), "input.bodyMd"),
        Case(SUBMIT, _job_input(bodyMd="b" * (limits.BODY_MD_MAX + 1)), "input.bodyMd"),
        Case(SUBMIT, _job_input(kind=""), "input.kind"),
        Case(SUBMIT, _job_input(kind="k" * (limits.KIND_MAX + 1)), "input.kind"),
        Case(SUBMIT, _job_input(capabilities=TOO_MANY_NAMES), "input.capabilities"),
        Case(SUBMIT, _job_input(capabilities=["os:mac", LONG_NAME]), "input.capabilities"),
        Case(SUBMIT, _job_input(engineClass=LONG_NAME), "input.engineClass"),
        Case(SUBMIT, _job_input(engineClass=""), "input.engineClass"),
        Case(SUBMIT, _job_input(profile=LONG_NAME), "input.profile"),
        Case(SUBMIT, _job_input(budget=-0.01), "input.budget"),
        Case(SUBMIT, _job_input(budget=limits.BUDGET_MAX * 2), "input.budget"),
        Case(SUBMIT, _job_input(maxAttempts=0), "input.maxAttempts"),
        Case(SUBMIT, _job_input(maxAttempts=limits.MAX_ATTEMPTS_MAX + 1), "input.maxAttempts"),
        Case(SUBMIT, _job_input(idempotencyKey=LONG_KEY), "input.idempotencyKey"),
    ],
    "ingestItemAsJob": [
        Case(INGEST, _options(capabilities=TOO_MANY_NAMES), "options.capabilities"),
        Case(INGEST, _options(capabilities=[LONG_NAME]), "options.capabilities"),
        Case(INGEST, _options(engineClass=LONG_NAME), "options.engineClass"),
        Case(INGEST, _options(profile=LONG_NAME), "options.profile"),
        Case(INGEST, _options(kind="k" * (limits.KIND_MAX + 1)), "options.kind"),
        Case(INGEST, _options(maxAttempts=0), "options.maxAttempts"),
        Case(INGEST, _options(maxAttempts=21), "options.maxAttempts"),
        Case(INGEST, _options(budget=-1.0), "options.budget"),
        # an unknown priority label names the label (DESIGN §4)
        Case(INGEST, {"id": "$bad_priority_item"}, "labels", message="priority:someday"),
    ],
    "claimNextJob": [
        Case(CLAIM, _worker(workerId=""), "worker.workerId"),
        Case(CLAIM, _worker(workerId="w" * (limits.WORKER_ID_MAX + 1)), "worker.workerId"),
        Case(CLAIM, _worker(capabilities=TOO_MANY_NAMES), "worker.capabilities"),
        Case(CLAIM, _worker(capabilities=[LONG_NAME]), "worker.capabilities"),
        Case(CLAIM, _worker(engineClasses=[""]), "worker.engineClasses"),
        Case(CLAIM, _worker(profiles=[LONG_NAME]), "worker.profiles"),
        Case(CLAIM, _worker(leaseSeconds=limits.LEASE_SECONDS_MIN - 1), "worker.leaseSeconds"),
        Case(CLAIM, _worker(leaseSeconds=-1), "worker.leaseSeconds"),
        Case(CLAIM, _worker(leaseSeconds=limits.LEASE_SECONDS_MAX + 1), "worker.leaseSeconds"),
    ],
    "heartbeat": [
        Case(HEARTBEAT, _lease(limits.LEASE_SECONDS_MIN - 1), "leaseSeconds"),
        Case(HEARTBEAT, _lease(limits.LEASE_SECONDS_MAX + 1), "leaseSeconds"),
    ],
    "transitionJob": [
        Case(TRANSITION, _transition(metrics={"costUsd": -0.5}), "metrics.costUsd"),
        Case(TRANSITION, _transition(metrics={"costUsd": limits.COST_MAX * 2}),
             "metrics.costUsd"),
        Case(TRANSITION, _transition(metrics={"tokensIn": -1}), "metrics.tokensIn"),
        Case(TRANSITION, _transition(metrics={"tokensOut": -1}), "metrics.tokensOut"),
        Case(TRANSITION, _transition(reason=LONG_REASON), "reason"),
        Case(TRANSITION, _transition(to="FAILED", reason=""), "reason"),
    ],
    "cancelJob": [
        Case(CANCEL, {"id": "$queued_job", "reason": LONG_REASON}, "reason"),
    ],
    "queries": [
        Case(ITEMS, {"first": 0}, "first"),
        Case(ITEMS, {"first": limits.PAGE_SIZE_MAX + 1}, "first"),
        Case(ITEMS, {"first": -5}, "first"),
        Case(ITEMS, {"after": "garbage"}, "after"),
        Case(ITEMS, {"after": "%%%"}, "after"),
        Case(ITEMS, {"after": encode_cursor("job", 1)}, "after"),  # another list's cursor
        Case(ITEMS, {"after": encode_cursor("item", 10**30)}, "after"),  # beyond any row id
        Case(ITEMS, {"label": LONG_LABEL}, "label"),
        Case(JOBS, {"first": 0}, "first"),
        Case(JOBS, {"first": limits.PAGE_SIZE_MAX + 1}, "first"),
        Case(JOBS, {"after": "garbage"}, "after"),
        Case(JOBS, {"after": encode_cursor("item", 1)}, "after"),
        Case(JOBS, {"after": encode_cursor("job", 10**30)}, "after"),  # beyond any row id
        Case(COMMENTS, {"id": "$item", "first": 0}, "first"),
        Case(COMMENTS, {"id": "$item", "first": limits.PAGE_SIZE_MAX + 1}, "first"),
        Case(COMMENTS, {"id": "$item", "after": "garbage"}, "after"),
        Case(COMMENTS, {"id": "$item", "after": "aXRlbTpub3Bl"}, "after"),  # "item:nope"
    ],
}


class Scene:
    """One product with an item (and a comment), a claimed job, a queued job, an item
    without a job and an item whose labels carry an unknown priority — all made
    through the API.  `state()` reads everything a refused request could touch."""

    def __init__(self, member: Any, worker: Any) -> None:
        self.clients = {"member": member, "worker": worker}
        self.ids: dict[str, Any] = {}

    async def build(self) -> Scene:
        member, worker = self.clients["member"], self.clients["worker"]
        item = (await member.data(CREATE_ITEM, input={"title": "claimed"}))["createItem"]["id"]
        await member.data(ADD_COMMENT, id=item, body="a comment")
        claimed = (await member.data(INGEST, id=item))["ingestItemAsJob"]["job"]["id"]
        claim = (await worker.data(CLAIM, worker={"workerId": "w1"}))["claimNextJob"]
        assert claim["job"]["id"] == claimed
        queued = (await member.data(SUBMIT, input={"title": "queued", "bodyMd": "b"}))
        fresh = (await member.data(CREATE_ITEM, input={"title": "fresh"}))["createItem"]["id"]
        bad_priority = (await member.data(CREATE_ITEM, input={
            "title": "bad priority", "labels": ["priority:someday"]}))["createItem"]["id"]
        self.ids = {
            "item": item, "claimed_job": claimed, "fence": claim["lease"]["fence"],
            "queued_job": queued["submitJob"]["job"]["id"], "fresh_item": fresh,
            "bad_priority_item": bad_priority,
        }
        return self

    def resolve(self, value: Any) -> Any:
        if isinstance(value, str) and value.startswith("$"):
            return self.ids[value[1:]]
        if isinstance(value, dict):
            return {key: self.resolve(inner) for key, inner in value.items()}
        if isinstance(value, list):
            return [self.resolve(inner) for inner in value]
        return value

    async def state(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.clients["member"].data(STATE)
        return data


@pytest.fixture
async def scene(live_server, http_client, make_token) -> Scene:
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    worker = http_client(server, await make_token("acme", Role.WORKER))
    return await Scene(member, worker).build()


async def _post(client: Any, query: str, variables: dict[str, Any] | None = None) -> Any:
    """POST and check what every answer must satisfy: no 5xx, no stack trace."""
    headers = {"Authorization": f"Bearer {client.token}"}
    response = await client.http.post(
        "/graphql", json={"query": query, "variables": variables or {}}, headers=headers
    )
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    assert 'File "' not in response.text
    return response


async def _check_case(scene: Scene, case: Case, before: dict[str, Any]) -> str | None:
    """None when the case is refused as it should be; otherwise what went wrong."""
    response = await _post(scene.clients[_role_for(case.operation)], case.operation,
                           scene.resolve(case.variables))
    errors = response.json().get("errors") or []
    if [error.get("extensions") for error in errors] != [
        {"code": "BAD_USER_INPUT", "field": case.field}
    ]:
        return f"answered {response.text[:300]}"
    if case.message is not None and case.message not in errors[0]["message"]:
        return f"message {errors[0]['message']!r} lacks {case.message!r}"
    if await scene.state() != before:
        return "wrote something"
    return None


async def test_a_broken_bound_is_bad_user_input_naming_the_field(scene):
    """Every case of the table, each checked on its own; all failures are reported."""
    before = await scene.state()
    failures = []
    for group, cases in CASES.items():
        for case in cases:
            problem = await _check_case(scene, case, before)
            if problem is not None:
                failures.append(f"{group} {json.dumps(case.variables)[:100]}: {problem}")
    assert not failures, "\n".join(failures)


def test_every_bounded_argument_has_a_case():
    named = {case.field for cases in CASES.values() for case in cases}
    assert named >= {
        "input.title", "input.description", "input.labels", "body", "input.bodyMd",
        "input.kind", "input.capabilities", "input.engineClass", "input.profile",
        "input.budget", "input.maxAttempts", "input.idempotencyKey", "options.capabilities",
        "options.engineClass", "options.profile", "options.kind", "options.maxAttempts",
        "options.budget", "worker.workerId", "worker.capabilities", "worker.engineClasses",
        "worker.profiles", "worker.leaseSeconds", "leaseSeconds", "metrics.costUsd",
        "metrics.tokensIn", "metrics.tokensOut", "reason", "first", "after", "label",
    }


MALFORMED_IDS = [  # the last is a full-width digit one
    "abc", "-1", "0", "1.5", " 1", "", "9" * 30, "99999999", "0x10", "\uff11",
]

ID_MUTATIONS = {  # operation → variables naming the bad id
    UPDATE_ITEM: lambda bad, s: {"id": bad, "input": {"title": "x"}},
    ADD_COMMENT: lambda bad, s: {"id": bad, "body": "x"},
    INGEST: lambda bad, s: {"id": bad},
    SUBMIT: lambda bad, s: _job_input(trackerItemId=bad),
    ECHO: lambda bad, s: {"id": bad},
    CANCEL: lambda bad, s: {"id": bad},
    RETRY: lambda bad, s: {"id": bad},
    HEARTBEAT: lambda bad, s: {"id": bad, "fence": s.ids["fence"]},
    TRANSITION: lambda bad, s: {"id": bad, "fence": s.ids["fence"], "to": "BUILDING"},
}
READ_BY_ID = "query($id: ID!) { item(id: $id) { id } job(id: $id) { id } }"


async def test_malformed_or_unknown_ids_are_not_found_or_null(scene):
    before = await scene.state()
    for bad in MALFORMED_IDS:
        for operation, variables in ID_MUTATIONS.items():
            client = scene.clients[_role_for(operation)]
            response = await _post(client, operation, variables(bad, scene))
            assert error_codes(response.json()) == ["NOT_FOUND"], (bad, response.text)
        for client in scene.clients.values():
            response = await _post(client, READ_BY_ID, {"id": bad})
            assert response.json() == {"data": {"item": None, "job": None}}, bad
    assert await scene.state() == before


WRONG_TYPES = [
    (ITEMS, {"first": "ten"}),
    (ITEMS, {"first": 1.5}),
    (ITEMS, {"first": 2**31}),  # beyond GraphQL's 32-bit Int
    ("query($s: ItemStatus) { items(status: $s) { nodes { id } } }", {"s": "WHATEVER"}),
    ("{ items(status: WHATEVER) { nodes { id } } }", {}),
    ('{ items(first: "ten") { nodes { id } } }', {}),
    ("query($s: JobStage) { jobs(stage: $s) { nodes { id } } }", {"s": "LAUNCHED"}),
    (CREATE_ITEM, {"input": {"title": 5}}),
    (CREATE_ITEM, {"input": {"title": "x", "status": "FINISHED"}}),
    (CREATE_ITEM, {"input": {"title": "x", "unknownField": True}}),
    (CREATE_ITEM, {"input": {"title": None}}),
    (CREATE_ITEM, {}),  # a required variable missing
    (SUBMIT, _job_input(priority="SOMETIME")),
    (SUBMIT, _job_input(maxAttempts="3")),
    (SUBMIT, _job_input(budget="cheap")),
    (TRANSITION, _transition(to="LAUNCHED")),
    (TRANSITION, _transition(fence="one")),
    (TRANSITION, _transition(metrics={"tokensIn": limits.TOKENS_MAX + 1})),  # not a 32-bit Int
    (TRANSITION, _transition(metrics={"costUsd": "free"})),
    (CLAIM, {"worker": {"workerId": ["w"]}}),
    (CLAIM, {"worker": {"workerId": "w", "leaseSeconds": 1e99}}),
    ("mutation { createItem(input: {title: 5}) { id } }", {}),
    ("mutation { createItem { id } }", {}),
    ("{ nope }", {}),
    ("{ items { nodes { id ", {}),  # does not parse
]


REFUSAL_CODES = {"GRAPHQL_PARSE_FAILED", "GRAPHQL_VALIDATION_FAILED", "BAD_USER_INPUT"}


async def test_wrong_types_and_invalid_enums_are_refused_with_a_code(scene):
    before = await scene.state()
    for query, variables in WRONG_TYPES:
        response = await _post(scene.clients[_role_for(query)], query,
                               scene.resolve(variables))
        body = response.json()
        codes = error_codes(body)
        assert codes, (query, variables, body)
        assert set(codes) <= REFUSAL_CODES, (query, variables, body)
        assert not body.get("data"), body
    assert await scene.state() == before


def _query_of_depth(depth: int) -> str:
    """`item { jobs { nodes { item { jobs … } } } }`, `depth` fields deep (the root
    field is depth 1); it starts at `job` when starting at `item` would end on a
    connection (which has no scalar to end on)."""
    head, cycle = "item", ["jobs", "nodes", "item"]
    if (depth - 1) % 3 == 1:
        head, cycle = "job", ["item", "jobs", "nodes"]
    names = [cycle[level % 3] for level in range(depth - 1)]
    inner = "id"
    for name in reversed(names):
        if name == "jobs":  # one job a page: the cost limit is not what this tests
            inner = f"jobs(first: 1) {{ {inner} }}"
        else:
            inner = f"{name} {{ id {inner} }}"
    return f'query Deep {{ {head}(id: "1") {{ id {inner} }} }}'


async def _assert_refused(client: Any, query: str, reason: str) -> None:
    body = (await _post(client, query)).json()
    assert set(error_codes(body)) == {"GRAPHQL_VALIDATION_FAILED"}, body
    assert reason in body["errors"][0]["message"].lower(), body
    assert not body.get("data")


async def test_depth_token_and_alias_limits_refuse_before_anything_runs(scene):
    before = await scene.state()
    member = scene.clients["member"]
    at_the_limit = await _post(member, _query_of_depth(MAX_DEPTH))
    assert not at_the_limit.json().get("errors"), at_the_limit.text
    await _assert_refused(member, _query_of_depth(MAX_DEPTH + 1), "depth")

    too_long = " ".join(["productId"] * (MAX_TOKENS + 10))
    await _assert_refused(member, f"{{ viewer {{ {too_long} }} }}", "token")
    padding = " ".join(["id"] * (MAX_TOKENS + 10))
    await _assert_refused(
        member, f'mutation {{ createItem(input: {{title: "padded"}}) {{ {padding} }} }}', "token"
    )

    def aliased(count: int, field: str) -> str:
        return " ".join(f"a{n}: {field}" for n in range(count))

    allowed = await _post(member, f"{{ {aliased(MAX_ALIASES, 'viewer { role }')} }}")
    assert not allowed.json().get("errors")
    await _assert_refused(member, f"{{ {aliased(MAX_ALIASES + 1, 'viewer { role }')} }}",
                          "alias")
    # many aliased mutations are refused as a whole: not one of them runs
    create = 'createItem(input: {title: "aliased"}) { id }'
    await _assert_refused(member, f"mutation {{ {aliased(MAX_ALIASES + 1, create)} }}", "alias")
    assert await scene.state() == before


async def test_an_unexpected_error_is_masked_and_logged(scene, monkeypatch, caplog):
    from app.tracker import service as tracker_service

    async def broken_create_item(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom secret")

    monkeypatch.setattr(tracker_service, "create_item", broken_create_item)
    before = await scene.state()
    with caplog.at_level(logging.ERROR, logger="app.graphql"):
        response = await _post(scene.clients["member"], CREATE_ITEM, _item_input())
    assert "boom secret" not in response.text
    body = response.json()
    assert body["data"] is None
    assert body["errors"] == [{
        "message": "Unexpected error.", "locations": body["errors"][0]["locations"],
        "path": ["createItem"], "extensions": {"code": "INTERNAL_SERVER_ERROR"},
    }]
    assert any("boom secret" in record.getMessage() for record in caplog.records)
    assert await scene.state() == before
    # the service keeps answering
    other = await _post(scene.clients["member"], ADD_COMMENT, {"id": scene.ids["item"],
                                                                "body": "still up"})
    assert not other.json().get("errors")
