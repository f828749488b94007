"""Sites without a gateway: certificates and their identity, the sites store (rotation, revocation, audit), what a
site's snapshot holds, node scopes of a site, and the per-identity cache."""

from __future__ import annotations

import asyncio
import io
import json

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crosslogic import pki
from crosslogic.store import sites
from crosslogic.store import tenancy as t
from crosslogic.xds import node_registry as nr
from crosslogic.xds.cache import SiteCaches
from crosslogic.xds.model import EndpointHealth, GatewaySettings
from crosslogic.xds.policy import RoutingPolicy, validate
from crosslogic.xds.registry import NodeView, cloud_pools
from crosslogic.xds.sites import SiteRow, site_pools, site_snapshot
from crosslogic.xds.snapshot import CLUSTER_TYPE, LISTENER_TYPE, Snapshot


def test_a_site_certificate_names_its_org_and_site_in_a_spiffe_uri_and_a_node_certificate_names_none():
    ca = pki.create_ca()
    issued = pki.issue_site(ca, "org-1", "site-1", days=1)
    identity = pki.site_identity_of(issued.cert_pem)
    assert identity == pki.SiteIdentity("org-1", "site-1", pki.serial_of(issued.cert_pem))
    assert identity.cache_key == f"site:site-1:{identity.serial}"
    assert pki.site_identity_of(pki.issue_node(ca, "n1", "org:org-1").cert_pem) is None
    assert pki.scope_of(issued.cert_pem) is None  # a site certificate is no cloud node certificate


async def _org_and_site(conn: asyncpg.Connection, org: str, site: str) -> sites.Site:
    await t.create_org(conn, org)
    return await sites.create_site(conn, org, site, actor="tester")


