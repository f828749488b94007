"""Air-gapped installs: the socket guard, signed licences, licence admission, and a whole `crosslogic up --demo
--airgap` run in which no process opens a socket to anything but loopback."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import openai
import pytest

from crosslogic import license as lic
from crosslogic.accounting.ledger import write_batch
from crosslogic.errors import ClientError
from crosslogic.extauthz.license_guard import LicenseGuard
from crosslogic.store import tenancy as t
from crosslogic.usage_record import UsageRecord
from tests.conftest import up_demo
from tests.gateway_helpers import client

GUARDED = """
import socket, sys
from crosslogic.runtime import airgap
airgap.install(sys.argv[1])
for attempt in (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("10.255.255.1", 9)),
                lambda: socket.getaddrinfo("example.com", 443),
                lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("8.8.8.8", 53)),
                lambda: socket.create_connection(("127.0.0.1", 9), timeout=1),
                lambda: socket.getaddrinfo("localhost", 9)):
    try:
        attempt()
        print("ok")
    except PermissionError:
        print("refused")
    except OSError:
        print("ok")  # allowed: nothing listens there
"""


def test_the_guard_refuses_every_non_loopback_connection_lookup_and_datagram_and_logs_each(tmp_path):
    log = tmp_path / "audit.jsonl"
    out = subprocess.run([sys.executable, "-c", GUARDED, str(log)], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["refused", "refused", "refused", "ok", "ok"], out.stderr
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    refused = {(e["event"], e["host"]) for e in entries if not e["allowed"]}
    assert refused == {("socket.connect", "10.255.255.1"), ("socket.getaddrinfo", "example.com"),
                       ("socket.sendto", "8.8.8.8")}
    assert oct(log.stat().st_mode & 0o777) == "0o600"


def _keys(tmp_path: Path) -> tuple[bytes, bytes]:
    private, public = lic.generate_keypair(tmp_path / "keys")
    return private.read_bytes(), public.read_bytes()


def test_a_licence_verifies_only_unaltered_and_with_the_trusted_key(tmp_path):
    signing, public = _keys(tmp_path)
    now = datetime.now(UTC)
    document = lic.issue(signing, str(uuid.uuid4()), "acme", 5, 1000, now, now + timedelta(days=30))
    assert lic.verify(document, public).tokens == 1000
    tampered = json.loads(json.dumps(document))
    tampered["license"]["tokens"] = 10**12
    with pytest.raises(lic.LicenseInvalid, match="altered"):
        lic.verify(tampered, public)
    _, other_public = lic.generate_keypair(tmp_path / "other")
    with pytest.raises(lic.LicenseInvalid):
        lic.verify(document, other_public.read_bytes())
    with pytest.raises(ValueError):
        lic.issue(signing, "o", "acme", 0, 1, now, now + timedelta(days=1))


def _usage(org_id: str, env_id: str, key_id: str, tokens: int) -> UsageRecord:
    return UsageRecord(request_id=uuid.uuid4().hex, occurred_at=datetime.now(UTC), org_id=org_id, env_id=env_id,
                       key_id=key_id, region="eu", model="m", endpoint="chat.completions", streamed=False,
                       status_code=200, prompt_tokens=tokens, completion_tokens=0, usage_source="reported",
                       latency_ms=1, node=None)


async def _install(conn, document: dict) -> None:
    await conn.execute("INSERT INTO licenses (license_id, org_id, body) VALUES ($1, $2, $3::jsonb)",
                       document["license"]["license_id"], uuid.UUID(document["license"]["org_id"]),
                       json.dumps(document))


async def _refusal(guard: LicenseGuard, org_id: str, reserve: int) -> tuple[int, str] | None:
    try:
        await guard.check(org_id, reserve)
    except ClientError as error:
        return error.status, error.code
    return None


async def test_licence_admission_refuses_without_a_licence_past_expiry_seats_and_allowance(database_url, tmp_path,
                                                                                           key_secret):
    signing, public = _keys(tmp_path)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await t.add_region(conn, "eu", "EU", [])
            await t.add_model(conn, "m", input_price_microdollars_per_1m=100, output_price_microdollars_per_1m=100)
            org = await t.create_org(conn, "bank", "enterprise", ["eu"])
            env = await t.create_env(conn, org.org_id, "prod", "eu")
            key, _ = await t.create_key(conn, key_secret.encode(), org.org_id, env.env_id, "k")
        guard = LicenseGuard(pool, public, refresh_s=0)
        assert await _refusal(guard, org.org_id, 1) == (403, "license_required")
        now = datetime.now(UTC)
        async with pool.acquire() as conn:
            forged = lic.issue(lic.generate_keypair(tmp_path / "rogue")[0].read_bytes(), org.org_id, "bank", 9,
                               10**9, now, now + timedelta(days=1))
            await _install(conn, forged)  # signed by another key: counts as none
            assert await _refusal(guard, org.org_id, 1) == (403, "license_required")
            await _install(conn, lic.issue(signing, org.org_id, "bank", 1, 100, now - timedelta(seconds=1),
                                           now + timedelta(days=1)))
        assert await _refusal(guard, org.org_id, 100) is None
        assert await _refusal(guard, org.org_id, 101) == (429, "license_tokens_exhausted")
        async with pool.acquire() as conn:
            await write_batch(conn, [_usage(org.org_id, env.env_id, key.key_id, 60)])
            assert await _refusal(guard, org.org_id, 41) == (429, "license_tokens_exhausted")
            assert await _refusal(guard, org.org_id, 40) is None
            await t.create_key(conn, key_secret.encode(), org.org_id, env.env_id, "second")
            assert await _refusal(guard, org.org_id, 1) == (403, "license_seats_exceeded")
            await conn.execute("DELETE FROM licenses")
            await _install(conn, lic.issue(signing, org.org_id, "bank", 5, 100, now - timedelta(days=2),
                                           now - timedelta(days=1)))
        assert await _refusal(guard, org.org_id, 1) == (403, "license_expired")
    finally:
        await pool.close()


def _cli(env: dict, state: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crosslogic", "--state-dir", state, *argv], capture_output=True,
                          text=True, timeout=60, env=env)


async def test_a_whole_airgapped_run_opens_no_socket_but_loopback_and_bills_by_licence(tmp_path):
    private, public = lic.generate_keypair(tmp_path / "vendor")
    audit = tmp_path / "sockets.jsonl"
    env = {**os.environ, "CROSSLOGIC_LICENSE_PUBLIC_KEY": str(public), "CROSSLOGIC_AIRGAP_AUDIT_LOG": str(audit),
           # a Stripe key left in the environment: air-gapped mode must not call out with it
           "CROSSLOGIC_STRIPE_API_KEY": "sk_live_should_never_be_used", "CROSSLOGIC_OTLP_ENDPOINT": ""}
    (tmp_path / "state").mkdir()
    with up_demo(tmp_path / "state", env=env, up_args=("--airgap",)) as info:
        state = info["state_dir"]
        api = client(info)
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await api.chat.completions.create(model="llama-3-8b", messages=[{"role": "user", "content": "hi"}])
        assert refused.value.response.json()["error"]["code"] == "license_required"

        cli_env = {**env, "CROSSLOGIC_AIRGAP": "1"}  # the operator's commands on this machine, guarded too
        issued = _cli(cli_env, state, "license", "issue", "--org", "demo", "--seats", "10", "--tokens", "100000",
                      "--days", "30", "--signing-key", str(private), "--out", str(tmp_path / "demo.license"))
        assert issued.returncode == 0, issued.stderr
        assert _cli(cli_env, state, "license", "verify", str(tmp_path / "demo.license")).returncode == 0
        installed = _cli(cli_env, state, "license", "install", str(tmp_path / "demo.license"))
        assert installed.returncode == 0, installed.stderr
        answer = None
        for _ in range(50):  # the guard re-reads an org's licence within its refresh interval
            try:
                answer = await api.chat.completions.create(model="llama-3-8b", max_tokens=4,
                                                           messages=[{"role": "user", "content": "hi"}])
                break
            except openai.PermissionDeniedError:
                await asyncio.sleep(0.2)
        assert answer is not None and answer.choices[0].message.content
        shown = _cli(cli_env, state, "--json", "license", "show")
        assert json.loads(shown.stdout)[0]["org_name"] == "demo"
        conn = await asyncpg.connect(info["database_url"])
        try:
            actions = {r["action"] for r in await conn.fetch("SELECT action FROM audit_log WHERE target_type = "
                                                             "'license'")}
        finally:
            await conn.close()
        assert actions == {"license.issue", "license.install"}
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert entries and len({e["pid"] for e in entries}) >= 5  # every service, the CLI and the supervisor logged
    assert [e for e in entries if not e["allowed"]] == []  # nobody even tried to reach beyond this machine
