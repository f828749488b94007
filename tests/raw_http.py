"""HTTP/1.x over a plain socket, for requests no client library would send (and to see exactly what came back)."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

READ_TIMEOUT_S = 30.0  # a hang fails the test instead of blocking it


@dataclass
class RawResponse:
    status: int | None  # None: the connection closed without an answer
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name.lower()), None)

    def openai_error(self) -> dict:
        """The body's `error` object; fails unless the reply is OpenAI-shaped JSON with that content type."""
        content_type = self.header("content-type") or ""
        assert content_type.split(";")[0].strip() == "application/json", (self.status, content_type, self.raw[:300])
        error = json.loads(self.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), error
        assert error["code"] is None or isinstance(error["code"], str), error  # OpenAI codes are strings
        return error


def address(gateway: dict) -> tuple[str, int]:
    url = urlsplit(gateway["gateway_base"])
    return url.hostname, url.port


def connect(gateway: dict, timeout: float = READ_TIMEOUT_S) -> socket.socket:
    return socket.create_connection(address(gateway), timeout=timeout)


def read_until_closed(sock: socket.socket) -> bytes:
    return read_response(sock, until_closed=True)


def send(gateway: dict, request: bytes) -> RawResponse:
    """Sends `request` as it is and reads one response (to the end its framing gives, else until closed)."""
    with connect(gateway) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking it all: read what it said
        return parse(read_response(sock, head_only=request.startswith(b"HEAD ")))


def read_response(sock: socket.socket, head_only: bool = False, until_closed: bool = False) -> bytes:
    """One response. Not simply "until closed" (unless asked): after a refusal Envoy waits up to its
    delayed_close_timeout (1 s) for the client to close first."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
        if not until_closed and _complete(data, head_only):
            return data


def _complete(data: bytes, head_only: bool) -> bool:
    while data.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
        data = data[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    if head_only:
        return True
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])}
    if fields.get(b"transfer-encoding") == b"chunked":
        return rest.endswith(b"0\r\n\r\n")
    if b"content-length" in fields:
        return len(rest) >= int(fields[b"content-length"])
    return False


def parse(raw: bytes) -> RawResponse:
    while raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
        raw = raw[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return RawResponse(None, [], b"", raw)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    body = _dechunk(rest) if ("transfer-encoding", "chunked") in headers else rest
    return RawResponse(status, headers, body, raw)


def _dechunk(data: bytes) -> bytes:
    body = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        body, data = body + data[:size], data[size + 2:]
    return body


def request(method: str, path: str, headers: dict[str, str] | list[tuple[str, str]], body: bytes = b"",
            version: str = "HTTP/1.1") -> bytes:
    """A well-framed request (content-length from the body, connection: close), however odd its parts."""
    items = list(headers.items()) if isinstance(headers, dict) else list(headers)
    names = {k.lower() for k, _ in items}
    if "host" not in names:
        items.insert(0, ("host", "gateway"))
    if body and "content-length" not in names and "transfer-encoding" not in names:
        items.append(("content-length", str(len(body))))
    items.append(("connection", "close"))
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in items) + "\r\n"
    return head.encode("latin-1") + body
