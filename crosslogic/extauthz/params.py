"""Typed reads of request parameters, refused in OpenAI's own words.

OpenAI's validator answers a bad parameter with a 400 whose message, `param` and `code` follow a few fixed
patterns, for example (observed replies):

    Invalid 'n': integer above maximum value. Expected a value <= 128, but got 130 instead.   integer_above_max_value
    Invalid type for 'temperature': expected a decimal, but got a string instead.            invalid_type
    Invalid value: 'foo'. Supported values are: 'a', 'b', and 'c'.                            invalid_value
    Missing required parameter: 'messages[0].role'.                                          missing_required_parameter
    The 'top_logprobs' parameter is only allowed when 'logprobs' is enabled.                 (code null)

`param` is the path of the value (`messages[2].content[0].text`). null counts as absent for every optional
parameter, as in vLLM's request models. Integers sent as integral decimals (`20.0`) are accepted as integers,
as vLLM accepts them; booleans are never numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from crosslogic import errors

INT64 = (-(2**63), 2**63 - 1)


def type_name(value: object) -> str:
    """How OpenAI names a JSON value's type in its messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def invalid_type(param: str, expected: str, value: object) -> errors.ClientError:
    return errors.invalid_param(f"Invalid type for '{param}': expected {expected}, but got {type_name(value)} "
                                "instead.", param, "invalid_type")


def missing(param: str) -> errors.ClientError:
    return errors.invalid_param(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def _listed(values: Sequence[str]) -> str:
    quoted = [f"'{v}'" for v in values]
    if len(quoted) <= 2:
        return " and ".join(quoted)
    return ", ".join(quoted[:-1]) + f", and {quoted[-1]}"


def unsupported(param: str, value: str, allowed: Sequence[str]) -> errors.ClientError:
    return errors.invalid_param(f"Invalid value: '{value[:100]}'. Supported values are: {_listed(allowed)}.", param,
                                "invalid_value")


def only_with(param: str, condition: str) -> errors.ClientError:
    return errors.invalid_param(f"The '{param}' parameter is only allowed when {condition}.", param, None)


def invalid_value(param: str, detail: str) -> errors.ClientError:
    return errors.invalid_param(f"Invalid value for '{param}': {detail}", param, "invalid_value")


def _range(param: str, value: int | float, lo: float | None, hi: float | None, kind: str) -> None:
    if lo is not None and value < lo:
        raise errors.invalid_param(f"Invalid '{param}': {kind} below minimum value. Expected a value >= "
                                   f"{_shown(lo)}, but got {_shown(value)} instead.", param, f"{kind}_below_min_value")
    if hi is not None and value > hi:
        raise errors.invalid_param(f"Invalid '{param}': {kind} above maximum value. Expected a value <= "
                                   f"{_shown(hi)}, but got {_shown(value)} instead.", param, f"{kind}_above_max_value")


def decimal_value(value: object, param: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_type(param, "a decimal", value)
    if isinstance(value, float) and not math.isfinite(value):  # 1e999 parses as inf
        raise invalid_value(param, "expected a finite number.")
    _range(param, value, lo, hi, "decimal")
    return value


def integer_value(value: object, param: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_type(param, "an integer", value)
    _range(param, value, lo, hi, "integer")
    return value


def decimal(body: dict, key: str, lo: float | None = None, hi: float | None = None) -> float | None:
    value = body.get(key)
    return None if value is None else decimal_value(value, key, lo, hi)


def integer(body: dict, key: str, lo: int | None = None, hi: int | None = None) -> int | None:
    value = body.get(key)
    return None if value is None else integer_value(value, key, lo, hi)


def boolean(body: dict, key: str, param: str | None = None) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise invalid_type(param or key, "a boolean", value)
    return value


def string_value(value: object, param: str) -> str:
    if not isinstance(value, str):
        raise invalid_type(param, "a string", value)
    return value


def string(body: dict, key: str, param: str | None = None) -> str | None:
    value = body.get(key)
    return None if value is None else string_value(value, param or key)


def required_string(body: dict, key: str, param: str) -> str:
    value = body.get(key)
    if value is None:
        raise missing(param)
    return string_value(value, param)


def obj(body: dict, key: str, param: str | None = None) -> dict | None:
    value = body.get(key)
    if value is not None and not isinstance(value, dict):
        raise invalid_type(param or key, "an object", value)
    return value


def array_value(value: object, param: str, *, min_length: int = 0, max_length: int | None = None) -> list:
    if not isinstance(value, list):
        raise invalid_type(param, "an array", value)
    if min_length and not value:
        raise errors.invalid_param(f"Invalid '{param}': empty array. Expected an array with minimum length "
                                   f"{min_length}, but got an empty array instead.", param, "empty_array")
    if max_length is not None and len(value) > max_length:
        raise errors.invalid_param(f"Invalid '{param}': array too long. Expected an array with maximum length "
                                   f"{max_length}, but got an array with length {len(value)} instead.", param,
                                   "array_above_max_length")
    return value


def choice(value: object, param: str, allowed: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise invalid_type(param, "a string", value)
    if value not in allowed:
        raise unsupported(param, value, allowed)
    return value
