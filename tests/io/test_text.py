"""io.text: terminal escapes, capped messages, strict JSON."""

from __future__ import annotations

import json
import logging

from shardfix.io.text import MAX_MESSAGE, EscapingFormatter, cap_message, printable, strict_json


def test_printable_escapes_controls_bidi_and_surrogates() -> None:
    s = printable("a\x1b[2Jb\x07c\x9bd\u202ee\ud800f\n\tg")
    assert s == "a\\x1b[2Jb\\x07c\\x9bd\\u202ee\\ud800f\n\tg"
    s.encode("utf-8")


def test_cap_message() -> None:
    assert cap_message("short") == "short"
    long = "x" * 300_000_000 if False else "a" * 10_000 + "END"
    capped = cap_message(long)
    assert len(capped) < MAX_MESSAGE + 100 and capped.endswith("END") and "left out" in capped


def test_strict_json_has_no_nan() -> None:
    text = strict_json({"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": object()})
    doc = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(c)))
    assert doc["a"] == "NaN" and doc["b"] == ["Infinity", "-Infinity", 1.5]


def test_log_lines_are_escaped() -> None:
    rec = logging.LogRecord("shardfix", logging.WARNING, __file__, 1, "key %s", ("\x1b]0;x\x07",), None)
    assert "\x1b" not in EscapingFormatter("%(message)s").format(rec)
