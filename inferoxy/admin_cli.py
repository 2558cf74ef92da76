"""``inferoxy models ...``: the model registry from a shell, through the admin API (docs/ADMIN.md).

Exit codes are fixed so scripts can branch on them:

====  ===========================================================
0     done
1     any other failure (the proxy answered with an unexpected error)
2     usage error (bad arguments, unreadable spec file)
3     no such model or version (HTTP 404)
4     refused: missing or wrong admin key (HTTP 401/403)
5     invalid spec or patch, or the model exists already (HTTP 400/409/422)
6     the proxy is unreachable (connection refused, timeout)
7     the proxy is up but its registry (Redis) is unreachable (HTTP 503)
====  ===========================================================
"""

from __future__ import annotations

import argparse
import os
import shlex
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import yaml

from model_manager.editing import SpecError, assignments_to_patch
from model_manager.models_file import ModelsFileError, parse_models

OK, FAILED, USAGE, NOT_FOUND, REFUSED, INVALID, UNREACHABLE, REGISTRY_DOWN = range(8)
DEFAULT_URL = "http://127.0.0.1:8698"
_STATUS_EXIT = {404: NOT_FOUND, 401: REFUSED, 403: REFUSED, 400: INVALID, 409: INVALID, 422: INVALID,
                503: REGISTRY_DOWN}


class CliError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def add_connection_options(parser: Any) -> None:
    """How an admin command reaches the proxy: address, key, timeout and TLS (shared by `models` and `keys`)."""
    parser.add_argument("--url", default=os.environ.get("INFEROXY_ADMIN_URL", DEFAULT_URL),
                        help=f"the proxy's REST address (INFEROXY_ADMIN_URL, default {DEFAULT_URL})")
    parser.add_argument("--key", default=os.environ.get("INFEROXY_ADMIN_KEY"),
                        help="the admin key, or an API key with the admin scope (INFEROXY_ADMIN_KEY)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the proxy")
    parser.add_argument("--cacert", default=os.environ.get("INFEROXY_CA_FILE"),
                        help="PEM CA bundle that verifies an https proxy (INFEROXY_CA_FILE; default: the system's)")
    parser.add_argument("--cert", default=os.environ.get("INFEROXY_CLIENT_CERT_FILE"),
                        help="PEM client certificate, for a proxy that requires one (INFEROXY_CLIENT_CERT_FILE)")
    parser.add_argument("--cert-key", default=os.environ.get("INFEROXY_CLIENT_KEY_FILE"),
                        help="the client certificate's PEM key, unless in --cert (INFEROXY_CLIENT_KEY_FILE)")


def connect(args: argparse.Namespace) -> AdminClient:
    """The admin API client that ``add_connection_options``' arguments describe."""
    return AdminClient(args.url, args.key, args.timeout, tls_context(args.cacert, args.cert, args.cert_key))


def add_models_parser(commands: Any) -> None:
    """Add ``models`` and its subcommands to the ``inferoxy`` parser."""
    models = commands.add_parser("models", help="list, add, change and remove models through the admin API")
    add_connection_options(models)
    sub = models.add_subparsers(dest="models_command", required=True)

    listing = sub.add_parser("list", help="every model version, its state and replicas")
    listing.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")

    show = sub.add_parser("show", help="one model's specs (YAML)")
    show.add_argument("name")
    show.add_argument("--version", help="only this version")

    add = sub.add_parser("add", help="register models from a spec file (one spec, or a models.yaml)")
    add.add_argument("-f", "--file", required=True, help="YAML or JSON; '-' reads standard input")
    add.add_argument("--replace", action="store_true", help="replace versions that exist already")
    add.add_argument("--default", action="store_true", help="make the added version the default")

    edit = sub.add_parser("edit", help="change a model: in $EDITOR, or with --set field=value")
    edit.add_argument("name")
    edit.add_argument("--version", help="the version to change (default: the default version)")
    edit.add_argument("--set", dest="assignments", action="append", default=[], metavar="FIELD=VALUE",
                      help="set a field (YAML value; env.KEY=value for one variable); repeatable")

    rm = sub.add_parser("rm", help="remove a model (every version) or one version")
    rm.add_argument("name")
    rm.add_argument("--version")

    for verb, text in (("load", "serve the model again (its replicas start)"),
                       ("unload", "stop serving the model (its replicas stop; the spec stays)")):
        command = sub.add_parser(verb, help=text)
        command.add_argument("name")
        command.add_argument("--version", help="only this version (default: all)")

    default = sub.add_parser("default", help="make VERSION the version served when a request names none")
    default.add_argument("name")
    default.add_argument("version")


