"""Every error a client can see, mapped to OpenAI's error JSON in one place."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class ClientError(Exception):
    status: int
    message: str
    type: str
    code: str | None
    param: str | None = None

    def body(self) -> bytes:
        return openai_error_json(self.message, self.type, self.code, self.param)


def openai_error_json(message: str, error_type: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}}).encode()


def missing_api_key() -> ClientError:
    return ClientError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                       "invalid_request_error", "invalid_api_key")


def invalid_api_key() -> ClientError:
    return ClientError(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")


def tenant_suspended(level: str) -> ClientError:
    return ClientError(403, f"This {level} is suspended. Contact your administrator.",
                       "permission_error", "tenant_suspended")


def wrong_site() -> ClientError:
    return ClientError(403, "This API key is not valid at this site: it serves one organization's keys. Use your "
                       "own organization's gateway.", "permission_error", "wrong_site")


def site_revoked() -> ClientError:
    return ClientError(403, "This site's access has been revoked. Contact your administrator.", "permission_error",
                       "site_revoked")


def billing_cap_reached() -> ClientError:
    return ClientError(403, "Your organization has reached its monthly spending cap. Raise the cap or wait for "
                       "the next billing month.", "insufficient_quota", "billing_cap_reached")


def model_not_found(model: str) -> ClientError:
    return ClientError(404, f"The model `{model}` does not exist or you do not have access to it.",
                       "invalid_request_error", "model_not_found", "model")


def invalid_request(message: str, param: str | None = None) -> ClientError:
    return ClientError(400, message, "invalid_request_error", "invalid_request_error", param)


def invalid_param(message: str, param: str | None, code: str | None) -> ClientError:
    """A 400 worded and coded as OpenAI's request validator does (`code` e.g. "invalid_type", or None where
    OpenAI sends null), naming the offending `param` in OpenAI's path syntax (`messages[0].role`)."""
    return ClientError(400, message, "invalid_request_error", code, param)


def internal_error() -> ClientError:
    """Our own fault (a bug), never the client's: OpenAI's wording for its 500s."""
    return ClientError(500, "The server had an error while processing your request. Sorry about that! Please "
                       "retry; if the error persists, contact support with the request id.", "server_error",
                       "internal_error")


def request_too_large() -> ClientError:
    return ClientError(413, "Request body is too large.", "invalid_request_error", "request_too_large")


def service_unavailable() -> ClientError:
    return ClientError(503, "The service is temporarily unavailable. Please retry.", "server_error",
                       "service_unavailable")


def server_busy(retry_after_s: int) -> ClientError:
    return ClientError(429, "The service is busy right now. Please retry after "
                       f"{max(1, retry_after_s)} s.", "server_error", "server_busy")


def rate_limit_exceeded(level: str, limit: str, retry_after_s: int) -> ClientError:
    return ClientError(429, f"Rate limit reached for this {level} on {limit}. "
                       f"Please retry after {max(1, retry_after_s)} s.",
                       "rate_limit_error", "rate_limit_exceeded")


def quota_exceeded(level: str, period: str) -> ClientError:
    return ClientError(403, f"This {level} has used its {period} token quota. It resets at the start of the "
                       "next period (UTC); contact your administrator to raise it.",
                       "insufficient_quota", "quota_exceeded")


def unknown_url() -> ClientError:
    return ClientError(404, "Unknown request URL. Please check the URL and method.", "invalid_request_error",
                       "unknown_url")


def method_not_allowed(method: str, allowed: list[str]) -> ClientError:
    return ClientError(405, f"Method {method} is not allowed here; use {', '.join(allowed)}.",
                       "invalid_request_error", "method_not_allowed")


def too_many_failed_requests(retry_after_s: int) -> ClientError:
    """Per client IP, when its requests keep failing authentication or validation (extauthz/abuse.py)."""
    return ClientError(429, "Too many failed requests from this address. Please retry after "
                       f"{max(1, retry_after_s)} s.", "rate_limit_error", "too_many_failed_requests")
