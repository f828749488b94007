"""deploy/kubernetes: every manifest is valid against the Kubernetes schemas, the gateway's bootstrap is valid for
Envoy itself, every command line parses with the real CLI, and every tier has its probes, disruption budget and
autoscaler; the readiness probe checks what it claims to."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from crosslogic.commands import build_parser
from crosslogic.runtime.envoy import envoy_binary
from crosslogic.runtime.processes import free_port
from tests.conftest import repo_root

DEPLOY = repo_root() / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # the oldest release we support; the schemas of newer ones accept these too


def _documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(DEPLOY.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _of_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in _documents() if doc["kind"] == kind}


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, kubernetes_validate.latest_version()])
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version):
    documents = _documents()
    assert len(documents) > 20
    for name, doc in documents:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_the_kustomization_applies_every_manifest():
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def test_envoy_accepts_the_gateway_bootstrap_without_deprecated_fields(tmp_path):
    bootstrap = tmp_path / "bootstrap.yaml"
    bootstrap.write_text(_of_kind("ConfigMap")["crosslogic-envoy-bootstrap"]["data"]["bootstrap.yaml"])
    result = subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(bootstrap), "--service-node", "g"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Deprecated field" not in result.stderr


def _containers() -> list[tuple[str, dict]]:
    out = []
    for kind in ("Deployment", "Job"):
        for name, doc in _of_kind(kind).items():
            out += [(name, c) for c in doc["spec"]["template"]["spec"]["containers"]]
    return out


def test_every_crosslogic_command_line_and_probe_parses_with_the_real_parsers():
    from crosslogic.runtime import probe

    parser = build_parser()
    commands = 0
    for name, container in _containers():
        assert container["image"] == "crosslogic", name  # one image for everything
        if "command" not in container:  # the image's entrypoint: `crosslogic`
            parser.parse_args(container["args"])
            commands += 1
        for kind in ("readinessProbe", "livenessProbe"):
            command = container.get(kind, {}).get("exec", {}).get("command")
            if command and command[:3] == ["python", "-m", "crosslogic.runtime.probe"]:
                probe.build_parser().parse_args(command[3:])
    assert commands >= 6


def test_every_tier_has_probes_a_disruption_budget_and_its_envoy_cluster_matches_its_service():
    deployments, budgets = _of_kind("Deployment"), _of_kind("PodDisruptionBudget")
    autoscalers, services = _of_kind("HorizontalPodAutoscaler"), _of_kind("Service")
    bootstrap = yaml.safe_load(_of_kind("ConfigMap")["crosslogic-envoy-bootstrap"]["data"]["bootstrap.yaml"])
    targets = {}
    for cluster in bootstrap["static_resources"]["clusters"]:
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        targets[address["socket_address"]["address"]] = address["socket_address"]["port_value"]
        assert "health_checks" in cluster and "outlier_detection" in cluster, cluster["name"]
    for name, deployment in deployments.items():
        labels = deployment["spec"]["selector"]["matchLabels"]
        assert deployment["spec"]["replicas"] >= 2, name  # no single replica of anything
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert "readinessProbe" in container and "livenessProbe" in container, (name, container["name"])
            assert container["resources"]["requests"]["cpu"], name
        assert any(b["spec"]["selector"]["matchLabels"] == labels for b in budgets.values()), name
        if name != "crosslogic-fleet":
            assert any(a["spec"]["scaleTargetRef"]["name"] == name for a in autoscalers.values()), name
        if name in targets:  # a control-plane tier Envoy reaches through its headless Service
            service = services[name]
            assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == labels
            assert targets[name] in {p["port"] for p in service["spec"]["ports"]}


def _probe(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crosslogic.runtime.probe", *argv], capture_output=True, text=True,
                          timeout=30, env={**os.environ, **env}, cwd=Path(repo_root()))


def test_the_readiness_probe_fails_while_the_port_or_a_store_does_not_answer(database_url, valkey_url):
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = str(listener.getsockname()[1])
    stores = {"CROSSLOGIC_DATABASE_URL": database_url, "CROSSLOGIC_REDIS_URL": valkey_url}
    try:
        assert _probe("--port", port, "--postgres", "--redis", env=stores).returncode == 0
        dead_redis = {**stores, "CROSSLOGIC_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
        refused = _probe("--port", port, "--postgres", "--redis", env=dead_redis)
        assert refused.returncode == 1 and "not ready" in refused.stderr
        assert _probe("--port", port, "--postgres", env=dead_redis).returncode == 0  # redis not asked for
    finally:
        listener.close()
    assert _probe("--port", port, env=stores).returncode == 1  # nothing listens any more


@pytest.mark.skipif(not __import__("shutil").which("kubectl"), reason="kubectl is not installed")
def test_kubectl_kustomize_renders_the_whole_set_and_it_stays_valid():
    rendered = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60,
                              check=True).stdout
    documents = [doc for doc in yaml.safe_load_all(rendered) if doc]
    assert len(documents) == len(_documents())
    for doc in documents:
        assert doc["metadata"].get("namespace", "crosslogic") == "crosslogic"
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
