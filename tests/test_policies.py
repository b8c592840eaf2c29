"""Policies and their guards: per-operation checks, the registry, generated signatures, and
the fast paths checked against a reference.

The reference run is what coverage.py does with its two tracers: the same cases
run through the generated guards (each policy's template, with its fast path)
and through the general enter/exit form, which asks ``violated()`` on every
call. Both must report exactly the same uses.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Sanitized

import sanitizer
from sanitizer import control, instrument, policies, threads
from sanitizer.exceptions import ConfigError
from sanitizer.ownership import OwnerRecord, new_record
from sanitizer.policies import (
    CONCURRENT_USE,
    EXCLUSIVE_POLICY,
    PROCESS_POLICY,
    STRICT_POLICY,
    Check,
    ConcurrentUse,
    Exclusive,
    Policy,
    Releasing,
)
from sanitizer.report import Occurrence

# -- Check ---------------------------------------------------------------------------------


def test_each_check_has_its_guarding_policy() -> None:
    assert Check.POLICY.under(STRICT_POLICY) is STRICT_POLICY
    assert Check.CONCURRENT.under(STRICT_POLICY) is CONCURRENT_USE
    assert Check.NONE.under(EXCLUSIVE_POLICY) is None
    releasing = Check.RELEASE.under(EXCLUSIVE_POLICY)
    assert isinstance(releasing, Releasing)
    assert (releasing.name, releasing.template) == ("exclusive", EXCLUSIVE_POLICY.template)
    assert Check.RELEASE.under(EXCLUSIVE_POLICY) is releasing  # one per policy


# -- the registry --------------------------------------------------------------------------


def test_get_knows_the_built_ins_and_names_the_accepted_ones() -> None:
    assert policies.get("strict") is STRICT_POLICY
    assert policies.get(EXCLUSIVE_POLICY) is EXCLUSIVE_POLICY
    with pytest.raises(ConfigError, match="unknown policy 'nope'; expected one of: "
                                          "exclusive, loop, process, strict, task"):
        policies.get("nope")


def test_a_plugins_policy_is_known_only_while_the_sanitizer_runs(sanitized: Sanitized) -> None:
    # dbapi declares "transaction": registered at start, forgotten at stop.
    assert policies.get("transaction").name == "transaction"
    sanitizer.disable()
    with pytest.raises(ConfigError):
        policies.get("transaction")


# -- generated signatures ------------------------------------------------------------------


def test_a_python_methods_signature_is_copied_with_its_defaults() -> None:
    def method(self: Any, a: int, /, b: int = 2, *rest: int, c: int = 3, **more: int) -> int:
        return a + b + c
    params, defaults = policies.parameters_of(method) or ("", {})
    assert params == "a, /, b=_g_default1, *rest, c=_g_default3, **more"
    assert defaults == {"_g_default1": 2, "_g_default3": 3}
    assert policies.call_arguments(params) == "a, b, *rest, c=c, **more"
    guard = STRICT_POLICY.guard(method, "method", name="method")
    assert str(inspect.signature(guard)) == str(inspect.signature(method))
    assert guard.__name__ == "method" and guard.__code__.co_name == "method"


def test_a_guard_takes_what_it_can_of_the_methods_metadata() -> None:
    class Odd:
        def __call__(self, obj: Any) -> int:
            return 7
    odd: Any = Odd()  # a C method as nanobind makes them: a None __qualname__
    odd.__qualname__, odd.__module__, odd.__doc__ = None, "somelib", "Its docstring."
    guard = STRICT_POLICY.guard_expression("_g_func(self)", "odd", "", {"_g_func": odd},
                                           wrapped=odd)
    assert (guard.__name__, guard.__qualname__, guard.__module__) == ("odd", "odd", "somelib")
    assert guard.__doc__ == "Its docstring." and guard.__wrapped__ is odd  # type: ignore[attr-defined]


def test_reserved_names_and_c_methods_get_args_and_kwargs() -> None:
    def method(self: Any, _g_record: int) -> None:
        pass
    assert policies.parameters_of(method) is None
    assert policies.parameters_of(list.append) is None


# -- the reference run ---------------------------------------------------------------------


class Reference(Policy):
    """``base`` in the general enter/exit form: every call asks ``violated()``, with the
    same bookkeeping (exclusive records say who is inside), and no fast path."""

    own_verdict = True

    def __init__(self, base: Policy) -> None:
        self.base = base
        self.name = base.name  # type: ignore[misc]

    def enter(self, obj: object, record: OwnerRecord, operation: str) -> Any:
        me = threads.local.token
        holder = record.busy
        entered = isinstance(self.base, Exclusive) and holder is None
        if entered:
            record.busy = me
        seen = None if entered else holder
        reported = policies.slow_path(obj, record, operation, seen, deciding=self.base)
        if reported:
            me.quiet += 1
        return me, entered, reported

    def exit(self, obj: object, record: OwnerRecord, state: Any) -> None:
        me, entered, reported = state
        if entered:
            record.busy = None
        if reported:
            me.quiet -= 1


class Thing:
    """A tracked object in a test: uses, and a call that can be held open."""

    def use(self) -> int:
        return 1

    def hold(self, entered: threading.Event, release: threading.Event) -> None:
        entered.set()
        release.wait(10)

    def nested(self) -> int:
        return self.use()


METHODS = (("use", None), ("hold", None), ("nested", None))


def make(policy: Policy, guards: Policy) -> Any:
    """A Thing whose record has ``policy``, guarded by ``guards``' guards."""
    cls = instrument.tracked_subclass(Thing, guards, METHODS)
    obj = cls()
    obj._sanitizer_record = new_record(policy, obj)
    return obj


