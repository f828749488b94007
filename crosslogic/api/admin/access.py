"""Who may do what through the admin API: the seed's roles (§4.9) over two scopes.

Roles:
- read-only: every read in its scope.
- developer: reads, and manages API keys (create, rotate, revoke): the dashboard's keys page.
- admin: everything in its scope (environments, env and key limits, admin tokens of its org; on the platform
  scope also orgs, org limits, billing terms, the catalogue, prices, routing policy and nodes).

Scopes: a platform token (org_id None) sees every org; an org token sees only its own org. Another org's
resources answer 404 exactly as a missing one does, so an org token cannot even learn which org names exist.
Catalogue reads (models, regions, prices) are open to every token: tenants need them to use the API. Nodes
and the routing policy are platform-only, even to read (endpoints are internal).
"""

from __future__ import annotations

from dataclasses import dataclass

from crosslogic import errors
from crosslogic.store.admin_tokens import AdminToken

READ, KEYS, WRITE = "read", "keys", "write"
_ALLOWED = {"read-only": {READ}, "developer": {READ, KEYS}, "admin": {READ, KEYS, WRITE}}
# Where a route acts: an org (path {org}), the platform only, or anywhere (catalogue reads, /me).
ORG, PLATFORM, ANY = "org", "platform", "any"


@dataclass(frozen=True)
class Principal:
    token: AdminToken

    @property
    def actor(self) -> str:
        """The audit log's actor: the token, by prefix and id (never the token itself)."""
        return f"admin-token:{self.token.token_prefix}:{self.token.token_id}"

    @property
    def platform(self) -> bool:
        return self.token.org_id is None

    def may(self, action: str) -> bool:
        return action in _ALLOWED[self.token.role]


def unauthenticated() -> errors.ClientError:
    return errors.ClientError(401, "Missing or invalid admin token. Send it as 'Authorization: Bearer clat_...'.",
                              "invalid_request_error", "invalid_admin_token")


def forbidden(role: str, action: str) -> errors.ClientError:
    what = {READ: "read", KEYS: "manage API keys", WRITE: "change this"}[action]
    return errors.ClientError(403, f"A {role} token may not {what}.", "permission_error", "insufficient_role")


def platform_only() -> errors.ClientError:
    return errors.ClientError(403, "Only a platform-scoped admin token may do this.", "permission_error",
                              "platform_scope_required")


def not_found(what: str) -> errors.ClientError:
    return errors.ClientError(404, f"{what} not found.", "invalid_request_error", "not_found")


def require(principal: Principal, action: str, scope: str) -> None:
    """Role and scope of a route, before it reads anything (an org's id is checked by `require_org`)."""
    if not principal.may(action):
        raise forbidden(principal.token.role, action)
    if scope == PLATFORM and not principal.platform:
        raise platform_only()


def require_org(principal: Principal, org_id: str) -> None:
    """An org token and another org: the same 404 as an org that does not exist."""
    if not principal.platform and principal.token.org_id != org_id:
        raise not_found("Organization")
