"""The request body as a JSON object, parsed with bounds a hostile client cannot push past.

`json.loads` recurses once per nesting level, in C and then in every walk over the result: about 1 KB of
`[[[[...` reached Python's recursion limit (a RecursionError per request, a 503 and a traceback). So the
nesting depth is measured on the bytes *before* parsing, without recursion, and anything deeper than
MAX_DEPTH is a 400. No real request comes close: OpenAI's structured outputs allow 10 levels of schema
nesting (~25 levels of JSON), a chat request with content parts is 5 deep.

Also refused, as OpenAI's parser refuses them: the non-standard literals NaN / Infinity / -Infinity that
Python accepts by default, and integers longer than Python's int-conversion limit (a ValueError deep in the
parser otherwise). Duplicate keys keep the last value, as vLLM's parser (and the Lua filter, which appends
`stream_options` as a duplicate) expect.

Speed: msgspec's C decoder parses a body first (a one-token chat body: 4.0 -> ~1.2 µs with the depth check, a
32 KB one 61 -> ~14 µs; measured with timeit). Whatever it accepts, it reads exactly as `json` does: duplicate
keys last-wins, integers of any size up to the 4,300-digit limit as Python ints, floats correctly rounded (a
property test compares both on arbitrary input). Whatever it refuses (NaN, Infinity, lone surrogates, a BOM,
UTF-16, 1e400, malformed JSON) goes to the `json` path below, so every refusal and its words, and the odd
inputs `json` accepts, stay as they were. Not orjson: it reads an integer beyond 64 bits as a float (silently
rounded: 18446744073709551616 -> 1.8446744073709552e19), and a scan for such digit runs costs more than the
parse saves (55 µs on 32 KB).
"""

from __future__ import annotations

import json
import re
import sys
from itertools import accumulate

import msgspec

from crosslogic import errors

MAX_DEPTH = 128
# Python refuses int() of longer digit strings (CVE-2020-10735); the limit is configurable per process.
MAX_INT_DIGITS = sys.get_int_max_str_digits() or 4300

# A JSON string, escapes included (the unrolled form: linear, no backtracking).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN = frozenset(b"[{")

_NOT_JSON = ("We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
             "HTTP library correctly. The API expects a JSON payload, but what was sent was not valid JSON.)")


class _Refused(ValueError):
    """Raised from inside the parser's hooks; becomes a 400 with its own message."""


def nesting_depth(raw: bytes) -> int:
    """Deepest nesting of arrays and objects, counting brackets outside strings (an unterminated string's
    brackets count too, which only ever makes invalid JSON look deeper). No recursion."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:  # the common case: cannot be too deep
        return 0
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(accumulate(1 if b in _OPEN else -1 for b in brackets), default=0)


def _no_constant(name: str) -> float:
    raise _Refused(f"The JSON body of your request contains {name}, which is not valid JSON: send numbers as "
                   "finite decimals.")


# One decoder for every request (json.loads with hooks builds a new one per call). parse_constant is called
# only for the NaN / Infinity literals, so it costs ordinary bodies nothing.
_DECODER = json.JSONDecoder(parse_constant=_no_constant)
_FAST = msgspec.json.Decoder()


def parse_object(raw: bytes) -> dict:
    """The body as a dict, or ClientError 400 (OpenAI's wording, param and code null)."""
    if not raw or not raw.strip():
        raise errors.invalid_param("The request body is empty; send a JSON object.", None, None)
    depth = nesting_depth(raw)
    if depth > MAX_DEPTH:
        raise errors.invalid_param(f"The JSON body of your request is nested too deeply ({depth} levels); at most "
                                   f"{MAX_DEPTH} levels of arrays and objects are accepted.", None, None)
    try:
        body = _FAST.decode(raw)
    except (msgspec.DecodeError, ValueError, RecursionError):
        body = _parse_slowly(raw)  # the refusal's own words, or what only `json` accepts
    if not isinstance(body, dict):
        raise errors.invalid_param("The request body must be a JSON object.", None, None)
    return body


def _parse_slowly(raw: bytes) -> object:
    """`json`'s reading of the body (any encoding it detects, NaN / Infinity refused), or the ClientError."""
    try:
        body = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))  # what json.loads does
    except _Refused as refused:
        raise errors.invalid_param(str(refused), None, None) from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        if "integer string conversion" in str(exc):  # Python's int-conversion limit (CVE-2020-10735)
            raise errors.invalid_param(f"The JSON body of your request contains an integer longer than "
                                       f"{MAX_INT_DIGITS} digits.", None, None) from None
        raise errors.invalid_param(_NOT_JSON, None, None) from None
    except RecursionError:
        raise errors.invalid_param(_NOT_JSON, None, None) from None
    return body
