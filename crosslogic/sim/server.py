"""A vLLM 0.32 OpenAI-compatible server, simulated: the only stand-in for a GPU node in this project.
(``engine="sglang"`` presents the same engine as SGLang instead: crosslogic/sim/sglang.py.)

Shapes, status codes, error JSON and SSE framing follow vLLM 0.32.0's own code (``vllm/entrypoints``):

* ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streaming or not), ``POST /v1/embeddings``
* ``GET /v1/models``, ``GET /health`` (200, empty body; 503 when made unhealthy), ``GET /version``,
  ``GET /metrics`` (Prometheus text, per-app registry, ``vllm:*`` series labelled ``model_name`` and
  ``engine="0"``).

The served names are aliases of ONE model, as with ``vllm serve --served-model-name a b``: any of them is
accepted, and responses and metrics always name the first. Token counts follow ``crosslogic.sim.tokens``;
the model writes exactly ``max_tokens`` tokens when asked (finish "length"), else
``default_completion_tokens`` (finish "stop"), clamped to ``max_model_len`` like vLLM. Timing: the first
token comes ``ttft_ms`` after the request is admitted, then one token every ``1/tokens_per_sec`` s
(0 = no delay). At most ``max_num_seqs`` sequences run at once; the rest wait (``num_requests_waiting``).
A client that disconnects aborts its request (finished_reason "abort"); tokens made until then count.
Not simulated: logprobs, tools, echo, stop strings, LoRA (the fields are accepted and ignored).

Test-only control endpoints (not in vLLM):

* ``GET /sim/config`` -> the current runtime config.
* ``POST /sim/config`` with any of ``ttft_ms``, ``tokens_per_sec``, ``default_completion_tokens``,
  ``healthy``, ``sse_fragment_bytes``, ``engine_error_after_tokens`` -> changes them for requests admitted from
  then on; answers the new config. The last two exercise the gateway's stream handling, never vLLM's own:
  ``sse_fragment_bytes`` > 0 writes every SSE event in pieces of that many bytes, one TCP write each (a proxy
  sees events split anywhere); ``engine_error_after_tokens`` = k makes each sequence fail after k tokens as
  when vLLM's engine reports finish reason "error": a stream gets vLLM's error event and ``[DONE]``, a
  non-streamed request a 500 ``InternalServerError`` (null = never).
* ``GET /sim/stats`` -> totals: requests, prompt/completion tokens, running/waiting, finish reasons.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from crosslogic.sim import tokens

VLLM_VERSION = "0.32.0"
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")  # vLLM's FinishReason strings
# vLLM 0.32's default histogram buckets (vllm/v1/metrics/buckets.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)
RUNTIME_FIELDS = ("ttft_ms", "tokens_per_sec", "default_completion_tokens", "healthy", "sse_fragment_bytes",
                  "engine_error_after_tokens")
_OPTIONAL_FIELDS = ("engine_error_after_tokens",)  # may be set to null
ENGINES = ("vllm", "sglang")


@dataclass(frozen=True)
class SimulatorConfig:
    models: Sequence[str] = ("llama-3-8b",)
    default_completion_tokens: int = 16
    ttft_ms: float = 0.0
    tokens_per_sec: float = 0.0  # 0: no delay between tokens
    embedding_dim: int = 8
    max_model_len: int = 8192
    node_name: str = "sim-0"
    max_num_seqs: int = 256
    kv_cache_tokens: int = 131072  # capacity behind vllm:kv_cache_usage_perc
    model_path: str | None = None  # /v1/models "root"; defaults to the first served name
    healthy: bool = True
    sse_fragment_bytes: int = 0  # test-only: > 0 writes each SSE event in pieces this big
    engine_error_after_tokens: int | None = None  # test-only: each sequence fails (finish "error") after k tokens
    engine: str = "vllm"  # the persona: "vllm" (this module) or "sglang" (crosslogic/sim/sglang.py)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a simulator serves at least one model name")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}")
        object.__setattr__(self, "models", tuple(self.models))

    @property
    def model_name(self) -> str:
        return self.models[0]


@dataclass
class SimStats:
    """Running totals, readable in-process (``app[SIM_STATS]``) and over ``GET /sim/stats``."""

    requests_total: int = 0  # HTTP generation/embedding requests admitted past validation
    requests_running: int = 0  # sequences (prompt x choice) being generated
    requests_waiting: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    kv_tokens_in_use: int = 0
    finished: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SIM_STATS = web.AppKey("sim_stats", SimStats)


# ---------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A failure the client sees, rendered once as vLLM's ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, err_type: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.err_type, self.message, self.param = status, err_type, message, param

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.err_type, "param": self.param,
                          "code": self.status}}
        return _json_response(body, status=self.status)


def validation_error(message: str, param: str | None = None, value: Any = None) -> ApiError:
    """vLLM's VLLMValidationError: 400 BadRequestError, message suffixed with parameter/value."""
    extras = [f"parameter={param}"] if param is not None else []
    if value is not None:
        extras.append(f"value={value}")
    text = f"{message} ({', '.join(extras)})" if extras else message
    return ApiError(400, "BadRequestError", text, param)


