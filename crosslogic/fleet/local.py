"""The local provider: a "machine" is a real `crosslogic agent` process supervising a simulated engine
(`python -m crosslogic.sim`, vLLM or SGLang persona) on this host, with its own node certificate from the
control plane's CA. The agent registers, heartbeats, reports load, warms up and drains exactly as on a GPU node;
only the engine is simulated (the one stand-in the project allows).

Spot notices come the way AWS sends them: each machine's agent polls an IMDS-style `spot/instance-action` URL
served here (404 until `evict()`), and the machine is killed outright `grace_s` later, as a cloud does.

`plan` injects what a cloud can do to a launch, one entry per launch in order: "ok", "no-register" (the machine
comes up but its agent cannot reach the control plane), "no-spot-capacity" (spot launches fail with
CapacityUnavailable), "fail" (LaunchFailed). Tests and the bench use it; the service runs with an empty plan.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from crosslogic import pki
from crosslogic.fleet.provider import CapacityUnavailable, LaunchFailed, Machine, NodeSpec
from crosslogic.runtime.processes import free_port

log = logging.getLogger("crosslogic.fleet.local")


@dataclass(frozen=True)
class LocalOptions:
    control_plane: str  # host:port of the NodeAgent API
    pki_dir: Path  # the control plane's CA (ca.pem, ca.key)
    workdir: Path  # per-machine certificates and logs
    heartbeat_interval_s: float = 1.0
    metrics_interval_s: float = 1.0
    sim_args: tuple[str, ...] = ()  # extra simulator flags (--ttft-ms, --tokens-per-sec, --max-num-seqs ...)
    agent_args: tuple[str, ...] = ()
    on_demand_microdollars_per_hour: int = 800_000
    spot_microdollars_per_hour: int = 300_000
    stop_timeout_s: float = 30.0


@dataclass
class _Running:
    spec: NodeSpec
    process: subprocess.Popen
    port: int
    log: object
    notice: dict | None = None


@dataclass
class LocalProvider:
    options: LocalOptions
    plan: deque[str] = field(default_factory=deque)
    name: str = "local"
    machines: dict[str, _Running] = field(default_factory=dict)
    launches: list[NodeSpec] = field(default_factory=list)  # every launch asked for, in order (tests, bench)
    _notices: web.AppRunner | None = None
    _notice_port: int = 0

    async def start(self) -> None:
        """Serves the spot-notice endpoints; call once before launching."""
        app = web.Application()
        app.router.add_get("/latest/meta-data/spot/instance-action/{name}", self._instance_action)
        self._notices = web.AppRunner(app, access_log=None)
        await self._notices.setup()
        self._notice_port = free_port()
        await web.TCPSite(self._notices, "127.0.0.1", self._notice_port).start()

    async def close(self) -> None:
        for name in list(self.machines):
            self._kill(name)
        if self._notices is not None:
            await self._notices.cleanup()

    async def _instance_action(self, request: web.Request) -> web.Response:
        running = self.machines.get(request.match_info["name"])
        if running is None or running.notice is None:
            return web.Response(status=404, text="Not Found")
        return web.json_response(running.notice)

    def price(self, spec: NodeSpec) -> int | None:
        return self.options.spot_microdollars_per_hour if spec.spot else self.options.on_demand_microdollars_per_hour

    async def launch(self, spec: NodeSpec) -> Machine:
        self.launches.append(spec)
        outcome = self.plan.popleft() if self.plan else "ok"
        if outcome == "fail":
            raise LaunchFailed("simulated launch failure")
        if outcome == "no-spot-capacity" and spec.spot:
            raise CapacityUnavailable(f"no spot capacity for {spec.accelerators} (simulated)")
        if spec.name in self.machines and self.machines[spec.name].process.poll() is None:
            running = self.machines[spec.name]
            return Machine(spec.name, str(running.process.pid), "up", spec.spot, self.price(spec))
        return await asyncio.to_thread(self._start, spec, outcome == "no-register")

    def _start(self, spec: NodeSpec, unreachable: bool) -> Machine:
        options = self.options
        tls = options.workdir / spec.name
        pki.write(tls, "node", pki.issue_node(pki.load_ca(options.pki_dir), spec.name, f"pool:{spec.cloud}"))
        (tls / "ca.pem").write_bytes((options.pki_dir / pki.CA_CERT).read_bytes())
        port = free_port()
        python = [sys.executable, "-P", "-m"]
        engine = [*python, "crosslogic.sim", "--host", "127.0.0.1", "--port", str(port), "--node-name", spec.name,
                  "--model", spec.model, "--engine", spec.engine, *options.sim_args]
        # A machine whose agent cannot reach the control plane (a broken image, a firewall): it never registers.
        control_plane = f"127.0.0.1:{free_port()}" if unreachable else options.control_plane
        argv = [*python, "crosslogic", "agent", "--control-plane", control_plane, "--name", spec.name,
                "--region", spec.region, "--model", spec.model, "--advertise", f"127.0.0.1:{port}",
                "--engine-command", shlex.join(engine), "--cloud", spec.cloud, "--gpu-type", spec.gpu_type,
                "--tls-dir", str(tls), "--heartbeat-interval", str(options.heartbeat_interval_s),
                "--metrics-interval", str(options.metrics_interval_s), "--spot-interval", "0.2",
                "--drain-timeout", str(options.stop_timeout_s),
                *(("--spot", "--aws-spot-url",
                   f"http://127.0.0.1:{self._notice_port}/latest/meta-data/spot/instance-action/{spec.name}")
                  if spec.spot else ()),
                *(("--model-version", spec.model_version) if spec.model_version else ()), *options.agent_args]
        options.workdir.mkdir(parents=True, exist_ok=True)
        out = open(options.workdir / f"{spec.name}.log", "ab")  # noqa: SIM115 - closed when the machine goes
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.machines[spec.name] = _Running(spec, process, port, out)
        log.info("launched local machine %s (pid %s, %s, engine %s on :%s)", spec.name, process.pid,
                 "spot" if spec.spot else "on-demand", spec.engine, port)
        return Machine(spec.name, str(process.pid), "up", spec.spot, self.price(spec))

    async def terminate(self, name: str) -> None:
        """SIGTERM to the agent (it drains, then stops its engine), SIGKILL to the machine after the timeout."""
        running = self.machines.get(name)
        if running is None:
            return
        if running.process.poll() is None:
            os.killpg(running.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(running.process.wait), self.options.stop_timeout_s)
            except TimeoutError:
                pass
        self._kill(name)

    def _kill(self, name: str) -> None:
        running = self.machines.pop(name, None)
        if running is None:
            return
        try:
            os.killpg(running.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        running.process.wait(10)
        running.log.close()

    async def list(self) -> list[Machine]:
        return [Machine(name, str(r.process.pid), "up" if r.process.poll() is None else "gone", r.spec.spot,
                        self.price(r.spec)) for name, r in self.machines.items()]

    async def evict(self, name: str, grace_s: float = 2.0) -> None:
        """A spot reclaim: the instance-action notice now, the machine killed without ceremony `grace_s` later
        (AWS gives two minutes; tests compress it)."""
        running = self.machines.get(name)
        if running is None:
            raise KeyError(name)
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + grace_s))
        running.notice = {"action": "terminate", "time": at}
        log.info("spot notice for %s: %s", name, json.dumps(running.notice))
        loop = asyncio.get_running_loop()
        loop.call_later(grace_s, self._kill, name)
