"""The model catalogue ext_authz validates against, loaded from real Postgres."""

from __future__ import annotations

import asyncio

import asyncpg

from crosslogic.extauthz.catalog import ModelCatalogue
from crosslogic.store.db import open_pool


async def test_requests_arriving_during_the_first_load_see_the_loaded_catalogue(database_url):
    conn = await asyncpg.connect(database_url)
    await conn.execute("INSERT INTO models (model_id) VALUES ('m-1'), ('m-2')")
    await conn.close()
    async with open_pool(database_url) as pool:
        catalogue = ModelCatalogue(pool)
        views = await asyncio.gather(*(catalogue.current() for _ in range(50)))
    # A burst of first requests once saw an empty catalogue and answered 404 for every model.
    assert all(set(view) == {"m-1", "m-2"} for view in views)


async def test_each_models_n_cap_reaches_validation(database_url):
    conn = await asyncpg.connect(database_url)
    await conn.execute("INSERT INTO models (model_id) VALUES ('default-cap')")
    await conn.execute("INSERT INTO models (model_id, max_n) VALUES ('small-cap', 4)")
    await conn.close()
    async with open_pool(database_url) as pool:
        models = await ModelCatalogue(pool).current()
    assert (models["default-cap"].max_n, models["small-cap"].max_n) == (128, 4)
