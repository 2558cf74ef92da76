"""The autoscaler benchmark runs end to end (``--quick``) and writes what docs/PERFORMANCE.md reads from it.

A smoke test of the harness, not of the autoscaler: its short steps say nothing about scaling
(the end-to-end scaling tests do). It needs matplotlib (the ``dev`` extra): missing, it skips with
the reason on a developer's machine and fails under CI.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support import REPO, require_service

SAMPLE_KEYS = {"t_s", "offered_rps", "sent", "answered", "errors", "outstanding", "replicas", "target", "state",
               "p50_ms", "p99_ms"}


def run_bench(argv: list[str], timeout_s: float) -> str:
    """Run a benchmark in a session of its own, so a timeout ends the proxy and replicas it started too."""
    process = subprocess.Popen([sys.executable, *argv], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
        raise AssertionError(f"{argv} did not finish within {timeout_s}s") from None
    assert process.returncode == 0, output[-4000:]
    return output


def test_the_autoscaler_benchmark_writes_its_series_and_plot(tmp_path: Path) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        require_service("matplotlib", "INFEROXY_REQUIRE_MATPLOTLIB", "is not installed (pip install -e '.[dev]')")
    report, png = tmp_path / "autoscaler.json", tmp_path / "autoscaler.png"
    run_bench(["bench/bench_autoscaler.py", "--quick", "--json", str(report), "--png", str(png)], timeout_s=150)

    result = json.loads(report.read_text())
    assert {"machine", "settings", "steps", "series", "totals", "summary"} <= set(result)
    assert [step["name"] for step in result["steps"]] == ["low", "high", "low"]
    assert result["steps"][1]["rps"] > result["steps"][0]["rps"]
    series = result["series"]
    assert len(series) >= 15  # about 13 s of load sampled every 0.5 s, then the backlog's answers
    assert all(set(sample) == SAMPLE_KEYS for sample in series)
    assert [s["t_s"] for s in series] == sorted(s["t_s"] for s in series)
    # The model's scale was readable throughout, and one replica at least served it.
    assert all(s["replicas"] is not None and s["replicas"] >= 1 and s["target"] is not None for s in series)
    # Every request is accounted for: answered or failed with a code, in the totals and in the samples.
    totals = result["totals"]
    assert totals["sent"] > 0
    assert totals["sent"] == totals["answered"] + sum(totals["errors"].values())
    assert sum(s["answered"] for s in series) == totals["answered"]
    assert any(s["p99_ms"] is not None for s in series)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
