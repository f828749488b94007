"""ext_authz's HTTP/1.1 server, tested as if it faced the internet (it faces Envoy only): malformed, hostile,
slow, partial and pipelined input never crashes it, never hangs it, and never gets an allow.

The checker behind the server allows everything, so any 200 for a malformed request would mean the parser let
it through to the decision. Limits are small so the bounds act within the test.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crosslogic import contract
from crosslogic.extauthz.decision import Allowed
from crosslogic.extauthz.http_transport import authz_http_server
from crosslogic.extauthz.http_wire import BadRequest, Limits, parse_head

LIMITS = Limits(max_head_bytes=4096, max_headers=32, max_body_bytes=2048, request_timeout_s=0.6, idle_timeout_s=1.2,
                max_pipelined=4)
ANSWER_WITHIN_S = 5.0  # a hang fails the test rather than blocking it


def check_request(body: bytes = b'{"model": "m"}', *, path: str = "/v1/chat/completions", method: str = "POST",
                  extra: bytes = b"") -> bytes:
    return (f"{method} {contract.AUTHZ_CHECK_PREFIX}{path} HTTP/1.1\r\nhost: gw\r\n".encode()
            + b"authorization: Bearer good\r\nx-request-id: r1\r\n" + extra
            + f"content-length: {len(body)}\r\n\r\n".encode() + body)


class AllowAll:
    """The decision every request that reaches it gets: an allow. Records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, dict, bytes]] = []

    async def check(self, peer, method, path, headers, body):
        self.calls.append((peer, method, path, headers, body))
        return Allowed(headers={"x-clp-org": "o"}, remove=("authorization",), metadata={"org_id": "o"})


@pytest.fixture
async def server():
    checker = AllowAll()
    async with authz_http_server("127.0.0.1:0", checker, None, LIMITS) as port:
        yield port, checker


