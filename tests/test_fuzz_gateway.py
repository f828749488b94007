"""Random requests through the whole gateway: whatever a client sends, it gets a 2xx or an OpenAI-shaped 4xx.

Hypothesis builds requests from random methods, paths, headers and bodies (JSON of any shape, payloads that
are almost right, deeply nested JSON, raw bytes) and sometimes breaks their HTTP framing. Each reply must be
2xx, or 4xx with `content-type: application/json` and an OpenAI error object, with no internal header. After
the run: no traceback in any service log, and the gateway still serves a completion.
"""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import raw_http

ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/models/llama-3-8b",
             "/healthz", "/v1/", "/"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-_"
VISIBLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)
# Parameters OpenAI's API takes, with values of any type: what validation must turn into 400s, not 5xx.
PARAMS = ["model", "messages", "prompt", "input", "max_tokens", "n", "temperature", "top_p", "stream",
          "stream_options", "stop", "tools", "tool_choice", "response_format", "logprobs", "top_logprobs",
          "presence_penalty", "frequency_penalty", "seed", "user", "best_of", "suffix", "echo"]


@st.composite
def almost_right(draw) -> bytes:
    body = {"model": draw(st.sampled_from(["llama-3-8b", "bge-small", "", "nope"]) | st.text(max_size=8)),
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for name in draw(st.lists(st.sampled_from(PARAMS), max_size=4, unique=True)):
        body[name] = draw(json_values)
    if body.get("stream") is True:
        body["max_tokens"] = 2  # keep it short
    return json.dumps(body).encode()


@st.composite
def nested(draw) -> bytes:
    """JSON nested deeper than any parser's recursion: in a message's content, or in a parameter."""
    depth = draw(st.sampled_from([50, 500, 1000, 3000, 20000]) | st.integers(1, 5000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    deep = opener * depth + "1" + closer * depth
    if draw(st.booleans()):
        return ('{"model": "llama-3-8b", "messages": [{"role": "user", "content": ' + deep + "}]}").encode()
    return ('{"model": "llama-3-8b", "messages": [{"role": "user", "content": "x"}], "user": ' + deep + "}").encode()


bodies = st.one_of(
    st.just(b""),
    json_values.map(lambda v: json.dumps(v).encode()),
    almost_right(),
    nested(),
    st.binary(max_size=200),
)
header_names = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=20)


@st.composite
def requests(draw, api_key: str) -> bytes:
    extra = draw(st.lists(st.tuples(header_names, st.text(VISIBLE, max_size=40)), max_size=12))
    if draw(st.booleans()):  # the expensive path: a working key, a model endpoint, any body
        method, path = "POST", draw(st.sampled_from(ENDPOINTS[:3]))
        headers = [("authorization", f"Bearer {api_key}"), ("content-type", "application/json"), *extra[:3]]
    else:
        method = draw(st.sampled_from(METHODS) | st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1,
                                                         max_size=8))
        path = draw(st.sampled_from(ENDPOINTS) | st.text(alphabet=TOKEN_CHARS + "/%.?=&", max_size=30).map(
            lambda p: "/" + p))
        headers = extra
        if draw(st.booleans()):
            headers.append(("authorization", draw(st.sampled_from([f"Bearer {api_key}", "Bearer nope", "Basic x",
                                                                   ""]))))
        if draw(st.booleans()):
            headers.append(("content-type", draw(st.sampled_from(["application/json", "text/plain", "", "x/y"]))))
    data = raw_http.request(method, path, headers, draw(bodies))
    if draw(st.integers(0, 9)) == 0:  # now and then, break the framing itself
        where = draw(st.integers(0, len(data)))
        data = data[:where] + draw(st.binary(min_size=1, max_size=8)) + data[where:]
    return data


def _log_sizes(gateway: dict) -> dict[Path, int]:
    return {path: path.stat().st_size for path in Path(gateway["state_dir"]).rglob("*.log")}


def _new_log_text(gateway: dict, before: dict[Path, int]) -> dict[Path, str]:
    new = {}
    for path in Path(gateway["state_dir"]).rglob("*.log"):
        with path.open("rb") as log:
            log.seek(before.get(path, 0))
            new[path] = log.read().decode(errors="replace")
    return new


def test_random_requests_get_2xx_or_openai_4xx_and_leave_no_traceback(gateway):
    before = _log_sizes(gateway)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.too_slow])
    @given(data=requests(gateway["api_key"]))
    def one(data: bytes) -> None:
        reply = raw_http.send(gateway, data)
        assert reply.status is not None, ("no answer", data[:300])
        assert 200 <= reply.status < 300 or 400 <= reply.status < 500, (reply.status, reply.raw[:400], data[:300])
        assert not [k for k, _ in reply.headers if k.startswith(("x-envoy-", "x-clp-"))], reply.headers
        if reply.status >= 400 and not data.startswith(b"HEAD "):
            reply.openai_error()

    one()
    tracebacks = {str(path): text[text.index("Traceback"):][:1500]
                  for path, text in _new_log_text(gateway, before).items() if "Traceback" in text}
    assert not tracebacks, tracebacks
    healthy = raw_http.send(gateway, raw_http.request("POST", "/v1/chat/completions", {
        "authorization": f"Bearer {gateway['api_key']}", "content-type": "application/json"},
        json.dumps({"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 2}).encode()))
    assert healthy.status == 200 and json.loads(healthy.body)["choices"]
