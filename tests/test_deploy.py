"""deploy/kubernetes: every manifest is valid against the Kubernetes schemas, the gateway's bootstrap is valid for
Envoy itself, every command line parses with the real CLI, and every tier has its probes, disruption budget and
autoscaler; the readiness probe checks what it claims to; internal mutual TLS is wired (each service mounts its own
certificate from the Secret `crosslogic pki issue-internal` makes, and Envoy loads its own from it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from crosslogic import pki
from crosslogic.commands import build_parser
from crosslogic.runtime import internal_tls
from crosslogic.runtime.envoy import _TLS_PEERS, envoy_binary
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


INTERNAL_TLS_MOUNT = "/etc/crosslogic/internal-tls"


def _issue_secret(tmp_path: Path) -> Path:
    """The Secret's files as docs/deploy.md makes them: `crosslogic pki issue-internal --secret-dir`."""
    secret = tmp_path / "secret"
    args = build_parser().parse_args(["pki", "issue-internal", "--dir", str(tmp_path / "ca"), "--secret-dir",
                                      str(secret), "--host", "crosslogic-authz"])
    assert args.handler(args) == 0
    return secret


def _gateway_config(tmp_path: Path, secret: Path, admin_port: int = 9901) -> Path:
    """The gateway ConfigMap's files written as Envoy's pod sees them, its two mounts moved under tmp_path."""
    etc_envoy = tmp_path / "etc-envoy"
    etc_envoy.mkdir()
    for name, text in _of_kind("ConfigMap")["crosslogic-envoy-bootstrap"]["data"].items():
        text = text.replace("/etc/envoy/", f"{etc_envoy}/").replace(INTERNAL_TLS_MOUNT, str(secret))
        (etc_envoy / name).write_text(text.replace("port_value: 9901", f"port_value: {admin_port}"))
    return etc_envoy / "bootstrap.yaml"


def test_envoy_accepts_the_gateway_bootstrap_without_deprecated_fields(tmp_path):
    bootstrap = _gateway_config(tmp_path, _issue_secret(tmp_path))
    result = subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(bootstrap), "--service-node", "g"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Deprecated field" not in result.stderr


def test_envoy_loads_its_client_certificate_and_the_ca_from_the_secret_the_cli_issues(tmp_path):
    """The real Envoy on the ConfigMap's bootstrap and SDS files, the Secret's files where the pod mounts them:
    its /certs shows the CA and its own certificate (the files and names of both sides agree)."""
    secret = _issue_secret(tmp_path)
    assert sorted(p.name for p in secret.iterdir()) == sorted(internal_tls.secret_files())  # no CA key
    admin = free_port()
    bootstrap = _gateway_config(tmp_path, secret, admin)
    envoy = subprocess.Popen([str(envoy_binary()), "-c", str(bootstrap), "--service-node", "g", "--base-id",
                              str(admin), "--log-level", "warning"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    wanted = {pki.x509.load_pem_x509_certificate((secret / f"{name}.pem").read_bytes()).serial_number
              for name in (internal_tls.CA, internal_tls.ENVOY)}
    try:
        deadline = time.monotonic() + 30
        while True:
            assert envoy.poll() is None, envoy.stderr.read()[-2000:] if envoy.stderr else ""
            try:
                certs = httpx.get(f"http://127.0.0.1:{admin}/certs", timeout=2).json()
            except httpx.HTTPError:
                certs = {}
            loaded = {int(c["serial_number"], 16) for entry in certs.get("certificates", [])
                      for kind in ("ca_cert", "cert_chain") for c in entry.get(kind, [])}
            if wanted <= loaded:
                break
            assert time.monotonic() < deadline, f"Envoy loaded {loaded}, not {wanted}"
            time.sleep(0.2)
    finally:
        envoy.terminate()
        envoy.wait(timeout=30)


def _internal_tls_mount(pod: dict, container: dict) -> tuple[str, set[str]] | None:
    """(mount path, the Secret's keys in it) of the internal-TLS Secret in this container, if mounted."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret", {})
        if secret.get("secretName") == "crosslogic-internal-tls":
            assert mount.get("readOnly") and not secret.get("optional")
            items = {item["key"] for item in secret["items"]}
            assert all(item["key"] == item["path"] for item in secret["items"])
            return mount["mountPath"], items
    return None


def test_every_service_envoy_reaches_mounts_only_its_own_certificate_and_envoy_checks_each_identity():
    served = set()
    for name, deployment in _of_kind("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            args = container.get("args", [])
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            mounted = _internal_tls_mount(pod, container)
            if container["name"] == "envoy":
                assert mounted == (INTERNAL_TLS_MOUNT, {"ca.pem", "envoy.pem", "envoy.key"}), name
                continue
            if "serve" not in args:
                continue
            service = args[args.index("serve") + 1]
            listen = args[args.index("--listen") + 1] if "--listen" in args else ""
            if service not in internal_tls.SERVICES or listen.startswith("127.0.0.1"):
                assert mounted is None and "CROSSLOGIC_INTERNAL_TLS_DIR" not in env, (name, container["name"])
                continue
            # The service reads <dir>/ca.pem, <service>.pem/.key (internal_tls.service_identity): exactly those.
            who = internal_tls.identity(INTERNAL_TLS_MOUNT, service)
            assert env["CROSSLOGIC_INTERNAL_TLS_DIR"] == INTERNAL_TLS_MOUNT, name
            assert mounted == (INTERNAL_TLS_MOUNT, {who.ca.name, who.cert.name, who.key.name}), name
            assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]  # 0440 keys readable
            served.add(service)
    assert served == {"xds", "authz", "accounting", "api"}  # no ratelimit tier: admission is `authz` here
    config = _of_kind("ConfigMap")["crosslogic-envoy-bootstrap"]["data"]
    bootstrap = yaml.safe_load(config["bootstrap.yaml"])
    for cluster in bootstrap["static_resources"]["clusters"]:
        peer, h2 = _TLS_PEERS.get(cluster["name"].removeprefix("crosslogic_"), ("authz", False))  # as `up` renders
        context = cluster["transport_socket"]["typed_config"]["common_tls_context"]
        assert context.get("alpn_protocols") == (["h2"] if h2 else None), cluster["name"]
        sans = context["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"]
        assert sans == [{"san_type": "URI", "matcher": {"exact": internal_tls.service_uri(peer)}}], cluster["name"]
        cert_sds = context["tls_certificate_sds_secret_configs"][0]
        ca_sds = context["combined_validation_context"]["validation_context_sds_secret_config"]
        for sds, key in ((cert_sds, "envoy-cert.sds.yaml"), (ca_sds, "envoy-ca.sds.yaml")):
            assert sds["sds_config"]["path_config_source"]["path"] == f"/etc/envoy/{key}"
            assert yaml.safe_load(config[key])["resources"][0]["name"] == sds["name"]


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
