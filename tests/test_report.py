"""The report pipeline: structlog processors, renderers, and what the app's logging sees."""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import Any

import pytest
import structlog
from structlog.testing import LogCapture, capture_logs
from support import in_thread

import sanitizer
from sanitizer import render


def violation_event() -> dict[str, Any]:
    """A real violation's event dict, made by a real cross-thread call."""
    sanitizer.enable(log_file="/dev/null")
    try:
        holder: dict[str, sqlite3.Connection] = {}
        in_thread(lambda: holder.setdefault("c", sqlite3.connect(":memory:")), name="maker")
        with pytest.raises(sqlite3.ProgrammingError):
            holder["c"].execute("select 1")
        [violation] = sanitizer.violations()
        return {"event": render.EVENT, **violation.event()}
    finally:
        sanitizer.disable()


def test_pipeline_adds_level_and_timestamp_before_rendering() -> None:
    capture = LogCapture()
    chain = [*render.processors("json")[:-1], capture]  # our processors, a capturing sink
    logger = structlog.wrap_logger(None, processors=chain, wrapper_class=structlog.BoundLogger)
    logger.warning(render.EVENT, **{k: v for k, v in violation_event().items() if k != "event"})
    [entry] = capture.entries
    assert entry["event"] == "thread_affinity_violation"
    assert entry["level"] == "warning" and entry["timestamp"].endswith("Z")
    assert entry["policy"] == "strict" and entry["owner_thread"]["name"] == "maker"


def test_json_renderer_writes_one_line() -> None:
    line = render.processors("json")[-1](None, "warning", violation_event())
    assert "\n" not in line
    assert json.loads(line)["operation"] == "execute"


def test_console_renderer_names_both_sides() -> None:
    text = render.render_console(None, "warning", violation_event())
    assert text.splitlines()[1].startswith("WARNING: thread-affinity violation (strict)")
    assert "'maker'" in text and "'MainThread'" in text and "SUMMARY:" in text


def test_the_applications_logging_is_untouched(caplog: pytest.LogCaptureFixture) -> None:
    """Our events never reach structlog's global configuration or the logging module."""
    config = structlog.get_config()
    with capture_logs() as app_events, caplog.at_level(logging.DEBUG):
        violation_event()
    assert app_events == [] and caplog.records == []
    assert structlog.get_config() == config


def test_captured_frames_give_the_lines_f_lineno_gives() -> None:
    # Stacks keep bytecode offsets; the line is looked up only for reports.
    import sys

    from sanitizer import stacks

    seen: list[tuple[stacks.Stack, list[int]]] = []

    def inner() -> None:
        frame = sys._getframe()
        expected = [frame.f_lineno + 1, frame.f_back.f_lineno]  # type: ignore[union-attr]
        seen.append((stacks.capture(2), expected))

    for attempt in range(3):
        try:
            if attempt == 2:
                inner()
        finally:
            pass
    ((stack, expected),) = seen
    assert [stacks.line_of(frame) for frame in stack] == expected
    assert stacks.location(stack[0]) == (__file__, expected[0])
    assert stacks.location(None) == ("<unknown>", 0)
