"""Metric names out of PromQL: a small tokenizer, not a parser (tests/test_dashboards.py uses it to check
that dashboards and alerting rules name only metrics the daemon exports).

Its limits: it does not check syntax (``promtool`` does); it skips label matchers (``{...}``), ranges and
subqueries (``[...]``), strings and comments without looking inside, so it cannot see a metric chosen by
``{__name__=...}`` (such a matcher is refused instead); it knows PromQL's keywords and functions by name,
so an identifier followed by ``(`` that is neither is reported as an unknown function; it balances
brackets but checks no other structure, nor label names. Grafana's ``$var`` / ``${var}`` placeholders
are skipped.
"""

from __future__ import annotations

import re

AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
}  # fmt: skip
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time",
    "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "deg", "delta", "deriv", "double_exponential_smoothing",
    "exp", "floor", "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta", "increase",
    "info", "irate", "label_join", "label_replace", "last_over_time", "ln", "log10", "log2", "mad_over_time",
    "max_over_time", "min_over_time", "minute", "month", "pi", "predict_linear", "present_over_time",
    "quantile_over_time", "rad", "rate", "resets", "round", "scalar", "sgn", "sin", "sinh", "sort",
    "sort_by_label", "sort_by_label_desc", "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time",
    "sum_over_time", "tan", "tanh", "time", "timestamp", "vector", "year", "start", "end",
}  # fmt: skip
# Keywords followed by a parenthesised list of label names (skipped: label names are not metrics).
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
OTHER_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}

_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"(0x[0-9A-Fa-f]+|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)[A-Za-z0-9_]*")
GRAFANA_VARIABLE = re.compile(r"\$(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)")
_CLOSING = {"{": "}", "[": "]", "(": ")"}


def _skip_string(text: str, i: int) -> int:
    quote, i = text[i], i + 1
    while i < len(text) and text[i] != quote:
        i += 2 if text[i] == "\\" and quote != "`" else 1
    if i >= len(text):
        raise ValueError(f"unterminated string in {text!r}")
    return i + 1


def _skip_block(text: str, i: int) -> tuple[int, str]:
    """From an opening bracket to just after its closing one (strings inside skipped); returns the inside."""
    opening, start, depth = text[i], i + 1, 0
    while i < len(text):
        char = text[i]
        if char in "\"'`":
            i = _skip_string(text, i)
            continue
        if char == opening:
            depth += 1
        elif char == _CLOSING[opening]:
            depth -= 1
            if depth == 0:
                return i + 1, text[start:i]
        i += 1
    raise ValueError(f"unbalanced {opening!r} in {text!r}")


def _next_significant(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def metric_identifiers(expr: str) -> set[str]:
    """The metric names an expression selects (see the module docstring for what this does not see)."""
    found: set[str] = set()
    i = depth = 0
    while i < len(expr):
        char = expr[i]
        if char.isspace():
            i += 1
        elif char == "#":
            newline = expr.find("\n", i)
            i = len(expr) if newline < 0 else newline
        elif char in "\"'`":
            i = _skip_string(expr, i)
        elif char in "{[":
            i, inside = _skip_block(expr, i)
            if char == "{" and "__name__" in inside:
                raise ValueError(f"select metrics by name, not by a __name__ matcher: {expr!r}")
        elif char == "$" and (variable := GRAFANA_VARIABLE.match(expr, i)):
            i = variable.end()
        elif (number := _NUMBER.match(expr, i)) and not _IDENT.match(expr, i):
            i = number.end()
        elif ident := _IDENT.match(expr, i):
            name, i = ident.group(), ident.end()
            after = _next_significant(expr, i)
            calls = after < len(expr) and expr[after] == "("
            if name in LABEL_LIST_KEYWORDS:
                if calls:
                    i, _ = _skip_block(expr, after)
            elif name in AGGREGATIONS or name in OTHER_KEYWORDS:
                pass
            elif calls:
                if name not in FUNCTIONS:
                    raise ValueError(f"unknown PromQL function {name!r} in {expr!r}")
            else:
                found.add(name)
        else:
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth < 0 or char in "}]":
                raise ValueError(f"unbalanced {char!r} in {expr!r}")
            i += 1  # an operator or punctuation
    if depth:
        raise ValueError(f"unbalanced '(' in {expr!r}")
    return found
