"""The vLLM node simulator, exercised the way the gateway and agents use a real vLLM 0.32 node."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crosslogic.sim import tokens
from crosslogic.sim.__main__ import parse_args
from crosslogic.sim.server import RunningSimulator, SimulatorConfig, running_simulator

MODEL = "llama-3-8b"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": "say three words"}]},
]
# The token rule worked out by hand (test_token_rules_are_word_counts_with_chat_overhead checks the rule itself):
# 3 words + 4 per message, twice, + 2 per conversation.
PROMPT = (3 + 4) + (3 + 4) + 2


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    async with running_simulator(SimulatorConfig(models=[MODEL, "alias"]), shutdown_timeout=1) as running:
        yield running


@pytest.fixture
async def client(sim: RunningSimulator) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def sse_events(resp: aiohttp.ClientResponse) -> list[str]:
    """Raw ``data:`` payloads, checking the exact vLLM framing: ``data: <payload>\\n\\n``."""
    body = (await resp.read()).decode()
    assert body.endswith("\n\n")
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    return [e.removeprefix("data: ") for e in events]


async def metric_values(http: aiohttp.ClientSession, sim: RunningSimulator) -> dict[tuple, float]:
    async with http.get(f"{sim.url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def series(name: str, **labels: str) -> tuple:
    return name, tuple(sorted({"model_name": MODEL, "engine": "0", **labels}.items()))


# ------------------------------------------------------------------------------------------ token rules


def test_token_rules_are_word_counts_with_chat_overhead():
    assert tokens.count_prompt_tokens("hello big world") == 3
    assert tokens.count_prompt_tokens("") == 1  # the BOS token
    assert tokens.chat_prompt_tokens(MESSAGES) == (3 + 4) + (3 + 4) + 2
    assert tokens.chat_prompt_tokens([{"role": "assistant", "content": None}]) == 6
    assert tokens.batch_prompt_tokens(["a b", "c"]) == 3
    assert tokens.batch_prompt_tokens([5, 6, 7]) == 3
    assert tokens.batch_prompt_tokens([[5, 6], [7]]) == 3
    assert tokens.completion_tokens_for(5, 16) == 5
    assert tokens.completion_tokens_for(None, 16) == 16
    assert tokens.generated_text(3) == "tok0 tok1 tok2"
    assert tokens.count_prompt_tokens(tokens.generated_text(7)) == 7


def test_output_is_clamped_to_the_context_window_like_vllm():
    assert tokens.plan_completion(10, 5, 16, 100) == tokens.CompletionPlan(5, "length")
    assert tokens.plan_completion(10, None, 16, 100) == tokens.CompletionPlan(16, "stop")
    assert tokens.plan_completion(90, 50, 16, 100) == tokens.CompletionPlan(10, "length")
    assert tokens.plan_completion(90, None, 16, 100) == tokens.CompletionPlan(10, "length")


# --------------------------------------------------------------------------------------- chat completions


async def test_chat_usage_equals_the_token_rule_prediction(client: openai.AsyncOpenAI):
    out = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    assert out.id.startswith("chatcmpl-")
    assert out.object == "chat.completion"
    assert out.model == MODEL
    assert out.system_fingerprint.startswith("vllm-0.32.0-")
    (choice,) = out.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "tok0 tok1 tok2 tok3 tok4"
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == PROMPT
    assert out.usage.completion_tokens == 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5
    assert out.usage.prompt_tokens_details is None


async def test_chat_without_max_tokens_writes_the_default_and_stops(client: openai.AsyncOpenAI):
    out = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == 16


async def test_any_served_alias_is_accepted_and_answered_under_the_first_name(client: openai.AsyncOpenAI):
    out = await client.chat.completions.create(model="alias", messages=MESSAGES, max_completion_tokens=2)
    assert out.model == MODEL
    assert out.usage.completion_tokens == 2


async def test_n_choices_each_write_the_tokens_and_usage_adds_them(client: openai.AsyncOpenAI):
    out = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, n=2)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.usage.completion_tokens == 6


async def test_stream_with_include_usage_ends_with_usage_chunk_then_done(client: openai.AsyncOpenAI):
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    content = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert content == ["tok0 ", "tok1 ", "tok2 ", "tok3"]
    assert [c.choices[0].finish_reason for c in chunks[1:-1]] == [None, None, None, "length"]
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (PROMPT, 4)
    assert len({c.id for c in chunks}) == 1


async def test_continuous_usage_stats_put_cumulative_usage_on_every_chunk(client: openai.AsyncOpenAI):
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = [c async for c in stream]
    prompt = PROMPT
    assert [(c.usage.prompt_tokens, c.usage.completion_tokens) for c in chunks] == [
        (prompt, 0), (prompt, 1), (prompt, 2), (prompt, 3), (prompt, 3)]
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)


async def test_continuous_usage_stats_alone_is_ignored_as_in_vllm(sim: RunningSimulator, http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "stream": True,
            "stream_options": {"continuous_usage_stats": True}}
    async with http.post(f"{sim.base_url}/chat/completions", json=body) as resp:
        events = await sse_events(resp)
    assert not any("usage" in json.loads(e) for e in events[:-1])


async def test_raw_sse_framing_matches_vllm(sim: RunningSimulator, http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "stream": True}
    async with http.post(f"{sim.base_url}/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    # Without include_usage vLLM leaves the usage key out entirely (exclude_unset), it does not send null.
    assert not any("usage" in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["system_fingerprint"].startswith("vllm-0.32.0-")


# ---------------------------------------------------------------------------------------------- errors


async def test_unknown_model_is_404_in_vllm_error_shape(client: openai.AsyncOpenAI):
    with pytest.raises(openai.NotFoundError) as err:
        await client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert err.value.status_code == 404
    assert err.value.body == {
        "message": "The model `gpt-9` does not exist. Valid aliases: llama-3-8b, alias.",
        "type": "NotFoundError", "param": "model", "code": 404}


@pytest.mark.parametrize(("data", "param"), [
    (b"{not json", "body.1"),
    (json.dumps({"model": MODEL}).encode(), "body.messages"),
])
async def test_malformed_requests_are_400_bad_request(sim: RunningSimulator, http, data: bytes, param: str):
    async with http.post(f"{sim.base_url}/chat/completions", data=data,
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert (error["type"], error["param"], error["code"]) == ("Bad Request", param, 400)
    assert error["message"].startswith("1 validation error:")


async def test_max_tokens_beyond_max_model_len_is_400(client: openai.AsyncOpenAI):
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=9000)
    assert err.value.body["type"] == "BadRequestError"
    assert err.value.body["param"] == "max_tokens"
    assert "cannot be greater than max_model_len=8192" in err.value.body["message"]


async def test_stream_options_without_stream_is_400(sim: RunningSimulator, http):
    body = {"model": MODEL, "messages": MESSAGES, "stream_options": {"include_usage": True}}
    async with http.post(f"{sim.base_url}/chat/completions", json=body) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["param"] == "stream_options"
    assert error["message"].startswith("Stream options can only be defined when `stream=True`.")


async def test_unknown_route_is_404_in_error_shape(sim: RunningSimulator, http):
    async with http.get(f"{sim.url}/v1/nope") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == 404


# ----------------------------------------------------------------------------------------- completions


@pytest.mark.parametrize(("prompt", "n_prompts", "prompt_tokens"), [
    ("one two three", 1, 3), (["a b", "c d e"], 2, 5), ([11, 12, 13, 14], 1, 4), ([[1, 2], [3]], 2, 3)])
async def test_completions_usage_for_every_prompt_form(client: openai.AsyncOpenAI, prompt, n_prompts, prompt_tokens):
    out = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=3)
    assert out.id.startswith("cmpl-")
    assert [c.index for c in out.choices] == list(range(n_prompts))
    assert all(c.text == "tok0 tok1 tok2" and c.finish_reason == "length" for c in out.choices)
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == 3 * n_prompts


async def test_completions_default_max_tokens_is_16_like_vllm(client: openai.AsyncOpenAI):
    out = await client.completions.create(model=MODEL, prompt="hi")
    assert out.usage.completion_tokens == 16
    assert out.choices[0].finish_reason == "length"


async def test_completions_stream_with_usage(client: openai.AsyncOpenAI):
    stream = await client.completions.create(
        model=MODEL, prompt="a b c d", max_tokens=3, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks[:-1]) == "tok0 tok1 tok2"
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (4, 3)


# ------------------------------------------------------------------------------------ embeddings, models


async def test_embeddings_are_deterministic_with_prompt_only_usage(client: openai.AsyncOpenAI, sim, http):
    out = await client.embeddings.create(model=MODEL, input=["hello world", "x"])  # client asks base64
    assert [d.index for d in out.data] == [0, 1]
    hello, x = (d.embedding for d in out.data)
    assert len(hello) == len(x) == 8 and hello != x
    assert math.fsum(v * v for v in hello) == pytest.approx(1.0)  # unit length, as vLLM normalises
    assert out.usage.prompt_tokens == out.usage.total_tokens == 3  # 2 words + 1 word
    async with http.post(f"{sim.base_url}/embeddings", json={"input": "hello world"}) as resp:
        raw = await resp.json()  # floats this time, and a second request: the same vector
    assert raw["id"].startswith("embd-")
    assert raw["data"][0]["embedding"] == pytest.approx(hello, abs=1e-6)
    assert raw["usage"] == {"prompt_tokens": 2, "total_tokens": 2, "completion_tokens": 0,
                            "prompt_tokens_details": None, "completion_tokens_details": None}


async def test_models_lists_served_names_in_vllm_shape(client: openai.AsyncOpenAI, sim, http):
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL, "alias"]
    async with http.get(f"{sim.base_url}/models") as resp:
        card = (await resp.json())["data"][0]
    assert card["object"] == "model" and card["owned_by"] == "vllm"
    assert card["root"] == MODEL and card["parent"] is None and card["max_model_len"] == 8192
    assert card["permission"][0]["object"] == "model_permission"


async def test_health_and_version(sim: RunningSimulator, http):
    async with http.get(f"{sim.url}/health") as resp:
        assert (resp.status, await resp.read()) == (200, b"")
    async with http.get(f"{sim.url}/version") as resp:
        assert await resp.json() == {"version": "0.32.0"}
    async with http.post(f"{sim.url}/sim/config", json={"healthy": False}) as resp:
        assert (await resp.json())["healthy"] is False
    async with http.get(f"{sim.url}/health") as resp:
        assert resp.status == 503


# -------------------------------------------------------------------------------------- metrics, stats


async def test_metrics_expose_vllm_series_and_counters_follow_usage(client, sim, http):
    before = await metric_values(http, sim)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert before[series(name)] == 0
    out = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=7)
    after = await metric_values(http, sim)
    assert after[series("vllm:prompt_tokens_total")] == out.usage.prompt_tokens
    assert after[series("vllm:generation_tokens_total")] == 7
    assert after[series("vllm:request_success_total", finished_reason="length")] == 1
    assert after[series("vllm:time_to_first_token_seconds_count")] == 1
    assert after[series("vllm:e2e_request_latency_seconds_count")] == 1
    assert (sim.stats.prompt_tokens, sim.stats.completion_tokens) == (out.usage.prompt_tokens, 7)


async def wait_until(predicate, steps: int = 500) -> None:
    """Poll the in-process state; bounded, so a broken server fails the test instead of hanging it."""
    for _ in range(steps):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_client_disconnect_mid_stream_counts_only_generated_tokens(sim: RunningSimulator, http):
    sim.set_config(tokens_per_sec=100)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1000, "stream": True}
    resp = await http.post(f"{sim.base_url}/chat/completions", json=body)
    received = 0
    async for line in resp.content:
        if line.startswith(b"data: ") and b'"content":"tok' in line:
            received += 1
            if received == 3:
                break
    resp.close()  # drops the connection mid-stream
    await wait_until(lambda: sim.stats.requests_running == 0)
    assert sim.stats.finished["abort"] == 1
    assert 3 <= sim.stats.completion_tokens < 1000
    values = await metric_values(http, sim)
    assert values[series("vllm:generation_tokens_total")] == sim.stats.completion_tokens
    assert values[series("vllm:request_success_total", finished_reason="abort")] == 1
    # The server is still serving.
    async with http.get(f"{sim.url}/health") as health:
        assert health.status == 200


async def test_requests_beyond_max_num_seqs_wait(http):
    config = SimulatorConfig(models=[MODEL], max_num_seqs=1, tokens_per_sec=200)
    async with running_simulator(config, shutdown_timeout=1) as sim:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 20}
        first = asyncio.create_task(http.post(f"{sim.base_url}/chat/completions", json=body))
        await wait_until(lambda: sim.stats.requests_running == 1)
        second = asyncio.create_task(http.post(f"{sim.base_url}/chat/completions", json=body))
        await wait_until(lambda: sim.stats.requests_waiting == 1)
        values = await metric_values(http, sim)
        assert values[series("vllm:num_requests_waiting")] == 1
        assert values[series("vllm:num_requests_running")] == 1
        assert values[series("vllm:kv_cache_usage_perc")] > 0
        for task in (first, second):
            resp = await task
            assert resp.status == 200
            resp.release()
        assert sim.stats.completion_tokens == 40


async def test_runtime_config_and_stats_endpoints(sim: RunningSimulator, http):
    async with http.post(f"{sim.url}/sim/config", json={"default_completion_tokens": 2}) as resp:
        assert (await resp.json())["default_completion_tokens"] == 2
    async with http.post(f"{sim.url}/sim/config", json={"max_model_len": 1}) as resp:
        assert resp.status == 400
    async with http.post(f"{sim.base_url}/chat/completions", json={"messages": MESSAGES}) as resp:
        assert (await resp.json())["usage"]["completion_tokens"] == 2
    async with http.get(f"{sim.url}/sim/stats") as resp:
        stats = await resp.json()
    assert stats["completion_tokens"] == 2 and stats["finished"]["stop"] == 1


def test_cli_flags_build_the_config():
    config, args = parse_args(["--port", "8001", "--model", "a", "--model", "b", "--ttft-ms", "5",
                               "--tokens-per-sec", "30", "--completion-tokens", "9", "--node-name", "n1"])
    assert args.port == 8001
    assert config == SimulatorConfig(models=("a", "b"), ttft_ms=5, tokens_per_sec=30,
                                     default_completion_tokens=9, node_name="n1")


async def test_client_disconnect_during_a_non_streamed_request_aborts_it(sim: RunningSimulator, http):
    sim.set_config(tokens_per_sec=100)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1000}
    pending = asyncio.create_task(http.post(f"{sim.base_url}/chat/completions", json=body))
    await wait_until(lambda: sim.stats.completion_tokens >= 3)
    pending.cancel()  # aiohttp drops the connection of a cancelled request
    await wait_until(lambda: sim.stats.requests_running == 0)
    assert sim.stats.finished["abort"] == 1
    assert sim.stats.completion_tokens < 1000


async def test_x_request_id_header_becomes_the_response_id(sim: RunningSimulator, http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1}
    async with http.post(f"{sim.base_url}/chat/completions", json=body, headers={"X-Request-Id": "r42"}) as resp:
        assert (await resp.json())["id"] == "chatcmpl-r42"