async def _exchange(port: int, chunks: list[bytes], pause_s: float = 0.0) -> bytes:
    """Sends the chunks (pausing between them) and reads until the server closes or ANSWER_WITHIN_S passes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for chunk in chunks:
            writer.write(chunk)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            if pause_s:
                await asyncio.sleep(pause_s)
        writer.write_eof() if writer.can_write_eof() else None
        return await asyncio.wait_for(reader.read(), ANSWER_WITHIN_S)
    except ConnectionError:
        return b""
    finally:
        writer.close()


def _statuses(raw: bytes) -> list[int]:
    return [int(line[9:12]) for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


# --- the parser on its own ------------------------------------------------------------------------------------
def test_an_envoy_check_request_is_read_as_sent():
    head = check_request(b"{}", extra=b"x-multi: a\r\nx-multi: b\r\nx-odd: caf\xe9\r\n").split(b"\r\n\r\n")[0]
    parsed = parse_head(head, LIMITS)
    assert (parsed.method, parsed.target, parsed.content_length, parsed.keep_alive) == (
        "POST", "/check/v1/chat/completions", 2, True)
    # Repeated headers joined as Envoy's CheckRequest joins them; bytes >= 0x80 decode (Latin-1), never fail.
    assert parsed.headers["x-multi"] == "a,b" and parsed.headers["x-odd"] == "caf\xe9"


MALFORMED = {
    "no version": b"POST /check/x\r\nhost: gw",
    "HTTP/2 line": b"POST /check/x HTTP/2.0\r\nhost: gw",
    "absolute form": b"POST http://gw/check/x HTTP/1.1\r\nhost: gw",
    "two spaces": b"POST  /check/x HTTP/1.1\r\nhost: gw",
    "header without colon": b"POST /check/x HTTP/1.1\r\nhost gw",
    "space before colon": b"POST /check/x HTTP/1.1\r\nhost : gw",
    "obs-fold": b"POST /check/x HTTP/1.1\r\nx-a: 1\r\n  continued",
    "bare LF": b"POST /check/x HTTP/1.1\nhost: gw",
    "bare CR in value": b"POST /check/x HTTP/1.1\r\nx-a: 1\r2",
    "NUL in value": b"POST /check/x HTTP/1.1\r\nx-a: 1\x002",
    "empty header name": b"POST /check/x HTTP/1.1\r\n: v",
    "duplicate content-length": b"POST /check/x HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1",
    "negative content-length": b"POST /check/x HTTP/1.1\r\ncontent-length: -1",
    "signed content-length": b"POST /check/x HTTP/1.1\r\ncontent-length: +1",
    "overflowing content-length": b"POST /check/x HTTP/1.1\r\ncontent-length: " + b"9" * 5000,
    "content-length list": b"POST /check/x HTTP/1.1\r\ncontent-length: 1, 1",
    "body over the limit": b"POST /check/x HTTP/1.1\r\ncontent-length: 2049",
    "chunked": b"POST /check/x HTTP/1.1\r\ntransfer-encoding: chunked",
    "duplicate host": b"POST /check/x HTTP/1.1\r\nhost: a\r\nhost: b",
    "too many headers": b"POST /check/x HTTP/1.1" + b"".join(b"\r\nx-%d: v" % i for i in range(40)),
    "huge head": b"POST /check/x HTTP/1.1\r\nx-pad: " + b"a" * 5000,
}


@pytest.mark.parametrize("head", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_heads_are_refused_with_a_4xx(head):
    with pytest.raises(BadRequest) as refused:
        parse_head(head, LIMITS)
    assert 400 <= refused.value.error.status < 500


@given(st.binary(max_size=600))
def test_any_bytes_parse_or_are_refused_as_bad_requests(data):
    try:
        parsed = parse_head(data, LIMITS)
    except BadRequest as refused:
        assert 400 <= refused.error.status < 500
    else:
        assert parsed.target.startswith("/") and 0 <= parsed.content_length <= LIMITS.max_body_bytes


# --- the server, over real sockets ----------------------------------------------------------------------------
@pytest.mark.parametrize("head", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_request_is_answered_4xx_and_never_reaches_the_decision(server, head):
    port, checker = server
    raw = await _exchange(port, [head.replace(b"/check/x", b"/check/v1/x") + b"\r\n\r\n" + b"{}" * 8])
    statuses = _statuses(raw)
    assert statuses and all(400 <= s < 500 for s in statuses), raw[:200]
    assert not checker.calls


async def test_keep_alive_partial_writes_and_pipelining_are_served_in_order(server):
    port, checker = server
    one = check_request()
    # Byte by byte, then three at once on the same connection.
    raw = await _exchange(port, [one[i:i + 1] for i in range(len(one))] + [one * 3])
    assert _statuses(raw) == [200] * 4 and len(checker.calls) == 4
    peer, method, path, headers, body = checker.calls[0]
    assert (method, path, body, headers["authorization"]) == ("POST", "/v1/chat/completions", b'{"model": "m"}',
                                                              "Bearer good")


async def test_more_pipelined_requests_than_allowed_close_the_connection(server):
    port, checker = server
    raw = await _exchange(port, [check_request() * 20])
    assert set(_statuses(raw)) == {200} and len(_statuses(raw)) <= LIMITS.max_pipelined + 1


async def test_a_request_that_stops_mid_body_is_never_decided(server):
    port, checker = server
    assert await _exchange(port, [check_request(b"x" * 100)[:-50]]) == b""  # EOF: closed without an answer
    raw = await _exchange(port, [check_request(b"x" * 100)[:-50]], pause_s=LIMITS.request_timeout_s * 3)
    assert _statuses(raw) in ([], [408])  # a slow request past its bound: 408 once the sweep sees it, or closed
    assert not checker.calls


async def test_a_dripping_request_is_cut_at_its_bound_and_an_idle_connection_at_its_own(server):
    port, checker = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = b""
    for byte in check_request()[:30]:  # a byte every 50 ms, until the server answers
        writer.write(bytes([byte]))
        with contextlib.suppress(TimeoutError):
            raw = await asyncio.wait_for(reader.read(), 0.05)
            break
    else:
        raw = await asyncio.wait_for(reader.read(), ANSWER_WITHIN_S)
    writer.close()
    assert _statuses(raw) == [408] and not checker.calls
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), ANSWER_WITHIN_S) == b""  # idle: closed by the server
    writer.close()


async def test_paths_outside_the_check_prefix_are_never_checks(server):
    port, checker = server
    for request in (b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
                    b"POST /checkv1 HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
                    b"GET /release HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
                    b"POST /release HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}"):  # no releaser: admission "rls"
        assert _statuses(await _exchange(port, [request])) == [404]
    assert not checker.calls


async def test_a_head_request_gets_no_body_so_the_next_answer_stays_in_frame(server):
    port, _ = server
    raw = await _exchange(port, [check_request(b"", method="HEAD", path="/v1/models"),
                                 b"GET /nowhere HTTP/1.1\r\n\r\n"])
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and rest.startswith(b"HTTP/1.1 404 ")


def _mutations() -> st.SearchStrategy[bytes]:
    """A valid request (or two, pipelined) with bytes inserted, deleted or replaced anywhere."""
    base = st.sampled_from([check_request(), check_request() + check_request(b"", method="GET")])

    def mutate(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
        buf = bytearray(data)
        for where, cut, insert in edits:
            at = where % (len(buf) + 1)
            buf[at:at + cut] = insert
        return bytes(buf)

    edit = st.tuples(st.integers(0, 10_000), st.integers(0, 3),
                     st.sampled_from([b"", b"\r\n", b"\n", b"\r", b":", b" ", b"\x00", b"\xff", b"-1", b"9" * 30,
                                      b"\r\n\r\n", b"transfer-encoding: chunked\r\n", b"content-length: 3\r\n"]))
    return st.builds(mutate, base, st.lists(edit, min_size=1, max_size=4))


def _expected(data: bytes) -> list[int]:
    """The answers the parser implies for `data` sent at once: each complete valid request is answered (an
    allow), the first invalid one gets its 4xx and ends the connection, an incomplete tail gets nothing."""
    out: list[int] = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return out + ([431] if len(data) > LIMITS.max_head_bytes else [])
        try:
            head = parse_head(data[:end], LIMITS)
        except BadRequest as refused:
            return out + [refused.error.status]
        total = end + 4 + head.content_length
        if len(data) < total:
            return out
        out.append(200 if head.target.startswith(contract.AUTHZ_CHECK_PREFIX + "/") else 404)
        data = data[total:]
        if not head.keep_alive:
            return out
    return out


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_mutations(), cuts=st.lists(st.integers(1, 400), max_size=6))
async def test_mutated_requests_in_any_chunking_get_exactly_what_the_parser_says(server, data, cuts):
    port, checker = server
    before = len(checker.calls)
    chunks, rest = [], data
    for cut in cuts:
        chunks.append(rest[:cut])
        rest = rest[cut:]
    raw = await _exchange(port, [*chunks, rest])
    expected = _expected(data)
    assert _statuses(raw)[:len(expected)] == expected, (data, raw[:300])
    assert len(checker.calls) - before == expected.count(200)  # an allow only for what parsed as valid


async def test_the_server_still_serves_after_all_of_it(server):
    port, checker = server
    for head in MALFORMED.values():
        await _exchange(port, [head + b"\r\n\r\n"])
    assert _statuses(await _exchange(port, [check_request()])) == [200]