async def test_rotation_overlaps_revocation_cuts_every_certificate_and_every_action_is_audited(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        ca = pki.create_ca()
        site = await _org_and_site(conn, "acme", "dc-1")
        _, first = await sites.issue_certificate(conn, "dc-1", ca, days=30, actor="tester")
        _, second = await sites.issue_certificate(conn, site.site_id, ca, days=30, actor="tester")  # rotation
        old, new = pki.site_identity_of(first.cert_pem), pki.site_identity_of(second.cert_pem)
        assert old.serial != new.serial
        assert await sites.verify(conn, old) and await sites.verify(conn, new)  # both valid: no downtime
        assert (await sites.get_site(conn, "dc-1")).certificates == 2
        forged = pki.SiteIdentity(site.org_id, site.site_id, "abc123")  # a serial this CA never recorded
        assert not await sites.verify(conn, forged)
        other = await _org_and_site(conn, "globex", "dc-2")
        assert not await sites.verify(conn, pki.SiteIdentity(other.org_id, site.site_id, old.serial))  # org mismatch

        await conn.execute("UPDATE site_certificates SET not_after = now() - interval '1 second' WHERE serial = $1",
                           old.serial)
        assert not await sites.verify(conn, old) and await sites.verify(conn, new)  # the old one expired

        revoked = await sites.revoke_site(conn, "dc-1", actor="tester")
        assert sorted(revoked) == sorted([old.serial, new.serial])  # the expired one too
        assert not await sites.verify(conn, new)
        with pytest.raises(t.InvalidArgument, match="revoked"):
            await sites.issue_certificate(conn, "dc-1", ca)
        actions = [r["action"] for r in await conn.fetch(
            "SELECT action FROM audit_log WHERE target_type = 'site' AND target_id = $1 ORDER BY audit_id",
            site.site_id)]
        assert actions == ["site.create", "site.certificate.issue", "site.certificate.issue", "site.revoke"]
        with pytest.raises(t.Conflict):
            await sites.create_site(conn, "globex", "dc-2")
    finally:
        await conn.close()


def _node(node_id: str, *, site: str | None = None, org: str | None = None, region: str = "eu") -> NodeView:
    return NodeView(node_id=node_id, region=region, host="10.0.0.1", port=int(node_id[-1]) + 8000, models=("m",),
                    health=EndpointHealth.HEALTHY, load=None, reserved_org=org, site=site)


NODES = [_node("cloud-1"), _node("lane-2", org="org-b"), _node("a-3", site="site-a", org="org-a"),
         _node("b-4", site="site-b", org="org-b")]
def _policy() -> RoutingPolicy:
    return validate([{"region": "*", "pinning": "fallback", "spill_share": 1.0, "retries": 2,
                      "score_weights": {"queue": 0.5, "kv_cache": 0.3, "throughput": 0.2}, "queue_capacity": 8,
                      "load_aware": True}], {"eu": ()})


def _ids(pools) -> dict[str, list[tuple[str, int]]]:
    return {p.cluster_name: sorted((e.node_id, e.priority) for e in p.endpoints) for p in pools}


def test_a_site_pool_holds_its_own_nodes_first_then_the_shared_cloud_pool_and_nothing_of_anyone_else():
    site_a = SiteRow("site-a", "org-a", True, "0.0.0.0", 9000)
    pools = _ids(site_pools(site_a, NODES, _policy(), {"m": 1000.0}))
    assert pools["eu/m@org-a"] == pools["eu/m"] == [("a-3", 0), ("cloud-1", 1)]
    assert set(pools) == {"eu/m", "eu/m@org-a"}  # never org B's lane, nor site B's node
    strict = _ids(site_pools(SiteRow("site-a", "org-a", False, "0.0.0.0", 9000), NODES, _policy(), {"m": 1000.0}))
    assert strict["eu/m"] == [("a-3", 0)]  # no cloud spill allowed
    empty = _ids(site_pools(SiteRow("site-c", "org-c", True, "0.0.0.0", 9000), NODES, _policy(), {"m": 1000.0}))
    assert empty == {"eu/m": [("cloud-1", 0)], "eu/m@org-c": [("cloud-1", 0)]}  # no own node yet: the cloud pool


def test_cloud_gateways_never_see_a_site_node():
    everything = [e.node_id for p in cloud_pools(NODES, _policy(), {"m": 1000.0}) for e in p.endpoints]
    assert "a-3" not in everything and "b-4" not in everything and "cloud-1" in everything


def test_a_site_listener_binds_the_site_address_and_tells_ext_authz_the_site_org():
    snapshot = site_snapshot(SiteRow("site-a", "org-a", True, "0.0.0.0", 9443), NODES, _policy(), {"m": 1000.0},
                             GatewaySettings(usage_log_path="/cloud/host/usage.jsonl"))
    listener = snapshot.types[LISTENER_TYPE].by_name["gateway"].value
    assert b"x-clp-site-org" in listener and b"org-a" in listener and b"/cloud/host" not in listener
    assert b"org-b" not in b"".join(a.value for typed in snapshot.types.values() for a in typed.by_name.values())
    assert set(snapshot.types[CLUSTER_TYPE].by_name) == {"eu/m", "eu/m@org-a"}


@pytest.mark.parametrize(("registration", "allowed"), [
    (dict(reserved_org_id="org-a"), True),
    (dict(reserved_org_id="org-b"), False),  # another org's node
    (dict(reserved_org_id=""), False),  # the shared pool
])
def test_a_site_scope_registers_only_its_own_orgs_nodes(registration, allowed):
    reg = nr.Registration(name="n", region="eu", cloud="onprem", spot=False, gpu_type="x", vram_total_gb=1,
                          vram_free_gb=1, throughput_tokens_per_sec=1, models=("m",), endpoint_host="h",
                          endpoint_port=1, **registration)
    scope = nr.NodeScope.site("site-a", "org-a")
    if allowed:
        nr.check_scope(scope, reg, None)
    else:
        with pytest.raises(nr.ScopeViolation):
            nr.check_scope(scope, reg, None)
    # a name already taken at another site, or in the cloud, is not taken over
    with pytest.raises(nr.ScopeViolation, match="another scope"):
        nr.check_scope(scope, nr.Registration(**{**reg.__dict__, "reserved_org_id": "org-a"}),
                       {"cloud": "onprem", "reserved_org_id": "org-a", "site_id": "site-b"})
    assert not nr.NodeScope("org", "org-a").allows("onprem", "org-a", "site-a")  # cloud certs never reach sites


async def test_a_revoked_identity_is_closed_and_a_new_cache_starts_from_the_site_snapshot():
    caches = SiteCaches()
    snapshot = Snapshot(types={})
    caches.update({"s1": snapshot}, {"site:s1:aa"})
    cache = caches.cache_for("site:s1:aa", "s1")
    assert cache.snapshot is snapshot
    queue = cache.watch()
    caches.update({"s1": snapshot}, set())  # the certificate is no longer admitted
    assert await asyncio.wait_for(queue.get(), 1) is None and cache.closed
    assert await cache.wait_ready() is None
    assert caches.cache_for("site:s1:aa", "s1") is not cache  # a reconnect is checked again by the resolver


def _config(**overrides):
    from crosslogic.sites.run import SiteConfig

    return SiteConfig(**{"site_id": "site-a", "site_name": "dc-1", "org_id": "org-a",
                         "cloud_api_url": "https://127.0.0.1:1", "cloud_xds_address": "127.0.0.1:2", "authz_port": 3,
                         "als_port": 4, "api_port": 5, "envoy_admin_port": 6, "gateway_port": 7, **overrides})


def test_a_bundle_holds_the_sites_files_only_each_0600_and_unpacks_nothing_else(tmp_path):
    import tarfile

    from crosslogic.sites.bundle import build_bundle, extract_bundle, write_bundle

    ca = pki.create_ca()
    site_cert = pki.issue_site(ca, "org-a", "site-a", days=1)
    path = tmp_path / "dc-1.tar.gz"
    write_bundle(path, build_bundle(_config(), ca.cert_pem, site_cert))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with tarfile.open(path) as tar:
        members = {m.name: m.mode for m in tar.getmembers()}
        assert b"PRIVATE KEY" not in tar.extractfile("tls/ca.pem").read()  # the CA's certificate, never its key
        bootstrap = tar.extractfile("envoy-bootstrap.yaml").read().decode()
    assert set(members) == {"site.json", "tls/ca.pem", "tls/node.pem", "tls/node.key", "envoy-bootstrap.yaml",
                            "agent.args", "README.md"}
    assert set(members.values()) == {0o600}
    assert "tls/node.pem" in bootstrap and "UpstreamTlsContext" in bootstrap
    config = extract_bundle(path, tmp_path / "site")
    assert config == _config()
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "site").rglob("*") if p.is_file()} == {"0o600"}

    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../outside")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match="unexpected member"):
        extract_bundle(evil, tmp_path / "evil")
    assert not (tmp_path / "outside").exists()