def schema_error(kind: str, loc: tuple[Any, ...], msg: str, value: Any, ctx: dict | None = None) -> ApiError:
    """FastAPI's RequestValidationError as vLLM renders it: 400 "Bad Request", pydantic-style message."""
    param = ".".join(str(p) for p in loc)
    err: dict[str, Any] = {"type": kind, "loc": param, "msg": msg, "input": _summarize(value)}
    if ctx is not None:
        err["ctx"] = ctx
    return ApiError(400, "Bad Request", f"1 validation error:\n  {err}", param)


def _summarize(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = value if isinstance(value, str) else str(value)
    return text[:200] + "...[truncated]" if len(text) > 200 else text


def not_found_model(model: str, served: Sequence[str]) -> ApiError:
    return ApiError(404, "NotFoundError",
                    f"The model `{model}` does not exist. Valid aliases: {', '.join(served)}.", "model")


@web.middleware
async def _error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # Starlette's 404/405 through vLLM's http_exception_handler.
        return ApiError(exc.status, exc.reason, exc.reason).response()


# ------------------------------------------------------------------------------------- request parsing


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _json_response(body: Any, status: int = 200) -> web.Response:
    # Starlette's JSONResponse: compact JSON, content-type without charset.
    return web.Response(body=_dumps(body).encode(), status=status, headers={"Content-Type": "application/json"})


async def _read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if request.content_type != "application/json":
        raise ApiError(400, "Bad Request",
                       "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed")
    if not raw:
        raise schema_error("missing", ("body",), "Field required", None)
    try:
        body = json.loads(raw)
    except ValueError as exc:
        pos, msg = (exc.pos, exc.msg) if isinstance(exc, json.JSONDecodeError) else (0, str(exc))
        raise schema_error("json_invalid", ("body", pos), "JSON decode error", {}, {"error": msg}) from None
    if not isinstance(body, dict):
        raise schema_error("model_attributes_type", ("body",),
                           "Input should be a valid dictionary or object to extract fields from", body)
    return body


def _opt_int(body: dict[str, Any], key: str, default: int | None = None) -> int | None:
    if key not in body:
        return default
    value = body[key]
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        raise schema_error("int_parsing", ("body", key),
                           "Input should be a valid integer, unable to parse string as an integer", value)
    raise schema_error("int_type", ("body", key), "Input should be a valid integer", value)


_LAX_BOOLS = {"true": True, "t": True, "yes": True, "y": True, "on": True, "1": True,
              "false": False, "f": False, "no": False, "n": False, "off": False, "0": False}


def _opt_bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    # pydantic's lax mode, which vLLM's request models use
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LAX_BOOLS:
        return _LAX_BOOLS[value.strip().lower()]
    raise schema_error("bool_parsing", ("body", key), "Input should be a valid boolean, unable to interpret input",
                       value)


@dataclass(frozen=True)
class StreamFlags:
    stream: bool
    include_usage: bool
    continuous_usage: bool


def _stream_flags(body: dict[str, Any]) -> StreamFlags:
    options = body.get("stream_options")
    # vLLM checks truthiness: "stream_options": {} without stream is accepted.
    if options and not body.get("stream"):
        raise validation_error("Stream options can only be defined when `stream=True`.", "stream_options")
    if options is not None and not isinstance(options, dict):
        raise schema_error("model_type", ("body", "stream_options"),
                           "Input should be a valid dictionary or instance of StreamOptions", options)
    stream = _opt_bool(body, "stream")
    include = bool(options and options.get("include_usage"))  # StreamOptions.include_usage defaults False
    return StreamFlags(stream, include, include and bool(options and options.get("continuous_usage_stats")))


def _check_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    if "messages" not in body:
        raise schema_error("missing", ("body", "messages"), "Field required", body)
    messages = body["messages"]
    if not isinstance(messages, list):
        raise schema_error("list_type", ("body", "messages"), "Input should be a valid list", messages)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise schema_error("missing", ("body", "messages", i, "role"), "Field required", message)
    return messages


def _check_prompt(body: dict[str, Any], key: str) -> list[str | list[int]]:
    value = body.get(key)
    if key == "prompt" and value in (None, ""):
        raise validation_error("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    if value is None:
        raise schema_error("missing", ("body", key), "Field required", body)
    ok = isinstance(value, str) or (
        isinstance(value, list) and value and (
            all(isinstance(x, str) for x in value)
            or all(_is_token_id(x) for x in value)
            or all(isinstance(x, list) and x and all(_is_token_id(t) for t in x) for x in value)
        )
    )
    if not ok:
        raise schema_error("string_type", ("body", key), "Input should be a valid string", value)
    return tokens.prompt_batch(value)


def _is_token_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _request_id(request: web.Request, prefix: str) -> str:
    return f"{prefix}-{request.headers.get('X-Request-Id') or uuid.uuid4().hex}"


# --------------------------------------------------------------------------------------------- metrics


class _Metrics:
    """The vLLM series this project reads, in a registry owned by one app."""

    def __init__(self, model_name: str, stats: SimStats, kv_capacity: int) -> None:
        self.registry = CollectorRegistry()
        names, values = ("model_name", "engine"), (model_name, "0")

        def gauge(name: str, doc: str, read: Callable[[], float]) -> None:
            Gauge(name, doc, names, registry=self.registry).labels(*values).set_function(read)

        gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
              lambda: stats.requests_running)
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
              lambda: stats.requests_waiting)
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
              lambda: min(1.0, stats.kv_tokens_in_use / kv_capacity))
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", names,
                                     registry=self.registry).labels(*values)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         names, registry=self.registry).labels(*values)
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          (*names, "finished_reason"), registry=self.registry)
        self.request_success = {r: success.labels(*values, r) for r in FINISH_REASONS}
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              names, buckets=TTFT_BUCKETS, registry=self.registry).labels(*values)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             names, buckets=E2E_BUCKETS, registry=self.registry).labels(*values)


