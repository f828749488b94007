"""The metric names (and label matchers) a PromQL expression selects, without Prometheus: a small lexer.

Enough of PromQL for dashboards and alert rules: strings, label matchers `{k="v", k=~"re"}`, ranges and
subqueries `[5m]` / `[1h:1m]`, `by`/`without`/`on`/`ignoring`/`group_left`/`group_right` label lists,
function calls, operators and keywords, numbers and durations, and Grafana's `$variables` and `label_values()`.
What is left is selectors: a bare identifier that is not a function call or a keyword.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                      "unless", "offset", "atan2", "inf", "nan"})
_LABEL_LIST_KEYWORDS = ("by", "without", "on", "ignoring", "group_left", "group_right")
AGGREGATIONS = frozenset({"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                          "bottomk", "topk", "quantile", "limitk", "limit_ratio"})
_TOKEN = re.compile(r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<matchers>\{(?:"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|[^{}"'])*\})
  | (?P<range>\[[^\]]*\])
  | (?P<variable>\$\{?[A-Za-z_][A-Za-z0-9_]*\}?)
  | (?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:e[+-]?\d+)?)(?:ms|s|m|h|d|w|y)*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<space>\s+)
  | (?P<other>.)
""", re.VERBOSE)
_MATCHER = re.compile(r"""\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')\s*,?""")


@dataclass
class Selector:
    metric: str
    labels: set[str] = field(default_factory=set)  # label names matched on


def _matcher_labels(text: str) -> set[str]:
    body = text.strip()[1:-1]
    labels, position = set(), 0
    while position < len(body.strip()):
        found = _MATCHER.match(body, position)
        if not found:
            raise ValueError(f"cannot read label matchers {text!r}")
        labels.add(found.group(1))
        position = found.end()
    return labels


def selectors(expr: str) -> list[Selector]:
    """Every metric selector in `expr` (a PromQL expression, or Grafana's label_values(metric, label))."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr) if m.lastgroup != "space"]
    found: list[Selector] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if kind == "ident" and text in _LABEL_LIST_KEYWORDS and following[1] == "(":
            depth, i = 0, i + 1  # skip the label list: `by (region, model)`
            while i < len(tokens):
                depth += {"(": 1, ")": -1}.get(tokens[i][1], 0)
                i += 1
                if depth == 0:
                    break
            continue
        if kind == "ident" and text in AGGREGATIONS and following[1] in _LABEL_LIST_KEYWORDS:
            i += 1  # `sum by (...) (...)`: the aggregation, then its label list
            continue
        if kind == "ident" and text not in KEYWORDS and following[1] != "(":
            selector = Selector(text)
            if following[0] == "matchers":
                selector.labels = _matcher_labels(following[1])
                i += 1
            found.append(selector)
        elif kind == "ident" and text == "label_values" and following[1] == "(":
            # Grafana: label_values(metric, label) or label_values(label); the label is not a metric
            args = expr[expr.index("(", expr.index("label_values")) + 1: expr.rindex(")")].split(",")
            if len(args) == 2:
                found.extend(selectors(args[0]))
            return found
        elif kind == "matchers":
            raise ValueError(f"a selector without a metric name ({text}) in {expr!r}: name the metric")
        i += 1
    return found
