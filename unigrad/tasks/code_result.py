"""Reading the result line a `code` snippet prints, as untrusted text.

The snippet runs model-written code, so its stdout is whatever that code makes it: a result marker followed by tens
of thousands of "[" (which would take `json.loads` past Python's recursion limit), a line of megabytes, bytes that
are no JSON at all. `read_results` never raises: it checks a line's length and its nesting depth *before* parsing,
and returns either the (status, value) pairs the harness prints or the reason it could not (`REASONS`), so that one
such completion scores 0 on its own and its reason is counted, never failing the batch it came in.
"""

from __future__ import annotations

import json
import re

MAX_LINE_CHARS = 16384  # a correct run of the built-in tests prints a few hundred characters
MAX_DEPTH = 16  # the harness's line nests 2 deep, a returned value (list of numbers) 1 deep
REASONS = ("oversized", "too_deep", "malformed")  # what `read_results` reports; "parser_error" when all else fails

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def nesting_depth(text: str) -> int:
    """The deepest nesting of JSON arrays and objects in `text`, brackets inside JSON strings left out. Linear in
    the text and without recursion; an unterminated string's brackets are counted (never an underestimate)."""
    depth = peak = 0
    for bracket in _BRACKETS.findall(_JSON_STRING.sub("0", text)):
        depth += 1 if bracket in "[{" else -1
        peak = max(peak, depth)
    return peak


def loads_bounded(text: str) -> tuple[object, str | None]:
    """(the JSON value of `text`, None), or (None, the reason it was refused): longer than MAX_LINE_CHARS, nested
    deeper than MAX_DEPTH, or not JSON."""
    if len(text) > MAX_LINE_CHARS:
        return None, "oversized"
    if nesting_depth(text) > MAX_DEPTH:
        return None, "too_deep"
    try:
        return json.loads(text), None
    except ValueError:
        return None, "malformed"


def read_results(stdout: str, marker: str, n_tests: int) -> tuple[list[tuple[str, object]] | None, str | None]:
    """(results, reason) from the last `marker` line of `stdout`: results are [(status, value)], one per test, each
    "ok" value decoded. (None, None) when no line has the marker (the snippet crashed or timed out before printing);
    (None, one of REASONS) when the line cannot be read; a value that cannot be read makes its test's status
    "unreadable" and gives its reason."""
    lines = [line for line in stdout.splitlines() if line.startswith(marker)]
    if not lines:
        return None, None
    results, reason = loads_bounded(lines[-1][len(marker):])
    if reason is not None:
        return None, reason
    if not isinstance(results, list) or len(results) != n_tests:
        return None, "malformed"
    out: list[tuple[str, object]] = []
    for item in results:
        if not (isinstance(item, list) and len(item) == 2 and item[0] in ("ok", "error") and isinstance(item[1], str)):
            return None, "malformed"
        status, value = item
        if status == "ok":
            value, bad = loads_bounded(value)
            status, reason = ("unreadable", bad) if bad is not None else (status, reason)
        out.append((status, value))
    return out, reason
