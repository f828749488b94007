"""OpenAI request validation (pure)."""

from __future__ import annotations

import json

import pytest

from crosslogic.errors import ClientError
from crosslogic.extauthz.validation import Endpoint, ModelSpec, endpoint_for, validate_request

MODELS = {
    "chat": ModelSpec("chat", "chat", context_length=8192, max_output_tokens=100, default_max_tokens=50),
    "embed": ModelSpec("embed", "embedding", context_length=512, max_output_tokens=1, default_max_tokens=1),
}


def check(endpoint: Endpoint, body: object, allowed: frozenset[str] = frozenset()):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return validate_request(endpoint, raw, MODELS, allowed)


def test_chat_request_yields_model_stream_and_token_budget():
    facts = check(Endpoint.CHAT, {"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 20, "stream": True, "stream_options": {"include_usage": True}})
    assert (facts.model, facts.stream, facts.client_wants_usage, facts.max_tokens) == ("chat", True, True, 20)


def test_absent_max_tokens_reserves_the_model_default():
    facts = check(Endpoint.CHAT, {"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    assert facts.max_tokens == 50


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"", 400, None),
    (b"[1, 2]", 400, None),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ({"model": "chat"}, 400, "messages"),
    ({"model": "chat", "messages": "hello"}, 400, "messages"),
    ({"model": "chat", "messages": [{"role": "user"}], "max_tokens": 101}, 400, "max_tokens"),
    ({"model": "chat", "messages": [{"role": "user"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "chat", "messages": [{"role": "user"}], "max_tokens": True}, 400, "max_tokens"),
    ({"model": "chat", "messages": [{"role": "user"}], "stream": "yes"}, 400, "stream"),
    ({"model": "nope", "messages": [{"role": "user"}]}, 404, "model"),
    ({"model": "embed", "messages": [{"role": "user"}]}, 404, "model"),
])
def test_invalid_chat_requests_are_refused_with_the_right_status(body, status, param):
    with pytest.raises(ClientError) as refused:
        check(Endpoint.CHAT, body)
    assert refused.value.status == status and refused.value.param == param


def test_models_outside_the_environment_allowance_are_not_found():
    with pytest.raises(ClientError) as refused:
        check(Endpoint.CHAT, {"model": "chat", "messages": [{"role": "user"}]}, frozenset({"other"}))
    assert refused.value.status == 404


def test_embeddings_need_input_and_never_stream():
    facts = check(Endpoint.EMBEDDINGS, {"model": "embed", "input": ["a", "b"], "stream": True})
    assert facts.stream is False and facts.max_tokens == 0
    with pytest.raises(ClientError):
        check(Endpoint.EMBEDDINGS, {"model": "embed"})


def test_endpoint_lookup_ignores_query_and_trailing_slash():
    assert endpoint_for("/v1/chat/completions?x=1") is Endpoint.CHAT
    assert endpoint_for("/v1/embeddings/") is Endpoint.EMBEDDINGS
    assert endpoint_for("/v1/files") is None
