"""Production mode (`crosslogic up --internal-tls`): mutual TLS between Envoy and every control-plane service, from
the project's CA. A request through the gateway is served and billed; each service refuses a client without a
certificate, with one from another CA (the node agents' CA too), and Envoy picks up a re-issued certificate."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crosslogic import contract, pki
from crosslogic.runtime import internal_tls
from tests.conftest import up_demo
from tests.gateway_helpers import ledger_row

TRANSPORTS = [t for t in os.environ.get("CROSSLOGIC_TEST_TRANSPORTS", "http,grpc").split(",") if t]


# Each ext_authz transport, and the two-hop admission (Envoy's ratelimit filter + `serve ratelimit`).
VARIANTS = [(t, "authz") for t in TRANSPORTS] + [("http", "rls")]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: "-".join(v))
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    transport, admission = request.param
    env = {**os.environ, "CROSSLOGIC_AUTHZ_TRANSPORT": transport, "CROSSLOGIC_ADMISSION": admission}
    with up_demo(tmp_path_factory.mktemp(f"itls-{transport}-{admission}"), env=env,
                 up_args=("--internal-tls",)) as info:
        yield info


def _chat(info: dict) -> httpx.Response:
    return httpx.post(info["gateway_url"] + "/chat/completions", headers={"authorization": f"Bearer {info['api_key']}"},
                      json={"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                      timeout=30)


def test_a_completion_is_served_and_billed_with_every_hop_on_mutual_tls(stack):
    assert stack["internal_tls_dir"]
    response = _chat(stack)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3
    row = asyncio.run(ledger_row(stack["database_url"], response.headers["x-request-id"]))
    assert row["completion_tokens"] == 3
    models = httpx.get(stack["gateway_url"] + "/models", headers={"authorization": f"Bearer {stack['api_key']}"},
                       timeout=30)
    assert models.status_code == 200 and models.json()["data"]  # the api cluster, over TLS too
    stats = httpx.get(stack["envoy_admin_url"] + "/stats?filter=ssl.handshake$", timeout=10).text
    handshakes = {line.split(".")[1]: int(line.rsplit(" ", 1)[1]) for line in stats.splitlines()
                  if line.startswith("cluster.")}
    clusters = [contract.XDS_CLUSTER, contract.AUTHZ_CLUSTER, contract.ACCOUNTING_CLUSTER, contract.API_CLUSTER]
    if stack["admission"] == "rls":
        clusters.append(contract.RATELIMIT_CLUSTER)
    for cluster in clusters:
        assert handshakes.get(cluster, 0) > 0, (cluster, stats)  # Envoy reached it over TLS


def _services(info: dict) -> dict[str, tuple[int, bool]]:
    """Every listener Envoy reaches: (port, speaks gRPC)."""
    ports = info["ports"]
    grpc_authz = info["authz_transport"] == "grpc"
    services = {"xds": (ports["xds"], True), "accounting": (ports["accounting"], True),
                "authz": (ports["authz"], grpc_authz), "release": (ports["release"], False),
                "api": (ports["api"], False)}
    if info["admission"] == "rls":
        services["ratelimit"] = (ports["ratelimit"], True)
    return services


def _other_ca_client(directory: Path) -> tuple[bytes, bytes]:
    other = pki.create_ca("not the internal CA")
    issued = pki.issue_service(other, internal_tls.service_uri("envoy"), ["127.0.0.1"], server=False, client=True)
    return issued.cert_pem, issued.key_pem


def _tls_handshake(port: int, cert: tuple[bytes, bytes] | None, ca: Path, tmp: Path, h2: bool) -> bool:
    """True if the server completes a TLS handshake and answers over it (TLS 1.3 reports a refused client
    certificate on the first read)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    if h2:
        context.set_alpn_protocols(["h2"])
    if cert is not None:
        (tmp / "c.pem").write_bytes(cert[0])
        (tmp / "c.key").write_bytes(cert[1])
        context.load_cert_chain(str(tmp / "c.pem"), str(tmp / "c.key"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            if h2:
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            else:
                tls.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
            return len(tls.recv(1024)) > 0
    except (ssl.SSLError, ConnectionError, TimeoutError, OSError):
        return False


def test_every_service_refuses_a_client_without_a_certificate_or_with_another_ca_s(stack, tmp_path):
    directory = Path(stack["internal_tls_dir"])
    ca = directory / "ca.pem"
    envoy = internal_tls.identity(directory, "envoy")
    good = (envoy.cert.read_bytes(), envoy.key.read_bytes())
    node_ca = pki.load_ca(Path(stack["pki_dir"]))  # the node agents' CA: a node certificate opens nothing here
    node = pki.issue_node(node_ca, "node-1", "pool:aws")
    for name, (port, h2) in _services(stack).items():
        assert _tls_handshake(port, good, ca, tmp_path, h2), f"{name}: Envoy's own certificate was refused"
        assert not _tls_handshake(port, None, ca, tmp_path, h2), f"{name} took a client without a certificate"
        assert not _tls_handshake(port, _other_ca_client(tmp_path), ca, tmp_path, h2), f"{name} took another CA"
        assert not _tls_handshake(port, (node.cert_pem, node.key_pem), ca, tmp_path, h2), f"{name} took a node cert"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:  # and clear text gets nothing
            plain.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
            plain.settimeout(5)
            try:
                reply = plain.recv(1024)
            except (TimeoutError, ConnectionError):
                reply = b""
            assert b"HTTP/1.1 200" not in reply, name


def test_a_grpc_client_with_the_envoy_certificate_passes_and_one_without_fails(stack):
    directory = Path(stack["internal_tls_dir"])
    ca = (directory / "ca.pem").read_bytes()
    envoy = internal_tls.identity(directory, "envoy")
    port = stack["ports"]["accounting"]
    with_cert = grpc.ssl_channel_credentials(ca, envoy.key.read_bytes(), envoy.cert.read_bytes())
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(f"127.0.0.1:{port}", with_cert, options) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca), options) as channel, \
            pytest.raises(grpc.RpcError) as refused:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_re_issued_certificate_is_picked_up_by_envoy_without_a_restart(stack):
    directory = Path(stack["internal_tls_dir"])
    before = (directory / "envoy.pem").read_bytes()
    internal_tls.issue_internal(directory, ["127.0.0.1", "localhost"])
    assert (directory / "envoy.pem").read_bytes() != before
    # Envoy's SDS watch reloads its client certificate; the services keep theirs until restarted (both are
    # signed by the same CA, so old and new interoperate). Requests keep working throughout.
    deadline = time.monotonic() + 30
    serial = pki.x509.load_pem_x509_certificate((directory / "envoy.pem").read_bytes()).serial_number
    while True:
        certs = httpx.get(stack["envoy_admin_url"] + "/certs", timeout=10).json()
        serials = {int(c["serial_number"], 16) for entry in certs.get("certificates", [])
                   for c in entry.get("cert_chain", [])}
        if serial in serials:
            break
        assert time.monotonic() < deadline, "Envoy never loaded the re-issued certificate"
        time.sleep(0.5)
    assert _chat(stack).status_code == 200
