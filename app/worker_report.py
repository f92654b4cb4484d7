"""What the reference worker tells a person: one line per happening, a live status line.

Lines go to stderr (stdout stays the command's), each prefixed with the local time:

    14:02:07 job 12: claimed "Fix the login test" (attempt 1 of 3, fence 1)
    14:02:07 job 12: BUILDING
    14:03:40 job 12: exit 0 -> SHIPPED in 1m33s, cost $0.50, tokens 1200 in / 300 out

On a terminal (stderr is a TTY) a `rich` status line below them shows what the worker
is doing now (waiting, running job N for how long); the command's output is then passed
through the same console so the status line stays whole.  Retry warnings from the
client (logger `app.client`) are printed the same way, one line each.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime
from types import TracebackType

from rich.console import Console
from rich.logging import RichHandler
from rich.status import Status

from app.client import ClaimedJob, JobState


def elapsed(seconds: float) -> str:
    """`0.4s`, `12.0s`, `1m33s`, `2h05m`."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def figures(state: JobState) -> str:
    """`, cost $0.50, tokens 120 in / 30 out` — only what the service knows."""
    parts = []
    if state.cost_usd:
        parts.append(f"cost ${state.cost_usd:.2f}")
    tokens_in, tokens_out = state.tokens
    if tokens_in or tokens_out:
        parts.append(f"tokens {tokens_in or 0} in / {tokens_out or 0} out")
    return "".join(f", {part}" for part in parts)


def outcome(state: JobState) -> str:
    """`SHIPPED`, `FAILED (exit code 3)`, `QUEUED again (exit code 75)`."""
    reason = f" ({state.failure_reason})" if state.failure_reason else ""
    if state.stage == "QUEUED":
        return f"QUEUED again{reason}"
    if state.stage == "SHIPPED":
        return "SHIPPED"
    return f"{state.stage}{reason}"


class Reporter:
    """Prints the worker's lines; shows the live status when `live` (default: on a TTY)."""

    def __init__(self, *, live: bool | None = None) -> None:
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal if live is None else live
        self._status: Status | None = None
        self._text = "starting"
        self._since: float | None = None

    def __enter__(self) -> Reporter:
        handler: logging.Handler
        if self.live:
            handler = RichHandler(console=self.console, show_path=False, markup=False)
            self._status = self.console.status(self._text)
            self._status.start()
        else:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                                   datefmt="%H:%M:%S"))
        self._handler = handler
        logger = logging.getLogger("app")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._status is not None:
            self._status.stop()
        logging.getLogger("app").removeHandler(self._handler)

    # -- lines --------------------------------------------------------------

    def line(self, text: str) -> None:
        stamped = f"{datetime.now().strftime('%H:%M:%S')} {text}"
        if self.live:
            self.console.print(stamped, markup=False)
        else:
            print(stamped, file=sys.stderr, flush=True)

    def output(self, text: str) -> None:
        """A line of the command's own output (only used on a terminal)."""
        self.console.print(text, markup=False, emoji=False)

    def claimed(self, job: ClaimedJob) -> None:
        title = str(job.fields.get("title") or "")
        self.line(f'job {job.id}: claimed "{title}" (attempt {job.fields.get("attempts")} of '
                  f'{job.fields.get("maxAttempts")}, fence {job.lease.fence})')
        self.status(f"job {job.id}: claimed", since=time.monotonic())

    def stage(self, job: ClaimedJob, stage: str) -> None:
        self.line(f"job {job.id}: {stage}")
        self.status(f"job {job.id}: {stage}, running the command")

    def finished(self, job: ClaimedJob, exit_code: int, state: JobState, took: float) -> None:
        self.line(f"job {job.id}: exit {exit_code} -> {outcome(state)} in {elapsed(took)}"
                  f"{figures(state)}")

    def ended_by_service(self, job: ClaimedJob, state: JobState | None, why: str,
                         killed: int | None, took: float) -> None:
        """`job 12: CANCELLED (item cancelled) by the service; command killed (exit -15)
        after 41.0s` — or, when the job could not be read, the service's refusal."""
        if state is None:
            now = f"lease lost ({why})"
        elif state.stage in ("CANCELLED", "FAILED", "SHIPPED"):
            now = f"{outcome(state)} by the service"
        else:
            now = f"lease lost, the job is now {outcome(state)}"
        kill = f"; command killed (exit {killed})" if killed is not None else ""
        self.line(f"job {job.id}: {now}{kill} after {elapsed(took)}")

    def released(self, job: ClaimedJob, reason: str, state: JobState | None) -> None:
        if state is None:
            self.line(f"job {job.id}: could not be released ({reason}); "
                      "the service requeues it when its lease runs out")
        else:
            self.line(f"job {job.id}: released ({reason}); back to {state.stage}, "
                      f"attempt not counted ({state.attempts} used)")

    # -- the live status ------------------------------------------------------

    def status(self, text: str, *, since: float | None = None) -> None:
        self._text = text
        if since is not None or not text.startswith("job "):
            self._since = since
        self.tick()

    def tick(self) -> None:
        if self._status is None:
            return
        suffix = f" · {elapsed(time.monotonic() - self._since)}" if self._since else ""
        self._status.update(f"{self._text}{suffix}")
