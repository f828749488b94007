"""The admin API of `crosslogic up --demo` with the real gateway: not reachable through the client listener, and
its key actions take effect at the gateway (a rotation's overlap keeps the old key working, a revocation does not)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.test_dashboard_browser import _chat, _wait


def _call(url: str, token: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"{}")


def test_the_admin_api_is_not_reachable_through_the_client_gateway(gateway):
    for path in ("/admin/v1/me", "/openapi.json", "/dashboard/", "/admin/v1/orgs"):
        # an admin token is not an API key: ext_authz refuses it before any route is looked at
        status, _, body = _call(gateway["gateway_base"] + path, gateway["admin_token"])
        assert status == 401 and body["error"]["code"] == "invalid_api_key", (path, status)
        # an API key gets past ext_authz, and Envoy has no route there
        status, _, body = _call(gateway["gateway_base"] + path, gateway["api_key"])
        assert status == 404 and body["error"]["code"] == "unknown_url", (path, status)
    status, _, me = _call(f"{gateway['admin_url']}/admin/v1/me", gateway["admin_token"])
    assert status == 200 and me["scope"] == "platform"


def test_a_rotation_overlap_keeps_the_old_key_working_and_a_plain_rotation_ends_it(gateway):
    admin, org = gateway["admin_url"] + "/admin/v1", gateway["org_id"]
    token = gateway["org_admin_token"]
    status, _, created = _call(f"{admin}/orgs/{org}/keys", token, "POST", {"env": "dev", "name": "rotating"})
    assert status == 201
    first = created["api_key"]
    assert _chat(gateway, first)[0] == 200

    status, _, rotated = _call(f"{admin}/orgs/{org}/keys/{created['key_id']}/rotate", token, "POST",
                               {"overlap_seconds": 600})
    assert status == 201 and rotated["replaces"]["expires_at"]
    second = rotated["api_key"]
    assert _chat(gateway, first)[0] == 200 and _chat(gateway, second)[0] == 200  # both, during the overlap

    status, _, again = _call(f"{admin}/orgs/{org}/keys/{rotated['key_id']}/rotate", token, "POST", {})
    assert status == 201
    assert _wait(lambda: _chat(gateway, second)[0] == 401, 1.0, "the gateway to refuse the rotated-away key")
    assert _chat(gateway, again["api_key"])[0] == 200
    assert _chat(gateway, first)[0] == 200  # its own overlap still runs


def test_a_read_only_token_of_the_real_process_cannot_mutate(gateway):
    admin, org = gateway["admin_url"] + "/admin/v1", gateway["org_id"]
    status, _, made = _call(f"{admin}/tokens", gateway["org_admin_token"], "POST", {"role": "read-only"})
    assert status == 201 and made["org_id"] == org
    status, headers, refused = _call(f"{admin}/orgs/{org}/keys", made["token"], "POST", {"env": "dev"})
    assert status == 403 and refused["error"]["code"] == "insufficient_role"
    assert headers["Content-Type"].startswith("application/json")
    assert _call(f"{admin}/orgs/{org}/keys", made["token"])[0] == 200
