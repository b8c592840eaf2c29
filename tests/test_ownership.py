"""ownership: owner records, what they remember, and how they look after fork()."""

from __future__ import annotations

import os
import threading
import weakref

import pytest
from support import in_thread

from sanitizer import ownership, threads
from sanitizer.ownership import FORKED, UNTRACKED, OwnerRecord, new_record, record_of
from sanitizer.policies import EXCLUSIVE_POLICY, STRICT_POLICY
from sanitizer.state import STATE


class Thing:
    pass


def test_a_new_record_belongs_to_the_calling_thread_and_its_line() -> None:
    thing = Thing()
    record = new_record(STRICT_POLICY, thing)  # created here
    assert record.owner is threads.current()
    assert record.pid == os.getpid()
    assert record.policy is STRICT_POLICY and record.tracked
    assert record.object_type == "tests.test_ownership.Thing" or \
        record.object_type.endswith("Thing")
    assert record.creation_stack[0][0].co_name == \
        "test_a_new_record_belongs_to_the_calling_thread_and_its_line"
    assert (record.busy, record.sharing) == (None, 0)


def test_record_of_sees_tracked_objects_only() -> None:
    thing = Thing()
    assert record_of(thing) is None
    thing._sanitizer_record = UNTRACKED  # type: ignore[attr-defined]
    assert record_of(thing) is None  # the null record is no record
    record = new_record(EXCLUSIVE_POLICY, thing)
    thing._sanitizer_record = record  # type: ignore[attr-defined]
    assert record_of(thing) is record


def test_transfer_makes_the_calling_thread_the_owner() -> None:
    record = new_record(STRICT_POLICY, Thing())
    token = in_thread(lambda: (record.transfer_to_current_thread(), threads.current())[1])
    assert record.owner is token and token is not threads.current()


def test_a_dead_records_reference_goes_with_it() -> None:
    kept = new_record(STRICT_POLICY, Thing())
    before = len(STATE.records)
    for _ in range(2048):  # each dies at once, and its weak reference with it
        new_record(STRICT_POLICY, Thing())
    assert len(STATE.records) == before
    assert any(ref() is kept for ref in STATE.records)  # a live one is still remembered
    del kept
    assert len(STATE.records) == before - 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_in_a_forked_child_every_inherited_record_is_the_parents() -> None:
    record = new_record(EXCLUSIVE_POLICY, Thing())
    parent_token = threads.current()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = record.busy is FORKED and threads.current() is not parent_token
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert record.busy is None  # the parent's stays its own


def test_a_record_holds_no_reference_to_its_object() -> None:
    thing = Thing()
    record = new_record(STRICT_POLICY, thing)
    ref = weakref.ref(thing)
    del thing
    assert ref() is None and isinstance(record, OwnerRecord)


def test_qualified_names_hide_generated_subclasses() -> None:
    class Base:
        pass
    sub = type("Base", (Base,), {"__sanitizer_public_type__": Base})
    assert ownership.qualified_name(sub) == ownership.qualified_name(Base)
    assert ownership.qualified_type(threading.Lock()).endswith("lock")