# ---------------------------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class _Seq:
    """One engine request: a (prompt, choice) pair."""

    index: int  # choice index in the response
    prompt_tokens: int
    plan: tokens.CompletionPlan


OnToken = Callable[[int, list[_Seq]], Awaitable[None]]


class EngineError(Exception):
    """A sequence finished with reason "error" (vLLM's GenerationError: "Internal server error", HTTP 500)."""

    message = "Internal server error"


class _Engine:
    """Admission, timing, token accounting and metrics for generated sequences."""

    def __init__(self, config: SimulatorConfig, stats: SimStats, metrics: _Metrics) -> None:
        self.config = config  # replaced whole by POST /sim/config
        self.stats = stats
        self.metrics = metrics
        self._capacity = asyncio.Condition()

    async def _admit(self, k: int) -> None:
        self.stats.requests_waiting += k
        try:
            async with self._capacity:
                limit = self.config.max_num_seqs
                # A request larger than the limit still runs alone rather than waiting forever.
                await self._capacity.wait_for(
                    lambda: self.stats.requests_running == 0 or self.stats.requests_running + k <= limit)
                self.stats.requests_running += k
        finally:
            self.stats.requests_waiting -= k

    async def _release(self, k: int) -> None:
        # The slots come back at once, before any await: a handler cancelled again while waiting for the
        # lock below must not leak them. Waking the waiters is shielded from that cancellation too.
        self.stats.requests_running -= k
        await asyncio.shield(self._wake_waiters())

    async def _wake_waiters(self) -> None:
        async with self._capacity:
            self._capacity.notify_all()

    async def generate(self, seqs: list[_Seq], prompt_tokens: int, on_token: OnToken | None = None) -> None:
        """Run ``seqs`` in lockstep; ``on_token(i, active)`` after token ``i`` of each active sequence.

        Tokens count as generated before they are delivered, as in vLLM: a client that disconnects
        still pays for the token whose write failed. Any exception (disconnect, cancellation) aborts.
        """
        arrival = time.monotonic()
        config = self.config
        self.stats.requests_total += 1
        await self._admit(len(seqs))
        done = dict.fromkeys((s.index for s in seqs), 0)
        kv_tokens = 0
        failed = False
        try:
            if config.ttft_ms > 0:
                await asyncio.sleep(config.ttft_ms / 1000)
            self.stats.prompt_tokens += prompt_tokens
            self.metrics.prompt_tokens.inc(prompt_tokens)
            kv_tokens = sum(s.prompt_tokens for s in seqs)
            self.stats.kv_tokens_in_use += kv_tokens
            self.metrics.ttft.observe(time.monotonic() - arrival)
            for i in range(max(s.plan.tokens for s in seqs)):
                if i and config.tokens_per_sec > 0:
                    await asyncio.sleep(1 / config.tokens_per_sec)
                if i == config.engine_error_after_tokens:
                    failed = True
                    raise EngineError
                active = [s for s in seqs if s.plan.tokens > i]
                for s in active:
                    done[s.index] += 1
                self.stats.completion_tokens += len(active)
                self.stats.kv_tokens_in_use += len(active)
                kv_tokens += len(active)
                self.metrics.generation_tokens.inc(len(active))
                if on_token is not None:
                    await on_token(i, active)
        finally:
            self.stats.kv_tokens_in_use -= kv_tokens
            elapsed = time.monotonic() - arrival
            for s in seqs:
                reason = s.plan.finish_reason if done[s.index] == s.plan.tokens else "error" if failed else "abort"
                self.stats.finished[reason] += 1
                self.metrics.request_success[reason].inc()
                self.metrics.e2e.observe(elapsed)
            await self._release(len(seqs))

    async def embed(self, prompt_tokens: int) -> None:
        """Account one embedding batch: a prefill and nothing generated."""
        self.stats.requests_total += 1
        await self._admit(1)
        try:
            if self.config.ttft_ms > 0:
                await asyncio.sleep(self.config.ttft_ms / 1000)
            self.stats.prompt_tokens += prompt_tokens
            self.metrics.prompt_tokens.inc(prompt_tokens)
        finally:
            await self._release(1)


