"""The SkyPilot provider: one SkyPilot cluster (one VM) per node, through SkyPilot's Python SDK
(`pip install 'crosslogic[skypilot]'`). No cloud is reachable from this project's machines: `build_task` is tested
against SkyPilot's own task schema validation (tests/test_fleet_skypilot.py); the calls that reach a cloud
(`sky.launch`, `sky.down`, `sky.status`) stay behind the Provider interface. The manual check with real
credentials is in docs/fleet.md.

The task: `resources` (accelerators, use_spot, infra = cloud[/region]), a `setup` that installs the engine and the
agent, and a `run` that writes the node certificate (passed as SkyPilot secrets, never in the task's envs or logs)
and starts `crosslogic agent` supervising the engine command. The cluster is named after the node, so launch,
down and status are idempotent by name.
"""

from __future__ import annotations

import asyncio
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crosslogic import pki
from crosslogic.fleet.provider import CapacityUnavailable, LaunchFailed, Machine, NodeSpec

ENGINE_PORT = 8000
# What the setup installs per engine (pinned by the operator's image in production; these are the PyPI names).
ENGINE_PACKAGES = {"vllm": "vllm", "sglang": "sglang[all]"}
SPOT_NOTICE_URLS = {
    "aws": ("--aws-spot-url", "http://169.254.169.254/latest/meta-data/spot/instance-action"),
    "gcp": ("--gcp-spot-url", "http://metadata.google.internal/computeMetadata/v1/instance/preempted"),
    "azure": ("--azure-spot-url", "http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01"),
}
TLS_DIR = "~/.crosslogic/tls"


def engine_command(spec: NodeSpec) -> str:
    if spec.engine == "sglang":
        return shlex.join(["python", "-m", "sglang.launch_server", "--model-path", spec.model, "--served-model-name",
                           spec.model, "--host", "0.0.0.0", "--port", str(ENGINE_PORT), "--enable-metrics"])
    return shlex.join(["vllm", "serve", spec.model, "--served-model-name", spec.model, "--host", "0.0.0.0",
                       "--port", str(ENGINE_PORT)])


def setup_script(spec: NodeSpec, install: str) -> str:
    return "\n".join([
        "set -eu",
        f"python -m pip install --upgrade {shlex.quote(ENGINE_PACKAGES[spec.engine])} {shlex.quote(install)}",
    ])


def run_script(spec: NodeSpec, control_plane: str) -> str:
    """Writes the node certificate from the secrets, then runs the agent in the foreground (SkyPilot's job)."""
    agent = ["crosslogic", "agent", "--control-plane", control_plane, "--name", spec.name, "--region", spec.region,
             "--model", spec.model, "--cloud", spec.cloud, "--gpu-type", spec.gpu_type,
             "--engine-url", f"http://127.0.0.1:{ENGINE_PORT}", "--engine-command", engine_command(spec),
             "--tls-dir", TLS_DIR]
    if spec.spot:
        agent.append("--spot")
        if spec.cloud in SPOT_NOTICE_URLS:
            agent += list(SPOT_NOTICE_URLS[spec.cloud])
    if spec.model_version:
        agent += ["--model-version", spec.model_version]
    return "\n".join([
        "set -eu",
        f"mkdir -p {TLS_DIR} && chmod 700 {TLS_DIR}",
        f'printf %s "$CLNODE_TLS_CERT" > {TLS_DIR}/node.pem',
        f'printf %s "$CLNODE_TLS_KEY" > {TLS_DIR}/node.key && chmod 600 {TLS_DIR}/node.key',
        f'printf %s "$CLNODE_TLS_CA" > {TLS_DIR}/ca.pem',
        # The address Envoy reaches: the VM's private address (a tailnet address where the image joins one).
        f"exec {shlex.join(agent)} --advertise \"$(hostname -I | cut -d' ' -f1):{ENGINE_PORT}\"",
    ])


