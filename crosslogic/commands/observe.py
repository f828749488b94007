"""`crosslogic observe health|scrape-config`: the running stack's operator endpoints (docs/observability.md).

Found through runtime.json (`ports`), like the admin commands; nothing but the standard library, so it works on
any install. `health` asks every service's /readyz (exit 1 if one is not ready); `scrape-config` prints a
Prometheus scrape configuration for this stack (one job per service, Envoy's stats listener included).
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path

# runtime.json port -> (Prometheus job, metrics path); the fleet serves its endpoints on its listen port.
TARGETS = {"authz_metrics": ("crosslogic-authz", "/metrics"),
           "ratelimit_metrics": ("crosslogic-ratelimit", "/metrics"),
           "accounting_metrics": ("crosslogic-accounting", "/metrics"),
           "api_metrics": ("crosslogic-api", "/metrics"), "xds_metrics": ("crosslogic-xds", "/metrics"),
           "fleet": ("crosslogic-fleet", "/metrics"), "supervisor_metrics": ("crosslogic-supervisor", "/metrics"),
           "envoy_stats": ("envoy", "/stats/prometheus")}


def targets(runtime: dict) -> dict[str, tuple[str, str]]:
    """job -> (host:port, metrics path) of every operator endpoint this stack runs."""
    ports = runtime.get("ports", {})
    found = {}
    for port_name, (job, path) in TARGETS.items():
        if port_name == "ratelimit_metrics" and runtime.get("admission") != "rls":
            continue  # `serve ratelimit` runs only with admission "rls"
        if ports.get(port_name):
            found[job] = (f"127.0.0.1:{ports[port_name]}", path)
    return found


def _readyz(address: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError as exc:
        return 0, {"status": f"unreachable ({exc})"}


def _runtime(args: argparse.Namespace) -> dict:
    from crosslogic.runtime.state import read_runtime

    runtime = read_runtime(Path(args.state_dir))
    if not runtime:
        raise SystemExit(f"crosslogic: error: no running stack in {args.state_dir} (runtime.json)")
    return runtime


def _health(args: argparse.Namespace) -> int:
    report = {}
    for job, (address, _) in targets(_runtime(args)).items():
        if job == "envoy":
            continue  # Envoy's readiness is the supervisor's `envoy` check
        status, body = _readyz(address)
        report[job] = {"ready": status == 200, "status": body.get("status", ""),
                       "checks": body.get("checks", {})}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for job, entry in report.items():
            failing = [f"{name}: {c['detail']}" for name, c in entry["checks"].items() if not c["ok"]]
            print(f"{job:24} {'ready' if entry['ready'] else 'NOT READY'}"
                  + (f"  ({'; '.join(failing) or entry['status']})" if not entry["ready"] else ""))
    return 0 if all(entry["ready"] for entry in report.values()) else 1


def _scrape_config(args: argparse.Namespace) -> int:
    lines = ["# Prometheus scrape configuration of this stack (crosslogic observe scrape-config).",
             "# Alert rules: deploy/prometheus/crosslogic-alerts.yaml; dashboards: deploy/grafana/*.json.",
             "scrape_configs:"]
    for job, (address, path) in targets(_runtime(args)).items():
        lines += [f"- job_name: {job}", f"  metrics_path: {path}", f"  static_configs: [{{targets: ['{address}']}}]"]
    print("\n".join(lines))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    observe = sub.add_parser("observe", help="the running stack's health and metrics endpoints",
                             description="Readiness of every service and a Prometheus scrape configuration, "
                             "from runtime.json")
    commands = observe.add_subparsers(dest="observe_command", required=True, metavar="COMMAND")
    health = commands.add_parser("health", help="every service's /readyz (exit 1 if one is not ready)")
    health.set_defaults(handler=_health)
    scrape = commands.add_parser("scrape-config", help="print a Prometheus scrape configuration for this stack")
    scrape.set_defaults(handler=_scrape_config)
