"""`FleetClient`: fleetbridge's GraphQL API from Python, on the maintained `gql` library.

Queries and mutations go over HTTP (gql's httpx transport, one pooled connection);
subscriptions over the websocket (gql's websockets transport, `graphql-transport-ws`,
the token in the `connection_init` payload as DESIGN §5 says).  The reference worker
(`app.worker`) and `fleetbridge watch` (`app.watch`) are built on it; other Python code
may use it the same way:

    async with FleetClient("http://127.0.0.1:8000/graphql", token) as fleet:
        job = await fleet.claim("worker-1", capabilities=["os:linux"])
        if job is not None:
            await fleet.transition(job.id, job.lease.fence, "SHIPPED")

Transient failures (see `app.client.retry`) are retried under the client's
`RetryPolicy`, each logged as one warning line; any other GraphQL error is raised as
`FleetApiError` with its `extensions.code`.  A retried write is safe: a failed request
writes nothing, and a write that did commit before its answer was lost is refused on
the retry (`CONFLICT`: the fence or the stage has moved on).  The one exception is a
claim whose answer was lost: its lease runs out and the reaper requeues the job.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from gql import Client, GraphQLRequest
from gql.client import AsyncClientSession
from gql.transport.exceptions import TransportQueryError
from gql.transport.httpx import HTTPXAsyncTransport

from app.client.retry import FleetApiError, RetryPolicy, call_with_retry
from app.client.stream import EventStream, FleetEvent, Stream

JOB_FIELDS = """id title bodyMd kind priority capabilities engineClass profile budget
  attempts maxAttempts trackerItemId stage failureReason metrics { costUsd tokensIn tokensOut }"""
CLAIM = GraphQLRequest(f"""
mutation claimNextJob($worker: WorkerInput!) {{ claimNextJob(worker: $worker) {{
  job {{ {JOB_FIELDS} }} lease {{ workerId fence expiresAt }} }} }}""")
HEARTBEAT = GraphQLRequest("""
mutation heartbeat($jobId: ID!, $fence: Int!, $leaseSeconds: Int) {
  heartbeat(jobId: $jobId, fence: $fence, leaseSeconds: $leaseSeconds) {
    workerId fence expiresAt } }""")
TRANSITION = GraphQLRequest(f"""
mutation transitionJob($jobId: ID!, $fence: Int!, $to: JobStage!, $metrics: JobMetricsInput,
                    $reason: String, $retryable: Boolean) {{
  transitionJob(jobId: $jobId, fence: $fence, to: $to, metrics: $metrics, reason: $reason,
                retryable: $retryable) {{ {JOB_FIELDS} }} }}""")
RELEASE = GraphQLRequest(f"""
mutation releaseJob($jobId: ID!, $fence: Int!, $reason: String) {{
  releaseJob(jobId: $jobId, fence: $fence, reason: $reason) {{ {JOB_FIELDS} }} }}""")
JOB = GraphQLRequest(f"query job($id: ID!) {{ job(id: $id) {{ {JOB_FIELDS} }} }}")


@dataclass(frozen=True, slots=True)
class Lease:
    fence: int
    expires_at: datetime
    worker_id: str | None = None

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Lease:
        expires_at = datetime.fromisoformat(str(payload["expiresAt"]))
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)
        return cls(int(payload["fence"]), expires_at, payload.get("workerId"))


@dataclass(frozen=True, slots=True)
class JobState:
    """A job as the service answered it: `fields` holds every field of JOB_FIELDS."""

    fields: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.fields["id"])

    @property
    def stage(self) -> str:
        return str(self.fields["stage"])

    @property
    def attempts(self) -> int:
        return int(self.fields["attempts"])

    @property
    def failure_reason(self) -> str | None:
        reason = self.fields.get("failureReason")
        return None if reason is None else str(reason)

    @property
    def cost_usd(self) -> float | None:
        metrics = self.fields.get("metrics") or {}
        value = metrics.get("costUsd")
        return None if value is None else float(value)

    @property
    def tokens(self) -> tuple[int | None, int | None]:
        metrics = self.fields.get("metrics") or {}
        return metrics.get("tokensIn"), metrics.get("tokensOut")


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job this worker holds: its fields at the claim, and the lease."""

    state: JobState
    lease: Lease

    @property
    def id(self) -> str:
        return self.state.id

    @property
    def fields(self) -> dict[str, Any]:
        return self.state.fields


def websocket_url(url: str) -> str:
    """The websocket address of an HTTP endpoint (ws:// and wss:// pass through)."""
    for http, ws in (("http://", "ws://"), ("https://", "wss://")):
        if url.startswith(http):
            return ws + url[len(http):]
    return url


def http_url(url: str) -> str:
    """The HTTP address of a websocket endpoint (http:// and https:// pass through)."""
    for ws, http in (("ws://", "http://"), ("wss://", "https://")):
        if url.startswith(ws):
            return http + url[len(ws):]
    return url


def api_error(exc: TransportQueryError) -> FleetApiError:
    """The first GraphQL error of an answer, with its code."""
    first = (exc.errors or [{}])[0]
    if not isinstance(first, dict):
        return FleetApiError("INTERNAL_SERVER_ERROR", str(first))
    code = (first.get("extensions") or {}).get("code") or "INTERNAL_SERVER_ERROR"
    return FleetApiError(str(code), str(first.get("message", exc)))