def run_models(args: argparse.Namespace) -> int:
    return run_admin_command(args, "models", COMMANDS[args.models_command])


def run_admin_command(args: argparse.Namespace, group: str,
                      command: Callable[[AdminClient, argparse.Namespace], int]) -> int:
    """Run one admin CLI command against the proxy; a failure is one line on stderr and its exit code."""
    try:
        with connect(args) as client:
            return command(client, args)
    except CliError as exc:
        print(f"inferoxy {group}: {exc}", file=sys.stderr)
        return exc.code


class AdminClient:
    """The admin API over httpx, turning failures into ``CliError`` with the right exit code."""

    def __init__(self, url: str, key: str | None, timeout: float, tls: ssl.SSLContext | None = None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        # JSON bodies only and no browser headers: what the admin API requires (docs/ADMIN.md, Access).
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                 verify=tls if tls is not None else True)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def call(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None,
             headers: dict[str, str] | None = None) -> Any:
        try:
            response = self.http.request(method, path, json=body, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise CliError(UNREACHABLE, f"cannot reach the proxy at {self.url}: {exc}") from None
        if response.is_success:
            return response.json()
        try:
            payload = response.json()
        except ValueError:
            payload = {"error": response.text}
        message = payload.get("error", response.text) if isinstance(payload, dict) else str(payload)
        for problem in payload.get("fields", []) if isinstance(payload, dict) else []:
            message += f"\n  {problem.get('field') or 'spec'}: {problem.get('reason')}"
        raise CliError(_STATUS_EXIT.get(response.status_code, FAILED), f"{message} (HTTP {response.status_code})")


def tls_context(cafile: str | None, certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    """The context that verifies an https proxy (and presents a client certificate); None: the system's CAs."""
    if not (cafile or certfile):
        return None
    try:
        context = ssl.create_default_context(cafile=cafile)
        if certfile:
            context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise CliError(USAGE, f"cannot use the TLS files: {exc}") from None
    return context


# Characters of a model's description the list shows.
DESCRIPTION_WIDTH = 48

# -- commands -------------------------------------------------------------------------------------


def cmd_list(client: AdminClient, args: argparse.Namespace) -> int:
    listing = client.call("GET", "/v2/admin/models")
    if args.json:
        print(_dump_json(listing))
        return OK
    header = ("NAME", "VERSION", "DEFAULT", "LOADED", "STATE", "REPLICAS", "BATCH", "RUNS", "FRAMEWORK", "DESCRIPTION")
    rows = [
        (
            m["name"], m["version"], "*" if m["default"] else "", "yes" if m["loaded"] else "no",
            m["state"] or "-",
            f"{'-' if m['ready_replicas'] is None else m['ready_replicas']}/{m['min_replicas']}..{m['max_replicas']}",
            str(m["max_batch_size"]), m["image"] or m["model_class"] or "(command)",
            # .get: a proxy older than the metadata fields lists none.
            m.get("framework") or "-", _first_line(m.get("description")),
        )
        for m in listing["models"]
    ]
    print(_table(header, rows))
    return OK


def _first_line(text: str | None, width: int = DESCRIPTION_WIDTH) -> str:
    """A description in a table cell: its first line, cut to ``width`` (``show`` prints it whole)."""
    line = (text or "-").splitlines()[0] if (text or "").strip() else "-"
    return line if len(line) <= width else line[: width - 3] + "..."


def cmd_show(client: AdminClient, args: argparse.Namespace) -> int:
    if args.version:
        print(_dump_yaml(client.call("GET", f"/v2/admin/models/{args.name}/versions/{args.version}")), end="")
        return OK
    model = client.call("GET", f"/v2/admin/models/{args.name}")
    print(f"# {model['name']}: default version {model['default_version']}")
    for entry in model["versions"]:
        status = entry["status"] or {}
        print(f"# version {entry['spec']['version']}: {'loaded' if entry['loaded'] else 'unloaded'}, "
              f"state {status.get('state', 'unknown')}")
        print("---")
        print(_dump_yaml(entry["spec"]), end="")
    return OK


def cmd_add(client: AdminClient, args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()  # noqa: SIM115
        document = yaml.safe_load(text)
        # One spec (it has a name) or a whole models.yaml, new style or legacy.
        is_single = isinstance(document, dict) and isinstance(document.get("name"), str) and "models" not in document
        specs = [document] if is_single else [s.model_dump(mode="json", exclude_unset=True)
                                               for s in parse_models(document, source=args.file)]
    except (OSError, yaml.YAMLError, ModelsFileError) as exc:
        raise CliError(USAGE, f"cannot use {args.file}: {exc}") from None
    params = {"default": "true"} if args.default else None
    for spec in specs:
        if args.replace:
            name, version = spec.get("name"), str(spec.get("version", "1"))
            client.call("PUT", f"/v2/admin/models/{name}/versions/{version}", spec, params)
        else:
            client.call("POST", "/v2/admin/models", spec, params)
        print(f"added {spec.get('name')}/{spec.get('version', '1')}")
    return OK


def cmd_edit(client: AdminClient, args: argparse.Namespace) -> int:
    if args.assignments:
        try:
            patch = assignments_to_patch(args.assignments)
        except SpecError as exc:
            raise CliError(USAGE, str(exc)) from None
        result = client.call("PATCH", _model_path(args.name, args.version), patch)
        print(f"changed {result['spec']['name']}/{result['spec']['version']} (revision {result['revision']})")
        return OK
    version = args.version or client.call("GET", f"/v2/admin/models/{args.name}")["default_version"]
    current = client.call("GET", f"/v2/admin/models/{args.name}/versions/{version}")
    edited = _edit_in_editor(_dump_yaml(current))
    try:
        document = yaml.safe_load(edited)
    except yaml.YAMLError as exc:
        raise CliError(INVALID, f"the edited spec is not YAML: {exc}") from None
    if document == current:
        print("no change")
        return OK
    result = client.call("PUT", f"/v2/admin/models/{args.name}/versions/{version}", document)
    print(f"changed {args.name}/{version} (revision {result['revision']})")
    return OK


def cmd_rm(client: AdminClient, args: argparse.Namespace) -> int:
    result = client.call("DELETE", _model_path(args.name, args.version))
    print(f"removed {result['deleted']}")
    return OK


def cmd_load(client: AdminClient, args: argparse.Namespace) -> int:
    body = {"parameters": {"version": args.version}} if args.version else {}
    result = client.call("POST", f"/v2/repository/models/{args.name}/load", body)
    print("loaded " + ", ".join(result["loaded"]))
    return OK


def cmd_unload(client: AdminClient, args: argparse.Namespace) -> int:
    body = {"parameters": {"version": args.version}} if args.version else {}
    result = client.call("POST", f"/v2/repository/models/{args.name}/unload", body)
    print("unloaded " + ", ".join(result["unloaded"]))
    return OK


def cmd_default(client: AdminClient, args: argparse.Namespace) -> int:
    client.call("PUT", f"/v2/admin/models/{args.name}/default", {"version": args.version})
    print(f"{args.name}: default version {args.version}")
    return OK


COMMANDS = {"list": cmd_list, "show": cmd_show, "add": cmd_add, "edit": cmd_edit, "rm": cmd_rm,
            "load": cmd_load, "unload": cmd_unload, "default": cmd_default}


# -- formatting -----------------------------------------------------------------------------------


def _model_path(name: str, version: str | None) -> str:
    return f"/v2/admin/models/{name}" + (f"/versions/{version}" if version else "")


def _edit_in_editor(text: str) -> str:
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    with tempfile.NamedTemporaryFile("w+", suffix=".yaml", delete=False) as handle:
        handle.write(text)
        path = handle.name
    try:
        if subprocess.call([*shlex.split(editor), path]) != 0:
            raise CliError(FAILED, f"{editor} exited with an error; nothing was changed")
        with open(path, encoding="utf-8") as edited:
            return edited.read()
    finally:
        os.unlink(path)


def _dump_yaml(document: Any) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=None)


def _dump_json(document: Any) -> str:
    import json

    return json.dumps(document, indent=2)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in (header, *rows)]
    return "\n".join(lines)
