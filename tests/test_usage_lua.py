"""envoy_assets/lua/usage.lua on LuaJIT: streams shown as OpenAI sends them whatever the node's chunking, usage exact,
node errors in OpenAI's shape, leases released before the client can see the end (tests/usage_lua_harness.py).
The same filter inside Envoy: test_gateway_streams.py."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.usage_lua_harness import UsageFilter

SSE = "text/event-stream; charset=utf-8"
LEASE = {"lease": "req-1", "org_id": "o-1", "env_id": "e-1", "key_id": "k-1", "region": "ap-south"}
FILTER = UsageFilter()


def compact(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def events_of(body: bytes) -> list:
    """The data payloads of an SSE body (JSON decoded), checking vLLM/OpenAI framing on the way."""
    assert body.endswith(b"\n\n") or body == b""
    out = []
    for raw in body.split(b"\n\n")[:-1]:
        assert raw.startswith(b"data: "), raw
        payload = raw[6:]
        out.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return out


def complete_events(prefix: bytes) -> list:
    """The events a client could have parsed from the first bytes of a stream."""
    return events_of(prefix[:prefix.rfind(b"\n\n") + 2]) if b"\n\n" in prefix else []


# ----------------------------------------------------------------------------------------- the node's stream

# Generated text with the byte sequences the filter looks for: JSON escaping must keep them from confusing it.
texts = st.lists(st.sampled_from(['a', ' ', '"', '\\', '\n', '{', '}', 'é', '語', '"usage":{', 'data: ',
                                  '[DONE]', '"choices":[]', '\n\n']), max_size=6).map("".join)


@st.composite
def node_streams(draw):
    """What vLLM sends when asked for include_usage + continuous_usage_stats: per choice, a role chunk, then one
    chunk per token with cumulative usage; then the usage-only chunk and [DONE], or an error event and [DONE],
    or nothing more (the node died / the stream was cut)."""
    obj = draw(st.sampled_from(["chat.completion.chunk", "text_completion"]))
    n = draw(st.integers(1, 3))
    prompt = draw(st.integers(0, 5000))
    lengths = [draw(st.integers(0, 5)) for _ in range(n)]
    head = {"id": "chatcmpl-1", "object": obj, "created": 1, "model": "llama-3-8b"}
    events, sent = [], [0] * n
    for i in range(n):
        if obj == "chat.completion.chunk":
            events.append({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}],
                           "usage": {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0}})
    for step in range(max(lengths, default=0)):
        for i in range(n):
            if lengths[i] > step:
                sent[i] += 1
                last = sent[i] == lengths[i]
                choice = {"index": i, "delta": {"content": draw(texts)}, "logprobs": None,
                          "finish_reason": "length" if last else None}
                events.append({**head, "choices": [choice],
                               "usage": {"prompt_tokens": prompt, "total_tokens": prompt + sent[i],
                                         "completion_tokens": sent[i], "completion_tokens_details": None}})
    ending = draw(st.sampled_from(["usage", "error", "cut"]))
    payloads = [compact(e) for e in events]
    if ending == "usage":
        payloads.append(compact({**head, "choices": [], "usage": {"prompt_tokens": prompt,
                                                                  "total_tokens": prompt + sum(sent),
                                                                  "completion_tokens": sum(sent)},
                                 "system_fingerprint": "vllm-0.32.0-x"}))
    if ending == "error":
        payloads.append(json.dumps({"error": {"message": "Internal server error", "type": "InternalServerError",
                                              "param": None, "code": 500}}).encode())
    if ending != "cut":
        payloads.append(b"[DONE]")
    return {"body": b"".join(event(p) for p in payloads), "events": events, "ending": ending,
            "prompt": prompt, "completion": sum(sent), "any_event": bool(events)}


def expected_events(stream: dict, mode: str) -> list:
    """What OpenAI would send for the node's stream (the client asked for `mode`)."""
    out = []
    for e in events_of(stream["body"]):
        if isinstance(e, str) or "error" in e:
            out.append(e)
            continue
        final = e["choices"] == []
        if mode == "sse-strip":
            if final:
                continue
            e = {k: v for k, v in e.items() if k != "usage"}
        elif mode == "sse-null" and not final:
            e = {**e, "usage": None}
        out.append(e)
    return out


def split(body: bytes, cuts: list[int], at_events: bool) -> list[bytes]:
    """body cut at `cuts` (anywhere), and after every event when `at_events` (one write per event, as vLLM)."""
    points = {c % (len(body) + 1) for c in cuts}
    if at_events:
        points |= {i + 2 for i in range(len(body)) if body.startswith(b"\n\n", i)}
    points = sorted(points)
    pieces, start = [], 0
    for p in [*points, len(body)]:
        pieces.append(body[start:p])  # empty pieces too: Envoy hands those over (e.g. the end of stream)
        start = p
    return pieces


MODES = st.sampled_from(["sse-strip", "sse-null", "sse-keep"])