def _record(request_id: str):
    from datetime import UTC, datetime

    from crosslogic.usage_record import UsageRecord

    return UsageRecord(request_id=request_id, occurred_at=datetime.now(UTC), org_id="o", env_id="e", key_id="k",
                       region="r", model="m", endpoint="chat.completions", streamed=False, status_code=200,
                       prompt_tokens=3, completion_tokens=2, usage_source="reported", latency_ms=1, node=None)


def test_the_spool_keeps_each_request_once_in_order_and_survives_reopening(tmp_path):
    from crosslogic.sites.spool import Spool

    spool = Spool(tmp_path / "spool.sqlite3")
    spool.add([_record("r1"), _record("r2")])
    spool.add([_record("r2"), _record("r3")])  # r2 again: kept once
    spool.close()
    reopened = Spool(tmp_path / "spool.sqlite3")
    rows = reopened.oldest(10)
    assert [r.request_id for _, r in rows] == ["r1", "r2", "r3"]
    assert (rows[0][1].prompt_tokens, rows[0][1].completion_tokens) == (3, 2)
    reopened.delete_through([seq for seq, _ in rows[:2]])
    assert [r.request_id for _, r in reopened.oldest(10)] == ["r3"] and reopened.pending() == 1
    assert oct((tmp_path / "spool.sqlite3").stat().st_mode & 0o777) == "0o600"


