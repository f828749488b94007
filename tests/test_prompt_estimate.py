"""The prompt-token estimate that reservations use: template overhead, tools, non-ASCII text; property tests that
it only grows with content and never falls below the chars/4 + 1 estimate it replaced."""

from __future__ import annotations

import copy
import json

from hypothesis import given
from hypothesis import strategies as st

from crosslogic.extauthz import estimate
from crosslogic.extauthz.validation import Endpoint, ModelSpec, validate_request


def old_estimate(prompt: object) -> int:
    """The estimate before this one: every string's characters (4 per token id) / 4, + 1."""

    def chars(value: object) -> int:
        if isinstance(value, str):
            return len(value)
        if isinstance(value, list):
            return sum(chars(v) if not isinstance(v, int) else 4 for v in value)
        if isinstance(value, dict):
            return sum(chars(v) for v in value.values())
        return 0

    return chars(prompt) // 4 + 1


def chat(messages: list[dict], **body) -> int:
    return estimate.chat_prompt_tokens(messages, {"messages": messages, **body})


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_one_short_message_costs_its_text_plus_template_overhead():
    messages = [{"role": "user", "content": "Count for me please"}]  # 23 characters with the role
    assert chat(messages) == 23 // 4 + estimate.MESSAGE_OVERHEAD + estimate.REPLY_OVERHEAD
    assert chat(messages) > old_estimate(messages)


def test_every_message_adds_its_template_overhead():
    one = [{"role": "user", "content": "hi"}]
    three = one + [{"role": "assistant", "content": ""}, {"role": "user", "content": ""}]
    assert chat(three) - chat(one) == 2 * estimate.MESSAGE_OVERHEAD + len("assistant" + "user") // 4


def test_text_parts_names_and_tool_calls_all_count():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Pune"}'}}
    plain = [{"role": "user", "content": "What is the weather?"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the weather?"},
                                          {"type": "text", "text": "In Pune, please, and tomorrow's too."}]}]
    named = [{"role": "user", "name": "alice", "content": "What is the weather?"}]
    called = plain + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 31}'}]
    assert chat(parts) > chat(plain) and chat(named) > chat(plain)
    assert chat(called) >= chat(plain) + 2 * estimate.MESSAGE_OVERHEAD + estimate.TOOL_CALL_OVERHEAD + 10


def test_tool_definitions_are_counted_as_their_json_plus_the_template_instructions():
    messages = [{"role": "user", "content": "weather?"}]
    with_tools = chat(messages, tools=[WEATHER_TOOL])
    assert with_tools - chat(messages) >= estimate.TOOLS_OVERHEAD + len(json.dumps([WEATHER_TOOL])) // 4 - 1
    assert chat(messages, functions=[WEATHER_TOOL["function"]]) > chat(messages) + estimate.TOOLS_OVERHEAD


def test_non_ascii_text_is_not_counted_as_four_characters_per_token():
    chinese = "今天天气怎么样" * 10  # 70 characters; Llama-3's BPE spends about one token on each
    assert estimate.text_prompt_tokens(chinese) >= 70
    assert estimate.text_prompt_tokens(chinese) > 3 * old_estimate(chinese)
    assert estimate.text_prompt_tokens("a" * 70) == old_estimate("a" * 70)


def test_token_id_prompts_cost_one_token_per_id_plus_one_per_prompt():
    assert estimate.text_prompt_tokens([1, 2, 3, 4, 5]) == 6
    assert estimate.text_prompt_tokens([[1, 2], [3, 4, 5]]) == 5 + 2
    assert estimate.text_prompt_tokens(["abcd", "efgh"]) == 2 + 2


def test_a_lone_surrogate_from_a_json_escape_is_measured_not_an_error():
    (message,) = json.loads('[{"role": "user", "content": "x\\ud800y"}]')
    assert chat([message]) >= old_estimate([message])


