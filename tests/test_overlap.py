"""Exclusive's claims: every entry made while another call is inside is seen and counted,
with the GIL and without it, and signals handled inside guarded calls leave nothing held.

The core suite runs this file on every Python CI has, free-threaded 3.13t included, and
over both cores (the C claims and the Python ones).
"""

from __future__ import annotations

import gc
import random
import signal
import sys
import threading
from types import FrameType
from typing import Any

import pytest
from conftest import Sanitized
from support import in_thread, started, tracked

import sanitizer
from sanitizer import claims, stacks, threads
from sanitizer.ownership import CROWD, OwnerRecord
from sanitizer.policies import EXCLUSIVE, EXCLUSIVE_CALLED, Exclusive
from sanitizer.state import STATE


class CalledExclusive(Exclusive):
    """Exclusive with the guards free-threaded builds use, on any build."""

    template = EXCLUSIVE_CALLED


class InlineExclusive(Exclusive):
    """Exclusive with the guards of GIL builds from 3.11 (3.10 switches threads between
    the inline steps, so it calls the claims: not tested there)."""

    template = EXCLUSIVE


TEMPLATES = [pytest.param(CalledExclusive(), id="called")]
if not claims.CALLED:
    TEMPLATES.append(pytest.param(InlineExclusive(), id="inline"))


def cores() -> list[Any]:
    both = [pytest.param(claims._Claims(), id="python")]
    if threads.CORE == "c":
        from sanitizer import _speedups  # type: ignore[attr-defined]

        both.append(pytest.param(_speedups.Claims(OwnerRecord, OwnerRecord.busy,
                                                  OwnerRecord.inside, CROWD), id="c"))
    return both


# -- the claims themselves ------------------------------------------------------------------


@pytest.mark.parametrize("core", cores())
def test_a_claim_counts_everyone_after_the_first_and_the_last_out_leaves_it_idle(
        core: Any) -> None:
    record = OwnerRecord(None, "x", 0)
    a, b, c, d = (object() for _ in range(4))
    assert core.claim(record, a) is None  # the first in
    assert record.busy is a and record.inside == 0
    assert core.claim(record, b) is a
    assert core.claim(record, c) is a
    assert record.inside == 2
    core.release(record, a)  # the first leaves early: the others are still inside
    assert record.busy is CROWD and record.inside == 2
    assert core.claim(record, d) is CROWD  # so an entrant now still overlaps them
    for who in (b, c):
        core.release(record, who)
        assert record.busy is CROWD
    core.release(record, d)
    assert (record.busy, record.inside) == (None, 0)
    # A release that no claim let in (a signal handled before the claim) takes nothing.
    core.release(record, a)
    assert (record.busy, record.inside) == (None, 0)
    assert core.claim(record, b) is None and record.busy is b


def test_the_c_claims_check_their_arguments() -> None:
    if threads.CORE != "c":
        pytest.skip("the C core did not build, or is turned off")
    from sanitizer import _speedups

    record = OwnerRecord(None, "x", 0)
    with pytest.raises(TypeError, match="expected a OwnerRecord, not int"):
        claims.claim(1, 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes 2 arguments"):
        claims.CLAIMS.claim(record)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="takes 2 arguments"):
        claims.CLAIMS.release(record, 1, 2)  # type: ignore[call-arg]
    unready = _speedups.Claims.__new__(_speedups.Claims)
    with pytest.raises(RuntimeError, match="not initialised"):
        unready.claim(record, 1)

    class Other:
        __slots__ = ("busy",)
    for busy in (Other.busy, OwnerRecord.tracked, "busy"):
        with pytest.raises(TypeError, match="expected a slot of"):
            _speedups.Claims(OwnerRecord, busy, OwnerRecord.inside, CROWD)
    with pytest.raises(TypeError):
        _speedups.Claims("not a type", OwnerRecord.busy, OwnerRecord.inside, CROWD)
    assert (record.busy, record.inside) == (None, 0)


# -- many threads inside at once ----------------------------------------------------------


class Holder:
    """Each call waits inside until it is let go."""

    def hold(self, inside: threading.Event, go: threading.Event) -> None:
        inside.set()
        assert go.wait(10)

    def touch(self) -> int:
        return 1


@pytest.mark.parametrize("policy", TEMPLATES)
def test_an_entry_after_the_first_thread_left_still_overlaps_the_others(
        sanitized: Sanitized, policy: Exclusive) -> None:
    cls = sanitizer.thread_affine(policy=policy)(type("Holder", (Holder,), {}))
    obj = cls()
    record = tracked(obj)
    a_in, a_go, b_in, b_go = (threading.Event() for _ in range(4))
    a, _ = started(lambda: obj.hold(a_in, a_go), "A")
    assert a_in.wait(10)
    b, _ = started(lambda: obj.hold(b_in, b_go), "B")  # enters while A is inside
    assert b_in.wait(10)
    a_go.set()
    a.join()  # A, the first in, has left; B is still inside
    assert record.busy is CROWD and record.inside == 1
    in_thread(obj.touch, "C")  # C enters while B is inside: reported, naming B
    b_go.set()
    b.join()
    assert (record.busy, record.inside) == (None, 0)
    in_thread(obj.touch, "D")  # a sequential handoff: silent
    reported = sanitizer.violations()
    assert [(v.operation, v.thread["name"], (v.holder_thread or {}).get("name"))
            for v in reported] == [("hold", "B", "A"), ("touch", "C", "B")]
    assert "while thread T" in reported[1].message and "'B' is inside" in reported[1].message