_ENGINE = web.AppKey("sim_engine", _Engine)


# -------------------------------------------------------------------------------------------- handlers


class _SseWriter:
    """``text/event-stream`` as Starlette's StreamingResponse sends it; one ``data:`` event per chunk."""

    def __init__(self, request: web.Request, fragment_bytes: int = 0) -> None:
        self.request = request
        self.fragment_bytes = fragment_bytes
        self.response = web.StreamResponse(
            status=200, headers={"Content-Type": "text/event-stream; charset=utf-8"})

    async def start(self) -> None:
        await self.response.prepare(self.request)

    async def _write(self, data: bytes) -> None:
        step = self.fragment_bytes
        if step <= 0:
            await self.response.write(data)
            return
        for at in range(0, len(data), step):
            await self.response.write(data[at:at + step])
            await asyncio.sleep(0.001)  # one TCP segment per piece, so the reader sees the split

    async def send(self, chunk: dict[str, Any]) -> None:
        await self._write(f"data: {_dumps(chunk)}\n\n".encode())

    async def send_error(self, message: str) -> None:
        """vLLM's streaming error event: json.dumps of ErrorResponse (default separators), code 500."""
        error = {"error": {"message": message, "type": "InternalServerError", "param": None, "code": 500}}
        await self._write(f"data: {json.dumps(error)}\n\n".encode())

    async def done(self) -> None:
        await self._write(b"data: [DONE]\n\n")
        await self.response.write_eof()