@settings(max_examples=300, deadline=None)
@given(node_streams(), MODES, st.lists(st.integers(0, 10_000), max_size=40), st.booleans(), st.booleans())
def test_any_chunking_of_the_node_stream_gives_openai_events_and_exact_usage(stream, mode, cuts, at_events,
                                                                             arrive_during_call):
    whole = FILTER.respond(200, SSE, [stream["body"]], mode, authz=LEASE)
    chunked = FILTER.respond(200, SSE, split(stream["body"], cuts, at_events), mode, authz=LEASE,
                             arrive_during_call=arrive_during_call)
    assert chunked.body == whole.body  # the chunking never changes what the client gets
    got = events_of(chunked.body)
    want = expected_events(stream, mode)
    assert [e for e in got if not (isinstance(e, dict) and "error" in e)] == \
           [e for e in want if not (isinstance(e, dict) and "error" in e)]
    if stream["ending"] == "error":
        error = [e for e in got if isinstance(e, dict) and "error" in e]
        assert error == [{"error": {"message": "The model server failed to process the request. Please retry.",
                                    "type": "server_error", "param": None, "code": "bad_gateway"}}]
    # Usage: what the node reported, exactly (summed over choices when the stream was cut or failed).
    if stream["any_event"]:
        assert (chunked.usage["prompt_tokens"], chunked.usage["completion_tokens"]) == (
            stream["prompt"], stream["completion"])
    assert chunked.usage["finished"] is (stream["ending"] != "cut")
    assert chunked.usage == whole.usage
    # The lease is released once, before the client can see the end of the stream.
    (call,) = chunked.calls
    assert (call.cluster, call.method, call.path) == ("crosslogic_release", "POST", "/release")
    assert json.loads(call.body) == {"request_id": "req-1", "org_id": "o-1", "env_id": "e-1", "key_id": "k-1",
                                     "region": "ap-south"}
    assert not any(e == "[DONE]" or (isinstance(e, dict) and (e.get("choices") == [] or "error" in e))
                   for e in complete_events(chunked.sent_before(call)))


def test_without_a_lease_no_release_call_is_made():
    body = event(compact({"choices": [{"index": 0, "delta": {}}], "usage": {"prompt_tokens": 1,
                                                                          "completion_tokens": 1}})) + event(b"[DONE]")
    assert FILTER.respond(200, SSE, [body], "sse-strip").calls == []
    assert FILTER.respond(200, "application/json", [b'{"usage":{}}'], "json").calls == []
    assert FILTER.respond(400, "application/json", [b"{}"], "json").calls == []


def test_a_failing_release_endpoint_changes_nothing_for_the_client():
    body = event(b'{"choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":3,"completion_tokens":2}}')
    ok = FILTER.respond(200, SSE, [body, event(b"[DONE]")], "sse-null", authz=LEASE)
    failed = FILTER.respond(200, SSE, [body, event(b"[DONE]")], "sse-null", authz=LEASE, release_status="503")
    assert failed.body == ok.body and failed.usage == ok.usage
    assert len(ok.calls) == 1 and len(failed.calls) == 2  # a failed release is made once more, then left


def test_a_stream_that_ends_inside_an_event_passes_its_bytes_on():
    body = event(b'{"choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}')
    out = FILTER.respond(200, SSE, [body, b'data: {"choices":[{"ind'], "sse-strip", authz=LEASE)
    assert out.body == b'data: {"choices":[{"index":0,"delta":{}}]}\n\ndata: {"choices":[{"ind'
    assert out.usage["finished"] is False and out.usage["completion_tokens"] == 1
    assert len(out.calls) == 1  # released at the end even without [DONE]


def test_comments_and_crlf_framed_events_are_understood():
    usage = b'{"choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":4,"completion_tokens":2}}'
    body = b": keep-alive\r\n\r\ndata: " + usage + b"\r\n\r\ndata: [DONE]\r\n\r\n"
    out = FILTER.respond(200, SSE, [body[:20], body[20:]], "sse-strip")
    assert out.body == b': keep-alive\r\n\r\ndata: {"choices":[{"index":0,"delta":{}}]}\r\n\r\ndata: [DONE]\r\n\r\n'
    assert (out.usage["prompt_tokens"], out.usage["completion_tokens"], out.usage["finished"]) == (4, 2, True)


# ------------------------------------------------------------------------------------- non-streamed bodies


def test_a_json_body_passes_untouched_its_usage_read_and_the_lease_released_on_its_last_chunk():
    body = compact({"id": "x", "choices": [{"index": 0, "message": {"content": '"usage":{"prompt_tokens": 9}'}}],
                    "usage": {"prompt_tokens": 12, "total_tokens": 19, "completion_tokens": 7}})
    pieces = [body[:30], body[30:61], body[61:]]
    out = FILTER.respond(200, "application/json", pieces, "json", authz=LEASE)
    assert out.body == body and out.chunks == pieces
    assert (out.usage["prompt_tokens"], out.usage["completion_tokens"], out.usage["finished"]) == (12, 7, True)
    (call,) = out.calls
    assert call.held == 3  # the last chunk waits for the release


