"""The /v1/models service answers everything in OpenAI JSON, whatever path, method or database state."""

from __future__ import annotations

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from crosslogic.api.models import build_app
from crosslogic.runtime.processes import free_port


@pytest.fixture
async def api(database_url):
    async with asyncpg.create_pool(database_url, min_size=0, max_size=2) as pool:
        async with TestClient(TestServer(build_app(pool))) as client:
            yield client


async def _error(response) -> dict:
    assert response.content_type == "application/json"
    payload = await response.json()
    assert set(payload["error"]) == {"message", "type", "param", "code"} and payload["error"]["message"]
    return payload["error"]


@pytest.mark.parametrize("path", ["/v1/models/", "/v1/modelsfoo", "/v1", "/", "/v1/models/a/../../x"])
async def test_unknown_paths_are_json_404(api, path):
    response = await api.get(path, headers={"x-clp-env": "00000000-0000-0000-0000-000000000000"})
    assert response.status == 404 and (await _error(response))["code"] == "unknown_url"


@pytest.mark.parametrize("method", ["POST", "DELETE", "PUT", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/llama-3-8b"])
async def test_other_methods_are_json_405_with_allow(api, method, path):
    response = await api.request(method, path)
    assert response.status == 405
    assert (await _error(response))["code"] == "method_not_allowed"
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}


async def test_head_is_served_like_get(api):
    response = await api.head("/v1/models")
    assert response.status == 401  # no x-clp-env: Envoy's ext_authz did not vouch for the caller


async def test_a_database_outage_is_a_json_503():
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    async with asyncpg.create_pool(dead, min_size=0, max_size=1) as pool:
        async with TestClient(TestServer(build_app(pool))) as client:
            response = await client.get("/v1/models", headers={"x-clp-env": "00000000-0000-0000-0000-000000000000"})
            assert response.status == 503 and (await _error(response))["code"] == "service_unavailable"
