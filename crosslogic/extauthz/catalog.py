"""The model catalogue as authz sees it, reloaded from Postgres when models change."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from crosslogic.extauthz.validation import ModelSpec

log = logging.getLogger("crosslogic.extauthz")

_MODELS_SQL = """
SELECT model_id, kind, context_length, max_output_tokens, default_max_tokens, max_n
FROM models WHERE status = 'active'
"""
# Orgs with dedicated nodes: their requests go to their reserved lane (`region/model@org`, issue 4).
_RESERVED_ORGS_SQL = """
SELECT DISTINCT reserved_org_id::text AS org_id FROM nodes WHERE reserved_org_id IS NOT NULL
  AND status NOT IN ('dead', 'terminated') AND site_id IS NULL  -- a site's nodes are no cloud lane
"""


class ModelCatalogue:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.models: dict[str, ModelSpec] = {}
        self.reserved_orgs: frozenset[str] = frozenset()
        self.stale = True
        # Requests arriving during a load wait for it: answering them from the old (or empty) catalogue
        # refused a just-added model with 404.
        self._loading = asyncio.Lock()
        self._loaded = False

    def mark_stale(self) -> None:
        self.stale = True

    async def current(self) -> dict[str, ModelSpec]:
        if self.stale or not self._loaded or self._loading.locked():
            async with self._loading:
                if self.stale:
                    self.stale = False
                    try:
                        rows = await self.pool.fetch(_MODELS_SQL)
                    except Exception:
                        self.stale = True
                        raise
                    lanes = await self.pool.fetch(_RESERVED_ORGS_SQL)
                    self.models = {r["model_id"]: ModelSpec(**dict(r)) for r in rows}
                    self.reserved_orgs = frozenset(r["org_id"] for r in lanes)
                    self._loaded = True
        return self.models