def test_validation_reserves_with_the_new_estimate():
    models = {"chat": ModelSpec("chat", "chat", context_length=8192, max_output_tokens=100, default_max_tokens=50)}
    messages = [{"role": "user", "content": "Count for me please"}]
    plain = validate_request(Endpoint.CHAT, json.dumps({"model": "chat", "messages": messages}).encode(), models,
                             frozenset())
    assert plain.prompt_estimate == 23 // 4 + 4 + 5  # "user" + the text: 23 characters; message and reply overhead
    assert plain.reserve == 14 + 50  # and the model's default max_tokens
    # The definitions as one JSON list of the `tools` (and `functions`) lists, as the template renders them.
    tool_json = json.dumps([[WEATHER_TOOL]], ensure_ascii=False)
    tools = validate_request(Endpoint.CHAT, json.dumps({"model": "chat", "messages": messages,
                                                        "tools": [WEATHER_TOOL]}).encode(), models, frozenset())
    assert tools.prompt_estimate == (23 + len(tool_json)) // 4 + 4 + 5 + estimate.TOOLS_OVERHEAD


# ---------------------------------------------------------------- properties

text = st.text(max_size=40)
part = st.one_of(st.builds(lambda t: {"type": "text", "text": t}, text),
                 st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, text))
tool_call = st.builds(lambda i, n, a: {"id": i, "type": "function", "function": {"name": n, "arguments": a}},
                      text, text, text)


@st.composite
def message(draw) -> dict:
    m: dict = {"role": draw(st.sampled_from(["system", "user", "assistant", "tool"]))}
    m["content"] = draw(st.one_of(st.none(), text, st.lists(part, max_size=4)))
    if draw(st.booleans()):
        m["name"] = draw(text)
    if draw(st.booleans()):
        m["tool_calls"] = draw(st.lists(tool_call, max_size=3))
    return m


messages_st = st.lists(message(), min_size=1, max_size=6)
tools_st = st.lists(st.builds(lambda n, d: {"type": "function", "function": {"name": n, "description": d}},
                              text, text), max_size=3)


def _grow(messages: list[dict], tools: list[dict], how: int, extra: str, index: int) -> tuple[list, list]:
    """The same request with more content: one more message, longer text, a name, a tool call or a tool."""
    messages, tools = copy.deepcopy(messages), copy.deepcopy(tools)
    target = messages[index % len(messages)]
    if how == 0:
        messages.append({"role": "user", "content": extra})
    elif how == 1:
        content = target.get("content")
        if isinstance(content, str):
            target["content"] = content + extra
        elif isinstance(content, list):
            content.append({"type": "text", "text": extra})
        else:
            target["content"] = extra
    elif how == 2:
        target["name"] = target.get("name", "") + extra
    elif how == 3:
        target.setdefault("tool_calls", []).append(
            {"id": "c", "type": "function", "function": {"name": extra, "arguments": "{}"}})
    else:
        tools.append({"type": "function", "function": {"name": extra}})
    return messages, tools


@given(messages_st, tools_st, st.integers(0, 4), text, st.integers(0, 10))
def test_chat_estimate_never_shrinks_when_content_is_added(messages, tools, how, extra, index):
    grown_messages, grown_tools = _grow(messages, tools, how, extra, index)
    assert chat(grown_messages, tools=grown_tools) >= chat(messages, tools=tools)


@given(messages_st, tools_st)
def test_chat_estimate_is_never_below_the_old_one(messages, tools):
    assert chat(messages, tools=tools) >= old_estimate(messages)


prompts = st.one_of(text, st.lists(text, min_size=1, max_size=4), st.lists(st.integers(0, 2**17), min_size=1),
                    st.lists(st.lists(st.integers(0, 2**17), min_size=1), min_size=1, max_size=3))


@given(prompts)
def test_text_estimate_is_never_below_the_old_one(prompt):
    assert estimate.text_prompt_tokens(prompt) >= old_estimate(prompt)


@given(text, text)
def test_text_estimate_never_shrinks_when_text_is_appended(prompt, extra):
    assert estimate.text_prompt_tokens(prompt + extra) >= estimate.text_prompt_tokens(prompt)
    assert estimate.text_prompt_tokens([prompt, extra]) >= estimate.text_prompt_tokens([prompt])
