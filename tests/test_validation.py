"""OpenAI request validation (pure): OpenAI's wording, param and code for each refusal; every shape the official
SDK sends accepted; n / best_of in the reservation; bounded JSON; property tests with arbitrary JSON."""

from __future__ import annotations

import json

import httpx2
import msgspec
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crosslogic.errors import ClientError
from crosslogic.extauthz import estimate, jsonbody
from crosslogic.extauthz.validation import Endpoint, ModelSpec, endpoint_for, validate_request

MODELS = {
    "chat": ModelSpec("chat", "chat", context_length=8192, max_output_tokens=100, default_max_tokens=50, max_n=16),
    "embed": ModelSpec("embed", "embedding", context_length=512, max_output_tokens=1, default_max_tokens=1),
}
HI = [{"role": "user", "content": "hi"}]


def check(endpoint: Endpoint, body: object, allowed: frozenset[str] = frozenset()):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return validate_request(endpoint, raw, MODELS, allowed)


def refused(endpoint: Endpoint, body: object) -> ClientError:
    with pytest.raises(ClientError) as caught:
        check(endpoint, body)
    return caught.value


def chat(**fields) -> dict:
    return {"model": "chat", "messages": HI, **fields}


def completion(**fields) -> dict:
    return {"model": "chat", "prompt": "Once upon a time", **fields}


# ---------------------------------------------------------------- facts