def test_requests_get_the_forced_stream_options_only_when_streaming():
    body = b'{"model":"m","stream":true,"stream_options":{"include_usage":false}}'
    out, meta = FILTER.request({"x-clp-usage-mode": "sse-strip"}, body)
    assert json.loads(out)["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert meta["crosslogic.usage"]["mode"] == "sse-strip"
    assert FILTER.request({"x-clp-usage-mode": "json"}, b'{"model":"m"}')[0] == b'{"model":"m"}'


# ------------------------------------------------------------------------------------------- node errors

VLLM_400 = compact({"error": {"message": "max_tokens=9000 cannot be greater than max_model_len=8192. Please "
                                         "request fewer output tokens. (parameter=max_tokens, value=9000)",
                              "type": "BadRequestError", "param": "max_tokens", "code": 400}})


@pytest.mark.parametrize(("status", "content_type", "body", "want_status", "want_type", "want_code"), [
    (400, "application/json", VLLM_400, 400, "invalid_request_error", "invalid_request_error"),
    (400, "application/json", compact({"error": {"message": "1 validation error:\n  {'type': 'missing'}",
                                                 "type": "Bad Request", "param": "body.messages", "code": 400}}),
     400, "invalid_request_error", "invalid_request_error"),
    (404, "application/json", compact({"error": {"message": "The model `x` does not exist.",
                                                 "type": "NotFoundError", "param": "model", "code": 404}}),
     404, "invalid_request_error", "model_not_found"),
    (404, "application/json", b'{"detail":"Not Found"}', 404, "invalid_request_error", "not_found"),
    (422, "application/json", b'{"object":"error","message":"bad","type":"BadRequestError","code":422}', 422,
     "invalid_request_error", "invalid_request_error"),
    (429, "application/json", b'{"error":{"message":"too many","type":"TooManyRequests","code":429}}', 429,
     "server_error", "server_busy"),
    (401, "application/json", b'{"error":"Unauthorized"}', 502, "server_error", "bad_gateway"),
    (500, "application/json", compact({"error": {"message": "Traceback (most recent call last): File x",
                                                 "type": "InternalServerError", "param": None, "code": 500}}),
     502, "server_error", "bad_gateway"),
    (503, "text/plain", b"", 503, "server_error", "service_unavailable"),
    (504, "text/html", b"<html>gateway timeout</html>", 504, "server_error", "timeout"),
    (502, "text/html; charset=utf-8", b"<html><body>Bad Gateway from 10.0.0.7:8000</body></html>", 502,
     "server_error", "bad_gateway"),
    (200, "text/html", b"<html>a captive portal</html>", 502, "server_error", "bad_gateway"),
    (302, None, b"", 502, "server_error", "bad_gateway"),
])
def test_every_node_error_reaches_the_client_in_openai_shape(status, content_type, body, want_status, want_type,
                                                              want_code):
    out = FILTER.respond(status, content_type, [body[:7], body[7:]] if body else [], "json", authz=LEASE,
                         extra_headers={"content-encoding": "gzip"} if status == 500 else None)
    assert out.status == want_status
    assert out.headers["content-type"] == "application/json"
    assert "content-encoding" not in out.headers
    error = out.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (want_type, want_code)
    assert error["message"] and "Traceback" not in error["message"] and "10.0.0.7" not in error["message"]
    if want_status == 429:
        assert out.headers["retry-after"] == "1"
    assert len(out.calls) == 1  # the node answered: its lease goes back at once


def test_a_node_400_keeps_its_message_and_param():
    error = FILTER.respond(400, "application/json", [VLLM_400], "json").json()["error"]
    assert error["param"] == "max_tokens"
    assert error["message"].startswith("max_tokens=9000 cannot be greater than max_model_len=8192.")


def test_envoys_own_openai_replies_keep_their_words():
    body = compact({"error": {"message": "No capacity is available for this model right now. Please retry.",
                              "type": "server_error", "param": None, "code": "service_unavailable"}})
    out = FILTER.respond(503, "application/json", [body], "sse-strip")
    assert out.status == 503 and out.json() == json.loads(body)


@given(st.text(max_size=2000))
@settings(max_examples=200, deadline=None)
def test_any_node_message_becomes_a_short_valid_json_string_without_addresses(message):
    raw = compact({"error": {"message": "at http://10.1.2.3:8000/v1 and node-7.internal:9000 " + message,
                             "type": "BadRequestError", "param": None, "code": 400}})
    out = FILTER.respond(400, "application/json", [raw], "json")
    error = out.json()["error"]  # valid JSON whatever the message held
    assert len(error["message"].encode()) <= 512 + 3
    assert "10.1.2.3" not in error["message"] and "node-7.internal" not in error["message"]
    assert error["type"] == "invalid_request_error"


def test_a_bare_backslash_or_broken_utf8_cannot_break_the_reply():
    raw = b'{"error":{"message":"bad \\q escape \\u12 and \xff\xfe bytes","type":"x","code":400}}'
    error = FILTER.respond(400, "application/json", [raw], "json").json()["error"]
    assert "escape" in error["message"] and "bytes" in error["message"]
