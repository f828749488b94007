"""OpenAI request validation: pure functions from (path, body, catalogue, allowance) to request facts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum

from crosslogic import errors
from crosslogic.extauthz import estimate


class Endpoint(Enum):
    CHAT = ("/v1/chat/completions", "chat.completions", ("chat",))
    COMPLETIONS = ("/v1/completions", "completions", ("chat", "completion"))
    EMBEDDINGS = ("/v1/embeddings", "embeddings", ("embedding",))

    def __init__(self, path: str, label: str, model_kinds: tuple[str, ...]) -> None:
        self.path = path
        self.label = label
        self.model_kinds = model_kinds


ENDPOINTS_BY_PATH = {e.path: e for e in Endpoint}


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    kind: str
    context_length: int
    max_output_tokens: int
    default_max_tokens: int


@dataclass(frozen=True)
class RequestFacts:
    endpoint: Endpoint
    model: str
    stream: bool
    client_wants_usage: bool  # stream_options.include_usage as the client sent it
    max_tokens: int  # what the request may generate at most (a model default when absent)
    prompt_estimate: int  # prompt tokens for reservations (estimate.py); the node's count is what we bill
    # stream_options.continuous_usage_stats (vLLM's extension, honoured only with include_usage, as vLLM does)
    client_wants_continuous_usage: bool = False


def endpoint_for(path: str) -> Endpoint | None:
    return ENDPOINTS_BY_PATH.get(path.split("?", 1)[0].rstrip("/"))


def _require_present(body: dict, field: str, endpoint: Endpoint) -> object:
    value = body.get(field)
    if value is None or value == "" or value == []:
        raise errors.invalid_request(f"'{field}' is a required property for {endpoint.path}.", field)
    return value


def _max_tokens(body: dict, spec: ModelSpec) -> int:
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise errors.invalid_request(f"'{field}' must be a positive integer.", field)
        if value > spec.max_output_tokens:
            raise errors.invalid_request(
                f"'{field}' is too large: {value}. This model supports at most {spec.max_output_tokens} "
                "completion tokens.", field)
        return value
    return spec.default_max_tokens


def validate_request(
    endpoint: Endpoint,
    raw_body: bytes,
    models: dict[str, ModelSpec],
    allowed_models: frozenset[str],
) -> RequestFacts:
    """Raises ClientError (400/404) for anything a node would reject or that the tenant may not use."""
    if not raw_body:
        raise errors.invalid_request("The request body is empty; send a JSON object.")
    try:
        body = json.loads(raw_body)
    except (ValueError, UnicodeDecodeError):
        raise errors.invalid_request("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise errors.invalid_request("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise errors.invalid_request("'model' is a required property and must be a string.", "model")
    spec = models.get(model)
    if spec is None or spec.kind not in endpoint.model_kinds or (allowed_models and model not in allowed_models):
        raise errors.model_not_found(model)

    if endpoint is Endpoint.CHAT:
        messages = _require_present(body, "messages", endpoint)
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise errors.invalid_request("'messages' must be a list of objects with a 'role'.", "messages")
        prompt_estimate = estimate.chat_prompt_tokens(messages, body)
    else:
        field = "prompt" if endpoint is Endpoint.COMPLETIONS else "input"
        prompt_estimate = estimate.text_prompt_tokens(_require_present(body, field, endpoint))

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise errors.invalid_request("'stream' must be a boolean.", "stream")
    if endpoint is Endpoint.EMBEDDINGS:
        stream = False
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise errors.invalid_request("'stream_options' must be an object.", "stream_options")
    wants_usage = bool(options and options.get("include_usage") is True)
    wants_continuous = wants_usage and options.get("continuous_usage_stats") is True
    max_tokens = 0 if endpoint is Endpoint.EMBEDDINGS else _max_tokens(body, spec)
    if prompt_estimate + max_tokens > spec.context_length * 4:
        raise errors.invalid_request("The prompt is longer than this model's context window.", "messages")
    return RequestFacts(endpoint=endpoint, model=model, stream=stream, client_wants_usage=wants_usage,
                        max_tokens=max_tokens, prompt_estimate=prompt_estimate,
                        client_wants_continuous_usage=wants_continuous)
