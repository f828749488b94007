"""The model catalogue as authz sees it, reloaded from Postgres when models change."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from crosslogic.extauthz.validation import ModelSpec

log = logging.getLogger("crosslogic.extauthz")

_MODELS_SQL = """
SELECT model_id, kind, context_length, max_output_tokens, default_max_tokens
FROM models WHERE status = 'active'
"""


class ModelCatalogue:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.models: dict[str, ModelSpec] = {}
        self.stale = True
        # Requests arriving during the first load wait for it instead of seeing an empty catalogue
        # (every model 404); during later reloads they use the previous catalogue.
        self._loading = asyncio.Lock()
        self._loaded = False

    def mark_stale(self) -> None:
        self.stale = True

    async def current(self) -> dict[str, ModelSpec]:
        if self.stale or not self._loaded:
            async with self._loading:
                if self.stale:
                    self.stale = False
                    try:
                        rows = await self.pool.fetch(_MODELS_SQL)
                    except Exception:
                        self.stale = True
                        raise
                    self.models = {r["model_id"]: ModelSpec(**dict(r)) for r in rows}
                    self._loaded = True
        return self.models