def test_view_rows_and_usage_records_cross_the_site_api_exactly():
    from datetime import UTC, date, datetime
    from decimal import Decimal

    from crosslogic.sites.protocol import decode_row, encode_row, record_from_json, record_to_json

    row = {"a": Decimal("0.000001"), "b": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "c": date(2026, 1, 1),
           "d": 7, "e": None, "f": "[\"m\"]"}
    assert decode_row(json.loads(json.dumps(encode_row(row)))) == row
    record = _record("r9")
    assert record_from_json(json.loads(json.dumps(record_to_json(record)))) == record


@given(st.lists(st.tuples(st.sampled_from(["spool", "push", "push_answer_lost", "sync"]), st.integers(1, 50)),
                max_size=60))
def test_a_sites_quota_count_never_misses_its_own_usage_and_is_exact_after_every_sync(operations):
    """Against a model of the cloud's counter: a push is counted in the cloud before it is answered, and a push and
    a sync never overlap (SiteQuotas.exchange); a push whose answer was lost was counted all the same, and its
    batch is sent again (counted once, by request id). Exact after every sync, except while a batch whose answer
    was lost is not yet re-sent and synced after: then the site counts more, never less."""
    from datetime import UTC, datetime

    from crosslogic.ratelimit.quota import quota_keys
    from crosslogic.sites.quota import SiteQuotas

    at = datetime(2026, 1, 1, 12, tzinfo=UTC)
    quotas = SiteQuotas(clock=lambda: at)
    counted: dict[str, int] = {}  # the cloud's counter, by request id (settlement counts a request once)
    spool: list = []
    true_total = 0
    in_doubt: set[str] = set()  # counted in the cloud, answer lost, not yet acknowledged and synced after

    def push(answered: bool) -> None:
        if spool:
            batch = spool[:2]
            for r in batch:
                counted.setdefault(r.request_id, r.total_tokens)
            if answered:
                del spool[:2]
                quotas.acknowledged(batch)
            else:
                in_doubt.update(r.request_id for r in batch)

    for step, (op, tokens) in enumerate(operations):
        if op == "spool":
            record = _record(f"r{step}")
            record = record.__class__(**{**record.__dict__, "prompt_tokens": tokens, "completion_tokens": 0,
                                         "occurred_at": at})
            spool.append(record)
            quotas.spooled([record])
            true_total += tokens
        elif op in ("push", "push_answer_lost"):
            push(answered=op == "push")
        else:
            quotas.begin_sync()
            quotas.synced_counters({quota_keys("o", "e", at)[2]: sum(counted.values())})
            in_doubt &= {r.request_id for r in spool}  # re-sent and answered before this sync: exact again
            if not in_doubt:
                assert quotas.used("o", "e")[2] == true_total
        assert quotas.used("o", "e")[2] >= true_total


@given(st.integers(0, 120), st.lists(st.tuples(  # admissions and logs weighted: the cap is reached in most runs
    st.sampled_from(["admit"] * 3 + ["log"] * 2 + ["admit_test_key", "push", "sync", "sync_with_push",
                                                   "others_spend"]),
    st.integers(1, 40), st.integers(0, 40)), max_size=60))