class Counter:
    """Counts its own overlaps: entries made while another call is inside its body."""

    def __init__(self, body: int) -> None:
        self.lock = threading.Lock()
        self.body = body
        self.inside = 0
        self.overlaps = 0

    def work(self) -> None:
        with self.lock:
            if self.inside:
                self.overlaps += 1
            self.inside += 1
        total = 0
        for i in range(self.body):
            total += i
        with self.lock:
            self.inside -= 1


def test_every_entry_made_while_another_call_is_inside_is_counted(
        sanitized: Sanitized) -> None:
    """The method's own count against the sanitizer's, within 5%. The body is long
    enough for its window to dominate the guard's: a reported entry's slow path is
    inside the guard's window but not the body's, and without the GIL each of its
    sys._current_frames() stops every thread (~4 ms with 8 threads on 2 cores; a
    report's median slow path there was 22 ms, against 0.5 ms under the GIL)."""
    workers, calls = 8, 12
    body = 3_000_000 if threads.FREE_THREADED else 200_000
    obj = sanitizer.thread_affine(policy="exclusive")(Counter)(body)
    record = tracked(obj)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    barrier = threading.Barrier(workers)

    def run() -> None:
        barrier.wait()
        for _ in range(calls):
            obj.work()
    try:
        pool = [threading.Thread(target=run) for _ in range(workers)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    finally:
        sys.setswitchinterval(previous)
    counted = sum(v.count for v in sanitizer.violations() if v.policy == "exclusive")
    assert obj.overlaps >= workers * calls // 2, "the threads hardly overlapped"
    assert abs(counted - obj.overlaps) <= 0.05 * obj.overlaps, (counted, obj.overlaps)
    assert (record.busy, record.inside) == (None, 0)


# -- signals inside guarded calls -------------------------------------------------------------


class Worker:
    def work(self) -> int:
        total = 0
        for i in range(200):
            total += i
        return total + self.nested()

    def nested(self) -> int:  # a nested call by the same thread: claimed once
        return 1


INTERRUPTS = 1500

# The Python core's claim and release are Python functions: a signal handled as release()
# starts (its first instruction checks for one) leaves the claim held. The C core's make
# no such check, and GIL builds from 3.11 claim inline, with either core.
def skip_unless_signal_safe(policy: Exclusive) -> None:
    if threads.CORE == "python" and policy.template is EXCLUSIVE_CALLED:
        pytest.skip("the Python core's claims are not safe from signals (the C core's are)")


def interrupted(obj: Worker) -> int:
    """Call ``obj.work()`` until a timer's KeyboardInterrupt stops it, INTERRUPTS times
    at random points; the number that were handled inside a guard."""
    rng = random.Random(20261202)
    in_guard = 0

    def handler(_signum: int, frame: FrameType | None) -> None:
        nonlocal in_guard
        in_guard += any(f.f_code.co_filename == stacks.GUARD_FILENAME
                        for f in stacks.frames_of(frame))
        raise KeyboardInterrupt
    # Without collections: a signal handled in a Python gc.callbacks entry (the
    # sanitizer's own) is lost, reported as unraisable by CPython; not what this tests.
    collecting = gc.isenabled()
    gc.disable()
    previous = signal.signal(signal.SIGALRM, handler)
    lost = 0
    try:
        for _ in range(INTERRUPTS):
            try:  # the timer may fire as setitimer returns
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-5, 3e-4))
                for _ in range(100_000):
                    obj.work()
                lost += 1
            except KeyboardInterrupt:
                pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if collecting:
            gc.enable()
    assert lost == 0, f"{lost} interrupts were swallowed"
    return in_guard


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="no setitimer")
@pytest.mark.parametrize("policy", TEMPLATES)
def test_a_keyboard_interrupt_inside_a_guarded_call_leaves_no_holder(
        sanitized: Sanitized, policy: Exclusive) -> None:
    skip_unless_signal_safe(policy)
    obj = sanitizer.thread_affine(policy=policy)(type("Worker", (Worker,), {}))()
    record = tracked(obj)
    in_guard = interrupted(obj)
    assert in_guard > INTERRUPTS // 2, "the interrupts missed the guarded calls"
    assert (record.busy, record.inside) == (None, 0)
    in_thread(obj.work)  # a sequential handoff: silent
    assert sanitizer.violations() == []


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="no setitimer")
@pytest.mark.parametrize("policy", TEMPLATES)
def test_a_keyboard_interrupt_inside_a_reported_call_leaves_the_counts_exact(
        sanitized: Sanitized, policy: Exclusive) -> None:
    """With another thread inside throughout, every call is reported: the interrupts land
    in the slow path, the pipeline and the quiet call too."""
    skip_unless_signal_safe(policy)
    cls = sanitizer.thread_affine(policy=policy)(type("Worker", (Worker, Holder), {}))
    obj = cls()
    record = tracked(obj)
    inside, go = threading.Event(), threading.Event()
    holder, _ = started(lambda: obj.hold(inside, go), "holder")
    assert inside.wait(10)
    try:
        in_guard = interrupted(obj)
    finally:
        go.set()
        holder.join()
    assert in_guard > INTERRUPTS // 2
    assert (record.busy, record.inside) == (None, 0)
    assert threads.local.token.quiet == 0
    # Reports ask whether the owner lives: a signal there must not mark it stopped.
    assert threading.main_thread().is_alive()
    in_thread(obj.work)  # a sequential handoff: silent
    (violation,) = sanitizer.violations()
    assert violation.operation == "work" and violation.count >= INTERRUPTS // 2
    reporter = STATE.running.reporter  # type: ignore[union-attr]
    assert reporter.total == violation.count
