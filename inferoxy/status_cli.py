"""``inferoxy status``: the dashboard in a terminal (models, replicas, queues, rates, latency), from the same
JSON the page polls (``GET /dashboard/state``, bridges/overview.py). ``--watch`` redraws it, ``--json`` prints
the document for scripts. Address, key and TLS options and exit codes are ``inferoxy models``'s; the key is
one that may read every model's metrics (admin scope, or infer on every model) when
``INFEROXY_AUTH_METADATA=true`` asks for one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from typing import Any

from inferoxy.admin_cli import OK, USAGE, AdminClient, CliError, _table, add_connection_options, run_admin_command

STATE_PATH = "/dashboard/state"
# The overview's rates need two samples: a one-off look that finds none asks again every SECOND_LOOK_S, for up
# to RATES_WAIT_S (the bridge spaces samples out further when reading the metrics is slow: bridges/overview.py).
SECOND_LOOK_S = 1.0
RATES_WAIT_S = 5.0
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen: what `watch` does between frames


def add_status_parser(commands: Any) -> None:
    status = commands.add_parser("status", help="models, replicas, queues, rates and latency of a running proxy")
    add_connection_options(status)
    status.add_argument("--json", action="store_true", help="print GET /dashboard/state's JSON instead of tables")
    status.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                        help="redraw every SECONDS (default 2) until interrupted")
    status.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N frames")


def run_status(args: argparse.Namespace) -> int:
    return run_admin_command(args, "status", show_status)


def show_status(client: AdminClient, args: argparse.Namespace) -> int:
    if args.watch is not None and args.watch <= 0:
        raise CliError(USAGE, "--watch takes a positive number of seconds")
    if args.count is not None and (args.count < 1 or args.watch is None):
        raise CliError(USAGE, "--count takes a positive number of frames, with --watch")
    if args.watch is None:
        state = client.call("GET", STATE_PATH)
        deadline = time.monotonic() + RATES_WAIT_S
        while state.get("window_s") is None and time.monotonic() < deadline:  # one sample yet: no rates
            time.sleep(SECOND_LOOK_S)
            state = client.call("GET", STATE_PATH)
        print(_dump(state) if args.json else render(state, client.url))
        return OK
    frames = itertools.count() if args.count is None else range(args.count)
    try:
        for frame in frames:
            if frame:
                time.sleep(args.watch)
            state = client.call("GET", STATE_PATH)
            text = _dump(state) if args.json else render(state, client.url)
            # One write per frame, so the terminal never shows half of one.
            sys.stdout.write((CLEAR if not args.json else "") + text + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return OK


def _dump(state: Any) -> str:
    return json.dumps(state, indent=2)


# -- rendering (pure) -----------------------------------------------------------------------------


def render(state: dict[str, Any], url: str = "") -> str:
    """The terminal picture of a ``GET /dashboard/state`` document."""
    models = state.get("models", [])
    totals = state.get("totals", {})
    ready = sum(m["state"] == "ready" for m in models)
    window = state.get("window_s")
    lines = [
        f"Inferoxy{' at ' + url if url else ''} · {len(models)} model versions, {ready} ready · "
        f"{totals.get('requests', 0)} requests, {totals.get('errors', 0)} errors · "
        f"{_number(totals.get('request_rate'), 1)} req/s"
        + (f" (last {window:.1f} s)" if window is not None else " (no rate yet: one sample)"),
    ]
    components = state.get("components", {})
    if components:
        lines.append("components: " + ", ".join(f"{name} {'up' if up else 'DOWN'}" for name, up in components.items()))
    lines.append("")
    header = ("MODEL", "VERSION", "STATE", "REPLICAS", "QUEUE", "IN FLIGHT", "REQUESTS", "ERRORS", "REQ/S",
              "P50", "P99", "BATCH")
    rows = [(m["name"], m["version"] + ("*" if m.get("default") else ""), m["state"],
             f"{m['ready_replicas']}/{'?' if m.get('desired_replicas') is None else m['desired_replicas']}",
             m["queue_depth"], m["batches_in_flight"], m["requests"], m["errors"], _number(m["request_rate"], 1),
             _seconds(m["latency_p50_s"]), _seconds(m["latency_p99_s"]), _number(m["batch_size_mean"], 1))
            for m in models]
    lines.append(_table(header, rows) if rows else "no model is registered")
    replicas = [(r["id"], f"{m['name']}/{m['version']}", r["state"], "CPU" if r["gpu"] is None else f"GPU {r['gpu']}",
                 "-" if r["pid"] is None else r["pid"], _duration(r["uptime_s"]), m["restarts"])
                for m in models for r in m.get("replicas", [])]
    lines.append("")
    lines.append(_table(("REPLICA", "MODEL", "STATE", "GPU", "PID", "UPTIME", "RESTARTS"), replicas)
                 if replicas else "no replica is running")
    why = [f"  {m['name']}/{m['version']} {m['state']}: {_first_line(m['reason'])}"
           for m in models if m["state"] not in ("ready", "stopped", "idle") and m.get("reason")]
    if why:
        lines += ["", "not ready:", *why]
    problems = state.get("problems", [])
    if problems:
        lines += ["", *(f"problem: {p}" for p in problems)]
    return "\n".join(lines)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.001:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.{2 if value < 0.01 else 1}f} ms"
    return f"{value:.2f} s"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _first_line(text: str) -> str:
    line = text.strip().partition("\n")[0]
    return line if len(line) <= 160 else line[:157] + "..."
