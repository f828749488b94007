"""ext_authz over HTTP/1.1 (Envoy's `http_service`): the lean transport, and `POST /release` beside it.

Envoy sends each check as the client's request itself: the same method, contract.AUTHZ_CHECK_PREFIX + the path,
the client's headers (xds/resources.py picks them) plus the connection's peer (contract.CLIENT_ADDRESS_HEADER),
and the body with a content-length. The answer is the verdict (check.py) in headers:

- allowed: 200; the x-clp-* headers for the node (`allowed_upstream_headers`), the client headers the node
  must not get in contract.HEADERS_TO_REMOVE_HEADER, the rate-limit state for the client
  (`allowed_client_headers_on_success`), and the metadata as one header per key (contract.METADATA_HEADERS,
  `dynamic_metadata_from_headers`), all with an empty body;
- denied: the status with OpenAI's JSON body, its headers (`allowed_client_headers`) and the same metadata
  headers; a 5xx travels as contract.authz_wire_status says (Envoy would drop it for its own 503).

One asyncio Protocol per connection, no web framework: measured through real Envoy, a Python gRPC server costs
~0.5 ms of CPU per call whatever it does, this ~0.05 ms (docs/architecture.md, "Request path"). Bounded: head
and body sizes (http_wire.Limits), the time from a request's first byte to its last, keep-alive idleness, and
requests sent ahead of their answers; a bad request is answered once and the connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from crosslogic import contract, errors
from crosslogic.extauthz.check import Checker, Denied, Verdict, unexpected
from crosslogic.extauthz.decision import Allowed
from crosslogic.extauthz.http_wire import BadRequest, Limits, RequestHead, head_too_large, parse_head, response
from crosslogic.extauthz.release import LeaseReleaser

log = logging.getLogger("crosslogic.extauthz")
_JSON = ("content-type", "application/json")
_PREFIX = contract.AUTHZ_CHECK_PREFIX
_HEAD_END = b"\r\n\r\n"
_NEVER = float("inf")


def _metadata_headers(metadata) -> list[tuple[str, str]]:
    return [(key, contract.metadata_header_value(value)) for key, value in metadata.items()]


def verdict_response(verdict: Verdict, *, head_only: bool = False) -> bytes:
    """The answer Envoy's http_service reads a verdict from (see the module docstring)."""
    if isinstance(verdict, Allowed):
        headers = list(verdict.headers.items())
        if verdict.remove:
            headers.append((contract.HEADERS_TO_REMOVE_HEADER, ",".join(verdict.remove)))
        headers += verdict.response_headers.items()
        headers += _metadata_headers(verdict.metadata)
        return response(200, headers, head_only=head_only)
    headers = [_JSON, *((k, v) for k, v in verdict.headers.items() if k != "content-type")]
    headers += _metadata_headers(verdict.metadata)
    return response(contract.authz_wire_status(verdict.error.status), headers, verdict.error.body(),
                    head_only=head_only)


def _json_response(status: int, payload: dict, close: bool = False) -> bytes:
    return response(status, [_JSON], json.dumps(payload).encode(), close=close)


class AuthzHttpServer:
    """What every connection shares: the checker, the lease releaser (None: admission "rls", no leases to free
    early), the limits and the open connections (swept for their deadlines, closed on shutdown)."""

    def __init__(self, checker: Checker, releaser: LeaseReleaser | None, limits: Limits) -> None:
        self.checker = checker
        self.releaser = releaser
        self.limits = limits
        self.connections: set[AuthzConnection] = set()

    def protocol(self) -> AuthzConnection:
        return AuthzConnection(self)

    async def sweep(self, every_s: float = 0.5) -> None:
        """Closes connections past their deadline: one timer for all of them, nothing armed per request."""
        while True:
            await asyncio.sleep(every_s)
            now = time.monotonic()
            for connection in [c for c in self.connections if c.deadline < now]:
                connection.expire()


