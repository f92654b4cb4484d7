"""The benchmark harness's entry point answers --help, and its pure helpers are right.
The harness itself is not run by the suite (speed is measured in bench/, never here)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


harness = _load("harness")


def test_run_help_lists_the_modes() -> None:
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "--help"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    for flag in ("--quick", "--json", "--no-pg", "--only"):
        assert flag in done.stdout


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([5.0], 50, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 0, 1.0),
        ([4.0, 1.0, 3.0, 2.0], 100, 4.0),
        (list(map(float, range(1, 101))), 99, 99.01),
        ([10.0, 20.0], 25, 12.5),
    ],
)
def test_percentile_interpolates_between_closest_ranks(
    values: list[float], q: float, expected: float
) -> None:
    assert harness.percentile(values, q) == pytest.approx(expected)


@pytest.mark.parametrize(("values", "q"), [([], 50), ([1.0], -1), ([1.0], 100.5)])
def test_percentile_refuses_nothing_and_out_of_range(values: list[float], q: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        harness.percentile(values, q)


def test_ratio_and_its_formatting() -> None:
    assert harness.ratio(3.0, 4.0) == 0.75
    assert harness.ratio(1.0, 0.0) is None
    assert harness.ratio(None, 2.0) is None
    assert harness.fmt_ratio(0.75) == "0.75x"
    assert harness.fmt_ratio(3.456) == "3.46x"
    assert harness.fmt_ratio(0.0381) == "0.0381x"
    assert harness.fmt_ratio(0.0) == "0.00x"
    assert harness.fmt_ratio(None) == "n/a"
    assert harness.fmt_num(12345.678, "ms", 1) == "12,345.7 ms"
    assert harness.fmt_num(None) == "n/a"


def test_span_rates_and_cpu_per_operation() -> None:
    rate, cpu_ms = harness.Span(wall=2.0, cpu=0.5).per(100)
    assert rate == 50.0
    assert cpu_ms == pytest.approx(5.0)
    assert harness.Span(wall=0.0, cpu=0.0).per(10) == (0.0, 0.0)


def test_proc_stat_parsing_takes_user_and_system_time() -> None:
    # the command name may hold spaces and parentheses; utime=250, stime=150 ticks
    line = "4242 (python (x) y) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0 1 0"
    assert harness.parse_proc_stat(line, 100) == pytest.approx(4.0)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux /proc only")
def test_process_cpu_seconds_of_this_process_grows() -> None:
    before = harness.process_cpu_seconds(os.getpid())
    total = 0
    while harness.process_cpu_seconds(os.getpid()) <= before:
        total += sum(range(10_000))
    assert total > 0
