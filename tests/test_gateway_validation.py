"""Validation through the real gateway (issue 9 items 1, 4, 5): hostile JSON is a 400 with no traceback anywhere,
OpenAI's parameter refusals reach the official client typed and named, and `n` choices are generated, billed and
reserved n times."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.gateway_helpers import client, ledger_row
from tests.ratelimit_helpers import limited_tenant

# 23 characters with the role: 23 // 4 + 4 (message) + 5 (reply) = 14 estimated prompt tokens (estimate.py).
MESSAGES = [{"role": "user", "content": "Count for me please"}]
ESTIMATED_PROMPT = 14


def _log_size(gateway: dict) -> int:
    return (Path(gateway["state_dir"]) / "up.log").stat().st_size


def _log_since(gateway: dict, offset: int) -> str:
    with open(Path(gateway["state_dir"]) / "up.log", "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


async def _post(gateway: dict, body: bytes) -> tuple[int, str, dict]:
    async with aiohttp.ClientSession() as http, http.post(
        f"{gateway['gateway_url']}/chat/completions", data=body,
        headers={"authorization": f"Bearer {gateway['api_key']}", "content-type": "application/json"},
    ) as response:
        return response.status, response.headers.get("content-type", ""), await response.json(content_type=None)


@pytest.mark.parametrize("depth", [300, 5_000, 100_000])
async def test_deeply_nested_json_is_a_400_and_no_service_logs_a_traceback(gateway, depth):
    before = _log_size(gateway)
    nested = b"[" * depth + b"]" * depth
    for body in (b'{"model": "llama-3-8b", "messages": [{"role": "user", "content": ' + nested + b"}]}",
                 b'{"model": "llama-3-8b", "messages": ' + nested + b"}", nested):
        status, content_type, payload = await _post(gateway, body)
        assert status == 400 and content_type.startswith("application/json")
        assert "nested too deeply" in payload["error"]["message"]
        assert set(payload["error"]) == {"message", "type", "param", "code"}
    ok = await client(gateway).chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=1)
    assert ok.choices  # the gateway is healthy afterwards
    logged = _log_since(gateway, before)
    assert "Traceback" not in logged and "RecursionError" not in logged


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"temperature": 5}, "temperature", "decimal_above_max_value"),
    ({"temperature": "hot"}, "temperature", "invalid_type"),
    ({"top_p": -1}, "top_p", "decimal_below_min_value"),
    ({"n": 1000, "max_tokens": 1}, "n", "integer_above_max_value"),
    ({"presence_penalty": 3}, "presence_penalty", "decimal_above_max_value"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "array_above_max_length"),
    ({"top_logprobs": 2}, "top_logprobs", None),
    ({"stream_options": {"include_usage": True}}, "stream_options", None),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "missing_required_parameter"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
])
async def test_invalid_parameters_are_refused_before_any_node_with_a_typed_openai_error(gateway, fields, param, code):
    with pytest.raises(openai.BadRequestError) as refused:
        await client(gateway).chat.completions.create(**{"model": "llama-3-8b", "messages": MESSAGES, **fields})
    assert refused.value.status_code == 400 and refused.value.response.headers["content-type"] == "application/json"
    assert (refused.value.param, refused.value.code) == (param, code)
    body = refused.value.response.json()["error"]
    assert body["type"] == "invalid_request_error" and body["message"]


async def test_n_choices_are_generated_billed_and_reserved_n_times(gateway):
    tenant = await limited_tenant(gateway, key=(5_000, 100, None))
    raw = await client(gateway, tenant["keys"][0]["api_key"]).chat.completions.with_raw_response.create(
        model="llama-3-8b", messages=MESSAGES, max_tokens=3, n=4)
    completion = raw.parse()
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert completion.usage.completion_tokens == 12
    # A fresh key's full 5,000-token bucket minus the reservation: the prompt once, plus 4 x 3.
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(5_000 - (ESTIMATED_PROMPT + 4 * 3))
    row = await ledger_row(gateway["database_url"], raw.headers["x-request-id"])
    assert row["completion_tokens"] == 12


async def test_n_above_the_models_cap_is_refused_naming_the_cap(gateway):
    with pytest.raises(openai.BadRequestError) as refused:
        await client(gateway).chat.completions.create(model="llama-3-8b", messages=MESSAGES, n=129, max_tokens=1)
    assert refused.value.response.json()["error"]["message"] == (
        "Invalid 'n': integer above maximum value. Expected a value <= 128, but got 129 instead.")


async def test_raw_hostile_bodies_get_only_400s_in_openai_json(gateway):
    bodies = [b'{"model": "llama-3-8b", "messages": [{"role": "user", "content": "x"}], "seed": ' + b"7" * 5000 + b"}",
              b'{"model": "llama-3-8b", "messages": [{"role": "user", "content": "\\ud800"}], "n": NaN}',
              b'{"model": "llama-3-8b", "messages": [1, "two", null, {"role": {}}]}',
              json.dumps({"model": "llama-3-8b", "messages": MESSAGES, "logit_bias": {"x": 1}}).encode(),
              b'{"model": "llama-3-8b", "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}']
    for body in bodies:
        status, content_type, payload = await _post(gateway, body)
        assert status == 400 and content_type.startswith("application/json"), payload
        assert payload["error"]["type"] == "invalid_request_error"