def test_chat_request_yields_model_stream_and_token_budget():
    facts = check(Endpoint.CHAT, chat(max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert (facts.model, facts.stream, facts.client_wants_usage, facts.max_tokens) == ("chat", True, True, 20)
    assert (facts.sequences, facts.completion_budget) == (1, 20)


def test_absent_max_tokens_reserves_the_model_default():
    assert check(Endpoint.CHAT, chat()).max_tokens == 50


def test_n_choices_reserve_n_times_max_tokens_and_the_prompt_once():
    one, four = check(Endpoint.CHAT, chat(max_tokens=10)), check(Endpoint.CHAT, chat(max_tokens=10, n=4))
    assert four.prompt_estimate == one.prompt_estimate
    assert (four.sequences, four.completion_budget) == (4, 40)
    assert four.reserve == one.prompt_estimate + 40 and one.reserve == one.prompt_estimate + 10
    assert check(Endpoint.CHAT, chat(n=3)).completion_budget == 150  # 3 x the model default of 50


def test_completions_reserve_best_of_sequences_for_each_prompt_of_a_batch():
    assert check(Endpoint.COMPLETIONS, completion(max_tokens=10, n=2, best_of=5)).completion_budget == 50
    assert check(Endpoint.COMPLETIONS, completion(max_tokens=10, n=3, prompt=["a", "b"])).completion_budget == 60
    assert check(Endpoint.COMPLETIONS, completion(max_tokens=10, prompt=[1, 2, 3])).completion_budget == 10


def test_embeddings_need_input_and_never_stream():
    facts = check(Endpoint.EMBEDDINGS, {"model": "embed", "input": ["a", "b"], "stream": True})
    assert facts.stream is False and facts.max_tokens == 0 and facts.completion_budget == 0
    assert refused(Endpoint.EMBEDDINGS, {"model": "embed"}).param == "input"


def test_endpoint_lookup_ignores_query_and_trailing_slash():
    assert endpoint_for("/v1/chat/completions?x=1") is Endpoint.CHAT
    assert endpoint_for("/v1/embeddings/") is Endpoint.EMBEDDINGS
    assert endpoint_for("/v1/files") is None


# ---------------------------------------------------------------- refusals, as OpenAI words them

# (endpoint, body, param, code, message): messages as OpenAI's API returns them for the same mistake.
REFUSALS = [
    (Endpoint.CHAT, chat(temperature=3), "temperature", "decimal_above_max_value",
     "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 3 instead."),
    (Endpoint.CHAT, chat(temperature=-0.5), "temperature", "decimal_below_min_value",
     "Invalid 'temperature': decimal below minimum value. Expected a value >= 0, but got -0.5 instead."),
    (Endpoint.CHAT, chat(temperature="hot"), "temperature", "invalid_type",
     "Invalid type for 'temperature': expected a decimal, but got a string instead."),
    (Endpoint.CHAT, chat(temperature=True), "temperature", "invalid_type",
     "Invalid type for 'temperature': expected a decimal, but got a boolean instead."),
    (Endpoint.CHAT, chat(top_p=1.5), "top_p", "decimal_above_max_value",
     "Invalid 'top_p': decimal above maximum value. Expected a value <= 1, but got 1.5 instead."),
    (Endpoint.CHAT, chat(presence_penalty=-2.5), "presence_penalty", "decimal_below_min_value", None),
    (Endpoint.CHAT, chat(frequency_penalty=2.01), "frequency_penalty", "decimal_above_max_value", None),
    (Endpoint.CHAT, chat(n=0), "n", "integer_below_min_value",
     "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead."),
    (Endpoint.CHAT, chat(n=1000, max_tokens=1), "n", "integer_above_max_value",
     "Invalid 'n': integer above maximum value. Expected a value <= 16, but got 1000 instead."),
    (Endpoint.CHAT, chat(n=2.5), "n", "invalid_type",
     "Invalid type for 'n': expected an integer, but got a decimal instead."),
    (Endpoint.CHAT, chat(logprobs=1), "logprobs", "invalid_type", None),
    (Endpoint.CHAT, chat(top_logprobs=3), "top_logprobs", None,
     "The 'top_logprobs' parameter is only allowed when 'logprobs' is enabled."),
    (Endpoint.CHAT, chat(logprobs=True, top_logprobs=21), "top_logprobs", "integer_above_max_value", None),
    (Endpoint.CHAT, chat(stop=["a", "b", "c", "d", "e"]), "stop", "array_above_max_length",
     "Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with length 5 "
     "instead."),
    (Endpoint.CHAT, chat(stop=7), "stop", "invalid_type", None),
    (Endpoint.CHAT, chat(stop=["a", 1]), "stop[1]", "invalid_type", None),
    (Endpoint.CHAT, chat(max_tokens=101), "max_tokens", "invalid_value",
     "max_tokens is too large: 101. This model supports at most 100 completion tokens, whereas you provided 101."),
    (Endpoint.CHAT, chat(max_completion_tokens=0), "max_completion_tokens", "integer_below_min_value", None),
    (Endpoint.CHAT, chat(max_tokens=True), "max_tokens", "invalid_type", None),
    (Endpoint.CHAT, chat(seed="42"), "seed", "invalid_type", None),
    (Endpoint.CHAT, chat(seed=2**63), "seed", "integer_above_max_value", None),
    (Endpoint.CHAT, chat(user=5), "user", "invalid_type",
     "Invalid type for 'user': expected a string, but got an integer instead."),
    (Endpoint.CHAT, chat(stream="yes"), "stream", "invalid_type", None),
    (Endpoint.CHAT, chat(stream_options={"include_usage": True}), "stream_options", None,
     "The 'stream_options' parameter is only allowed when 'stream' is enabled."),
    (Endpoint.CHAT, chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage",
     "invalid_type", None),
    (Endpoint.CHAT, chat(stream=True, stream_options=[]), "stream_options", "invalid_type", None),
    (Endpoint.CHAT, chat(logit_bias={"abc": 1}), "logit_bias", "invalid_value",
     "Invalid key in 'logit_bias': 'abc'. You should only be submitting non-negative integers."),
    (Endpoint.CHAT, chat(logit_bias={"50256": 101}), "logit_bias.50256", "decimal_above_max_value", None),
    (Endpoint.CHAT, chat(logit_bias=[1]), "logit_bias", "invalid_type", None),
    (Endpoint.CHAT, {"model": "chat"}, "messages", "missing_required_parameter",
     "Missing required parameter: 'messages'."),
    (Endpoint.CHAT, chat(messages=[]), "messages", "empty_array",
     "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead."),
    (Endpoint.CHAT, chat(messages="hello"), "messages", "invalid_type", None),
    (Endpoint.CHAT, chat(messages=["hello"]), "messages[0]", "invalid_type",
     "Invalid type for 'messages[0]': expected an object, but got a string instead."),
    (Endpoint.CHAT, chat(messages=[{"content": "x"}]), "messages[0].role", "missing_required_parameter", None),
    (Endpoint.CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role", "invalid_value",
     "Invalid value: 'wizard'. Supported values are: 'system', 'assistant', 'user', 'function', 'tool', and "
     "'developer'."),
    (Endpoint.CHAT, chat(messages=[{"role": "user"}]), "messages[0].content", "missing_required_parameter",
     "Missing required parameter: 'messages[0].content'."),
    (Endpoint.CHAT, chat(messages=[{"role": "user", "content": 5}]), "messages[0].content", "invalid_type",
     "Invalid type for 'messages[0].content': expected one of a string or array of objects, but got an integer "
     "instead."),
    (Endpoint.CHAT, chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content[0].text",
     "missing_required_parameter", None),
    (Endpoint.CHAT, chat(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]),
     "messages[0].content[0].type", "invalid_value", "Invalid value: 'image_url'. Supported values are: 'text'."),
    (Endpoint.CHAT, chat(messages=[{"role": "tool", "content": "42"}]), "messages[0].tool_call_id",
     "missing_required_parameter", None),
    (Endpoint.CHAT, chat(messages=[*HI, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}]),
     "messages[1].tool_calls[0].function", "missing_required_parameter", None),
    (Endpoint.CHAT, chat(tools={"type": "function"}), "tools", "invalid_type", None),
    (Endpoint.CHAT, chat(tools=[{"type": "function", "function": {}}]), "tools[0].function.name",
     "missing_required_parameter", "Missing required parameter: 'tools[0].function.name'."),
    (Endpoint.CHAT, chat(tools=[{"type": "function", "function": {"name": "get weather"}}]),
     "tools[0].function.name", "invalid_value", None),
    (Endpoint.CHAT, chat(tools=[{"type": "retrieval"}]), "tools[0].type", "invalid_value",
     "Invalid value: 'retrieval'. Supported values are: 'function' and 'custom'."),
    (Endpoint.CHAT, chat(tool_choice="auto"), "tool_choice", None,
     "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified."),
    (Endpoint.CHAT, chat(tool_choice="always", tools=[{"type": "function", "function": {"name": "f"}}]),
     "tool_choice", "invalid_value", None),
    (Endpoint.CHAT, chat(tool_choice={"type": "function", "function": {"name": "g"}},
                         tools=[{"type": "function", "function": {"name": "f"}}]),
     "tool_choice", "invalid_value", None),
    (Endpoint.CHAT, chat(response_format={"type": "xml"}), "response_format.type", "invalid_value",
     "Invalid value: 'xml'. Supported values are: 'text', 'json_object', 'json_schema', and 'structural_tag'."),
    (Endpoint.CHAT, chat(response_format={"type": "json_schema"}), "response_format.json_schema",
     "missing_required_parameter", None),
    (Endpoint.CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "a"}}),
     "response_format.json_schema.schema", "missing_required_parameter", None),
    (Endpoint.CHAT, chat(response_format="json"), "response_format", "invalid_type", None),
    (Endpoint.CHAT, chat(parallel_tool_calls="no"), "parallel_tool_calls", "invalid_type", None),
    (Endpoint.CHAT, chat(top_k=-2), "top_k", "integer_below_min_value", None),
    (Endpoint.CHAT, chat(min_p=1.5), "min_p", "decimal_above_max_value", None),
    (Endpoint.CHAT, chat(repetition_penalty=0), "repetition_penalty", "invalid_value", None),
    (Endpoint.CHAT, chat(max_tokens=10, min_tokens=11), "min_tokens", "integer_above_max_value", None),
    (Endpoint.CHAT, {"messages": HI}, "model", "missing_required_parameter", None),
    (Endpoint.CHAT, {"model": 7, "messages": HI}, "model", "invalid_type", None),
    (Endpoint.COMPLETIONS, completion(prompt=None), "prompt", "missing_required_parameter", None),
    (Endpoint.COMPLETIONS, completion(prompt=""), "prompt", "empty_string", None),
    (Endpoint.COMPLETIONS, completion(prompt={"text": "x"}), "prompt", "invalid_type", None),
    (Endpoint.COMPLETIONS, completion(prompt=[1, -2]), "prompt[1]", "integer_below_min_value", None),
    (Endpoint.COMPLETIONS, completion(prompt=[[1], []]), "prompt[1]", "empty_array", None),
    (Endpoint.COMPLETIONS, completion(prompt=["a", 1]), "prompt[1]", "invalid_type", None),
    (Endpoint.COMPLETIONS, completion(best_of=1, n=2), "best_of", "invalid_value", None),
    (Endpoint.COMPLETIONS, completion(best_of=21), "best_of", "integer_above_max_value", None),
    (Endpoint.COMPLETIONS, completion(best_of=2, stream=True), "best_of", "invalid_value", None),
    (Endpoint.COMPLETIONS, completion(echo="yes"), "echo", "invalid_type", None),
    (Endpoint.COMPLETIONS, completion(suffix=1), "suffix", "invalid_type", None),
    (Endpoint.COMPLETIONS, completion(logprobs=True), "logprobs", "invalid_type", None),
    (Endpoint.COMPLETIONS, completion(logprobs=6), "logprobs", "integer_above_max_value", None),
    (Endpoint.COMPLETIONS, completion(stream_options={}), "stream_options", None, None),
    (Endpoint.EMBEDDINGS, {"model": "embed", "input": ""}, "input", "empty_string", None),
    (Endpoint.EMBEDDINGS, {"model": "embed", "input": ["a"] * 2049}, "input", "array_above_max_length", None),
    (Endpoint.EMBEDDINGS, {"model": "embed", "input": "a", "encoding_format": "int8"}, "encoding_format",
     "invalid_value", "Invalid value: 'int8'. Supported values are: 'float' and 'base64'."),
    (Endpoint.EMBEDDINGS, {"model": "embed", "input": "a", "dimensions": 0}, "dimensions", "integer_below_min_value",
     None),
]