class FleetClient:
    """One product's view of the API under one bearer token.

    `url` is the GraphQL endpoint (http[s]:// or ws[s]://, either works); `timeout`
    bounds each HTTP request in seconds; `retry` governs transient failures (the
    default retries for as long as it takes, waiting at most 30 s between tries).
    Use it as an async context manager, or call `connect()` and `aclose()`."""

    def __init__(
        self, url: str, token: str, *, timeout: float = 30.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.url = http_url(url)
        self.ws_url = websocket_url(url)
        self.token = token
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._client = Client(
            transport=HTTPXAsyncTransport(
                url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout,
            ),
            execute_timeout=timeout + 5,
        )
        self._session: AsyncClientSession | None = None

    async def connect(self) -> None:
        if self._session is None:
            session = await self._client.connect_async()  # type: ignore[no-untyped-call]
            assert isinstance(session, AsyncClientSession)
            self._session = session

    async def aclose(self) -> None:
        if self._session is not None:
            self._session = None
            await self._client.close_async()  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> FleetClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- any operation -------------------------------------------------------

    async def execute(
        self, request: GraphQLRequest | str, variables: dict[str, Any] | None = None, *,
        retry: RetryPolicy | None = None,
    ) -> dict[str, Any]:
        """Run one query or mutation over HTTP; its `data`.  Raises FleetApiError for a
        GraphQL error, and the last transport error when the policy gives up."""
        await self.connect()
        session = self._session
        assert session is not None
        document = GraphQLRequest(request, variable_values=variables or {})
        name = document.operation_name or _operation_name(document) or "request"

        async def once() -> dict[str, Any]:
            try:
                data: dict[str, Any] = await session.execute(document)
            except TransportQueryError as exc:
                raise api_error(exc) from exc
            return data

        return await call_with_retry(name, retry or self.retry, once)

    # -- the worker's calls (DESIGN §2) ----------------------------------------

    async def claim(
        self, worker_id: str, *, capabilities: Sequence[str] = (),
        engine_classes: Sequence[str] = (), profiles: Sequence[str] = (),
        lease_seconds: int | None = None,
    ) -> ClaimedJob | None:
        """`claimNextJob`: the job the scheduler gives this worker, or None."""
        worker = {
            "workerId": worker_id, "capabilities": list(capabilities),
            "engineClasses": list(engine_classes), "profiles": list(profiles),
            "leaseSeconds": lease_seconds,
        }
        payload = (await self.execute(CLAIM, {"worker": worker}))["claimNextJob"]
        if payload["job"] is None:
            return None
        return ClaimedJob(JobState(payload["job"]), Lease.from_payload(payload["lease"]))

    async def heartbeat(
        self, job_id: str, fence: int, lease_seconds: int | None = None, *,
        retry: RetryPolicy | None = None,
    ) -> Lease:
        """Extend the lease; CONFLICT (FleetApiError) when it is no longer held."""
        data = await self.execute(
            HEARTBEAT, {"jobId": job_id, "fence": fence, "leaseSeconds": lease_seconds},
            retry=retry,
        )
        return Lease.from_payload(data["heartbeat"])

    async def transition(
        self, job_id: str, fence: int, to: str, *, reason: str | None = None,
        retryable: bool = False, metrics: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> JobState:
        """`transitionJob`; `metrics` is a JobMetricsInput (costUsd, tokensIn, tokensOut)."""
        data = await self.execute(TRANSITION, {
            "jobId": job_id, "fence": fence, "to": to, "reason": reason,
            "retryable": retryable, "metrics": metrics,
        }, retry=retry)
        return JobState(data["transitionJob"])

    async def release(
        self, job_id: str, fence: int, reason: str | None = None, *,
        retry: RetryPolicy | None = None,
    ) -> JobState:
        """`releaseJob`: give the job back (QUEUED at once, the attempt not counted)."""
        data = await self.execute(
            RELEASE, {"jobId": job_id, "fence": fence, "reason": reason}, retry=retry
        )
        return JobState(data["releaseJob"])

    async def job(self, job_id: str, *, retry: RetryPolicy | None = None) -> JobState | None:
        data = await self.execute(JOB, {"id": job_id}, retry=retry)
        return None if data["job"] is None else JobState(data["job"])

    # -- subscriptions (DESIGN §5) ----------------------------------------------

    def events(
        self, streams: Sequence[Stream], *, after: str | None = None, reconnect: bool = True,
    ) -> AsyncGenerator[FleetEvent, None]:
        """Job stage and item status changes, merged from `streams` over one websocket,
        in the order they arrive.  With `after`, stored events after that cursor come
        first.  A connection lost after it was acknowledged is opened again (backoff
        under the client's policy) and every stream resumes after its last cursor, with
        no gap and no duplicate.  Raises FleetApiError (a refused token is
        `UNAUTHENTICATED`, a refused subscription carries the service's code)."""
        return EventStream(
            self.ws_url, self.token, streams, after=after, reconnect=reconnect,
            retry=self.retry,
        ).events()


def _operation_name(request: GraphQLRequest) -> str | None:
    for definition in request.document.definitions:
        name = getattr(definition, "name", None)
        if name is not None:
            return str(name.value)
    return None