def _usage(prompt: int, completion: int, **extra: Any) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion,
            **extra}


class _Handlers:
    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        config = engine.config
        digest = hashlib.sha256(f"{config.model_path or config.model_name}|{config.max_model_len}".encode())
        self.fingerprint = f"vllm-{VLLM_VERSION}-{digest.hexdigest()[:8]}"

    @property
    def config(self) -> SimulatorConfig:
        return self.engine.config

    # -- shared request checks, in vLLM's order: schema, model, token budget

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise schema_error("string_type", ("body", "model"), "Input should be a valid string", model)
        if model and model not in self.config.models:
            raise not_found_model(model, self.config.models)

    def _plans(self, prompt_lens: list[int], max_tokens: int | None, param: str) -> list[tokens.CompletionPlan]:
        limit = self.config.max_model_len
        if max_tokens is not None and max_tokens > limit:
            raise validation_error(f"{param}={max_tokens} cannot be greater than max_model_len={limit}. "
                                   "Please request fewer output tokens.", param, max_tokens)
        plans = []
        for n in prompt_lens:
            if n > limit:
                raise validation_error(
                    f"This model's maximum context length is {limit} tokens. However, your prompt contains "
                    f"{n} input tokens, which exceeds this limit even without any output tokens. "
                    "Please reduce the length of the input prompt.", "input_tokens", n)
            plan = tokens.plan_completion(n, max_tokens, self.config.default_completion_tokens, limit)
            if plan.tokens < 1:
                raise validation_error(f"max_tokens must be at least 1, got {plan.tokens}.", "max_tokens",
                                       plan.tokens)
            plans.append(plan)
        return plans

    async def _generate(self, seqs: list[_Seq], prompt_tokens: int) -> None:
        try:
            await self.engine.generate(seqs, prompt_tokens)
        except EngineError as exc:
            raise ApiError(500, "InternalServerError", exc.message) from None

    def _choices_n(self, body: dict[str, Any]) -> int:
        n = _opt_int(body, "n", 1)
        if n is None:
            return 1
        if n < 1:
            raise validation_error(f"n must be at least 1, got {n}.", "n", n)
        return n

    # -- /v1/chat/completions

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await _read_json(request)
        flags = _stream_flags(body)
        messages = _check_messages(body)
        n = self._choices_n(body)
        if body.get("max_completion_tokens") is not None:
            param, max_tokens = "max_completion_tokens", _opt_int(body, "max_completion_tokens")
        else:
            param, max_tokens = "max_tokens", _opt_int(body, "max_tokens")
        self._check_model(body)
        prompt_tokens = tokens.chat_prompt_tokens(messages)
        (plan,) = self._plans([prompt_tokens], max_tokens, param)
        seqs = [_Seq(i, prompt_tokens, plan) for i in range(n)]
        rid, created, model = _request_id(request, "chatcmpl"), int(time.time()), self.config.model_name
        if flags.stream:
            return await self._chat_stream(request, flags, seqs, rid, created, model)
        await self._generate(seqs, prompt_tokens)
        completion = plan.tokens * n
        choices = [
            {"index": s.index,
             "message": {"role": "assistant", "content": tokens.generated_text(plan.tokens), "refusal": None,
                         "annotations": None, "audio": None, "function_call": None, "reasoning": None},
             "logprobs": None, "finish_reason": plan.finish_reason, "stop_reason": None, "token_ids": None,
             "routed_experts": None}
            for s in seqs
        ]
        return _json_response({
            "id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "service_tier": None, "system_fingerprint": self.fingerprint,
            "usage": _usage(prompt_tokens, completion, prompt_tokens_details=None, completion_tokens_details=None),
            "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None, "kv_transfer_params": None,
            "ec_transfer_params": None, "metrics": None,
        })

    async def _stream(self, sse: _SseWriter, flags: StreamFlags, seqs: list[_Seq], prompt_tokens: int,
                      on_token: Callable[[int, list[_Seq]], Awaitable[None]], head: dict[str, Any],
                      sent: dict[int, int]) -> web.StreamResponse:
        """Drives one SSE response: chunks from `on_token`, then vLLM's usage chunk and `[DONE]`."""
        try:
            await sse.start()
            try:
                await self.engine.generate(seqs, prompt_tokens, on_token)
            except EngineError as exc:  # vLLM: the error event replaces the rest, then [DONE]
                await sse.send_error(exc.message)
            else:
                if flags.include_usage:
                    await sse.send({**head, "choices": [], "usage": _usage(prompt_tokens, sum(sent.values())),
                                    "system_fingerprint": self.fingerprint})
            await sse.done()
        except ConnectionResetError:  # the client went away; the engine already counted what it made
            pass
        return sse.response

    async def _chat_stream(self, request: web.Request, flags: StreamFlags, seqs: list[_Seq], rid: str,
                           created: int, model: str) -> web.StreamResponse:
        sse = _SseWriter(request, self.config.sse_fragment_bytes)
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        prompt_tokens = seqs[0].prompt_tokens
        sent = dict.fromkeys((s.index for s in seqs), 0)

        async def on_token(i: int, active: list[_Seq]) -> None:
            if i == 0:  # vLLM sends the role with the first engine output
                for s in seqs:
                    chunk: dict[str, Any] = {**head, "choices": [{
                        "index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}]}
                    if flags.continuous_usage:
                        chunk["usage"] = _usage(prompt_tokens, 0, completion_tokens_details=None)
                    chunk["prompt_token_ids"] = None
                    chunk["prompt_text"] = None
                    await sse.send(chunk)
            for s in active:
                sent[s.index] += 1
                last = sent[s.index] == s.plan.tokens
                choice: dict[str, Any] = {"index": s.index,
                                          "delta": {"content": tokens.token_text(i, s.plan.tokens)},
                                          "logprobs": None, "finish_reason": s.plan.finish_reason if last else None}
                if last:
                    choice["stop_reason"] = None
                choice["token_ids"] = None
                chunk = {**head, "choices": [choice]}
                if flags.continuous_usage:
                    chunk["usage"] = _usage(prompt_tokens, sent[s.index], completion_tokens_details=None)
                if last and not flags.include_usage:
                    chunk["system_fingerprint"] = self.fingerprint
                await sse.send(chunk)

        return await self._stream(sse, flags, seqs, prompt_tokens, on_token, head, sent)

    # -- /v1/completions

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await _read_json(request)
        flags = _stream_flags(body)
        prompts = _check_prompt(body, "prompt")
        n = self._choices_n(body)
        max_tokens = _opt_int(body, "max_tokens", 16)  # CompletionRequest.max_tokens defaults to 16
        self._check_model(body)
        lens = [tokens.tokens_of(p) for p in prompts]
        plans = self._plans(lens, max_tokens, "max_tokens")
        seqs = [_Seq(p * n + c, lens[p], plans[p]) for p in range(len(prompts)) for c in range(n)]
        rid, created, model = _request_id(request, "cmpl"), int(time.time()), self.config.model_name
        if flags.stream:
            return await self._completions_stream(request, flags, seqs, sum(lens), rid, created, model)
        await self._generate(seqs, sum(lens))
        choices = [
            {"index": s.index, "text": tokens.generated_text(s.plan.tokens), "logprobs": None,
             "finish_reason": s.plan.finish_reason, "stop_reason": None, "token_ids": None,
             "prompt_logprobs": None, "prompt_token_ids": None, "routed_experts": None}
            for s in seqs
        ]
        return _json_response({
            "id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "service_tier": None, "system_fingerprint": self.fingerprint,
            "usage": _usage(sum(lens), sum(s.plan.tokens for s in seqs), prompt_tokens_details=None,
                            completion_tokens_details=None),
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
        })

    async def _completions_stream(self, request: web.Request, flags: StreamFlags, seqs: list[_Seq],
                                  prompt_tokens: int, rid: str, created: int, model: str) -> web.StreamResponse:
        sse = _SseWriter(request, self.config.sse_fragment_bytes)
        head = {"id": rid, "object": "text_completion", "created": created, "model": model}
        sent = dict.fromkeys((s.index for s in seqs), 0)

        async def on_token(i: int, active: list[_Seq]) -> None:
            for s in active:
                sent[s.index] += 1
                last = sent[s.index] == s.plan.tokens
                chunk: dict[str, Any] = {**head, "choices": [{
                    "index": s.index, "text": tokens.token_text(i, s.plan.tokens), "logprobs": None,
                    "finish_reason": s.plan.finish_reason if last else None, "stop_reason": None,
                    "prompt_token_ids": None, "token_ids": None}]}
                if flags.continuous_usage:
                    chunk["usage"] = _usage(s.prompt_tokens, sent[s.index])
                if last and not flags.include_usage:
                    chunk["system_fingerprint"] = self.fingerprint
                await sse.send(chunk)

        return await self._stream(sse, flags, seqs, prompt_tokens, on_token, head, sent)

    # -- /v1/embeddings

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        prompts = _check_prompt(body, "input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise schema_error("literal_error", ("body", "encoding_format"),
                               "Input should be 'float' or 'base64'", encoding, {"expected": "'float' or 'base64'"})
        dim = self.config.embedding_dim
        dimensions = _opt_int(body, "dimensions")
        self._check_model(body)
        if dimensions is not None and not 1 <= dimensions <= dim:
            raise validation_error(
                f"Model {self.config.model_name!r} only supports dimensions in range [1, {dim}], got {dimensions}.")
        lens = [tokens.tokens_of(p) for p in prompts]
        for n in lens:
            if n > self.config.max_model_len:
                raise validation_error(
                    f"This model's maximum context length is {self.config.max_model_len} tokens. However, your "
                    f"prompt contains {n} input tokens, which exceeds this limit even without any output "
                    "tokens. Please reduce the length of the input prompt.", "input_tokens", n)
        await self.engine.embed(sum(lens))
        data = []
        for i, prompt in enumerate(prompts):
            vector = tokens.embedding_for(prompt, dim)
            if dimensions is not None:  # Matryoshka-style: truncate, then renormalize
                head = vector[:dimensions]
                norm = sum(v * v for v in head) ** 0.5 or 1.0
                vector = [v / norm for v in head]
            encoded: Any = vector
            if encoding == "base64":  # float32, native (little-endian here), as the openai client expects
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"index": i, "object": "embedding", "embedding": encoded})
        total = sum(lens)
        return _json_response({
            "id": _request_id(request, "embd"), "object": "list", "created": int(time.time()),
            "model": self.config.model_name, "data": data,
            "usage": _usage(total, 0, prompt_tokens_details=None, completion_tokens_details=None),
        })

    # -- server info

    async def models(self, request: web.Request) -> web.Response:
        now = int(time.time())
        permission = {"object": "model_permission", "created": now, "allow_create_engine": False,
                      "allow_sampling": True, "allow_logprobs": True, "allow_search_indices": False,
                      "allow_view": True, "allow_fine_tuning": False, "organization": "*", "group": None,
                      "is_blocking": False}
        data = [
            {"id": name, "object": "model", "created": now, "owned_by": "vllm",
             "root": self.config.model_path or self.config.model_name, "parent": None,
             "max_model_len": self.config.max_model_len,
             "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", **permission}]}
            for name in self.config.models
        ]
        return _json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.config.healthy else 503)

    async def version(self, request: web.Request) -> web.Response:
        return _json_response({"version": VLLM_VERSION})

    async def metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.engine.metrics.registry), headers={"Content-Type": content_type})

    # -- /sim/ control

    def _config_view(self) -> dict[str, Any]:
        view = dataclasses.asdict(self.config)
        view["models"] = list(self.config.models)
        return view

    async def get_config(self, request: web.Request) -> web.Response:
        return _json_response(self._config_view())

    async def set_config(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        try:
            set_runtime_config(request.app, **body)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, "BadRequestError", str(exc)) from None
        return _json_response(self._config_view())

    async def stats(self, request: web.Request) -> web.Response:
        return _json_response({"node_name": self.config.node_name, **self.engine.stats.as_dict()})


# ------------------------------------------------------------------------------------------ app, server


def build_app(config: SimulatorConfig) -> web.Application:
    stats = SimStats()
    if config.engine == "sglang":
        from crosslogic.sim import sglang

        engine = _Engine(config, stats, sglang.SglangMetrics(config.model_name, stats, config.kv_cache_tokens))
        h: _Handlers = sglang.SglangHandlers(engine)
        middleware = sglang.error_middleware
    else:
        engine = _Engine(config, stats, _Metrics(config.model_name, stats, config.kv_cache_tokens))
        h = _Handlers(engine)
        middleware = _error_middleware
    # uvicorn sets no body limit; aiohttp's default 1 MiB would turn long prompts into 413s.
    app = web.Application(middlewares=[middleware], client_max_size=256 * 1024**2)
    app[SIM_STATS] = stats
    app[_ENGINE] = engine
    app.router.add_post("/v1/chat/completions", h.chat)
    app.router.add_post("/v1/completions", h.completions)
    app.router.add_post("/v1/embeddings", h.embeddings)
    app.router.add_get("/v1/models", h.models)
    app.router.add_get("/health", h.health)
    app.router.add_get("/version", h.version)
    app.router.add_get("/metrics", h.metrics)
    app.router.add_get("/sim/config", h.get_config)
    app.router.add_post("/sim/config", h.set_config)
    app.router.add_get("/sim/stats", h.stats)
    if config.engine == "sglang":
        sglang.add_routes(app, h)
    return app


def set_runtime_config(app: web.Application, **changes: Any) -> SimulatorConfig:
    """In-process twin of ``POST /sim/config``."""
    engine = app[_ENGINE]
    unknown = sorted(set(changes) - set(RUNTIME_FIELDS))
    if unknown:
        raise ValueError(f"not runtime-settable: {', '.join(unknown)}")
    for key, value in changes.items():
        if value is None and key in _OPTIONAL_FIELDS:
            continue
        numeric = key != "healthy"
        if isinstance(value, bool) == numeric or not isinstance(value, (int, float)) or value < 0:
            raise TypeError(f"{key} must be a {'non-negative number' if numeric else 'boolean'}")
    engine.config = dataclasses.replace(engine.config, **changes)
    return engine.config


@dataclass(frozen=True)
class RunningSimulator:
    app: web.Application
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url``."""
        return f"{self.url}/v1"

    @property
    def stats(self) -> SimStats:
        return self.app[SIM_STATS]

    def set_config(self, **changes: Any) -> SimulatorConfig:
        return set_runtime_config(self.app, **changes)


@asynccontextmanager
async def running_simulator(
    config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 5.0
) -> AsyncIterator[RunningSimulator]:
    """Serve ``config`` on ``host:port`` (0 = any free port) for the duration of the block."""
    # handler_cancellation: a client that goes away cancels its handler, as vLLM's with_cancellation and
    # Starlette's disconnect listener do, so the engine aborts instead of finishing unseen work.
    runner = web.AppRunner(build_app(config), access_log=None, shutdown_timeout=shutdown_timeout,
                           handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        yield RunningSimulator(runner.app, host, bound)
    finally:
        await runner.cleanup()


async def serve(config: SimulatorConfig, host: str, port: int, stop: asyncio.Event,
                shutdown_timeout: float = 10.0) -> None:
    """Serve until ``stop`` is set, then let in-flight requests finish (up to ``shutdown_timeout`` s)."""
    async with running_simulator(config, host, port, shutdown_timeout) as sim:
        print(f"crosslogic.sim {config.node_name}: serving {', '.join(config.models)} on {sim.url}", flush=True)
        await stop.wait()
