"""fleetbridge's Python client: `FleetClient` (gql over HTTP and websockets), its data
types, errors and retry policy.  See app/client/fleet.py."""

from __future__ import annotations

from app.client.fleet import ClaimedJob, FleetClient, JobState, Lease, http_url, websocket_url
from app.client.retry import NO_RETRY, FleetApiError, RetryPolicy, describe, is_transient
from app.client.stream import FleetEvent, Stream

__all__ = [
    "NO_RETRY",
    "ClaimedJob",
    "FleetApiError",
    "FleetClient",
    "FleetEvent",
    "JobState",
    "Lease",
    "RetryPolicy",
    "Stream",
    "describe",
    "http_url",
    "is_transient",
    "websocket_url",
]
