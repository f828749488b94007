"""HTTPS on the public listener (CROSSLOGIC_GATEWAY_TLS_CERT / _KEY): HTTP/1.1 and HTTP/2 by ALPN through the whole
chain, and nothing in clear text."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator

import httpx
import pytest

from crosslogic import pki
from tests.conftest import up_demo


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    certs = tmp_path_factory.mktemp("gateway-certs")
    ca = pki.create_ca("test gateway CA")
    ca_path, _ = pki.write(certs, "ca", ca)
    cert, key = pki.write(certs, "gateway", pki.issue_server(ca, ["127.0.0.1", "localhost"]))
    env = {**os.environ, "CROSSLOGIC_GATEWAY_TLS_CERT": str(cert), "CROSSLOGIC_GATEWAY_TLS_KEY": str(key)}
    with up_demo(tmp_path_factory.mktemp("tls"), env=env) as info:
        yield {**info, "ca": str(ca_path)}


def _chat(info: dict, http2: bool) -> httpx.Response:
    with httpx.Client(verify=ssl.create_default_context(cafile=info["ca"]), http1=not http2, http2=http2,
                      timeout=30) as client:
        return client.post(info["gateway_url"] + "/chat/completions",
                           headers={"authorization": f"Bearer {info['api_key']}"},
                           json={"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 3})


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
def test_a_completion_over_https_in_either_http_version(tls_gateway, http2):
    assert tls_gateway["gateway_url"].startswith("https://")
    response = _chat(tls_gateway, http2)
    assert response.status_code == 200, response.text
    assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert response.json()["usage"]["completion_tokens"] == 3


def test_the_certificate_is_verified_and_clear_text_gets_no_answer(tls_gateway):
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the issuing CA refuses
        httpx.get(tls_gateway["gateway_base"] + "/healthz", verify=True, timeout=10)
    port = int(tls_gateway["gateway_base"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        plain.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        reply = plain.recv(4096)
    assert b"HTTP/1.1 200" not in reply and b'"status"' not in reply