@pytest.mark.parametrize(("endpoint", "body", "param", "code", "message"), REFUSALS)
def test_each_invalid_parameter_is_a_400_naming_it_in_openais_words(endpoint, body, param, code, message):
    error = refused(endpoint, body)
    assert (error.status, error.type, error.param, error.code) == (400, "invalid_request_error", param, code)
    if message is not None:
        assert error.message == message
    reply = json.loads(error.body())["error"]
    assert set(reply) == {"message", "type", "param", "code"} and reply["param"] == param


def test_unknown_or_disallowed_models_are_not_found():
    assert refused(Endpoint.CHAT, chat(model="nope")).status == 404
    assert refused(Endpoint.CHAT, chat(model="embed")).status == 404  # an embedding model on chat
    with pytest.raises(ClientError) as caught:
        check(Endpoint.CHAT, chat(), frozenset({"other"}))
    assert (caught.value.status, caught.value.param) == (404, "model")


@pytest.mark.parametrize("body", [
    chat(temperature=0, top_p=1, presence_penalty=-2, frequency_penalty=2, n=16, seed=-(2**63), user="u", stop="x"),
    chat(stop=None, logprobs=True, top_logprobs=20, logit_bias={"50256": -100, "1": 0.5}),
    chat(max_tokens=20.0, n=2.0),  # integral decimals are integers (JavaScript cannot tell them apart)
    chat(temperature=None, top_p=None, n=None, max_tokens=None, stop=None, tools=None, stream_options=None),
    chat(top_k=-1, min_p=0.1, repetition_penalty=1.1, min_tokens=5, best_of=None, ignore_eos=True,
         chat_template_kwargs={"enable_thinking": False}),  # vLLM's own extras pass
    chat(stream=True, stream_options={"include_usage": False, "continuous_usage_stats": True}),
    chat(stream=False, stream_options=None),
    chat(messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "name": "ann", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:,x"}},
        {"type": "video_url", "video_url": {"url": "v"}}]}]),
    chat(messages=[*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]}]),
    chat(messages=[*HI, {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}]),
    chat(messages=[*HI, {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
                   {"role": "function", "name": "f", "content": None}]),
    chat(tools=[{"type": "function", "function": {"name": "get_weather", "description": "d", "strict": True,
                                                  "parameters": {"type": "object", "properties": {}}}}],
         tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False),
    chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required"),
    chat(tool_choice="none"),
    chat(functions=[{"name": "f", "parameters": {}}], function_call={"name": "f"}),
    chat(response_format={"type": "json_object"}),
    chat(response_format={"type": "json_schema", "json_schema": {"name": "answer", "strict": True,
                                                                 "schema": {"type": "object"}}}),
])
def test_valid_chat_requests_pass(body):
    assert check(Endpoint.CHAT, body).model == "chat"


