"""Helpers for tests that drive the real gateway."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import openai

from crosslogic.sim import tokens

LEDGER_WAIT_S = 15.0


async def ledger_row(database_url: str, request_id: str) -> asyncpg.Record:
    """The ledger row of one request, waiting for the access-log flush (never a timing assertion)."""
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + LEDGER_WAIT_S
        while True:
            row = await conn.fetchrow("SELECT * FROM usage_records WHERE request_id = $1", request_id)
            if row is not None or time.monotonic() > deadline:
                assert row is not None, f"no ledger row for request {request_id}"
                return row
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


def client(gateway: dict, api_key: str | None = None, **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway["gateway_url"], api_key=api_key or gateway["api_key"],
                              max_retries=0, **kwargs)


def expected_chat_prompt_tokens(messages: list[dict]) -> int:
    return tokens.chat_prompt_tokens(messages)