def other_thread(fn: Callable[[], Any], name: str = "other") -> None:
    thread = threading.Thread(target=fn, name=name)
    thread.start()
    thread.join()


def while_held(obj: Any, fn: Callable[[], Any]) -> None:
    """Run ``fn`` here while another thread is inside ``obj.hold``."""
    entered, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=obj.hold, args=(entered, release), name="holder")
    holder.start()
    entered.wait(10)
    try:
        fn()
    finally:
        release.set()
        holder.join()


def while_owner_holds(obj: Any, fn: Callable[[], Any]) -> None:
    """Run ``fn`` in another thread while this one (the owner) is inside ``obj.hold``."""
    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        entered.wait(10)
        try:
            fn()
        finally:
            release.set()
    thread = threading.Thread(target=other, name="other")
    thread.start()
    obj.hold(entered, release)
    thread.join()


SCENARIOS: dict[str, Callable[[Any], None]] = {
    "other thread while the owner is inside": lambda obj: while_owner_holds(obj, obj.use),
    "owner": lambda obj: (obj.use(), obj.nested()),
    "other thread, owner idle": lambda obj: other_thread(obj.use),
    "other thread while one is inside": lambda obj: while_held(obj, obj.use),
    "owner while another is inside": lambda obj: while_held(obj, obj.nested),
    "shared": lambda obj: _shared(obj, lambda: other_thread(obj.use)),
    "transferred": lambda obj: other_thread(lambda: (sanitizer.transfer(obj), obj.use())),
    "handoff, then back": lambda obj: (other_thread(obj.use), obj.use()),
}


def _shared(obj: Any, fn: Callable[[], Any]) -> None:
    with sanitizer.shared(obj):
        fn()


@contextlib.contextmanager
def collected() -> Iterator[list[tuple[str, ...]]]:
    """The uses reported in the block: (policy, operation, thread name)."""
    running = control.running()
    assert running is not None
    seen: list[tuple[str, ...]] = []

    def collect(occurrence: Occurrence) -> Occurrence:
        v = occurrence.violation
        seen.append((v.policy, v.operation, str(v.thread["name"])))
        return occurrence

    running.reporter.add(collect)
    try:
        yield seen
    finally:
        running.reporter.remove(collect)


def run(policy: Policy, guards: Policy, scenario: Callable[[Any], None]) -> list[tuple[str, ...]]:
    """The uses reported while ``scenario`` runs on a Thing of ``policy`` with ``guards``."""
    with collected() as seen:
        scenario(make(policy, guards))
    return seen


POLICIES = {"strict": STRICT_POLICY, "exclusive": EXCLUSIVE_POLICY, "process": PROCESS_POLICY}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("name", list(POLICIES))
def test_a_policys_guards_report_what_violated_decides(sanitized: Sanitized, name: str,
                                                       scenario: str) -> None:
    policy = POLICIES[name]
    fast = run(policy, policy, SCENARIOS[scenario])
    reference = run(policy, Reference(policy), SCENARIOS[scenario])
    assert fast == reference


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("name", ["strict", "exclusive"])
def test_the_concurrent_check_reports_what_violated_decides(sanitized: Sanitized, name: str,
                                                            scenario: str) -> None:
    policy = POLICIES[name]
    fast = run(policy, CONCURRENT_USE, SCENARIOS[scenario])
    reference = run(policy, Reference(ConcurrentUse()), SCENARIOS[scenario])
    assert fast == reference


