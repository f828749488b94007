"""The per-client failure budget (extauthz/abuse.py) and its place around the check, for either transport
(extauthz/throttle.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from crosslogic import errors
from crosslogic.extauthz.abuse import FailureBudget, client_address, forwarded_client
from crosslogic.extauthz.check import Denied, verdict_status
from crosslogic.extauthz.decision import Allowed
from crosslogic.extauthz.throttle import ThrottledChecker


class Clock:
    def __init__(self) -> None:
        self.ms = 0

    def __call__(self) -> int:
        return self.ms


def _level(burst: int, per_ms: float, failures: list[int], now: int) -> float:
    """A token bucket's level from its definition: full at the start, and over every window that starts at a
    failure, at most `burst` plus the window's refill minus the failures in it."""
    level = float(burst)
    for start in failures:
        level = min(level, burst + per_ms * (now - start) - sum(1 for f in failures if f >= start))
    return level


@settings(deadline=None)
@given(burst=st.integers(1, 8), refill_per_s=st.sampled_from([0.5, 1.0, 4.0, 20.0]),
       steps=st.lists(st.integers(0, 1500), min_size=1, max_size=60))
def test_a_client_is_refused_exactly_when_its_recent_failures_used_the_budget(burst, refill_per_s, steps):
    clock = Clock()
    budget = FailureBudget(burst, refill_per_s, clock_ms=clock)
    per_ms = budget.bucket.capacity / budget.bucket.window_ms
    client = budget.client("203.0.113.7", "")
    failures: list[int] = []
    for step in steps:
        clock.ms += step
        level = _level(burst, per_ms, failures, clock.ms)
        refused = budget.retry_after_ms(client) > 0
        if abs(level - 1) < 1e-6:
            continue  # on the boundary: rounding decides, either answer is right
        assert refused == (level < 1), (failures, clock.ms, level)
        if not refused:
            budget.failed(client)
            failures.append(clock.ms)
    # and over the whole run, never more failures than the burst plus what refilled
    assert len(failures) <= burst + per_ms * clock.ms + 1e-6


@settings(deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 300), st.booleans()), min_size=1, max_size=60))
def test_one_clients_failures_never_change_anothers_answers(steps):
    def run(with_neighbour: bool) -> list[int]:
        clock = Clock()
        budget = FailureBudget(3, 2.0, clock_ms=clock)
        answers = []
        for advance, neighbour_fails in steps:
            clock.ms += advance
            if with_neighbour and neighbour_fails:
                budget.failed(budget.client("198.51.100.1", ""))
            me = budget.client("198.51.100.2", "")
            answers.append(budget.retry_after_ms(me))
            if answers[-1] == 0:
                budget.failed(me)
        return answers

    assert run(True) == run(False)


def test_a_key_that_authenticated_keeps_working_while_its_address_is_throttled():
    clock = Clock()
    budget = FailureBudget(2, 1.0, clock_ms=clock)
    budget.proven("192.0.2.1", "Bearer good")
    for _ in range(2):
        budget.failed(budget.client("192.0.2.1", "Bearer random-junk"))
    assert budget.retry_after_ms(budget.client("192.0.2.1", "Bearer another-junk")) > 0
    assert budget.retry_after_ms(budget.client("192.0.2.1", "Bearer good")) == 0
    # proven from one address only: the same key elsewhere is an unknown credential there
    assert budget.client("192.0.2.9", "Bearer good") == (client_address("192.0.2.9"), None)


def test_the_tables_stay_bounded():
    budget = FailureBudget(1, 1.0, max_clients=50, clock_ms=Clock())
    for i in range(500):
        budget.failed(budget.client(f"10.0.{i // 256}.{i % 256}", ""))
        budget.proven(f"10.0.{i // 256}.{i % 256}", f"Bearer {i}")
    assert len(budget._levels) == 50 and len(budget._proven) == 50


def test_burst_zero_turns_the_budget_off():
    budget = FailureBudget(0, 1.0, clock_ms=Clock())
    for _ in range(100):
        budget.failed(budget.client("192.0.2.1", ""))
    assert budget.retry_after_ms(budget.client("192.0.2.1", "")) == 0


def test_an_ipv6_host_cannot_escape_by_changing_its_interface_id():
    assert client_address("2001:db8:1:2::1") == client_address("2001:db8:1:2:ffff:1:2:3")
    assert client_address("2001:db8:1:3::1") != client_address("2001:db8:1:2::1")
    assert client_address("::ffff:192.0.2.1") == "192.0.2.1"


def test_only_the_trusted_hops_of_x_forwarded_for_count():
    # Envoy appended the peer (10.0.0.5, our load balancer); the LB appended the client it saw.
    assert forwarded_client("10.0.0.5", "6.6.6.6, 198.51.100.4, 10.0.0.5", 1) == "198.51.100.4"
    assert forwarded_client("10.0.0.5", "6.6.6.6, 198.51.100.4, 10.0.0.5", 0) == "10.0.0.5"
    assert forwarded_client("10.0.0.5", "10.0.0.5", 1) == "10.0.0.5"  # nothing in front: the peer
    assert forwarded_client("10.0.0.5", "", 2) == "10.0.0.5"


class _Inner:
    """Answers every check with a fixed status, counting the calls that reached it (the expensive path)."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.calls = 0

    async def check(self, peer, method, path, headers, body):
        self.calls += 1
        if self.status == 200:
            return Allowed(headers={}, remove=())
        return Denied(errors.ClientError(self.status, "no", "invalid_request_error", "x"))


async def _check(throttled: ThrottledChecker, address: str, authorization: str = "", xff: str = ""):
    headers = {"x-forwarded-for": xff or address}
    if authorization:
        headers["authorization"] = authorization
    return await throttled.check(address, "POST", "/v1/chat/completions", headers, b"{}")


async def test_a_spamming_client_is_refused_with_429_before_the_expensive_path():
    inner = _Inner(401)
    throttled = ThrottledChecker(inner, FailureBudget(5, 0.001))
    statuses = [verdict_status(await _check(throttled, "192.0.2.1", "Bearer bad")) for _ in range(8)]
    assert statuses == [401] * 5 + [429] * 3 and inner.calls == 5
    refusal = await _check(throttled, "192.0.2.1")
    assert refusal.headers["retry-after"].isdigit()
    assert b'"code": "too_many_failed_requests"' in refusal.error.body()
    assert verdict_status(await _check(throttled, "192.0.2.2", "Bearer bad")) == 401


async def test_successes_cost_nothing_and_proven_keys_pass_a_throttled_address():
    good = ThrottledChecker(_Inner(200), FailureBudget(2, 0.001))
    for _ in range(20):
        assert isinstance(await _check(good, "192.0.2.1", "Bearer good"), Allowed)
    good.inner = _Inner(401)
    for _ in range(3):
        await _check(good, "192.0.2.1", "Bearer junk")
    good.inner = _Inner(200)
    assert isinstance(await _check(good, "192.0.2.1", "Bearer good"), Allowed)
    assert verdict_status(await _check(good, "192.0.2.1", "Bearer new")) == 429


async def test_a_forged_x_forwarded_for_buys_no_new_budget():
    inner = _Inner(401)
    throttled = ThrottledChecker(inner, FailureBudget(3, 0.001), trusted_hops=1)
    # Behind one trusted proxy (10.0.0.5), which appends what it saw; the client wrote the first entries.
    for i in range(10):
        await _check(throttled, "10.0.0.5", "Bearer x", f"9.9.9.{i}, 198.51.100.4, 10.0.0.5")
    assert inner.calls == 3
