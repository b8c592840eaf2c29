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
            holder["c"].execute("select 1")  # the access line
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


# -- reading a console report ------------------------------------------------------------


def test_console_frames_show_their_source_lines() -> None:
    text = render.render_console(None, "warning", violation_event()).splitlines()
    access = next(i for i, line in enumerate(text) if "in violation_event" in line)
    assert text[access + 1] == '        holder["c"].execute("select 1")  # the access line'
    creation = next(i for i, line in enumerate(text) if "in violation_event.<locals>.<lambda>"
                    in line)
    assert text[creation + 1].strip().startswith(
        'in_thread(lambda: holder.setdefault("c", sqlite3.connect(":memory:"))')
    assert text.index(text[access]) < text.index(text[creation])


def test_console_folds_runs_of_more_than_two_library_frames() -> None:
    import sysconfig

    event = violation_event()
    purelib = sysconfig.get_paths()["purelib"]
    django = [{"file": f"{purelib}/django/db/m{i}.py", "line": 1, "function": f"f{i}"}
              for i in range(5)]
    pair = [{"file": f"{purelib}/asgiref/s{i}.py", "line": 1, "function": f"g{i}"}
            for i in range(2)]
    user = event["access_stack"][0]
    event["access_stack"] = [*django, user, *pair]
    text = render.render_console(None, "warning", event)
    assert f"    #0 {purelib}/django/db/m0.py:1 in f0" in text
    assert "m1.py" not in text and "m4.py" not in text
    assert "    ... 4 frames in django" in text
    assert f"    #5 {user['file']}:{user['line']} in {user['function']}" in text  # numbered
    assert "s0.py:1 in g0" in text and "s1.py:1 in g1" in text  # two: not folded
    # JSON keeps every frame: folding is rendering only.
    line = json.loads(render.processors("json")[-1](None, "warning", event))
    assert [f["function"] for f in line["access_stack"]][:5] == [f"f{i}" for i in range(5)]


def test_a_real_threads_bootstrap_frames_are_folded() -> None:
    event = violation_event()
    created = event["creation_stack"]
    threading_frames = [f for f in created if f["file"].endswith("threading.py")]
    assert len(threading_frames) == 3, created  # run, _bootstrap_inner, _bootstrap
    text = render.render_console(None, "warning", event)
    assert "    ... 2 frames in the standard library" in text
    assert "Thread._bootstrap_inner" not in text
    assert len(event["creation_stack"]) == len(created)  # the event itself is untouched


def test_every_report_has_its_policys_hint() -> None:
    from sanitizer.policies import Strict

    event = violation_event()
    assert event["hint"] == Strict.advice
    text = render.render_console(None, "warning", event)
    assert f"  hint: {Strict.advice}" in text.splitlines()
    assert text.index("  hint:") < text.index("SUMMARY:")
