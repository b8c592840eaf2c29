"""report: the pipeline each violation runs through, step by step."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from support import in_thread

import sanitizer
from sanitizer.report import Dedup, Occurrence, Suppress, raise_, warn


class Account:
    def deposit(self) -> None:
        pass


def misuse(account: Any) -> None:
    in_thread(account.deposit)


def test_dedup_counts_a_kind_and_acts_only_on_its_first() -> None:
    from sanitizer.report import Violation

    dedup = Dedup()
    first = Violation("strict", "T", 1, "op", {}, {}, 1, 1, (), (), "m")
    again = Violation("strict", "T", 2, "op", {}, {}, 1, 1, (), (), "m")
    one = dedup(Occurrence(first, {"log", "warn", "raise"}))
    two = dedup(Occurrence(again, {"log", "warn", "raise"}))
    assert (one.first, one.actions) == (True, {"log", "warn", "raise"})
    assert (two.first, two.kind, two.actions) == (False, first, {"raise"})
    assert (dedup.total, first.count) == (2, 2)


def test_suppress_drops_what_a_rule_matches() -> None:
    from sanitizer.report import Violation
    from sanitizer.suppressions import Rule

    rule = Rule("policy", "strict", None, "here:1")
    v = Violation("strict", "T", 1, "op", {}, {}, 1, 1, (), (), "m")
    assert Suppress([rule])(Occurrence(v, {"log"})) is None
    assert rule.hits == 1
    assert Suppress([])(Occurrence(v, {"log"})) is not None


def test_the_actors_do_what_the_occurrence_says() -> None:
    from sanitizer.exceptions import ThreadAffinityError, ThreadAffinityWarning
    from sanitizer.report import Violation

    v = Violation("strict", "T", 1, "op", {}, {}, 1, 1, (), (), "the message")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn(Occurrence(v, {"warn"}))
        warn(Occurrence(v, set()))
    assert [str(w.message) for w in caught if w.category is ThreadAffinityWarning] == [
        "the message"]
    chosen = ThreadAffinityError(v)
    with pytest.raises(ThreadAffinityError) as raised:
        raise_(Occurrence(v, {"raise"}, error=chosen))
    assert raised.value is chosen
    assert raise_(Occurrence(v, set())) is not None


def test_added_steps_run_after_dedup_and_before_the_actors(enable: Any) -> None:
    run = enable(action="log")
    reporter = sanitizer_running().reporter
    seen: list[tuple[bool, set[str]]] = []

    def step(occurrence: Occurrence) -> Occurrence | None:
        seen.append((occurrence.first, set(occurrence.actions)))
        occurrence.actions.discard("log")  # a step may change what the actors do
        return occurrence

    reporter.add(step)
    account = sanitizer.track(Account())
    misuse(account)
    misuse(account)
    assert seen == [(True, {"log"}), (False, set())]
    assert run.records() == []  # the step took the log line away
    reporter.remove(step)
    assert step not in reporter.steps


def test_a_step_can_drop_an_occurrence(enable: Any) -> None:
    enable(action="log+raise")
    reporter = sanitizer_running().reporter
    reporter.add(lambda occurrence: None)
    account = sanitizer.track(Account())
    misuse(account)  # dropped before Raise: no ThreadAffinityError
    assert len(sanitizer.violations()) == 1  # counted by dedup, before the step


def sanitizer_running() -> Any:
    from sanitizer import control
    return control.running()
