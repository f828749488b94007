"""OpenAI request validation: pure functions from (path, body, catalogue, allowance) to request facts.

What OpenAI's API validates is validated here, before a request reaches a node or reserves anything, and
refused with OpenAI's wording, `param` and `code` (params.py): sampling ranges, `n` (capped per model, since
every choice is generated and reserved), logprobs, stop, token budgets, the shapes of messages, tools,
tool_choice and response_format, stream_options only with stream, completions' prompt / best_of / echo /
suffix, embeddings' input / encoding_format / dimensions. Parameters OpenAI does not know but vLLM does
(top_k, min_p, repetition_penalty, min_tokens, ...) pass, range-checked where the range is obvious; any other
field travels on untouched, as vLLM ignores or handles it.

Every function here raises only ClientError, whatever JSON it is given (property-tested with arbitrary JSON).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from crosslogic import errors
from crosslogic.extauthz import estimate, jsonbody
from crosslogic.extauthz import params as p

# OpenAI's ceiling for `n`; each model's own cap (models.max_n) defaults to it.
DEFAULT_MAX_N = 128


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
    max_n: int = DEFAULT_MAX_N  # most sequences one request may generate (n, best_of)


@dataclass(frozen=True)
class RequestFacts:
    endpoint: Endpoint
    model: str
    stream: bool
    client_wants_usage: bool  # stream_options.include_usage as the client sent it
    max_tokens: int  # what ONE sequence may generate at most (a model default when absent)
    prompt_estimate: int  # prompt tokens for reservations (estimate.py); the node's count is what we bill
    sequences: int = 1  # sequences the node generates: n, or best_of for completions

    @property
    def completion_budget(self) -> int:
        """Most completion tokens the request can produce: every sequence up to max_tokens."""
        return self.sequences * self.max_tokens

    @property
    def reserve(self) -> int:
        """What admission reserves and quotas compare: the prompt (counted once) plus the completion budget."""
        return self.prompt_estimate + self.completion_budget


def endpoint_for(path: str) -> Endpoint | None:
    return ENDPOINTS_BY_PATH.get(path.split("?", 1)[0].rstrip("/"))


# ---------------------------------------------------------------- shared parameters

MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's maximum for the completions endpoint's integer `logprobs`
MAX_BEST_OF = 20
MAX_TOOLS = 128
MAX_EMBEDDING_INPUTS = 2048
NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]+")
MAX_NAME_LENGTH = 64


def _sampling(body: dict) -> None:
    """The sampling parameters chat and completions share, and vLLM's common extras."""
    p.decimal(body, "temperature", 0, 2)
    p.decimal(body, "top_p", 0, 1)
    p.decimal(body, "presence_penalty", -2, 2)
    p.decimal(body, "frequency_penalty", -2, 2)
    p.integer(body, "seed", *p.INT64)
    p.string(body, "user")
    _stop(body)
    _logit_bias(body)
    # vLLM's extras: -1 or 0 disables top_k; repetition_penalty multiplies logits, so it must be positive.
    p.integer(body, "top_k", -1)
    p.decimal(body, "min_p", 0, 1)
    penalty = p.decimal(body, "repetition_penalty")
    if penalty is not None and penalty <= 0:
        raise p.invalid_value("repetition_penalty", f"must be greater than 0, but got {penalty} instead.")


def _stop(body: dict) -> None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list):
        raise p.invalid_type("stop", "one of a string or array of strings", stop)
    p.array_value(stop, "stop", max_length=MAX_STOP_SEQUENCES)
    for i, item in enumerate(stop):
        p.string_value(item, f"stop[{i}]")


def _logit_bias(body: dict) -> None:
    bias = p.obj(body, "logit_bias")
    for token, value in (bias or {}).items():
        if not token.isascii() or not token.isdigit():
            raise errors.invalid_param(f"Invalid key in 'logit_bias': {token[:50]!r}. You should only be submitting "
                                       "non-negative integers.", "logit_bias", "invalid_value")
        p.decimal_value(value, f"logit_bias.{token}", -100, 100)


