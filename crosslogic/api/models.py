"""Public `GET /v1/models` (and `/v1/models/{id}`): the models the caller's environment may use.

Envoy's ext_authz has already authenticated the caller and set x-clp-env; this service trusts only that
header, which Envoy overwrites on every request. Envoy routes only those two paths here, but whatever else
arrives (another path or method, a failing database) is answered as OpenAI JSON too, never aiohttp's text.
"""

from __future__ import annotations

import json
import logging

import asyncpg
from aiohttp import web

from crosslogic import errors
from crosslogic.contract import Header

_ENV_MODELS_SQL = """
SELECT m.model_id, m.kind, m.context_length, extract(epoch FROM m.created_at)::bigint AS created
FROM models m, environments e
WHERE e.env_id = $1 AND m.status = 'active'
  AND (jsonb_array_length(e.model_list) = 0 OR e.model_list ? m.model_id)
ORDER BY m.model_id
"""
POOL_KEY = web.AppKey("pool", asyncpg.Pool)
log = logging.getLogger("crosslogic.api")


def _model_json(row: asyncpg.Record) -> dict:
    return {"id": row["model_id"], "object": "model", "created": row["created"], "owned_by": "crosslogic",
            "max_model_len": row["context_length"]}


def _error(error: errors.ClientError, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=error.status, body=error.body(), content_type="application/json", headers=headers)


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """aiohttp's own refusals (unknown path, wrong method) and backend failures, as OpenAI errors."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as refused:
        allowed = sorted(refused.allowed_methods)
        return _error(errors.method_not_allowed(request.method, allowed), {"allow": ", ".join(allowed)})
    except web.HTTPNotFound:
        return _error(errors.unknown_url())
    except web.HTTPException as other:
        if other.status < 400:
            raise
        error_type = "server_error" if other.status >= 500 else "invalid_request_error"
        return _error(errors.ClientError(other.status, other.reason, error_type, None))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("models: database unavailable: %s", exc)
        return _error(errors.service_unavailable())


async def _env_models(request: web.Request) -> list[dict] | web.Response:
    env_id = request.headers.get(Header.ENV)
    if not env_id:
        return _error(errors.missing_api_key())
    rows = await request.app[POOL_KEY].fetch(_ENV_MODELS_SQL, env_id)
    return [_model_json(r) for r in rows]


async def list_models(request: web.Request) -> web.Response:
    models = await _env_models(request)
    if isinstance(models, web.Response):
        return models
    return web.json_response({"object": "list", "data": models}, dumps=json.dumps)


async def get_model(request: web.Request) -> web.Response:
    models = await _env_models(request)
    if isinstance(models, web.Response):
        return models
    wanted = request.match_info["model_id"]
    for model in models:
        if model["id"] == wanted:
            return web.json_response(model)
    return _error(errors.model_not_found(wanted))


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(pool: asyncpg.Pool) -> web.Application:
    app = web.Application(middlewares=[openai_errors])
    app[POOL_KEY] = pool
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_get("/healthz", healthz)
    return app
