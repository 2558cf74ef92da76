"""``inferoxy jobs submit|list|get|cancel``: the jobs API from a shell (docs/JOBS.md).

A client of ``/v2/jobs`` on a proxy's REST bridge, with ``inferoxy models``'s connection options and exit
codes. ``--key`` is an API key: submitting needs one that may infer the model (while keys are required);
each key lists and cancels its own jobs, an admin key every job. ``submit`` prints the job's id alone on
its last line; with ``--wait`` it polls until the job ends and exits 0 only if it succeeded.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from inferoxy.admin_cli import (
    FAILED,
    OK,
    USAGE,
    AdminClient,
    CliError,
    _table,
    add_connection_options,
    run_admin_command,
)

POLL_S = 1.0
FINAL = ("succeeded", "failed", "cancelled")


def add_jobs_parser(commands: Any) -> None:
    jobs = commands.add_parser("jobs", help="submit, list, show and cancel batch jobs through the jobs API")
    add_connection_options(jobs)
    sub = jobs.add_subparsers(dest="jobs_command", required=True)

    submit = sub.add_parser("submit", help="run a dataset through a model on the proxy; prints the job id last")
    submit.add_argument("model")
    submit.add_argument("input", help="s3:// URL, or a path under the proxy's INFEROXY_JOBS_LOCAL_ROOT")
    submit.add_argument("output", help="s3:// URL, or a path under the proxy's INFEROXY_JOBS_LOCAL_ROOT")
    submit.add_argument("--version", dest="model_version", help="the model version (default: its default)")
    submit.add_argument("--input", dest="inputs", action="append", default=[], metavar="NAME=COLUMN",
                        help="read model input NAME from COLUMN (repeatable)")
    submit.add_argument("--input-format", choices=["auto", "parquet", "csv", "images"], default=None)
    submit.add_argument("--key-column", help="a column copied to the output to tell rows apart")
    submit.add_argument("--batch-size", type=int)
    submit.add_argument("--max-samples", type=int)
    submit.add_argument("--concurrency", type=int)
    submit.add_argument("--storage-option", dest="storage_options", action="append", default=[],
                        metavar="KEY=VALUE", help="fsspec option for s3:// (repeatable; never shown back)")
    submit.add_argument("--idempotency-key", help="a retried submit with the same key returns the same job")
    submit.add_argument("--wait", action="store_true", help="poll until the job ends; exit 1 unless it succeeded")

    listing = sub.add_parser("list", help="your jobs, newest first (every job with an admin key)")
    listing.add_argument("--state", choices=["queued", "running", *FINAL])
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")

    get = sub.add_parser("get", help="one job as JSON: state, progress, timings, errors")
    get.add_argument("id")
    cancel = sub.add_parser("cancel", help="stop a job (a running one stops at its next part)")
    cancel.add_argument("id")


def run_jobs(args: argparse.Namespace) -> int:
    return run_admin_command(args, "jobs", JOB_COMMANDS[args.jobs_command])


def _pairs(items: list[str], what: str) -> dict[str, str]:
    found = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CliError(USAGE, f"{what} {item!r} is not NAME=VALUE")
        found[name] = value
    return found


def cmd_submit(client: AdminClient, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model": args.model, "input": args.input, "output": args.output}
    optional = {"version": args.model_version, "input_format": args.input_format, "key_column": args.key_column,
                "batch_size": args.batch_size, "max_samples": args.max_samples, "concurrency": args.concurrency}
    body.update({name: value for name, value in optional.items() if value is not None})
    if args.inputs:
        body["inputs"] = _pairs(args.inputs, "--input")
    if args.storage_options:
        body["storage_options"] = _pairs(args.storage_options, "--storage-option")
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
    job = client.call("POST", "/v2/jobs", body, headers=headers)
    print(f"job {job['id']}: {job['state']}")
    if not args.wait:
        print(job["id"])
        return OK
    while job["state"] not in FINAL:
        time.sleep(POLL_S)
        job = client.call("GET", f"/v2/jobs/{job['id']}")
    print(f"job {job['id']}: {job['state']}{_done(job)}" + (f": {job['error']}" if job.get("error") else ""))
    print(job["id"])
    return OK if job["state"] == "succeeded" else FAILED


def _done(job: dict[str, Any]) -> str:
    progress = job["progress"]
    total = "?" if progress["total"] is None else progress["total"]
    return f" ({progress['done']}/{total} rows, {progress['failed']} failed)"


def cmd_list(client: AdminClient, args: argparse.Namespace) -> int:
    params = {"limit": str(args.limit), **({"state": args.state} if args.state else {})}
    jobs = client.call("GET", "/v2/jobs", params=params)["jobs"]
    if args.json:
        print(json.dumps(jobs, indent=2))
        return OK
    rows = [(job["id"], job["state"], job["options"]["model"], f"{job['progress']['done']}/"
             f"{'?' if job['progress']['total'] is None else job['progress']['total']}", job["owner"] or "-",
             time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(job["created_at"]))) for job in jobs]
    print(_table(("ID", "STATE", "MODEL", "ROWS", "OWNER", "CREATED (UTC)"), rows))
    return OK


def cmd_get(client: AdminClient, args: argparse.Namespace) -> int:
    print(json.dumps(client.call("GET", f"/v2/jobs/{args.id}"), indent=2))
    return OK


def cmd_cancel(client: AdminClient, args: argparse.Namespace) -> int:
    job = client.call("DELETE", f"/v2/jobs/{args.id}")
    print(f"job {job['id']}: {job['state']}" + (" (cancel requested)" if job["state"] not in FINAL else ""))
    return OK


JOB_COMMANDS = {"submit": cmd_submit, "list": cmd_list, "get": cmd_get, "cancel": cmd_cancel}