def test_the_reference_run_can_tell_them_apart(sanitized: Sanitized) -> None:
    # The comparison is not vacuous: the cases report, and differently per policy.
    strict = run(STRICT_POLICY, STRICT_POLICY, SCENARIOS["other thread, owner idle"])
    exclusive = run(EXCLUSIVE_POLICY, EXCLUSIVE_POLICY,
                    SCENARIOS["other thread while one is inside"])
    concurrent = run(STRICT_POLICY, CONCURRENT_USE,
                     SCENARIOS["other thread while the owner is inside"])
    assert strict == [("strict", "use", "other")]
    assert exclusive == [("exclusive", "use", "MainThread")]
    assert concurrent == [("exclusive", "use", "other")]
    assert run(STRICT_POLICY, CONCURRENT_USE, SCENARIOS["other thread, owner idle"]) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("name", list(POLICIES))
def test_in_a_forked_child_too(sanitized: Sanitized, name: str) -> None:
    policy = POLICIES[name]
    objects = {"fast": make(policy, policy), "reference": make(policy, Reference(policy)),
               "releasing": make(policy, Releasing(policy))}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            results = {key: run_on(obj) for key, obj in objects.items()}
            os.write(write, repr(results).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        results = eval(pipe.read())  # our own repr of tuples of strings
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert results["fast"] == results["reference"] == [("process", "use", "MainThread")]
    assert results["releasing"] == []  # letting go in a child is not a use


def run_on(obj: Any) -> list[tuple[str, ...]]:
    with collected() as seen:
        obj.use()
    return seen


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    assert set(threading.enumerate()) <= before


# -- hints: each policy words how such bugs are usually fixed -----------------------------


def _verdict(policy: str) -> Any:
    from sanitizer.report import Violation

    return Violation(policy=policy, object_type="T", object_id=1, operation="op",
                     owner_thread={}, thread={}, pid=1, owner_pid=1, creation_stack=(),
                     access_stack=(), message="")


@pytest.mark.parametrize(("policy", "verdict", "words"), [
    (policies.STRICT_POLICY, "strict", "a connection per thread, or a pool"),
    (policies.EXCLUSIVE_POLICY, "exclusive", "one thread at a time"),
    (policies.PROCESS_POLICY, "process", "reconnect in the child after fork"),
    (policies.CONCURRENT_USE, "exclusive", "one thread at a time"),
    (policies.LOOP_POLICY, "loop", "run_coroutine_threadsafe"),
    (policies.EVENT_LOOP_POLICY, "loop", "call_soon_threadsafe"),
    (policies.TASK_POLICY, "task", "one task at a time"),
    (policies.TASK_POLICY, "loop", "run_coroutine_threadsafe"),  # its sync methods' rule
    (policies.NOBLOCK_POLICY, "noblock", "asyncio.to_thread"),
    # A verdict of another policy gets that policy's hint: a strict object after fork.
    (policies.STRICT_POLICY, "process", "reconnect in the child after fork"),
    (policies.Releasing(policies.EXCLUSIVE_POLICY), "exclusive", "one thread at a time"),
    (policies.NOBLOCK_POLICY.over(policies.EXCLUSIVE_POLICY), "noblock", "asyncio.to_thread"),
])
def test_each_policy_words_its_hint(policy: policies.Policy, verdict: str, words: str) -> None:
    base = getattr(policy, "base", None) or policy
    record = new_record(base, object())
    assert words in policy.advice_for(_verdict(verdict), record)


def test_every_builtin_policy_has_its_own_hint() -> None:
    builtin = [policies.STRICT_POLICY, policies.EXCLUSIVE_POLICY, policies.PROCESS_POLICY,
               policies.LOOP_POLICY, policies.EVENT_LOOP_POLICY, policies.TASK_POLICY,
               policies.NOBLOCK_POLICY]
    hints = [p.advice for p in builtin]
    assert all(hints) and len(set(hints)) == len(hints)
    assert policies.Policy.advice not in hints  # the generic one is only a fallback


def test_a_plugins_loop_hint_is_the_reports_hint_not_part_of_its_message() -> None:
    bound = policies.LoopBound("complete it with loop.call_soon_threadsafe(...)")
    record = new_record(bound, object())
    assert bound.advice_for(_verdict("loop"), record) == (
        "complete it with loop.call_soon_threadsafe(...)")
    assert "reconnect" in bound.advice_for(_verdict("process"), record)
    assert policies.LoopBound().advice_for(_verdict("loop"), record) == policies.LoopBound.advice