def test_a_sites_bill_cap_never_lets_its_own_spend_pass_the_cap_and_refuses_only_at_it(cap, operations):
    """Against a model of the ledger (owed counts a push before it is acknowledged; a sync reads it, a push may
    land between the sync's start and its read): spend at this site (records plus what requests in flight hold)
    never passes the cap by more than what other gateways spent since the last sync; after a quiet sync a
    request is refused exactly when owed + its maximum cost would pass the cap; test keys are never refused."""
    from datetime import UTC, datetime

    from crosslogic import errors
    from crosslogic.accounting.pricing import PriceBook
    from crosslogic.extauthz.billcap import Cap
    from crosslogic.ratelimit.money import month_of
    from crosslogic.sites.authz import SiteState
    from crosslogic.sites.billcap import SiteBillCap
    from crosslogic.sites.quota import SiteQuotas

    at = datetime(2026, 1, 1, 12, tzinfo=UTC)
    start = datetime(2020, 1, 1, tzinfo=UTC)
    state = SiteState("o", 60)
    # 1 micro-dollar per token in and out: a record's cost is its tokens
    state.prices = PriceBook.from_rows({"models": [("m", start, 1, 1_000_000, 1_000_000)],
                                        "regions": [("r", start, 1_000_000)],
                                        "terms": [("o", start, 1_000_000, 0)]})
    state.test_keys = frozenset({"test-key"})
    quotas = SiteQuotas(clock=lambda: at)
    caps = SiteBillCap(state, quotas, clock=lambda: at, monotonic=lambda: 0.0)
    ledger = 0  # owed in the cloud: delivered site records plus other gateways' spend
    synced_owed, others_since_sync = 0, 0
    in_flight: dict[str, tuple[int, int, str]] = {}  # request id → (max cost, real cost, key)
    spool: list = []
    spooled_cost = 0  # this site's records in its spool or pushed (real cost)

    def record(request_id: str, cost: int, key: str):
        base = _record(request_id)
        return base.__class__(**{**base.__dict__, "prompt_tokens": cost, "completion_tokens": 0, "occurred_at": at,
                                 "key_id": key})

    def push() -> None:
        nonlocal ledger
        if spool:
            batch = spool[:2]
            del spool[:2]
            ledger += sum(0 if r.key_id == "test-key" else r.total_tokens for r in batch)
            quotas.acknowledged(batch)

    def held_now() -> int:
        return sum(m for m, _, k in in_flight.values() if k != "test-key")

    def others() -> int:  # what other gateways spent: the ledger less this site's delivered records
        undelivered = sum(0 if r.key_id == "test-key" else r.total_tokens for r in spool)
        return ledger - (spooled_cost - undelivered)

    async def reserve(request_id: str, max_cost: int, key: str) -> bool:
        view_cap = None if key == "test-key" else Cap(cap, False, synced_owed, False, month_of(at))
        try:
            await caps.reserve("o", view_cap, "m", "r", request_id, max_cost, 0)
        except errors.ClientError as exc:
            assert exc.status == 403 and exc.code == "billing_cap_reached"
            return False
        return True

    for step, (op, max_cost, used) in enumerate(operations):
        request_id = f"r{step}"
        quiet = not in_flight and not spool and others_since_sync == 0
        if op in ("admit", "admit_test_key"):
            key = "test-key" if op == "admit_test_key" else "k"
            admitted = asyncio.run(reserve(request_id, max_cost, key))
            if key == "test-key":
                assert admitted
            elif quiet and quotas.spent("o", month_of(at)) == 0:
                assert admitted == (synced_owed + max_cost <= cap)
            if admitted:
                in_flight[request_id] = (max_cost, min(used, max_cost), key)
                # the bound: admitted only while this site's spend and holds and what the ledger owed at the last
                # sync stay within the cap, so the org passes it by other gateways' spend since then only
                assert key == "test-key" or spooled_cost + held_now() + others() <= cap + others_since_sync
        elif op == "log" and in_flight:
            rid = next(iter(in_flight))
            _, cost, key = in_flight.pop(rid)
            spooled = record(rid, cost, key)
            spool.append(spooled)
            quotas.spooled([spooled])
            caps.settled(spooled)
            spooled_cost += 0 if key == "test-key" else cost
        elif op == "push":
            push()
        elif op == "others_spend":
            ledger += used
            others_since_sync += used
        elif op in ("sync", "sync_with_push"):
            quotas.begin_sync()
            if op == "sync_with_push":
                push()
            synced_owed, others_since_sync = ledger, 0
            quotas.synced_counters({})
        assert caps.held() == held_now()  # a hold lasts from admission until its record is spooled, exactly
        assert spooled_cost + held_now() <= cap  # this site alone never passes the cap
        # never undercounts: synced owed + the site's unsynced spend + its holds hold all but others' unseen spend
        assert synced_owed + quotas.spent("o", month_of(at)) + caps.held() >= \
            spooled_cost + held_now() + others() - others_since_sync