@pytest.mark.parametrize(("endpoint", "body"), [
    (Endpoint.COMPLETIONS, completion(prompt=["a", "b"], echo=True, suffix=None, logprobs=5, best_of=3, n=3)),
    (Endpoint.COMPLETIONS, completion(prompt=[1, 2, 3], stream=True, stream_options={"include_usage": True})),
    (Endpoint.COMPLETIONS, completion(prompt=[[1, 2], [3]], best_of=1)),
    (Endpoint.EMBEDDINGS, {"model": "embed", "input": [[1, 2], [3]], "encoding_format": "base64", "dimensions": 8}),
    (Endpoint.EMBEDDINGS, {"model": "embed", "input": [1, 2, 3], "encoding_format": "float", "user": "u"}),
])
def test_valid_completion_and_embedding_requests_pass(endpoint, body):
    assert check(endpoint, body).model == body["model"]


def _sdk_body(call) -> bytes:
    """The exact bytes the official openai SDK sends for `call(client)`."""
    sent: list[bytes] = []

    def capture(request: httpx2.Request) -> httpx2.Response:
        sent.append(request.content)
        return httpx2.Response(400, json={"error": {"message": "captured", "type": "t", "param": None, "code": None}})

    with httpx2.Client(transport=httpx2.MockTransport(capture)) as http:
        client = openai.OpenAI(api_key="k", base_url="http://gateway/v1", http_client=http, max_retries=0)
        with pytest.raises(openai.BadRequestError):
            call(client)
    return sent[0]


