"""What events carry for their readers: schema, fingerprint, sites, times, story, history,
and the exit summary's exact counts (the fields `report` and `html` build on)."""

from __future__ import annotations

import collections
import datetime
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from support import in_thread, line_of, run_program

import sanitizer
from sanitizer import render, report
from sanitizer.ownership import record_of


class Thing:
    def use(self) -> int:
        return 1


def moment(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def all_events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


MISUSE = """\
    import threading, sanitizer

    class Thing:
        def use(self):
            return 1

    thing = sanitizer.track(Thing())  # made
    def other():
        thing.use()  # used
    for _ in range(3):
        t = threading.Thread(target=other)
        t.start()
        t.join()
"""


def test_every_event_names_its_schema_host_fingerprint_and_both_sites(tmp_path: Path) -> None:
    proc, [event] = run_program(tmp_path, MISUSE)
    assert proc.returncode == 0, proc.stderr
    assert event["schema"] == render.SCHEMA
    assert event["host"] == render.HOST
    assert len(event["fingerprint"]) == 16
    assert event["access_site"]["line"] == line_of(MISUSE, "used")
    assert event["creation_site"]["line"] == line_of(MISUSE, "made")
    assert moment(event["created_at"]) <= moment(event["timestamp"])


def test_the_exit_summary_has_each_kinds_exact_count_times_and_threads(tmp_path: Path) -> None:
    proc, [event] = run_program(tmp_path, MISUSE)
    assert proc.returncode == 0, proc.stderr
    [summary] = [e for e in all_events(tmp_path / "violations.jsonl")
                 if e["event"] == render.SUMMARY_EVENT]
    assert (summary["schema"], summary["pid"], summary["total"]) == (render.SCHEMA,
                                                                    event["pid"], 3)
    [tally] = summary["violations"]
    assert tally["fingerprint"] == event["fingerprint"] and tally["count"] == 3
    times = [o["at"] for o in tally["occurrences"]]
    assert len(times) == 3 and times == sorted(times)
    assert (tally["first_at"], tally["last_at"]) == (times[0], times[-1])
    assert len({o["thread"] for o in tally["occurrences"]}) == 3
    assert {t["serial"] for t in tally["threads"]} == {o["thread"]
                                                      for o in tally["occurrences"]}


def test_fingerprints_agree_across_processes_and_tell_sites_apart(tmp_path: Path) -> None:
    log = tmp_path / "violations.jsonl"
    _, [first] = run_program(tmp_path, MISUSE)
    log.unlink()
    _, [again] = run_program(tmp_path, MISUSE)  # the same script, another process
    log.unlink()
    moved = MISUSE.replace("thing.use()  # used", "x = 1\n        thing.use()  # used")
    _, [elsewhere] = run_program(tmp_path, moved)
    assert first["pid"] != again["pid"]
    assert again["fingerprint"] == first["fingerprint"]
    assert elsewhere["fingerprint"] != first["fingerprint"]


def test_the_story_has_sharing_windows_and_transfers_in_order(sanitized: Any) -> None:
    thing = sanitizer.track(Thing())
    with sanitizer.shared(thing):
        in_thread(thing.use, name="sharer")  # allowed: nothing reported
    in_thread(lambda: sanitizer.transfer(thing), name="taker")
    thing.use()  # the old owner: a violation now
    [violation] = sanitizer.violations()
    story = violation.event()["story"]
    assert [(s["what"], s["thread"]["name"]) for s in story] == [
        ("shared", "MainThread"), ("unshared", "MainThread"), ("transfer", "taker")]
    assert [s["at"] for s in story] == sorted(s["at"] for s in story)
    assert story[2]["from"]["name"] == "MainThread" and "from" not in story[0]


def test_history_keeps_the_last_accesses_with_their_sites(enable: Any) -> None:
    enable(history=3)
    thing = sanitizer.track(Thing())
    record = record_of(thing)
    assert record is not None and record.history is not None
    assert "_g_history" in type(thing).use.__code__.co_varnames
    for _ in range(5):
        thing.use()  # mine
    in_thread(thing.use, name="intruder")
    [violation] = sanitizer.violations()
    history = violation.event()["history"]
    assert [h["thread"]["name"] for h in history] == ["MainThread", "MainThread", "intruder"]
    assert history[0]["site"]["function"] == "test_history_keeps_the_last_accesses_with_their_sites"
    assert history[0]["site"]["file"] == __file__


def test_history_through_a_proxy_names_the_callers_line(enable: Any) -> None:
    enable(history=2)
    queue = sanitizer.track(collections.OrderedDict())  # a C type: tracked by a proxy
    assert type(queue) is not collections.OrderedDict and record_of(queue) is not None
    queue.get("x")
    in_thread(lambda: queue.get("y"), name="intruder")
    [violation] = sanitizer.violations()
    assert [h["site"]["file"] for h in violation.event()["history"]] == [__file__, __file__]


def test_without_history_records_keep_none_and_guards_do_nothing_more(sanitized: Any) -> None:
    thing = sanitizer.track(Thing())
    record = record_of(thing)
    assert record is not None and record.history is None
    names = type(thing).use.__code__.co_varnames
    assert "_g_record" in names and "_g_history" not in names  # a guard, without the note


def test_occurrences_stop_being_kept_at_the_limit_but_the_count_goes_on(
        sanitized: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "OCCURRENCE_LIMIT", 5)
    thing = sanitizer.track(Thing())
    done = threading.Event()

    def misuse() -> None:
        for _ in range(8):
            thing.use()
        done.set()
    in_thread(misuse, name="intruder")
    assert done.is_set()
    [violation] = sanitizer.violations()
    assert violation.count == 8
    tally = violation.tally()
    assert tally["count"] == 8 and len(tally["occurrences"]) == 5
    assert tally["last_at"] >= tally["occurrences"][-1]["at"]
