"""The ``inferoxy`` command."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import sys

from pydantic import ValidationError

from inferoxy.admin_cli import add_models_parser, run_models
from inferoxy.credentials import make_serve_secrets
from inferoxy.jobs_cli import add_jobs_parser, run_jobs
from inferoxy.keys_cli import add_keys_parser, run_keys
from inferoxy.logs import setup_logging
from inferoxy.runner import COMPONENTS, loop_factory, run_component, run_in_process
from inferoxy.settings import Settings, load_settings
from inferoxy.status_cli import add_status_parser, run_status
from inferoxy.supervisor import Supervisor, print_endpoints
from jobs.cli import add_batch_parser, run_batch_command
from model_manager.models_file import ModelsFileError, models_file_to_seed
from task_manager.runtimes.base import RuntimeStartError

log = logging.getLogger("inferoxy.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferoxy", description="Serve Dockerized models over REST, gRPC and ZeroMQ.")
    parser.add_argument("--config", help="YAML settings file (same as INFEROXY_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start every component on this machine")
    serve.add_argument("--models", help="models.yaml that seeds the registry (same as INFEROXY_MODELS_FILE)")
    serve.add_argument(
        "--in-process",
        action="store_true",
        help="run the components in one process (then inproc:// bus URLs work); replicas stay processes",
    )

    run = commands.add_parser("run", help="start one component alone (for separate containers or pods)")
    run.add_argument("component", choices=sorted(COMPONENTS))
    run.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        help="serve this component's Prometheus metrics on http://INFEROXY_BIND_HOST:N/metrics (no auth: "
             "keep it on loopback or a pod network)",
    )
    add_models_parser(commands)
    add_keys_parser(commands)
    add_jobs_parser(commands)
    add_status_parser(commands)
    add_batch_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models":  # a client of the admin API: needs no settings of its own
        return run_models(args)
    if args.command == "keys":
        return run_keys(args)
    if args.command == "jobs":
        return run_jobs(args)
    if args.command == "status":
        return run_status(args)
    # Children of `serve` read the same environment, so options become variables here.
    if args.config:
        os.environ["INFEROXY_CONFIG"] = os.path.abspath(args.config)
    if getattr(args, "models", None):
        os.environ["INFEROXY_MODELS_FILE"] = os.path.abspath(args.models)
    if args.command == "batch":  # a client of the ZeroMQ bridge (or of a proxy it embeds): its own settings
        return run_batch_command(args)
    try:
        settings = load_settings()
    except (ValidationError, FileNotFoundError) as exc:
        print(f"inferoxy: bad settings: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve" or args.component == "model_manager":
        try:  # the model manager refuses it too; checked here first to say so in one line, not a traceback
            models_file_to_seed(settings)
        except ModelsFileError as exc:
            print(f"inferoxy: {exc}", file=sys.stderr)
            return 2

    if args.command == "run":
        setup_logging(settings.log_level, args.component, settings.log_format)
        if settings.bus_curve and settings.bus_secret is None:
            print("inferoxy: a component run alone needs INFEROXY_BUS_SECRET, the same for every component "
                  "(or INFEROXY_BUS_CURVE=false to run the bus unauthenticated)", file=sys.stderr)
            return 2
        if args.metrics_port is not None:
            try:
                serve_component_metrics(settings.bind_host, args.metrics_port)
            except OSError as exc:
                print(f"inferoxy: cannot listen on the metrics port {args.metrics_port} of {settings.bind_host}: "
                      f"{exc}", file=sys.stderr)
                return 2
        try:
            with asyncio.Runner(loop_factory=loop_factory(args.component, settings)) as runner:
                runner.run(run_component(args.component, settings))
        except RuntimeStartError as exc:
            # A refusal to start (another live proxy owns the instance name, say): the message is the whole
            # story, and a traceback in front of it only hides what the operator must do.
            logging.getLogger("inferoxy").error("%s", exc)
            return 2
        return 0

    setup_logging(settings.log_level, "serve", settings.log_format)
    # Made once here, inherited by every component (and a restarted one), so siblings keep agreeing.
    os.environ.update(make_serve_secrets(settings))
    settings = load_settings()
    warn_if_exposed(settings)
    if not settings.redis_url:
        warn_registry_in_memory()
    if args.in_process:
        embedded = not settings.redis_url

        def on_ready(shared: Settings) -> None:
            print_endpoints(shared, embedded_redis=embedded)

        asyncio.run(run_in_process(settings, on_ready))
        return 0
    return Supervisor(settings).serve()


def serve_component_metrics(host: str, port: int) -> None:
    """This process's own metrics on http://host:port/metrics, from a thread of prometheus-client's (for a
    component run alone, scraped per pod; under ``serve`` the REST bridge's /metrics shows every component).
    Started before the component, so a port that is taken stops it at once rather than half-way up."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=host)


def warn_registry_in_memory() -> None:
    log.warning("the embedded Redis keeps the model registry in memory: models added through the admin API or "
                "`inferoxy models` are lost when Inferoxy stops (models.yaml seeds it again at each start); "
                "set INFEROXY_REDIS_URL to a Redis of your own to keep them")


def auth_is_off(settings: Settings) -> bool:
    """Whether a caller that reaches the bridges may need no credential. Only INFEROXY_AUTH=required promises one
    from the start: ``auto`` asks for keys once the first exists, which serve cannot know before Redis is read."""
    return settings.auth != "required"


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # any other name may resolve to an address other machines reach


def warn_if_exposed(settings: Settings) -> None:
    if is_loopback_host(settings.bind_host) or not auth_is_off(settings):
        return
    log.warning("the bridges listen on %s with INFEROXY_AUTH=%s: until an API key exists (auto), or at all (off), "
                "anyone who reaches ports %d (REST), %d (gRPC) and %d (ZeroMQ) may run inference; create keys "
                "with 'inferoxy keys create' and set INFEROXY_AUTH=required and INFEROXY_ADMIN_KEY "
                "(docs/SECURITY.md), or set INFEROXY_BIND_HOST=127.0.0.1", settings.bind_host, settings.auth,
                settings.rest_port, settings.grpc_port, settings.zmq_port)

if __name__ == "__main__":
    sys.exit(main())