def _streaming(body: dict) -> tuple[bool, bool]:
    """(stream, client wants usage). OpenAI refuses any stream_options, even {}, without stream."""
    stream = bool(p.boolean(body, "stream"))
    options = p.obj(body, "stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise p.only_with("stream_options", "'stream' is enabled")
    for flag in ("include_usage", "continuous_usage_stats", "include_obfuscation"):
        p.boolean(options, flag, f"stream_options.{flag}")
    return stream, options.get("include_usage") is True


def _sequences(body: dict, spec: ModelSpec) -> int:
    n = p.integer(body, "n", 1, spec.max_n)
    return 1 if n is None else n


def _max_tokens(body: dict, spec: ModelSpec, fields: tuple[str, ...]) -> int:
    """The first of `fields` that is set (each one type-checked), within the model's output cap."""
    chosen: tuple[str, int] | None = None
    for field in fields:
        value = p.integer(body, field, 1)
        if value is not None and chosen is None:
            chosen = (field, value)
    if chosen is None:
        return spec.default_max_tokens
    field, value = chosen
    if value > spec.max_output_tokens:
        raise errors.invalid_param(f"{field} is too large: {value}. This model supports at most "
                                   f"{spec.max_output_tokens} completion tokens, whereas you provided {value}.",
                                   field, "invalid_value")
    return value


def _min_tokens(body: dict, max_tokens: int) -> None:
    """vLLM's `min_tokens`: at least 0 and not above the request's max_tokens."""
    p.integer(body, "min_tokens", 0, max_tokens)


def _name(value: object, param: str) -> str:
    """A function / schema name as OpenAI restricts it: ^[a-zA-Z0-9_-]{1,64}$."""
    name = p.string_value(value, param)
    if len(name) > MAX_NAME_LENGTH:
        raise errors.invalid_param(f"Invalid '{param}': string too long. Expected a string with maximum length "
                                   f"{MAX_NAME_LENGTH}, but got a string with length {len(name)} instead.", param,
                                   "string_above_max_length")
    if not NAME_PATTERN.fullmatch(name):
        raise errors.invalid_param(f"Invalid '{param}': string does not match pattern. Expected a string that "
                                   "matches the pattern '^[a-zA-Z0-9_-]+$'.", param, "invalid_value")
    return name


def _context_check(facts_prompt: int, max_tokens: int, spec: ModelSpec, param: str) -> None:
    # The estimate leans high (estimate.py), so only a request far beyond the window is refused here; the
    # node refuses the rest with its exact count.
    if facts_prompt + max_tokens > spec.context_length * 4:
        raise errors.invalid_param(
            f"This model's maximum context length is {spec.context_length} tokens. However, you requested about "
            f"{facts_prompt + max_tokens} tokens ({facts_prompt} in the {param}, {max_tokens} for the completion). "
            f"Please reduce the length of the {param} or the completion.", param, "context_length_exceeded")


# ---------------------------------------------------------------- chat messages

ROLES = ("system", "assistant", "user", "function", "tool", "developer")
CONTENT_REQUIRED = frozenset({"system", "developer", "user", "tool"})
# OpenAI's part types per role; a user's parts may also be vLLM's own (video_url, audio_url, image_embeds...).
TEXT_ONLY = ("text",)
PART_TYPES = {"system": TEXT_ONLY, "developer": TEXT_ONLY, "tool": TEXT_ONLY, "function": TEXT_ONLY,
              "assistant": ("text", "refusal")}
PART_FIELDS = {"text": "text", "refusal": "refusal", "image_url": "image_url", "input_audio": "input_audio",
               "file": "file"}  # the field each OpenAI part type carries


def _part(part: object, param: str, role: str) -> None:
    if not isinstance(part, dict):
        raise p.invalid_type(param, "an object", part)
    kind = part.get("type")
    if kind is None:
        raise p.missing(f"{param}.type")
    allowed = PART_TYPES.get(role)
    kind = p.choice(kind, f"{param}.type", allowed) if allowed else p.string_value(kind, f"{param}.type")
    field = PART_FIELDS.get(kind)
    if field is None:
        return
    value = part.get(field)
    if value is None:
        raise p.missing(f"{param}.{field}")
    if field in ("text", "refusal"):
        p.string_value(value, f"{param}.{field}")
    elif not isinstance(value, dict):
        raise p.invalid_type(f"{param}.{field}", "an object", value)
    elif field == "image_url":
        p.required_string(value, "url", f"{param}.image_url.url")


def _content(content: object, param: str, role: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise p.invalid_type(param, "one of a string or array of objects", content)
    p.array_value(content, param, min_length=1)
    for j, part in enumerate(content):
        _part(part, f"{param}[{j}]", role)


def _function_call(call: object, param: str) -> None:
    if not isinstance(call, dict):
        raise p.invalid_type(param, "an object", call)
    p.required_string(call, "name", f"{param}.name")
    p.required_string(call, "arguments", f"{param}.arguments")


def _tool_calls(message: dict, param: str) -> None:
    calls = message.get("tool_calls")
    if calls is None:
        return
    p.array_value(calls, f"{param}.tool_calls")
    for k, call in enumerate(calls):
        at = f"{param}.tool_calls[{k}]"
        if not isinstance(call, dict):
            raise p.invalid_type(at, "an object", call)
        p.required_string(call, "id", f"{at}.id")
        kind = call.get("type")
        if kind is None:
            raise p.missing(f"{at}.type")
        if p.choice(kind, f"{at}.type", ("function", "custom")) == "function":
            function = call.get("function")
            if function is None:
                raise p.missing(f"{at}.function")
            _function_call(function, f"{at}.function")


def _message(message: object, param: str) -> None:
    if not isinstance(message, dict):
        raise p.invalid_type(param, "an object", message)
    role = message.get("role")
    if role is None:
        raise p.missing(f"{param}.role")
    role = p.choice(role, f"{param}.role", ROLES)
    p.string(message, "name", f"{param}.name")
    content = message.get("content")
    if content is None and (role in CONTENT_REQUIRED or (role == "function" and "content" not in message)):
        raise p.missing(f"{param}.content")
    if content is not None:
        _content(content, f"{param}.content", role)
    if role == "tool":
        p.required_string(message, "tool_call_id", f"{param}.tool_call_id")
    elif role == "function":
        p.required_string(message, "name", f"{param}.name")
    elif role == "assistant":
        _tool_calls(message, param)
        if message.get("function_call") is not None:
            _function_call(message["function_call"], f"{param}.function_call")


def _messages(body: dict) -> list:
    messages = body.get("messages")
    if messages is None:
        raise p.missing("messages")
    p.array_value(messages, "messages", min_length=1)
    for i, message in enumerate(messages):
        _message(message, f"messages[{i}]")
    return messages


# ---------------------------------------------------------------- tools, tool_choice, response_format


def _tool(tool: object, param: str) -> str | None:
    """Validates one entry of `tools`; returns its function's name (None for a custom tool's)."""
    if not isinstance(tool, dict):
        raise p.invalid_type(param, "an object", tool)
    kind = tool.get("type")
    if kind is None:
        raise p.missing(f"{param}.type")
    kind = p.choice(kind, f"{param}.type", ("function", "custom"))
    spec = tool.get(kind)
    if spec is None:
        raise p.missing(f"{param}.{kind}")
    if not isinstance(spec, dict):
        raise p.invalid_type(f"{param}.{kind}", "an object", spec)
    if spec.get("name") is None:
        raise p.missing(f"{param}.{kind}.name")
    name = _name(spec["name"], f"{param}.{kind}.name")
    p.string(spec, "description", f"{param}.{kind}.description")
    if kind == "function":
        p.obj(spec, "parameters", f"{param}.function.parameters")
        p.boolean(spec, "strict", f"{param}.function.strict")
        return name
    return None


def _tools(body: dict) -> frozenset[str] | None:
    """The function names `tools` defines, or None without tools."""
    tools = body.get("tools")
    if tools is None:
        return None
    p.array_value(tools, "tools", min_length=1, max_length=MAX_TOOLS)
    return frozenset(filter(None, (_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools))))


def _tool_choice(body: dict, tools: frozenset[str] | None) -> None:
    choice = body.get("tool_choice")
    if choice is None:
        return
    if isinstance(choice, str):
        choice = p.choice(choice, "tool_choice", ("none", "auto", "required"))
        if choice == "none":
            return  # vLLM's own default without tools; harmless
    elif isinstance(choice, dict):
        kind = choice.get("type")
        if kind is None:
            raise p.missing("tool_choice.type")
        kind = p.choice(kind, "tool_choice.type", ("function", "custom", "allowed_tools"))
        named = choice.get(kind)
        if named is None:
            raise p.missing(f"tool_choice.{kind}")
        if not isinstance(named, dict):
            raise p.invalid_type(f"tool_choice.{kind}", "an object", named)
        if kind == "function":
            name = p.required_string(named, "name", "tool_choice.function.name")
            if tools is not None and name not in tools:
                raise p.invalid_value("tool_choice", f"no function named '{name[:64]}' is among the 'tools'.")
    else:
        raise p.invalid_type("tool_choice", "one of a string or object", choice)
    if tools is None:
        raise errors.invalid_param("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
                                   "are specified.", "tool_choice", None)


def _functions(body: dict) -> None:
    """The deprecated `functions` / `function_call` pair."""
    functions = body.get("functions")
    if functions is not None:
        p.array_value(functions, "functions", max_length=MAX_TOOLS)
        for i, function in enumerate(functions):
            if not isinstance(function, dict):
                raise p.invalid_type(f"functions[{i}]", "an object", function)
            if function.get("name") is None:
                raise p.missing(f"functions[{i}].name")
            _name(function["name"], f"functions[{i}].name")
            p.obj(function, "parameters", f"functions[{i}].parameters")
    call = body.get("function_call")
    if isinstance(call, str):
        p.choice(call, "function_call", ("none", "auto"))
    elif isinstance(call, dict):
        p.required_string(call, "name", "function_call.name")
    elif call is not None:
        raise p.invalid_type("function_call", "one of a string or object", call)


RESPONSE_FORMATS = ("text", "json_object", "json_schema", "structural_tag")  # the last one is vLLM's


def _response_format(body: dict) -> None:
    fmt = p.obj(body, "response_format")
    if fmt is None:
        return
    kind = fmt.get("type")
    if kind is None:
        raise p.missing("response_format.type")
    if p.choice(kind, "response_format.type", RESPONSE_FORMATS) != "json_schema":
        return
    schema = fmt.get("json_schema")
    if schema is None:
        raise p.missing("response_format.json_schema")
    if not isinstance(schema, dict):
        raise p.invalid_type("response_format.json_schema", "an object", schema)
    if schema.get("name") is None:
        raise p.missing("response_format.json_schema.name")
    _name(schema["name"], "response_format.json_schema.name")
    if schema.get("schema") is None:
        raise p.missing("response_format.json_schema.schema")
    p.obj(schema, "schema", "response_format.json_schema.schema")
    p.string(schema, "description", "response_format.json_schema.description")
    p.boolean(schema, "strict", "response_format.json_schema.strict")


# ---------------------------------------------------------------- prompts (completions, embeddings)

PROMPT_TYPES = "one of a string, array of strings, array of integers, or array of arrays of integers"


def _token_ids(ids: list, param: str) -> None:
    for k, token in enumerate(ids):
        p.integer_value(token, f"{param}[{k}]", 0)


def _prompt(body: dict, field: str, max_items: int | None = None) -> object:
    """A completions `prompt` or embeddings `input`: a string, strings, token ids, or lists of token ids."""
    value = body.get(field)
    if value is None:
        raise p.missing(field)
    if isinstance(value, str):
        if not value:
            raise errors.invalid_param(f"Invalid '{field}': empty string. Expected a string with minimum length 1, "
                                       "but got an empty string instead.", field, "empty_string")
        return value
    if not isinstance(value, list):
        raise p.invalid_type(field, PROMPT_TYPES, value)
    p.array_value(value, field, min_length=1, max_length=max_items)
    first = value[0]
    if isinstance(first, str):
        for i, item in enumerate(value):
            p.string_value(item, f"{field}[{i}]")
    elif isinstance(first, list):
        for i, item in enumerate(value):
            p.array_value(item, f"{field}[{i}]", min_length=1)
            _token_ids(item, f"{field}[{i}]")
    elif isinstance(first, int | float) and not isinstance(first, bool):
        _token_ids(value, field)
    else:
        raise p.invalid_type(f"{field}[0]", "one of a string, integer, or array of integers", first)
    return value


# ---------------------------------------------------------------- per endpoint


def _chat(body: dict, spec: ModelSpec) -> tuple[int, int, int]:
    """(prompt estimate, max_tokens, sequences) of a valid chat request."""
    messages = _messages(body)
    _sampling(body)
    sequences = _sequences(body, spec)
    logprobs = p.boolean(body, "logprobs")
    if p.integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) is not None and not logprobs:
        raise p.only_with("top_logprobs", "'logprobs' is enabled")
    tools = _tools(body)
    _tool_choice(body, tools)
    p.boolean(body, "parallel_tool_calls")
    _functions(body)
    _response_format(body)
    max_tokens = _max_tokens(body, spec, ("max_completion_tokens", "max_tokens"))
    _min_tokens(body, max_tokens)
    prompt_estimate = estimate.chat_prompt_tokens(messages, body)
    _context_check(prompt_estimate, max_tokens, spec, "messages")
    return prompt_estimate, max_tokens, sequences


