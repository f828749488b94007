"""The admin HTTP API and the developer dashboard (aiohttp), on their own listener.

`crosslogic serve api --admin-listen HOST:PORT` serves this app beside the public /v1/models one; Envoy has no
route or cluster to this port, so it is reachable only where an operator exposes it (loopback by default).

Every request: bearer admin token -> role and scope of the route -> parameters and body against the route's
schema -> `{org}` / `{env}` / `{key_id}` resolved inside the token's scope -> one data function (the CLI's) with
the token as the audit actor. Every answer that is not 2xx is OpenAI-shaped JSON; a database outage is a 503,
a client mistake a 4xx, never a 500.
"""

from __future__ import annotations

import json
import logging
from importlib import resources

import asyncpg
import prometheus_client
from aiohttp import web

from crosslogic import errors
from crosslogic.api.admin import access
from crosslogic.api.admin.openapi import openapi_document
from crosslogic.api.admin.routes import PATH_PARAMS, ROUTES, Call, Route
from crosslogic.api.admin.schema import check, query_value
from crosslogic.runtime.health import dependency
from crosslogic.store import admin_tokens
from crosslogic.store import tenancy as t

log = logging.getLogger("crosslogic.api.admin")
POOL = web.AppKey("pool", asyncpg.Pool)
SECRET = web.AppKey("secret", bytes)
DEFAULT_REGION = web.AppKey("default_region", str)
REQUESTS = prometheus_client.Counter("crosslogic_admin_requests", "Admin API requests by route and status",
                                     ["method", "route", "status"])
DASHBOARD_FILES = {"app.js": "text/javascript", "app.css": "text/css", "uPlot.iife.min.js": "text/javascript",
                   "uPlot.min.css": "text/css", "index.html": "text/html"}
_DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


def _error(error: errors.ClientError, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=error.status, body=error.body(), content_type="application/json", headers=headers)


def _tenancy_error(exc: t.TenancyError) -> errors.ClientError:
    if isinstance(exc, t.NotFound):
        return errors.ClientError(404, str(exc), "invalid_request_error", "not_found")
    if isinstance(exc, t.Conflict):
        return errors.ClientError(409, str(exc), "invalid_request_error", "conflict")
    return errors.ClientError(400, str(exc), "invalid_request_error", "invalid_value")


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except errors.ClientError as refused:
        response = _error(refused)
    except t.TenancyError as exc:
        response = _error(_tenancy_error(exc))
    except web.HTTPMethodNotAllowed as refused:
        allowed = sorted(refused.allowed_methods)
        response = _error(errors.method_not_allowed(request.method, allowed), {"allow": ", ".join(allowed)})
    except web.HTTPNotFound:
        response = _error(errors.unknown_url())
    except web.HTTPException as other:
        if other.status < 400:
            raise
        kind = "server_error" if other.status >= 500 else "invalid_request_error"
        response = _error(errors.ClientError(other.status, other.reason, kind, None))
    except _DATABASE_ERRORS as exc:
        dependency("postgres").failed(exc)
        log.warning("admin api: database unavailable: %s", exc)
        response = _error(errors.service_unavailable())
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    REQUESTS.labels(request.method, route, str(response.status)).inc()
    return response