class AuthzConnection(asyncio.Protocol):
    """One keep-alive connection from Envoy: requests one at a time, answered in order."""

    def __init__(self, server: AuthzHttpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False  # a request is being decided; what arrives meanwhile waits in the buffer
        self.pipelined = 0  # requests in a row that arrived before the previous answer went out
        self.deadline = _NEVER
        self.peer = ""
        self.eof = False  # the peer sent all it will: answer what is complete, then close

    # --- asyncio callbacks -----------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else str(peer or "")
        self.server.connections.add(self)
        self.deadline = time.monotonic() + self.limits.idle_timeout_s

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self.buffer.clear()

    def data_received(self, data: bytes) -> None:
        if not self.buffer:
            self.deadline = time.monotonic() + self.limits.request_timeout_s  # a request begins
        self.buffer += data
        if self.busy:
            # Envoy never sends ahead; one request's worth is the most we hold while answering another.
            if len(self.buffer) > self.limits.max_head_bytes + self.limits.max_body_bytes + 4:
                self._abort()
            return
        self._next_request()

    def eof_received(self) -> bool:
        self.eof = True
        return self.busy  # keep the connection for the answer being decided; a request cut short gets none

    # --- requests ----------------------------------------------------------------------------------------------
    def _next_request(self) -> None:
        buffer = self.buffer
        end = buffer.find(_HEAD_END)
        if end < 0:
            if len(buffer) > self.limits.max_head_bytes:
                self._refuse(head_too_large(self.limits))
            return
        try:
            head = parse_head(bytes(buffer[:end]), self.limits)
        except BadRequest as bad:
            self._refuse(bad)
            return
        total = end + 4 + head.content_length
        if len(buffer) < total:
            return  # the body is still coming (bounded by max_body_bytes, timed by the deadline)
        body = bytes(buffer[end + 4:total])
        del buffer[:total]
        self.busy = True
        self.deadline = _NEVER  # the decision has its own bounds; Envoy's timeout closes the connection
        asyncio.get_running_loop().create_task(self._answer(head, body))

    async def _answer(self, head: RequestHead, body: bytes) -> None:
        try:
            answer = await self._dispatch(head, body)
        except Exception as exc:  # noqa: BLE001 - a bug in the framing of an answer: still answer, in JSON
            answer = verdict_response(Denied(unexpected(exc, head.method, head.target)))
        transport = self.transport
        if transport is None:
            return  # Envoy went away meanwhile (its timeout); the verdict is dropped
        transport.write(answer)
        self.busy = False
        if not head.keep_alive:
            transport.close()
            return
        if self.buffer:
            self.pipelined += 1
            if self.pipelined > self.limits.max_pipelined:
                self._abort()
                return
            self.deadline = time.monotonic() + self.limits.request_timeout_s
            self._next_request()
        else:
            self.pipelined = 0
            self.deadline = time.monotonic() + self.limits.idle_timeout_s
        if self.eof and not self.busy and self.transport is not None:
            self.transport.close()

    async def _dispatch(self, head: RequestHead, body: bytes) -> bytes:
        target = head.target
        if target.startswith(_PREFIX) and target[len(_PREFIX):len(_PREFIX) + 1] == "/":
            headers = head.headers
            peer = headers.get(contract.CLIENT_ADDRESS_HEADER) or self.peer
            verdict = await self.server.checker.check(peer, head.method, target[len(_PREFIX):], headers, body)
            return verdict_response(verdict, head_only=head.method == "HEAD")
        if head.method == "POST" and target.split("?", 1)[0] == contract.RELEASE_PATH and self.server.releaser:
            status, payload = await self.server.releaser.answer(body)
            return _json_response(status, payload)
        return _json_response(404, {"error": f"checks are served under {_PREFIX}/, leases at POST "
                                             f"{contract.RELEASE_PATH}"})

    # --- endings -----------------------------------------------------------------------------------------------
    def _refuse(self, bad: BadRequest) -> None:
        """Answer a request we cannot read, then close: its framing cannot be trusted for the next one."""
        transport = self.transport
        self.buffer.clear()
        if transport is None:
            return
        transport.write(response(bad.error.status, [_JSON], bad.error.body(), close=True))
        transport.close()

    def _abort(self) -> None:
        self.buffer.clear()
        if self.transport is not None:
            self.transport.abort()

    def expire(self) -> None:
        """Past the deadline: idle for too long, or a request that never finished arriving (answered 408)."""
        if self.buffer and not self.busy:
            self._refuse(BadRequest(errors.ClientError(408, "The request was not received in time.",
                                                       "invalid_request_error", "request_timeout")))
        elif self.transport is not None:
            self.transport.close()
        self.deadline = _NEVER


@asynccontextmanager
async def authz_http_server(listen: str, checker: Checker, releaser: LeaseReleaser | None,
                            limits: Limits, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """Serves checks and `POST /release` on `listen` (host:port; port 0 = any) until the block ends; yields the
    port. With `ssl_context`: over TLS (internal mutual TLS, runtime/internal_tls.py)."""
    host, _, port = listen.rpartition(":")
    server = AuthzHttpServer(checker, releaser, limits)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server.protocol, host or "127.0.0.1", int(port), backlog=1024,
                                        ssl=ssl_context)
    sweeper = asyncio.create_task(server.sweep())
    bound = listener.sockets[0].getsockname()[1]
    log.info("ext_authz (HTTP) listening on %s:%d", host or "127.0.0.1", bound)
    try:
        yield bound
    finally:
        sweeper.cancel()
        listener.close()
        for connection in list(server.connections):
            if connection.transport is not None:
                connection.transport.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(listener.wait_closed(), 1.0)
