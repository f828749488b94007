"""/openapi.json: built from the route table (crosslogic/api/admin/routes.py), the same declarations the server
checks requests with."""

from __future__ import annotations

import re

from crosslogic.api.admin.routes import PATH_PARAMS, ROUTES, Route
from crosslogic.api.admin.schema import Schema

ERROR_SCHEMA: Schema = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"], "additionalProperties": False,
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_ERRORS = {"400": "Invalid parameters or body", "401": "Missing or invalid admin token",
           "403": "The token's role or scope does not allow this", "404": "Not found (or not in the token's scope)",
           "409": "Conflicts with the current state", "503": "The database is unavailable; retry"}


def _operation(route: Route) -> dict:
    names = re.findall(r"{(\w+)}", route.path)
    parameters = [{"name": n, "in": "path", "required": True, "description": PATH_PARAMS[n][1],
                   "schema": PATH_PARAMS[n][0]} for n in names]
    parameters += [{"name": p.name, "in": "query", "required": p.required, "description": p.description,
                    "schema": p.schema} for p in route.params]
    op: dict = {
        "operationId": f"{route.method.lower()}_{re.sub(r'[^a-z0-9]+', '_', route.path.lower()).strip('_')}",
        "summary": route.summary, "tags": [route.tag],
        "description": f"Needs a token that may `{route.action}` ({route.scope} scope).",
        "parameters": parameters,
        "responses": {str(route.status): {"description": "OK", "content": {"application/json": {
            "schema": {"type": "object"}}}},
            **{code: {"description": text, "content": {"application/json": {"schema": {
                "$ref": "#/components/schemas/Error"}}}} for code, text in _ERRORS.items()}},
    }
    if route.body is not None:
        op["requestBody"] = {"required": route.body.required,
                             "content": {"application/json": {"schema": route.body.schema}}}
    return op


def openapi_document(server_url: str | None = None) -> dict:
    paths: dict[str, dict] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "CrossLogic admin API", "version": "1",
                 "description": "Orgs, environments, API keys, limits, usage, billing, catalogue, routing policy "
                                "and nodes. Authenticate with an admin token: `Authorization: Bearer clat_...`. "
                                "Errors are OpenAI-shaped: {\"error\": {\"message\", \"type\", \"param\", "
                                "\"code\"}}. See docs/admin-api.md."},
        "paths": paths,
        "components": {"schemas": {"Error": ERROR_SCHEMA},
                       "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}}},
        "security": [{"adminToken": []}],
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc
