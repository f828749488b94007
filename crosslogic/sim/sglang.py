"""The simulator's SGLang persona (`python -m crosslogic.sim --engine sglang`): the same engine model (admission,
timing, tokens) behind SGLang's HTTP surface, as its OpenAI-compatible server (sglang/srt/entrypoints/openai) and
its Prometheus collector (sglang/srt/metrics/collector.py) present it:

* errors are SGLang's ErrorResponse at the top level, not under "error":
  ``{"object": "error", "message", "type", "param", "code"}``; a streamed error is
  ``data: {"error": {...same...}}`` then ``[DONE]``;
* responses echo the model name the client sent ("default" when none) and any name is served; choices carry
  ``matched_stop`` (the EOS token id on "stop", null on "length"); usage has ``prompt_tokens_details: null`` and
  ``reasoning_tokens: 0``; non-streamed bodies end with ``metadata: {"weight_version": "default"}``;
* a chat stream is pydantic's ``model_dump_json`` of every chunk, so every chunk carries ``"usage": null`` and
  every delta all four fields (``role, content, reasoning_content, tool_calls``, nulls included); the finish
  reason comes in a chunk of its own with an empty delta; the usage chunk (``include_usage``) has no choices;
* /metrics: ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``, ``sglang:token_usage``,
  ``sglang:gen_throughput`` (a gauge the scheduler refreshes only every 40 decode steps, so it stays stale when
  the engine goes idle: read ``sglang:generation_tokens_total`` for rates), ``sglang:num_used_tokens``,
  ``sglang:max_total_num_tokens``, ``sglang:prompt_tokens_total``, ``sglang:generation_tokens_total``,
  ``sglang:num_requests_total``, ``sglang:time_to_first_token_seconds``, ``sglang:e2e_request_latency_seconds``,
  scheduler series labelled ``engine_type="unified", model_name, pp_rank, tp_rank``;
* /health (200, empty), /health_generate, /get_model_info, /get_server_info, /version.

Messages of validation errors keep the vLLM persona's words (the gateway passes a node's 4xx message through,
cleaned); their shape, status and type are SGLang's.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from crosslogic.sim import tokens
from crosslogic.sim.server import (
    E2E_BUCKETS,
    FINISH_REASONS,
    TTFT_BUCKETS,
    ApiError,
    EngineError,
    SimStats,
    StreamFlags,
    _check_messages,
    _check_prompt,
    _dumps,
    _Handlers,
    _json_response,
    _opt_int,
    _read_json,
    _Seq,
    _SseWriter,
    _stream_flags,
)

SGLANG_VERSION = "0.5.5"
EOS_TOKEN_ID = 128009  # Llama 3's <|eot_id|>: what matched_stop reports when generation stopped on EOS
DECODE_LOG_INTERVAL = 40  # SGLang's --decode-log-interval: gen_throughput is refreshed this often
DEFAULT_MODEL_NAME = "default"


def error_body(status: int, err_type: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": err_type, "param": param, "code": status}


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
    try:
        return await handler(request)
    except ApiError as exc:
        # RequestValidationError is rendered with the status phrase as its type ("Bad Request"), like vLLM's.
        return _json_response(error_body(exc.status, exc.err_type, exc.message, exc.param), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json_response({"detail": exc.reason}, status=exc.status)  # FastAPI's own 404 / 405


class _Throughput:
    """sglang:generation_tokens_total, and the gen_throughput gauge refreshed every DECODE_LOG_INTERVAL steps."""

    def __init__(self, counter, gauge) -> None:
        self.counter, self.gauge = counter, gauge
        self.steps = 0
        self.tokens = 0
        self.since = time.monotonic()

    def inc(self, amount: float = 1) -> None:
        self.counter.inc(amount)
        self.steps += 1
        self.tokens += int(amount)
        if self.steps >= DECODE_LOG_INTERVAL:
            now = time.monotonic()
            self.gauge.set(self.tokens / max(now - self.since, 1e-9))
            self.steps, self.tokens, self.since = 0, 0, now


class SglangMetrics:
    def __init__(self, model_name: str, stats: SimStats, kv_capacity: int) -> None:
        self.registry = CollectorRegistry()
        sched = ("engine_type", "model_name", "pp_rank", "tp_rank")
        sched_values = ("unified", model_name, "0", "0")

        def gauge(name: str, doc: str, read: Callable[[], float]) -> None:
            Gauge(name, doc, sched, registry=self.registry).labels(*sched_values).set_function(read)

        gauge("sglang:num_running_reqs", "The number of running requests.", lambda: stats.requests_running)
        gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.", lambda: stats.requests_waiting)
        gauge("sglang:num_used_tokens", "The number of used tokens.", lambda: stats.kv_tokens_in_use)
        gauge("sglang:token_usage", "The token usage.", lambda: min(1.0, stats.kv_tokens_in_use / kv_capacity))
        gauge("sglang:max_total_num_tokens", "Maximum total number of tokens in the KV cache pool.",
              lambda: kv_capacity)
        throughput = Gauge("sglang:gen_throughput", "The generation throughput (token/s).", sched,
                           registry=self.registry).labels(*sched_values)
        names, values = ("model_name",), (model_name,)
        self.prompt_tokens = Counter("sglang:prompt_tokens", "Number of prefill tokens processed.", names,
                                     registry=self.registry).labels(*values)
        self.generation_tokens = _Throughput(
            Counter("sglang:generation_tokens", "Number of generation tokens processed.", names,
                    registry=self.registry).labels(*values), throughput)
        requests = Counter("sglang:num_requests", "The number of requests.", names,
                           registry=self.registry).labels(*values)
        self.request_success = dict.fromkeys(FINISH_REASONS, requests)
        self.ttft = Histogram("sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              names, buckets=TTFT_BUCKETS, registry=self.registry).labels(*values)
        self.e2e = Histogram("sglang:e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds",
                             names, buckets=E2E_BUCKETS, registry=self.registry).labels(*values)


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion,
            "prompt_tokens_details": None, "reasoning_tokens": 0}


def _matched(finish_reason: str) -> int | None:
    return EOS_TOKEN_ID if finish_reason == "stop" else None


def _delta(role: str | None = None, content: str | None = None) -> dict[str, Any]:
    return {"role": role, "content": content, "reasoning_content": None, "tool_calls": None}


class _SglangSse(_SseWriter):
    async def send_error(self, message: str) -> None:
        # create_streaming_error_response: json.dumps (default separators) of {"error": ErrorResponse}
        body = {"error": error_body(400, "BadRequestError", message)}
        await self._write(f"data: {json.dumps(body)}\n\n".encode())


class SglangHandlers(_Handlers):
    """SGLang's routes over the shared engine."""

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "Bad Request", "[{'type': 'string_type', 'loc': ('body', 'model'), "
                           "'msg': 'Input should be a valid string'}]")

    @staticmethod
    def _model(body: dict[str, Any]) -> str:
        return body.get("model") or DEFAULT_MODEL_NAME

    async def _run_stream(self, request: web.Request, flags: StreamFlags, seqs: list[_Seq], prompt_tokens: int,
                          on_token, finish, usage_head: dict[str, Any]) -> web.StreamResponse:
        sse = _SglangSse(request, self.config.sse_fragment_bytes)
        try:
            await sse.start()
            try:
                await self.engine.generate(seqs, prompt_tokens, lambda i, active: on_token(sse, i, active))
            except EngineError as exc:
                await sse.send_error(exc.message)
            else:
                await finish(sse)
                if flags.include_usage:
                    completion = sum(s.plan.tokens for s in seqs)
                    await sse.send({**usage_head, "choices": [], "usage": _usage(prompt_tokens, completion)})
            await sse.done()
        except ConnectionResetError:
            pass
        return sse.response

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
        rid, model = f"{uuid.uuid4().hex}", self._model(body)
        if flags.stream:
            return await self._chat_stream(request, flags, seqs, rid, model)
        await self._generate(seqs, prompt_tokens)
        choices = [{"index": s.index,
                    "message": {"role": "assistant", "content": tokens.generated_text(plan.tokens),
                                "reasoning_content": None, "tool_calls": None},
                    "logprobs": None, "finish_reason": plan.finish_reason, "matched_stop": _matched(plan.finish_reason)}
                   for s in seqs]
        return _json_response({"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                               "choices": choices, "usage": _usage(prompt_tokens, plan.tokens * n),
                               "metadata": {"weight_version": "default"}})

    async def _chat_stream(self, request: web.Request, flags: StreamFlags, seqs: list[_Seq], rid: str,
                           model: str) -> web.StreamResponse:
        prompt_tokens = seqs[0].prompt_tokens
        sent = dict.fromkeys((s.index for s in seqs), 0)

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                    "choices": choices, "usage": usage}

        def choice(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish,
                    "matched_stop": _matched(finish) if finish else None}

        async def on_token(sse: _SseWriter, i: int, active: list[_Seq]) -> None:
            if i == 0:
                for s in seqs:
                    await sse.send(chunk([choice(s.index, _delta("assistant", ""))]))
            for s in active:
                sent[s.index] += 1
                usage = _usage(prompt_tokens, sent[s.index]) if flags.continuous_usage else None
                await sse.send(chunk([choice(s.index, _delta(content=tokens.token_text(i, s.plan.tokens)))], usage))

        async def finish(sse: _SseWriter) -> None:
            for s in seqs:  # the finish reason in a chunk of its own, with an empty delta
                await sse.send(chunk([choice(s.index, _delta(), s.plan.finish_reason)]))

        return await self._run_stream(request, flags, seqs, prompt_tokens, on_token, finish,
                                      {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                                       "model": model})

    # -- /v1/completions

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await _read_json(request)
        flags = _stream_flags(body)
        prompts = _check_prompt(body, "prompt")
        n = self._choices_n(body)
        max_tokens = _opt_int(body, "max_tokens", 16)
        self._check_model(body)
        lens = [tokens.tokens_of(p) for p in prompts]
        plans = self._plans(lens, max_tokens, "max_tokens")
        seqs = [_Seq(p * n + c, lens[p], plans[p]) for p in range(len(prompts)) for c in range(n)]
        rid, model, created = uuid.uuid4().hex, self._model(body), int(time.time())
        if flags.stream:
            sent = dict.fromkeys((s.index for s in seqs), 0)

            async def on_token(sse: _SseWriter, i: int, active: list[_Seq]) -> None:
                for s in active:
                    sent[s.index] += 1
                    last = sent[s.index] == s.plan.tokens
                    finish = s.plan.finish_reason if last else None
                    await sse.send({"id": rid, "object": "text_completion", "created": int(time.time()),
                                    "model": model, "choices": [{
                                        "index": s.index, "text": tokens.token_text(i, s.plan.tokens),
                                        "logprobs": None, "finish_reason": finish,
                                        "matched_stop": _matched(finish) if finish else None}],
                                    "usage": _usage(s.prompt_tokens, sent[s.index]) if flags.continuous_usage
                                    else None})

            async def finish(sse: _SseWriter) -> None:
                return None

            return await self._run_stream(request, flags, seqs, sum(lens), on_token, finish,
                                          {"id": rid, "object": "text_completion", "created": created,
                                           "model": model})
        await self._generate(seqs, sum(lens))
        choices = [{"index": s.index, "text": tokens.generated_text(s.plan.tokens), "logprobs": None,
                    "finish_reason": s.plan.finish_reason, "matched_stop": _matched(s.plan.finish_reason)}
                   for s in seqs]
        return _json_response({"id": rid, "object": "text_completion", "created": created, "model": model,
                               "choices": choices, "usage": _usage(sum(lens), sum(s.plan.tokens for s in seqs)),
                               "metadata": {"weight_version": "default"}})

    # -- /v1/embeddings: the vLLM persona's maths, SGLang's envelope

    async def embeddings(self, request: web.Request) -> web.Response:
        response = await super().embeddings(request)
        body = json.loads(response.body)
        body = {"data": body["data"], "model": self._model(json.loads(await request.read())), "object": "list",
                "usage": _usage(body["usage"]["prompt_tokens"], 0)}
        return _json_response(body)

    # -- server info

    async def models(self, request: web.Request) -> web.Response:
        now = int(time.time())
        data = [{"id": name, "object": "model", "created": now, "owned_by": "sglang",
                 "root": self.config.model_path or self.config.model_name, "parent": None,
                 "max_model_len": self.config.max_model_len} for name in self.config.models]
        return _json_response({"object": "list", "data": data})

    async def version(self, request: web.Request) -> web.Response:
        return _json_response({"version": SGLANG_VERSION})

    async def health_generate(self, request: web.Request) -> web.Response:
        """SGLang runs a one-token generation before answering."""
        if not self.config.healthy:
            return web.Response(status=503)
        plan = tokens.plan_completion(1, 1, 1, self.config.max_model_len)
        await self.engine.generate([_Seq(0, 1, plan)], 1)
        return web.Response(status=200)

    async def model_info(self, request: web.Request) -> web.Response:
        path = self.config.model_path or self.config.model_name
        return _json_response({"model_path": path, "tokenizer_path": path, "is_generation": True,
                               "preferred_sampling_params": None, "weight_version": "default"})

    async def server_info(self, request: web.Request) -> web.Response:
        return _json_response({"model_path": self.config.model_path or self.config.model_name,
                               "served_model_name": self.config.model_name, "context_length": self.config.max_model_len,
                               "max_running_requests": self.config.max_num_seqs, "version": SGLANG_VERSION,
                               "max_total_num_tokens": self.config.kv_cache_tokens})


def add_routes(app: web.Application, h: SglangHandlers) -> None:
    app.router.add_get("/health_generate", h.health_generate)
    app.router.add_get("/get_model_info", h.model_info)
    app.router.add_get("/get_server_info", h.server_info)


__all__ = ["SglangHandlers", "SglangMetrics", "add_routes", "error_middleware", "_dumps"]
