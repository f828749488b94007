"""The developer dashboard end to end, in headless Chromium against `crosslogic up --demo`: sign in with the demo
org's admin token, see the usage graph built from the ledger rows of requests this test sent through the gateway,
create a key and use it, revoke it and see the gateway refuse it within a second.

Chromium is Debian's (`make test` installs it; see scripts/ensure_browser.sh), driven by Playwright without its
own browser download. Where neither can be had the test is skipped and says why. CROSSLOGIC_SCREENSHOTS=DIR saves
the screenshots of docs/img/ there.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CROSSLOGIC_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium; "
                                "`make test` does it where it can)")


def _chat(gateway: dict, api_key: str, content: str = "Hello dashboard") -> tuple[int, dict]:
    body = json.dumps({"model": "llama-3-8b", "max_tokens": 16,
                       "messages": [{"role": "user", "content": content}]}).encode()
    request = urllib.request.Request(f"{gateway['gateway_url']}/chat/completions", data=body, headers={
        "authorization": f"Bearer {api_key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _admin(gateway: dict, path: str) -> dict:
    request = urllib.request.Request(f"{gateway['admin_url']}/admin/v1{path}",
                                     headers={"authorization": f"Bearer {gateway['org_admin_token']}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _ledger_tokens(gateway: dict) -> int:
    usage = _admin(gateway, f"/orgs/{gateway['org_id']}/usage?bucket=hour")
    return sum(r["total_tokens"] for r in usage["data"])


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _shot(page, name: str) -> None:
    folder = os.environ.get("CROSSLOGIC_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name), full_page=True)


def test_dashboard_shows_ledger_usage_and_a_key_it_creates_works_until_it_is_revoked(gateway):
    before = _ledger_tokens(gateway)
    sent = 0
    for i in range(3):
        status, answer = _chat(gateway, gateway["api_key"], f"Hello dashboard {i}")
        assert status == 200, answer
        sent += answer["usage"]["total_tokens"]
    # the ledger (the access-log sink) has the requests' rows: what the graph is drawn from
    _wait(lambda: _ledger_tokens(gateway) >= before + sent, 15, "the ledger rows of the requests sent")

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("dialog", lambda dialog: dialog.accept())
            page.goto(f"{gateway['admin_url']}/dashboard/")
            page.fill("#token", "clat_" + "0" * 40)
            page.click("#sign-in button")
            page.wait_for_selector("#sign-in-error:not(:empty)")  # (the page's CSP forbids evaluated strings)
            assert "Sign-in failed" in page.text_content("#sign-in-error")

            page.fill("#token", gateway["org_admin_token"])
            page.click("#sign-in button")
            page.wait_for_selector("body[data-state=ready]")
            assert page.text_content("#org-name").startswith("demo")
            chart = page.locator("#usage-chart canvas")
            assert chart.count() == 1 and chart.bounding_box()["height"] > 100
            ledger_now = _ledger_tokens(gateway)
            assert int(page.get_attribute("#usage-chart", "data-total-tokens")) == ledger_now >= before + sent
            assert "llama-3-8b" in page.text_content("#by-model")
            assert "ap-south" in page.text_content("#by-region")
            assert page.text_content("#free-remaining") != "–"
            assert page.locator("#limits tbody tr").count() > 0
            _shot(page, "dashboard.png")

            page.fill("#new-key-name", "browser-test")
            page.click("#create-key-button")
            page.wait_for_selector("#new-key:not([hidden])")
            new_key = page.text_content("#new-key-value").strip()
            assert new_key.startswith("clsk_live_")
            status, answer = _chat(gateway, new_key)
            assert status == 200, answer
            key_id = page.locator("#keys tbody tr", has_text="browser-test").get_attribute("data-key-id")

            page.click(f"button.revoke[data-key-id='{key_id}']")
            page.wait_for_selector(f"#keys tr[data-key-id='{key_id}'] td.status-revoked")
            revoked_at = time.monotonic()
            refused = _wait(lambda: _chat(gateway, new_key)[0] == 401, 5, "the gateway to refuse the revoked key")
            took = time.monotonic() - revoked_at
            print(f"revoked key refused by the gateway {took * 1000:.0f} ms after the dashboard's revoke")
            assert refused and took < 1.0, f"the revoked key was served for {took:.2f} s"

            # A test key: made with the checkbox, shown with its badge, served, its usage in the ledger at $0.
            page.fill("#new-key-name", "browser-test-key")
            page.check("#new-key-test")
            page.click("#create-key-button")
            page.wait_for_selector("#keys tbody tr:has-text('browser-test-key')")
            test_key = page.text_content("#new-key-value").strip()
            assert test_key.startswith("clsk_test_")
            row = page.locator("#keys tbody tr", has_text="browser-test-key")
            assert row.locator(".badge.mode-test").text_content() == "test"
            assert page.locator("#keys tbody tr", has_text="browser-test").first.locator(".badge").count() == 1
            status, answer = _chat(gateway, test_key)
            assert status == 200, answer
            _wait(lambda: _admin(gateway, f"/orgs/{gateway['org_id']}/billing")["test_usage"]["tokens"]
                  >= answer["usage"]["total_tokens"], 15, "the test key's ledger row")
            page.click("#refresh")
            page.wait_for_selector("#test-usage:not(:empty)")
            assert "test keys" in page.text_content("#test-usage") and "free" in page.text_content("#test-usage")
            assert page.text_content("#test-key-caps").startswith("Test keys: at most")
            _shot(page, "dashboard-keys.png")  # live, revoked and test keys, the test usage shown as free
        finally:
            browser.close()
