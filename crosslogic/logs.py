"""Logging for every crosslogic process: one stderr handler, text or JSON lines, repeated warnings throttled.

Why the throttle: a dependency that is down (Valkey, Postgres) makes every request log the same warning;
at gateway rates that floods the disk and hides everything else. A warning or error that repeats is let
through at most once per interval, and the next one that passes says how many were left out. "Repeats" =
same logger, level, message template and string arguments (a child's name, a key): numbers and exceptions
in the arguments vary from one failure to the next and do not make a message new.

JSON lines (CROSSLOGIC_LOG_FORMAT=json) carry `request_id` (and `trace_id` when Envoy traces) whenever the line
was logged while a request was being handled (`request_context`): Envoy's x-request-id, which is also the
ledger's idempotency key and a field of Envoy's own access log, so one id finds a request in Envoy's log,
ext_authz's, the accounting service's and the ledger.

Connection failures that third-party libraries log with a traceback (asyncpg's pool refilling itself while
Postgres restarts) are logged in one line: the traceback says nothing the message does not.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable

_MAX_TEMPLATES = 1024  # messages built with f-strings have no shared template: bound what is remembered
# The request being handled by the current task (asyncio copies the context into every task it starts).
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("crosslogic_request_id", default="")
_trace_id: contextvars.ContextVar[str] = contextvars.ContextVar("crosslogic_trace_id", default="")


class request_context:  # noqa: N801 - used like a function: `with request_context(id):`
    """Log lines written inside the block carry `request_id` (and `trace_id`, the OpenTelemetry trace's).
    A class, not @contextmanager: it runs on every ext_authz check, and a generator costs twice as much."""

    __slots__ = ("request_id", "trace_id", "_tokens")

    def __init__(self, request_id: str, trace_id: str = "") -> None:
        self.request_id, self.trace_id = request_id, trace_id

    def __enter__(self) -> None:
        self._tokens = (_request_id.set(self.request_id), _trace_id.set(self.trace_id))

    def __exit__(self, *exc: object) -> None:
        _request_id.reset(self._tokens[0])
        _trace_id.reset(self._tokens[1])


def current_request_id() -> str:
    return _request_id.get()


class RepeatThrottle(logging.Filter):
    """Lets a WARNING-or-worse message template through once per `interval_s`, counting the rest."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._seen: OrderedDict[tuple, list] = OrderedDict()  # template -> [last let through, left out since]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or self.interval_s <= 0:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        key = (record.name, record.levelno, str(record.msg), *(a for a in args if isinstance(a, str)))
        now = self.clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval_s:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.getMessage()} [{seen[1]} more like this in the last {now - seen[0]:.0f}s]"
            record.args = None
        self._seen[key] = [now, 0]
        self._seen.move_to_end(key)
        if len(self._seen) > _MAX_TEMPLATES:
            self._seen.popitem(last=False)
        return True


def _connectivity_error(exc: BaseException) -> bool:
    names = {cls.__module__.split(".")[0] + "." + cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, OSError | TimeoutError) or bool(names & {
        "asyncpg.PostgresConnectionError", "asyncpg.CannotConnectNowError", "asyncpg.InterfaceError",
        "redis.ConnectionError"})


class ConnectivityTracebacks(logging.Filter):
    """A library's traceback for "cannot connect" becomes one line (`logger: message: error`)."""

    LIBRARIES = ("asyncpg", "redis", "grpc", "aiohttp")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.split(".")[0] in self.LIBRARIES:
            exc = record.exc_info[1]
            if exc is not None and _connectivity_error(exc):
                record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
                record.args, record.exc_info, record.exc_text = None, None, None
        return True


class JsonLines(logging.Formatter):
    """One JSON object a line: time (UTC, milliseconds), level, logger, message, service, request_id."""

    def __init__(self, service: str = "") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z", "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if self.service:
            entry["service"] = self.service
        request_id = getattr(record, "request_id", "") or _request_id.get()
        if request_id:
            entry["request_id"] = request_id
        trace_id = _trace_id.get()
        if trace_id:
            entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, *, json_lines: bool = False, repeat_interval_s: float = 10.0,
                      service: str = "") -> None:
    """Like logging.basicConfig: the handler is installed only where nobody else (a test harness) has one."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    if any(not getattr(h, "crosslogic", False) for h in root.handlers):
        return
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.crosslogic = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonLines(service) if json_lines else
                         logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.addFilter(ConnectivityTracebacks())
    handler.addFilter(RepeatThrottle(repeat_interval_s))
    root.addHandler(handler)