SDK_CALLS = [
    (Endpoint.CHAT, lambda c: c.chat.completions.create(
        model="chat", messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
        temperature=0.7, top_p=0.9, n=2, stop=["\n"], max_completion_tokens=20, presence_penalty=0.1,
        frequency_penalty=0.1, logprobs=True, top_logprobs=2, seed=1, user="u", logit_bias={"1": 5},
        stream=True, stream_options={"include_usage": True}, parallel_tool_calls=True,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice="auto", response_format={"type": "json_object"}, extra_body={"top_k": 20})),
    (Endpoint.CHAT, lambda c: c.chat.completions.create(
        model="chat", messages=HI, response_format={"type": "json_schema", "json_schema": {
            "name": "a", "schema": {"type": "object", "properties": {"x": {"type": "integer"}}}}})),
    (Endpoint.COMPLETIONS, lambda c: c.completions.create(
        model="chat", prompt=["a", "b"], max_tokens=5, n=2, best_of=3, echo=True, logprobs=2, suffix="z")),
    (Endpoint.EMBEDDINGS, lambda c: c.embeddings.create(model="embed", input=["a", "b"], encoding_format="float",
                                                        dimensions=4)),
]


@pytest.mark.parametrize(("endpoint", "call"), SDK_CALLS)
def test_what_the_official_sdk_sends_is_accepted(endpoint, call):
    assert check(endpoint, _sdk_body(call)).model in MODELS


# ---------------------------------------------------------------- the JSON itself


