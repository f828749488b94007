"""`crosslogic` command line: `up` (whole stack), `serve <service>` (one process), admin commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from crosslogic.runtime.state import DEFAULT_STATE_DIR


def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host or "127.0.0.1", int(port)


def _run_service(make: Callable[[], Awaitable[None]]) -> int:
    """Runs one service until SIGTERM/SIGINT, then lets it shut down in order."""

    async def main() -> None:
        task = asyncio.ensure_future(make())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    try:
        import uvloop  # a faster event loop where available: the services' hot paths are loop-bound
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
    return 0


def _serve(args: argparse.Namespace) -> int:
    from crosslogic.settings import Settings

    settings = Settings()
    if args.service == "authz":
        from crosslogic.extauthz.service import serve_authz

        return _run_service(lambda: serve_authz(settings, args.listen, args.release_listen))
    if args.service == "ratelimit":
        from crosslogic.ratelimit.service import serve_ratelimit

        return _run_service(lambda: serve_ratelimit(settings, args.listen))
    if args.service == "accounting":
        from crosslogic.accounting.sink import serve_accounting

        return _run_service(lambda: serve_accounting(settings, args.listen))
    if args.service == "api":
        from crosslogic.api.service import serve_api

        host, port = _split_listen(args.listen)
        return _run_service(lambda: serve_api(settings, host, port))
    if args.service == "xds":
        from crosslogic.xds.model import GatewaySettings, client_bounds
        from crosslogic.xds.service import serve_xds

        gateway = GatewaySettings(listen_host=args.gateway_host, listen_port=args.gateway_port,
                                  max_request_bytes=settings.max_request_bytes,
                                  usage_log_path=settings.usage_log_path,
                                  admission=args.admission or settings.admission,
                                  **client_bounds(settings))
        return _run_service(lambda: serve_xds(settings.require_database(), args.listen, gateway,
                                              nodeagent_listen=args.nodeagent_listen))
    raise SystemExit(f"unknown service {args.service}")


def _up(args: argparse.Namespace) -> int:
    from crosslogic.runtime.supervisor import UpOptions, run_up

    return run_up(UpOptions(state_dir=Path(args.state_dir), host=args.host, port=args.port, demo=args.demo,
                            ready_file=Path(args.ready_file) if args.ready_file else None))


def _migrate(args: argparse.Namespace) -> int:
    from crosslogic.runtime.state import resolve_settings
    from crosslogic.store.db import migrate

    settings = resolve_settings(Path(args.state_dir))
    applied = asyncio.run(migrate(settings.require_database()))
    print("applied: " + (", ".join(applied) if applied else "nothing (schema is current)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crosslogic", description="CrossLogic inference control plane")
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR),
                        help="where `up` keeps data, logs and runtime.json (default: .state)")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole stack on this machine in the foreground")
    up.add_argument("--demo", action="store_true", help="add two simulated vLLM nodes and a demo org/key")
    up.add_argument("--host", default="127.0.0.1", help="gateway listen address")
    up.add_argument("--port", type=int, default=8080, help="gateway listen port")
    up.add_argument("--ready-file", help="write connection details as JSON here once everything answers")
    up.set_defaults(handler=_up)

    serve = sub.add_parser("serve", help="run one control-plane service")
    serve.add_argument("service", choices=["authz", "ratelimit", "accounting", "api", "xds"])
    serve.add_argument("--listen", required=True, help="host:port")
    serve.add_argument("--gateway-host", default="127.0.0.1", help="xds: the gateway listener address")
    serve.add_argument("--gateway-port", type=int, default=8080, help="xds: the gateway listener port")
    serve.add_argument("--admission", choices=["authz", "rls"],
                       help="xds: where rate-limit admission happens (default: CROSSLOGIC_ADMISSION, else authz)")
    serve.add_argument("--release-listen",
                       help="authz: also serve POST /release (concurrency leases freed as a response ends), host:port")
    serve.add_argument("--nodeagent-listen", help="xds: also serve the NodeAgent API to node agents (host:port)")
    serve.set_defaults(handler=_serve)

    mig = sub.add_parser("migrate", help="apply database migrations")
    mig.set_defaults(handler=_migrate)

    from crosslogic.agent import cli as agent_cli

    agent_cli.register(sub)
    from crosslogic.xds import policy_cli

    policy_cli.register(sub)
    try:
        from crosslogic import admin_cli
    except ImportError:  # pragma: no cover - only while the admin commands are being written
        admin_cli = None
    if admin_cli is not None:
        admin_cli.register(sub)
    from crosslogic import billing_cli, limits_cli

    billing_cli.register(sub)
    limits_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
