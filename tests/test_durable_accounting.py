"""No request goes missing from the ledger when the accounting sink dies (real stack, real Envoy)."""

from __future__ import annotations

import asyncio
import os
import signal

from tests.gateway_helpers import child_pids, client, ledger_rows

MESSAGES = [{"role": "user", "content": "count for me"}]
PROMPT_TOKENS = 3 + 4 + 2  # the simulator's rule by hand: 3 words, 4 per message, 2 per conversation


async def _one(api, i: int) -> tuple[str, int]:
    if i % 2:
        raw = await api.chat.completions.with_raw_response.create(
            model="llama-3-8b", messages=MESSAGES, max_tokens=3 + i % 5, stream=True)
        async for _ in raw.parse():
            pass
    else:
        raw = await api.chat.completions.with_raw_response.create(
            model="llama-3-8b", messages=MESSAGES, max_tokens=3 + i % 5)
    return raw.headers["x-request-id"], PROMPT_TOKENS + 3 + i % 5


async def test_requests_served_while_the_accounting_sink_is_killed_are_all_in_the_ledger(gateway):
    sinks = child_pids(gateway["pid"], "serve accounting")
    assert len(sinks) == 1
    api = client(gateway)
    first = await asyncio.gather(*(_one(api, i) for i in range(20)))
    os.kill(sinks[0], signal.SIGKILL)  # no flush, no goodbye: whatever it held in memory is gone
    during = await asyncio.gather(*(_one(api, i) for i in range(20, 80)))
    expected = dict(first + during)
    rows = await ledger_rows(gateway["database_url"], list(expected))
    assert sorted(rows) == sorted(expected)
    assert {rid: rows[rid]["total_tokens"] for rid in expected} == expected
    assert all(rows[rid]["usage_source"] == "reported" for rid in expected)