def test_nesting_beyond_the_limit_is_a_400_before_anything_recurses():
    for depth in (jsonbody.MAX_DEPTH + 1, 1_000, 200_000):  # 200,000 levels: 400 KB of body
        body = b'{"model": "chat", "messages": [{"role": "user", "content": "x", "extra": ' + b"[" * depth + \
            b"]" * depth + b"}]}"
        error = refused(Endpoint.CHAT, body)
        assert error.status == 400 and "nested too deeply" in error.message and error.param is None
    # brackets inside strings do not nest anything
    assert jsonbody.nesting_depth(b'["' + b"[" * 500 + b'\\", "\\"[", [1]]') == 2


def test_a_body_at_the_depth_limit_is_parsed():
    depth = jsonbody.MAX_DEPTH - 4  # the extra value sits 4 levels deep in the body
    body = b'{"model": "chat", "messages": [{"role": "user", "content": "x", "extra": ' + b"[" * depth + \
        b"]" * depth + b"}]}"
    assert check(Endpoint.CHAT, body).model == "chat"


@pytest.mark.parametrize(("raw", "words"), [
    (b"", "empty"), (b"   ", "empty"), (b"[1, 2]", "must be a JSON object"), (b'{"model": ', "could not parse"),
    (b"\xff\xfe\x00", "could not parse"), (b'{"model": "chat", "temperature": NaN}', "NaN"),
    (b'{"model": "chat", "temperature": Infinity}', "Infinity"), (b'{"a": -Infinity}', "-Infinity"),
    (b'{"model": "chat", "seed": ' + b"9" * 5000 + b"}", "longer than 4300 digits"),
])
def test_malformed_json_is_a_400_with_a_clear_message(raw, words):
    error = refused(Endpoint.CHAT, raw)
    assert error.status == 400 and words in error.message and error.param is None


def test_a_huge_decimal_is_out_of_range_not_a_crash():
    assert refused(Endpoint.CHAT, b'{"model": "chat", "messages": [], "temperature": 1e999}').status == 400
    error = refused(Endpoint.CHAT, b'{"model": "chat", "messages": [{"role":"user","content":"x"}], '
                                   b'"repetition_penalty": 1e999}')
    assert error.param == "repetition_penalty" and "finite" in error.message


def test_duplicate_keys_keep_the_last_value_as_the_node_does():
    facts = check(Endpoint.CHAT, b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], '
                                 b'"max_tokens": 5, "max_tokens": 7}')
    assert facts.max_tokens == 7


def test_lone_surrogates_are_measured_not_errors():
    facts = check(Endpoint.CHAT, b'{"model": "chat", "messages": [{"role": "user", "content": "a\\ud800b"}]}')
    assert facts.prompt_estimate > 0


# ---------------------------------------------------------------- properties with arbitrary JSON

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=False, allow_infinity=True), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=30)
FIELDS = ["model", "messages", "prompt", "input", "temperature", "top_p", "n", "best_of", "max_tokens",
          "max_completion_tokens", "stream", "stream_options", "stop", "logprobs", "top_logprobs", "logit_bias",
          "tools", "tool_choice", "functions", "function_call", "response_format", "seed", "user", "echo",
          "suffix", "encoding_format", "dimensions", "min_tokens", "repetition_penalty", "top_k"]
message_like = st.fixed_dictionaries({}, optional={
    "role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "function", "developer"]), json_values),
    "content": json_values, "name": json_values, "tool_calls": json_values, "tool_call_id": json_values,
    "function_call": json_values})
bodies = st.fixed_dictionaries(
    {"model": st.one_of(st.sampled_from(["chat", "embed"]), json_values)},
    optional={**{f: json_values for f in FIELDS if f != "model"},
              "messages": st.one_of(json_values, st.lists(st.one_of(message_like, json_values), max_size=4))})


def _deep(value: object, depth: int) -> object:
    for _ in range(depth):
        value = [value]
    return value


