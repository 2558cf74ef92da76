"""``inferoxy batch MODEL INPUT OUTPUT``: a dataset through a model, into parquet (docs/JOBS.md, "The batch CLI").

Through a running proxy's ZeroMQ bridge (``--url``), or through one started in this process for the job
(``--embedded``, as ``serve --in-process`` with the usual models.yaml) and stopped after it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from inferoxy.client import DEFAULT_URL
from jobs.options import BatchOptions

if TYPE_CHECKING:
    from jobs.runner import JobSummary, Progress

# The runner (pyarrow, fsspec) is imported when a job runs: `inferoxy` builds this parser for every command,
# and each component is started through it.

log = logging.getLogger("inferoxy.batch")

# Without a terminal: one log line per this many rows.
LOG_EVERY_ROWS = 10_000
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 130


def add_batch_parser(commands: Any) -> None:
    batch = commands.add_parser("batch", help="run a model over a dataset (parquet, CSV, images; local or s3://) "
                                "into parquet")
    batch.add_argument("model")
    batch.add_argument("input", help="parquet file or folder, CSV file, or folder of images; a path or s3:// URL")
    batch.add_argument("output", help="the results' folder (path or s3:// URL); OUTPUT.metadata.json beside it")
    where = batch.add_mutually_exclusive_group()
    where.add_argument("--url", default=os.environ.get("INFEROXY_ZMQ_URL", DEFAULT_URL),
                       help=f"the proxy's ZeroMQ bridge (default $INFEROXY_ZMQ_URL or {DEFAULT_URL})")
    where.add_argument("--embedded", action="store_true",
                       help="start the proxy in this process for the job (models.yaml, as serve --in-process)")
    batch.add_argument("--models", help="with --embedded: the models.yaml to serve (same as INFEROXY_MODELS_FILE)")
    batch.add_argument("--api-key", default=os.environ.get("INFEROXY_API_KEY"),
                       help="API key for the proxy (default $INFEROXY_API_KEY)")
    batch.add_argument("--server-key", default=os.environ.get("INFEROXY_ZMQ_SERVER_KEY"),
                       help="the bridge's CURVE public key when it encrypts (default $INFEROXY_ZMQ_SERVER_KEY)")
    batch.add_argument("--version", dest="model_version", help="model version (default: the model's default)")
    batch.add_argument("--input", dest="mapping", action="append", default=[], metavar="NAME=COLUMN",
                       help="read the model's input NAME from COLUMN (repeatable)")
    batch.add_argument("--key", help="a column copied to the output to tell rows apart (default: the row index)")
    batch.add_argument("--format", choices=["auto", "parquet", "csv", "images"], default="auto")
    batch.add_argument("--batch-size", type=int, default=32, help="rows per request (default 32)")
    batch.add_argument("--max-samples", type=int, help="stop after this many input rows")
    batch.add_argument("--concurrency", type=int, help="requests in flight (default 8)")
    batch.add_argument("--part-rows", type=int, default=10_000,
                       help="rows per output part: the most a resumed job does again (default 10000)")
    batch.add_argument("--storage-option", dest="storage", action="append", default=[], metavar="KEY=VALUE",
                       help="s3 option: key, secret, token, endpoint_url, region (repeatable)")
    batch.add_argument("--resume", action="store_true", help="continue the job that wrote OUTPUT from its checkpoint")
    batch.add_argument("--progress", choices=["auto", "bar", "log", "none"], default="auto",
                       help="auto: a bar on a terminal, else a log line per 10000 rows")


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name:
            raise ValueError(f"{flag} {value!r}: expected KEY=VALUE")
        out[name] = rest
    return out


def options_of(args: argparse.Namespace) -> BatchOptions:
    return BatchOptions(
        model=args.model, version=args.model_version, input=args.input, output=args.output,
        input_format=args.format, inputs=_pairs(args.mapping, "--input"), key_column=args.key,
        batch_size=args.batch_size, max_samples=args.max_samples, concurrency=args.concurrency,
        part_rows=args.part_rows, storage_options=_pairs(args.storage, "--storage-option"), resume=args.resume)


def run_batch_command(args: argparse.Namespace) -> int:
    from jobs.runner import JobError

    try:
        options = options_of(args)
    except (ValueError, ValidationError) as exc:
        print(f"inferoxy batch: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.embedded:
            summary = asyncio.run(_embedded(options, args))
        else:
            summary = asyncio.run(_run(options, args.url, args.api_key, args.server_key, args.progress))
    except JobError as exc:
        print(f"inferoxy batch: {exc}", file=sys.stderr)
        return EXIT_JOB_FAILED
    if summary.cancelled:
        print(f"inferoxy batch: stopped after {summary.rows} rows; --resume continues it", file=sys.stderr)
        return EXIT_CANCELLED
    print(json.dumps(summary.to_json()))
    return 0


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return str(exc)


async def _run(options: BatchOptions, url: str, api_key: str | None, server_key: str | None,
               progress: str) -> JobSummary:
    from jobs.runner import run_batch
    from jobs.zmq_predictor import ZmqPredictor

    cancel = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):  # the first stops sending and commits; resume finishes
        loop.add_signal_handler(signum, cancel.set)
    predictor = ZmqPredictor(url, api_key=api_key, server_key=server_key)
    report, close = _progress(progress)
    try:
        return await run_batch(options, predictor, on_progress=report, cancel=cancel)
    finally:
        close()
        await predictor.aclose()


async def _embedded(options: BatchOptions, args: argparse.Namespace) -> JobSummary:
    from inferoxy.credentials import make_serve_secrets
    from inferoxy.runner import run_in_process
    from inferoxy.settings import Settings, load_settings
    from jobs.runner import JobError

    try:  # inferoxy/cli.py has set INFEROXY_MODELS_FILE from --models
        settings = load_settings()
    except (ValidationError, FileNotFoundError) as exc:
        raise JobError(f"bad settings: {_one_line(exc) if isinstance(exc, ValidationError) else exc}") from None
    os.environ.update(make_serve_secrets(settings))  # as serve: the components share the secrets it makes
    settings = load_settings()
    ready = asyncio.Event()
    shared: list[Settings] = []

    def on_ready(started: Settings) -> None:
        shared.append(started)
        ready.set()

    proxy = asyncio.create_task(run_in_process(settings, on_ready), name="embedded-proxy")
    waiter = asyncio.create_task(ready.wait())
    try:
        await asyncio.wait({proxy, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.is_set():
            await proxy  # its error says why it did not start
            raise JobError("the embedded proxy stopped before it was ready")
        host = "127.0.0.1" if shared[0].bind_host in ("0.0.0.0", "::", "") else shared[0].bind_host
        server_key = None
        if shared[0].zmq_curve_secret_key is not None:
            import zmq

            server_key = zmq.curve_public(shared[0].zmq_curve_secret_key.get_secret_value().encode()).decode()
        job = asyncio.create_task(_run(options, f"tcp://{host}:{shared[0].zmq_port}", args.api_key, server_key,
                                       args.progress))
        await asyncio.wait({job, proxy}, return_when=asyncio.FIRST_COMPLETED)
        if not job.done():  # the proxy stopped under the job (a signal while it started, a failed component)
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError, JobError):
                await job
            raise JobError("the embedded proxy stopped during the job; --resume continues it")
        return job.result()
    finally:
        waiter.cancel()
        proxy.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await proxy


def _progress(mode: str) -> tuple[Callable[[Progress], None] | None, Callable[[], None]]:
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "log"
    if mode == "none":
        return None, lambda: None
    if mode == "bar":
        from tqdm import tqdm

        bar = tqdm(unit="rows", unit_scale=True, dynamic_ncols=True, file=sys.stderr)

        def update(progress: Progress) -> None:
            if progress.rows_total is not None and bar.total != progress.rows_total:
                bar.total = progress.rows_total
            bar.set_postfix(failed=progress.rows_failed, refresh=False)
            bar.update(progress.rows_done - bar.n)

        return update, bar.close
    next_line = [LOG_EVERY_ROWS]
    began = time.perf_counter()

    def line(progress: Progress) -> None:
        if progress.rows_done >= next_line[0] or progress.rows_done == progress.rows_total:
            total = f"/{progress.rows_total}" if progress.rows_total is not None else ""
            rate = progress.rows_done / max(time.perf_counter() - began, 1e-9)
            log.info("%d%s rows done, %d failed, %.0f rows/s (this run)", progress.rows_done, total,
                     progress.rows_failed, rate)
            next_line[0] = (progress.rows_done // LOG_EVERY_ROWS + 1) * LOG_EVERY_ROWS

    return line, lambda: None
