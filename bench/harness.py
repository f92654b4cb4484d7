"""Pure helpers of the benchmark harness (bench/run.py): percentiles, ratios, CPU clocks.

Everything here is side-effect free except the clocks, and unit-tested in
tests/unit/test_bench_harness.py.  The harness itself is never run by the suite.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# What a served process under benchmark runs with (bench/served.py, bench_fanout.py): no
# background loops, quiet logs, and none of the per-address or per-token admission limits
# (DESIGN §8) - every benchmark client shares one address and one token, which a real
# fleet does not; left on, they would measure the limiter instead of the service.
SERVED_ENV: dict[str, str] = {
    "FLEET_BACKGROUND_LOOPS": "false",
    "FLEET_LOG_LEVEL": "warning",
    "FLEET_GRAPHIQL": "false",
    "FLEET_RATE_LIMIT_PER_IP": "",
    "FLEET_RATE_LIMIT_PER_TOKEN": "",
    "FLEET_MAX_WEBSOCKETS_PER_TOKEN": "100000",
    "FLEET_MAX_SUBSCRIPTIONS_PER_TOKEN": "1000000",
}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 ≤ q ≤ 100) of `values`, linearly interpolated between the
    closest ranks (numpy's default).  Raises ValueError for no values or q out of range."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    if low == high:
        return float(ordered[low])
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator ÷ denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def fmt_ratio(value: float | None) -> str:
    """A ratio as printed in the headline: two decimals and 'x' (three significant figures
    below 0.1), 'n/a' for a missing one."""
    if value is None:
        return "n/a"
    if value != 0 and abs(value) < 0.1:
        return f"{value:.3g}x"
    return f"{value:.2f}x"


def fmt_num(value: float | None, unit: str = "", digits: int = 1) -> str:
    """A figure with thousands separators and a unit; 'n/a' for a missing one."""
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{(' ' + unit) if unit else ''}"


@dataclass(frozen=True, slots=True)
class Span:
    """Wall seconds and CPU seconds of one measured stretch."""

    wall: float
    cpu: float

    def per(self, count: int) -> tuple[float, float]:
        """(operations per wall second, CPU milliseconds per operation)."""
        if count <= 0 or self.wall <= 0:
            return 0.0, 0.0
        return count / self.wall, self.cpu * 1e3 / count


@dataclass(slots=True)
class Clock:
    """Measures wall time and the CPU time of this process (`cpu_of=None`) or of
    another process given by pid (read from /proc/<pid>/stat, Linux)."""

    cpu_of: int | None = None
    _wall: float = field(default=0.0, init=False)
    _cpu: float = field(default=0.0, init=False)

    def cpu_seconds(self) -> float:
        if self.cpu_of is None:
            return time.process_time()
        return process_cpu_seconds(self.cpu_of)

    def start(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), self.cpu_seconds()
        return self

    def stop(self) -> Span:
        return Span(time.perf_counter() - self._wall, self.cpu_seconds() - self._cpu)


def parse_proc_stat(line: str, ticks_per_second: int) -> float:
    """User + system CPU seconds from one /proc/<pid>/stat line (fields 14 and 15; the
    command name in parentheses may hold spaces)."""
    fields = line[line.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_second


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process `pid` (Linux /proc)."""
    line = Path(f"/proc/{pid}/stat").read_text()
    return parse_proc_stat(line, os.sysconf("SC_CLK_TCK"))