def task_config(spec: NodeSpec, control_plane: str, install: str, secrets: dict[str, str]) -> dict[str, Any]:
    """The task as SkyPilot's YAML config (what `sky.Task.from_yaml_config` validates against its schema)."""
    infra = spec.cloud + (f"/{spec.cloud_region}" if spec.cloud_region else "")
    return {
        "name": spec.name,
        "resources": {"infra": infra, "accelerators": spec.accelerators, "use_spot": spec.spot,
                      "ports": [ENGINE_PORT]},
        "envs": {"CLNODE_NAME": spec.name},
        "secrets": secrets,
        "setup": setup_script(spec, install),
        "run": run_script(spec, control_plane),
    }


@dataclass
class SkyPilotProvider:
    control_plane: str
    pki_dir: Path
    install: str = "crosslogic[agent]"
    name: str = "skypilot"

    def secrets(self, spec: NodeSpec) -> dict[str, str]:
        issued = pki.issue_node(pki.load_ca(self.pki_dir), spec.name, f"pool:{spec.cloud}")
        return {"CLNODE_TLS_CERT": issued.cert_pem.decode(), "CLNODE_TLS_KEY": issued.key_pem.decode(),
                "CLNODE_TLS_CA": (self.pki_dir / pki.CA_CERT).read_text()}

    def build_task(self, spec: NodeSpec):
        import sky

        return sky.Task.from_yaml_config(task_config(spec, self.control_plane, self.install, self.secrets(spec)))

    async def launch(self, spec: NodeSpec) -> Machine:
        import sky
        from sky import exceptions

        task = self.build_task(spec)

        def launch_and_wait():
            # down=True: the cluster is torn down when its job (the agent) ends, so a node that stops is not billed.
            return sky.stream_and_get(sky.launch(task, cluster_name=spec.name, down=True, retry_until_up=False))

        try:
            _job_id, handle = await asyncio.to_thread(launch_and_wait)
        except exceptions.ResourcesUnavailableError as exc:
            raise CapacityUnavailable(str(exc)) from None
        except Exception as exc:  # SkyPilot raises many kinds (credentials, quota, provisioning): all are retried
            raise LaunchFailed(f"{type(exc).__name__}: {exc}") from None
        price = None
        resources = getattr(handle, "launched_resources", None)
        if resources is not None:
            try:
                price = round(resources.get_cost(3600) * 1_000_000)
            except Exception:  # no catalogue entry: FinOps falls back to gpu_prices
                price = None
        return Machine(spec.name, spec.name, "up", spec.spot, price)

    async def terminate(self, name: str) -> None:
        import sky
        from sky import exceptions

        try:
            await asyncio.to_thread(lambda: sky.get(sky.down(name)))
        except exceptions.ClusterDoesNotExist:
            return

    async def list(self) -> list[Machine]:
        import sky

        records = await asyncio.to_thread(lambda: sky.get(sky.status()))
        machines = []
        for record in records:
            get = record.get if isinstance(record, dict) else lambda k, r=record: getattr(r, k, None)
            status = str(get("status") or "")
            resources = get("handle") and getattr(get("handle"), "launched_resources", None)
            machines.append(Machine(str(get("name")), str(get("name")), "up" if status.endswith("UP") else "launching",
                                    bool(resources and resources.use_spot)))
        return machines

    def price(self, spec: NodeSpec) -> int | None:
        """The catalogue's cheapest hourly price for the accelerators (SkyPilot's own catalogue, fetched by SkyPilot
        when it is first needed); None when it cannot say (offline: FinOps uses gpu_prices)."""
        try:
            from sky import catalog

            name, _, count = spec.accelerators.partition(":")
            instance_types, _ = catalog.get_instance_type_for_accelerator(
                name, int(count or 1), use_spot=spec.spot, region=spec.cloud_region or None, clouds=spec.cloud)
            if not instance_types:
                return None
            cost = catalog.get_hourly_cost(instance_types[0], spec.spot, spec.cloud_region or None, None,
                                           clouds=spec.cloud)
            return round(cost * 1_000_000)
        except Exception:
            return None
