"""Every reply Envoy makes itself, as an OpenAI-shaped JSON error (HCM `local_reply_config`).

Envoy answers on its own for HTTP it cannot parse (400, 431, 426, 501), timeouts (408, 504), oversized
bodies (413), no reachable node (503), routes with a direct response, and header limits crossed once
ext_authz added its headers (500 `ext_authz_invalid`). Measured on Envoy 1.40 with raw sockets: all of them
pass through `local_reply_config`, codec errors included (docs/architecture.md, "Errors").

Mappers are tried in order, the first match wins. The first one matches the replies whose bodies are ours
already (ext_authz denials, the rate-limit service's refusals) and changes nothing: a mapper or a top-level
`body_format` would overwrite them (DESIGN.md §4). The last two catch whatever Envoy may say that no mapper
names, so no plain-text reply can slip through.
"""

from __future__ import annotations

from crosslogic import contract, errors

# Response code details (`%RESPONSE_CODE_DETAILS%`) of local replies whose body we wrote ourselves.
OUR_OWN_BODIES = ("ext_authz_denied", "request_rate_limited")
# Response flags of "no node could take the request": no healthy host, connect failure, overflow, no
# cluster, retry limit, remote reset before the answer.
UPSTREAM_DOWN_FLAGS = ("UH", "UF", "UO", "NC", "URX", "UR")


def _cel(expression: str) -> dict:
    return {"extension_filter": {
        "name": "envoy.access_loggers.extension_filters.cel",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                         "expression": expression}}}


def _status(op: str, value: int) -> dict:
    return {"status_code_filter": {"comparison": {"op": op, "value": {
        "default_value": value, "runtime_key": f"clp.local_reply.{op.lower()}.{value}"}}}}


def _details(*names: str) -> dict:
    return _cel("response.code_details in [" + ", ".join(f"'{n}'" for n in names) + "]")


def _flags(*flags: str) -> dict:
    return {"response_flag_filter": {"flags": list(flags)}}


_JSON_BODY = {"text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"}, "content_type": "application/json"}


def _to_json(filter_: dict, status: int | None, message: str, code: str, error_type: str | None = None) -> dict:
    """Replaces the reply's body with an OpenAI error (and its status, when given)."""
    error_type = error_type or ("server_error" if status is not None and status >= 500 else "invalid_request_error")
    body = errors.openai_error_json(message, error_type, code).decode()
    mapper = {"filter": filter_, "body": {"inline_string": body}, "body_format_override": _JSON_BODY}
    if status is not None:
        mapper["status_code"] = status
    return mapper


def local_reply_config(max_headers: int, max_headers_kib: int, max_body_bytes: int) -> dict:
    headers_too_large = (f"Request headers are too large: at most {max_headers} headers and {max_headers_kib} KiB "
                         "of headers and URL together.")
    return {"mappers": [
        # A 5xx of the HTTP authz server travels as 45x (Envoy would replace a 5xx by its own reply): back to its
        # status, body and headers untouched (contract.TUNNELLED_5XX).
        *({"filter": {"and_filter": {"filters": [_details("ext_authz_denied"), _status("EQ", wire)]}},
           "status_code": status} for status, wire in contract.TUNNELLED_5XX.items()),
        {"filter": _details(*OUR_OWN_BODIES)},  # ours already: left exactly as they are
        # Our direct-response routes carry JSON bodies already; only the content type needs saying.
        {"filter": _details("direct_response"), "body_format_override": _JSON_BODY},
        # The client's headers plus the ones ext_authz adds crossed the header limit: the client's doing.
        _to_json(_details("ext_authz_invalid"), 431, headers_too_large, "request_headers_too_large"),
        _to_json(_status("EQ", 431), 431, headers_too_large, "request_headers_too_large"),
        _to_json(_status("EQ", 413), 413, f"Request body is too large: at most {max_body_bytes} bytes.",
                 "request_too_large"),
        # A stream idle on a pool route: the node said nothing for too long (a stalled client meets the
        # shorter request_timeout first).
        _to_json(_details("stream_idle_timeout"), 504, "The model took too long to answer. Please retry.", "timeout"),
        _to_json(_status("EQ", 408), 408, "The request was not received in time.", "request_timeout"),
        _to_json(_flags("UT"), 504, "The model took too long to answer. Please retry.", "timeout"),
        _to_json(_flags(*UPSTREAM_DOWN_FLAGS), 503,
                 "No capacity is available for this model right now. Please retry.", "service_unavailable"),
        # The rate-limit or authorisation service could not be asked.
        _to_json({"or_filter": {"filters": [_flags("RLSE"), _flags("UAEX")]}}, 503,
                 "The service is temporarily unavailable. Please retry.", "service_unavailable"),
        _to_json(_status("EQ", 426), 426, "Unsupported HTTP version: use HTTP/1.1 or HTTP/2.",
                 "unsupported_http_version"),
        _to_json(_details("upgrade_failed"), 400, "Protocol upgrades (WebSocket, h2c) are not supported.",
                 "upgrade_not_supported"),
        _to_json(_status("EQ", 404), 404, errors.unknown_url().message, errors.unknown_url().code),
        # Malformed HTTP (request line, header characters, framing, transfer encoding): the client's mistake,
        # so 4xx even where Envoy says 501 (an unknown transfer-encoding). The DPE flag is set only after the
        # reply was built, so it cannot be matched here (measured).
        _to_json({"or_filter": {"filters": [_status("EQ", 400), _status("EQ", 501)]}}, 400,
                 "The request is not valid HTTP (request line, headers or body framing).", "invalid_http_request"),
        _to_json(_status("GE", 500), None, "The service had an internal error. Please retry.", "internal_error",
                 "server_error"),
        _to_json(_status("GE", 0), None, "The request could not be processed.", "invalid_request"),
    ]}
