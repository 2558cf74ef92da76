"""``inferoxy keys ...``: API keys from a shell, through the admin API (docs/ADMIN.md, "API keys").

``create`` prints the new key once, alone on the last line of its output, so a script can take
it with ``tail -n 1``; nothing else ever shows it. Exit codes are ``inferoxy models``'s.
"""

from __future__ import annotations

import argparse
from typing import Any

from inferoxy.admin_cli import OK, USAGE, AdminClient, CliError, _table, add_connection_options, run_admin_command


def add_keys_parser(commands: Any) -> None:
    """Add ``keys`` and its subcommands to the ``inferoxy`` parser."""
    keys = commands.add_parser("keys", help="create, list and revoke API keys through the admin API")
    add_connection_options(keys)
    sub = keys.add_subparsers(dest="keys_command", required=True)

    create = sub.add_parser("create", help="make a key; it is printed once, alone on the last line")
    create.add_argument("name")
    create.add_argument("--scopes", default="infer", help="infer, admin, or infer,admin (default infer)")
    create.add_argument("--models", help="comma-separated models the key may use (default: every model)")
    create.add_argument("--rate", type=float, help="requests per second, per bridge process (default: no limit)")
    create.add_argument("--burst", type=int, help="requests at once above the rate (default: one second's worth)")

    sub.add_parser("list", help="every key's name, scopes, models and limits (never the key itself)")
    revoke = sub.add_parser("revoke", help="revoke a key: every bridge refuses it within a second")
    revoke.add_argument("name")


def run_keys(args: argparse.Namespace) -> int:
    return run_admin_command(args, "keys", KEY_COMMANDS[args.keys_command])


def cmd_create(client: AdminClient, args: argparse.Namespace) -> int:
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    if args.models is not None and not models:
        raise CliError(USAGE, "--models names no model")
    body = {"name": args.name, "scopes": scopes, "models": models, "rate": args.rate, "burst": args.burst}
    created = client.call("POST", "/v2/admin/keys", body)
    print(f"created API key {created['name']}: {_describe(created)}")
    print("store it now; it is shown only this once:")
    print(created["key"])
    return OK


def cmd_list(client: AdminClient, args: argparse.Namespace) -> int:
    keys = client.call("GET", "/v2/admin/keys")["keys"]
    rows = [(k["name"], ",".join(k["scopes"]), ",".join(k["models"]) if k["models"] else "*", _limit(k))
            for k in keys]
    print(_table(("NAME", "SCOPES", "MODELS", "RATE"), rows))
    return OK


def cmd_revoke(client: AdminClient, args: argparse.Namespace) -> int:
    client.call("DELETE", f"/v2/admin/keys/{args.name}")
    print(f"revoked API key {args.name}")
    return OK


KEY_COMMANDS = {"create": cmd_create, "list": cmd_list, "revoke": cmd_revoke}


def _limit(key: dict[str, Any]) -> str:
    if key.get("rate") is None:
        return "-"
    burst = key.get("burst")
    return f"{key['rate']:g}/s" + (f" burst {burst}" if burst else "")


def _describe(key: dict[str, Any]) -> str:
    models = ", ".join(key["models"]) if key.get("models") else "every model"
    return f"scopes {','.join(key['scopes'])}; {models}; rate {_limit(key)}"