def _bearer(request: web.Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def _body(request: web.Request, route: Route) -> dict:
    if route.body is None:
        return {}
    raw = await request.read()
    if not raw.strip():
        if route.body.required:
            raise errors.invalid_request("A JSON object body is required.")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise errors.invalid_request("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise errors.invalid_request("The body must be a JSON object.")
    checked = check(body, route.body.schema, "body")
    if len(checked) < route.body.schema.get("minProperties", 0):
        raise errors.invalid_request("Name at least one field to change.")
    return checked


def _params(request: web.Request, route: Route) -> dict:
    declared = {p.name: p for p in route.params}
    out = {}
    for name in request.query:
        if name not in declared:
            raise errors.invalid_param(f"unknown query parameter {name}", name, "unknown_parameter")
        values = request.query.getall(name)
        if len(values) > 1:
            raise errors.invalid_param(f"query parameter {name} is given twice", name, "invalid_value")
        out[name] = check(query_value(values[0], declared[name].schema), declared[name].schema, name)
    for p in route.params:
        if p.required and p.name not in out:
            raise errors.invalid_param(f"{p.name} is required", p.name, "missing_required_parameter")
    return out


def _path(request: web.Request) -> dict[str, str]:
    out = {}
    for name, value in request.match_info.items():
        out[name] = check(value, PATH_PARAMS[name][0], name)
    return out


async def _resolve(call: Call) -> None:
    """The path's org, env and key, inside the token's scope (another org's: 404, as a missing one)."""
    path = call.path
    if "org" in path:
        try:
            call.org = await t.get_org(call.conn, path["org"])
        except t.NotFound:
            raise access.not_found("Organization") from None
        access.require_org(call.principal, call.org.org_id)
    if "env" in path:
        assert call.org is not None
        try:
            call.env = await t.get_env(call.conn, path["env"], call.org.org_id)
        except t.NotFound:
            raise access.not_found("Environment") from None
    if "key_id" in path:
        assert call.org is not None
        try:
            key = await t.get_key(call.conn, path["key_id"])
        except t.NotFound:
            key = None
        if key is None or key.org_id != call.org.org_id:
            raise access.not_found("API key")
        call.key = key


def _endpoint(route: Route):
    async def handler(request: web.Request) -> web.Response:
        token_text = _bearer(request)
        async with request.app[POOL].acquire() as conn:
            token = None if token_text is None else \
                await admin_tokens.authenticate(conn, request.app[SECRET], token_text)
            dependency("postgres").succeeded()
            if token is None:
                raise access.unauthenticated()
            principal = access.Principal(token)
            access.require(principal, route.action, route.scope)
            call = Call(conn, principal, request.app[SECRET], request.app[DEFAULT_REGION],
                        params=_params(request, route), path=_path(request))
            call.body = await _body(request, route)
            await _resolve(call)
            payload = await route.handler(call)
        return web.json_response(payload, status=route.status, dumps=lambda v: json.dumps(v, default=str))

    return handler


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _dashboard_file(name: str) -> bytes:
    return (resources.files("crosslogic.api") / "dashboard" / name).read_bytes()


async def dashboard_index(_: web.Request) -> web.Response:
    return web.Response(body=_dashboard_file("index.html"), content_type="text/html", charset="utf-8",
                        headers={"cache-control": "no-cache"})


async def dashboard_static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in DASHBOARD_FILES:
        raise web.HTTPNotFound()
    return web.Response(body=_dashboard_file(name), content_type=DASHBOARD_FILES[name], charset="utf-8")


async def root(_: web.Request) -> web.Response:
    raise web.HTTPFound("/dashboard/")


@web.middleware
async def security_headers(request: web.Request, handler) -> web.StreamResponse:
    """The dashboard loads only its own files, and no other site may frame it."""
    response = await handler(request)
    response.headers.setdefault("x-content-type-options", "nosniff")
    response.headers.setdefault("x-frame-options", "DENY")
    response.headers.setdefault("content-security-policy", "default-src 'self'; frame-ancestors 'none'")
    return response


def build_admin_app(pool: asyncpg.Pool, secret: bytes, default_region: str) -> web.Application:
    if not secret:
        raise ValueError("the admin API needs the key secret (CROSSLOGIC_KEY_SECRET)")
    app = web.Application(middlewares=[security_headers, openai_errors], client_max_size=64 * 1024)
    app[POOL], app[SECRET], app[DEFAULT_REGION] = pool, secret, default_region
    for route in ROUTES:
        app.router.add_route(route.method, route.path, _endpoint(route))
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", root)
    app.router.add_get("/dashboard/", dashboard_index)
    app.router.add_get(r"/dashboard/static/{name:[A-Za-z0-9._-]+}", dashboard_static)
    return app