def _completion(body: dict, spec: ModelSpec, stream: bool) -> tuple[int, int, int]:
    prompt = _prompt(body, "prompt")
    _sampling(body)
    n = _sequences(body, spec)
    p.integer(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    p.boolean(body, "echo")
    p.string(body, "suffix")
    best_of = p.integer(body, "best_of", 0, min(MAX_BEST_OF, spec.max_n))
    if best_of is not None:
        if best_of < n:
            raise p.invalid_value("best_of", f"best_of must be greater than or equal to n, but got best_of={best_of} "
                                  f"and n={n}.")
        if stream and best_of > 1:
            raise p.invalid_value("best_of", "best_of greater than 1 cannot be used with stream.")
    max_tokens = _max_tokens(body, spec, ("max_tokens",))
    _min_tokens(body, max_tokens)
    prompt_estimate = estimate.text_prompt_tokens(prompt)
    _context_check(prompt_estimate, max_tokens, spec, "prompt")
    # Each prompt of a batch is generated `max(n, best_of)` times.
    return prompt_estimate, max_tokens, max(n, best_of or 0) * estimate.prompt_count(prompt)


def _embedding(body: dict, spec: ModelSpec) -> int:
    prompt = _prompt(body, "input", MAX_EMBEDDING_INPUTS)
    encoding = body.get("encoding_format")
    if encoding is not None:
        p.choice(encoding, "encoding_format", ("float", "base64"))
    p.integer(body, "dimensions", 1)
    p.string(body, "user")
    prompt_estimate = estimate.text_prompt_tokens(prompt)
    _context_check(prompt_estimate, 0, spec, "input")
    return prompt_estimate


def validate_request(
    endpoint: Endpoint,
    raw_body: bytes,
    models: dict[str, ModelSpec],
    allowed_models: frozenset[str],
) -> RequestFacts:
    """Raises ClientError (400/404) for anything a node would reject or that the tenant may not use."""
    body = jsonbody.parse_object(raw_body)
    model = body.get("model")
    if model is None or model == "":
        raise p.missing("model")
    p.string_value(model, "model")
    spec = models.get(model)
    if spec is None or spec.kind not in endpoint.model_kinds or (allowed_models and model not in allowed_models):
        raise errors.model_not_found(model if len(model) <= 256 else model[:256] + "...")  # no 1 MB echo

    if endpoint is Endpoint.EMBEDDINGS:
        return RequestFacts(endpoint=endpoint, model=model, stream=False, client_wants_usage=False, max_tokens=0,
                            prompt_estimate=_embedding(body, spec), sequences=0)
    stream, wants_usage = _streaming(body)
    if endpoint is Endpoint.CHAT:
        prompt_estimate, max_tokens, sequences = _chat(body, spec)
    else:
        prompt_estimate, max_tokens, sequences = _completion(body, spec, stream)
    return RequestFacts(endpoint=endpoint, model=model, stream=stream, client_wants_usage=wants_usage,
                        max_tokens=max_tokens, prompt_estimate=prompt_estimate, sequences=sequences)