@given(st.sampled_from(list(Endpoint)), bodies, st.integers(0, 400))
def test_any_json_body_gives_facts_or_a_client_error_never_anything_else(endpoint, body, depth):
    if depth > 100:  # bury one field deep, as the 1 KB body of issue 9 did
        body = {**body, "messages": _deep(body.get("messages"), depth)}
    raw = json.dumps(body).encode()
    try:
        facts = validate_request(endpoint, raw, MODELS, frozenset())
    except ClientError as error:
        assert 400 <= error.status < 500
        assert json.loads(error.body())["error"]["type"] == "invalid_request_error"
    else:
        assert facts.reserve >= facts.prompt_estimate >= 0 and facts.sequences >= 0


@given(st.binary(max_size=200))
def test_any_bytes_give_facts_or_a_client_error(raw):
    try:
        validate_request(Endpoint.CHAT, raw, MODELS, frozenset())
    except ClientError as error:
        assert error.status == 400


@given(json_values, json_values, st.integers(0, 3000))
def test_the_estimates_take_any_json_even_deeply_nested_without_raising(messages, tools, depth):
    deep = _deep(messages, depth)
    assert estimate.chat_prompt_tokens(deep, {"tools": _deep(tools, depth)}) >= estimate.REPLY_OVERHEAD
    assert estimate.text_prompt_tokens(deep) >= 1
    # extra levels of lists add nothing (a number directly inside a list is a token id)
    assert estimate.value_units(deep) == estimate.value_units([messages] if depth else messages)


@given(json_values)
def test_definitions_are_measured_exactly_as_their_json_text(value):
    text = json.dumps(value, ensure_ascii=False)
    assert estimate.json_units(value) == estimate.text_units(text)


# ---------------------------------------------------------------- the fast parser reads exactly as `json` does

class _NoFastPath:
    def decode(self, raw: bytes) -> object:
        raise msgspec.DecodeError("the fast path is off")


def _reading(raw: bytes, fast: bool = True) -> object:
    """parse_object's answer (a refusal as its words); fast=False: as it answered before the fast path (`json`)."""
    saved = jsonbody._FAST
    if not fast:
        jsonbody._FAST = _NoFastPath()
    try:
        return jsonbody.parse_object(raw)
    except ClientError as error:
        return ("refused", error.status, error.message)
    finally:
        jsonbody._FAST = saved


def _json_reading(raw: bytes) -> object:
    return _reading(raw, fast=False)


_tricky_text = st.one_of(
    st.text(), st.sampled_from(['"\\ud800"', '"\\udc00\\ud800"', "NaN", "-Infinity", "1e400", "-0", "-0.0",
                                "18446744073709551616", "-9223372036854775809", "1" * 400, "9" * 4301, '"\\u0000"',
                                "1.5e-400", "0.30000000000000004", '"\\/"', "[1,]", "{}x", "\ufeff{}"]))
_tricky_json = st.recursive(
    st.one_of(_tricky_text.map(lambda t: t if t[:1] in '"-0123456789NI[{\ufeff' else json.dumps(t)),
              st.integers(-(2**300), 2**300).map(str), st.floats(allow_nan=False).map(repr).map(
                  lambda r: r.replace("inf", "1e999"))),
    lambda inner: st.one_of(st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]"),
                            st.lists(st.tuples(st.sampled_from(['"a"', '"b"', '"model"']), inner), max_size=4).map(
                                lambda pairs: "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}")),
    max_leaves=12)


@given(st.lists(st.tuples(st.sampled_from(['"a"', '"b"', '"a"', '"max_tokens"']), _tricky_json), max_size=6),
       st.sampled_from(["utf-8", "utf-16", "utf-8-sig"]))
def test_the_fast_parser_reads_every_body_as_json_reads_it(pairs, encoding):
    # duplicate keys (last wins), huge and 64-bit-overflowing integers, lone surrogates, NaN, other encodings
    raw = ("{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}").encode(encoding, "surrogatepass")
    assert repr(_reading(raw)) == repr(_json_reading(raw))


@given(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_the_fast_parser_agrees_with_json_on_arbitrary_bytes(raw):
    assert repr(_reading(raw)) == repr(_json_reading(raw))
