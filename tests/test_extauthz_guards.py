"""The last resorts of ext_authz: a bug meeting unforeseen client input is a 400 (the client's request cannot be
served as sent), any other bug an OpenAI-shaped 500; each is one log line without a traceback, and Envoy always
gets an answer, over either transport (a CheckResponse; an HTTP answer whose 5xx survives Envoy)."""

from __future__ import annotations

import json
import logging

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2

from crosslogic import contract, errors
from crosslogic.extauthz import decision
from crosslogic.extauthz.check import Denied, GuardedAuthorizer
from crosslogic.extauthz.grpc_transport import AuthorizationServicer
from crosslogic.extauthz.http_transport import verdict_response
from crosslogic.extauthz.validation import Endpoint


def test_an_unforeseen_exception_in_validation_is_a_400_and_one_log_line(monkeypatch, caplog):
    def broken(*args):
        return {}["no such key"]  # stands for any bug in the validation of some odd body

    monkeypatch.setattr(decision, "validate_request", broken)
    with caplog.at_level(logging.ERROR, "crosslogic.extauthz"), pytest.raises(errors.ClientError) as answered:
        decision._validated(Endpoint.CHAT, b"{}", {}, frozenset())
    assert (answered.value.status, answered.value.type, answered.value.code) == (400, "invalid_request_error", None)
    (record,) = caplog.records
    assert record.exc_info is None and "KeyError" in record.getMessage() and "test_extauthz_guards.py" in \
        record.getMessage()


def test_client_errors_from_validation_pass_through_unchanged(caplog):
    with caplog.at_level(logging.ERROR, "crosslogic.extauthz"), pytest.raises(errors.ClientError) as answered:
        decision._validated(Endpoint.CHAT, b"[", {}, frozenset())
    assert answered.value.status == 400 and "could not parse" in answered.value.message and not caplog.records


class _BrokenAuthorizer:
    async def decide(self, method, path, headers, body):
        raise ZeroDivisionError("a bug outside validation")


def _check_request() -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.raw_body = "POST", "/v1/chat/completions", b"{}"
    http.headers["authorization"] = "Bearer x"
    return request


async def test_any_other_exception_is_an_openai_500_never_an_rpc_error(caplog):
    with caplog.at_level(logging.ERROR, "crosslogic.extauthz"):
        response = await AuthorizationServicer(GuardedAuthorizer(_BrokenAuthorizer())).Check(_check_request(), None)
    assert response.status.code == code_pb2.PERMISSION_DENIED
    assert response.denied_response.status.code == 500
    body = json.loads(response.denied_response.body)["error"]
    assert (body["type"], body["code"], body["param"]) == ("server_error", "internal_error", None)
    assert "ZeroDivisionError" not in response.denied_response.body  # nothing internal in the reply
    headers = {h.header.key: h.header.value for h in response.denied_response.headers}
    assert headers["content-type"] == "application/json"
    (record,) = caplog.records
    assert record.exc_info is None and "ZeroDivisionError" in record.getMessage()
    assert "/v1/chat/completions" in record.getMessage()


async def test_over_http_the_same_500_travels_as_a_status_envoy_passes_on(caplog):
    with caplog.at_level(logging.ERROR, "crosslogic.extauthz"):
        verdict = await GuardedAuthorizer(_BrokenAuthorizer()).check("192.0.2.1", "POST", "/v1/chat/completions",
                                                                     {"authorization": "Bearer x"}, b"{}")
    assert isinstance(verdict, Denied) and verdict.error.status == 500
    head, _, body = verdict_response(verdict).partition(b"\r\n\r\n")
    # Envoy would answer any 5xx of an HTTP authz server with its own empty 503; the local-reply mapper turns
    # this status back into a 500 (tests/test_http_transport.py checks it through Envoy).
    assert head.startswith(b"HTTP/1.1 %d " % contract.TUNNELLED_5XX[500])
    assert b"content-type: application/json" in head.split(b"\r\n")
    assert json.loads(body)["error"]["code"] == "internal_error" and b"ZeroDivisionError" not in body
    (record,) = caplog.records
    assert record.exc_info is None and "ZeroDivisionError" in record.getMessage()
