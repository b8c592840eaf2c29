"""Owner records: who made a tracked object, where, and who is using it right now."""

from __future__ import annotations

import collections
import dataclasses
import gc
import sys
import time
import weakref
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from sanitizer import loops, stacks, threads
from sanitizer.state import STATE

if TYPE_CHECKING:
    from sanitizer.loops import LoopToken
    from sanitizer.policies import Policy


@dataclasses.dataclass(frozen=True)
class Binding:
    """Where an object was bound to its event loop, when that was after it was made."""

    stack: stacks.Stack
    thread: threads.ThreadToken
    task: dict[str, Any] | None


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# ``busy`` holds the token of the thread inside a call, None when idle, or one of
# these. None ever equals a thread token, so all send guards to the slow path.
FORKED = _Sentinel("FORKED")  # the record was inherited across fork()
NEVER = _Sentinel("NEVER")  # the object is not tracked
#: The first thread in left while others it overlapped are still inside (``inside``
#: counts them): whoever enters now overlaps them, until the last of them leaves.
CROWD = _Sentinel("CROWD")


#: Changes of hands remembered per record (transfers, sharing windows).
STORY_LIMIT = 64


class OwnerRecord:
    """One per tracked object; objects derived from it (cursors, blobs) share it."""

    __slots__ = (
        "__weakref__",
        "_type",
        "binding",
        "busy",
        "created",
        "creation_stack",
        "depth",
        "derived_site",
        "history",
        "inside",
        "loop",
        "name",
        "object_id",
        "origin_loop",
        "origin_task",
        "owner",
        "owner_context",
        "pid",
        "policy",
        "resource",
        "sharing",
        "story",
        "task",
    )

    def __init__(
        self,
        policy: Policy | None,
        object_type: str | type,
        object_id: int,
        creation_stack: stacks.Stack = (),
        name: str | None = None,
        resource: dict[str, Any] | None = None,
        owner_context: list[str] | None = None,
    ) -> None:
        self.policy = policy
        self._type = object_type  # named only when a report asks
        self.object_id = object_id
        self.name = name
        self.resource = resource
        owner = threads.local.token
        self.owner: threads.ThreadToken | object = owner
        self.owner_context: list[str] = [] if owner_context is None else owner_context
        self.pid = owner.pid  # the token's: getpid() is a system call
        self.creation_stack = creation_stack
        #: Where a derived object with a record of its own (a DB-API cursor) was made,
        #: when its creation stack is its parent's: one frame, the user's.
        self.derived_site: stacks.Frame | None = None
        self.busy: object = None
        #: Calls inside now besides the first thread's (exclusive's guards count them).
        self.inside = 0
        self.sharing = 0
        # -- for the HTML timeline: set here and on cold paths only, but ``history`` --
        self.created = time.time()
        #: Transfers and sharing windows: (time, what, thread token, previous owner).
        self.story: list[tuple[float, str, threads.ThreadToken, object]] | None = None
        #: The last accesses, (thread token, time, code, offset) each, when the
        #: ``history`` option keeps them (guards append; a deque drops the oldest).
        self.history: collections.deque[tuple[Any, float, Any, int]] | None = (
            collections.deque(maxlen=STATE.history) if STATE.history else None)
        # -- event loops (loops.py): all None/0 for objects that never meet one --
        #: The LoopToken the object is bound to (the loop policy), or None: unbound.
        self.loop: LoopToken | None = None
        #: Where, in which task, the binding happened, when it was not at creation.
        self.binding: Binding | None = None
        #: The loop and task (description) the object was made in.
        self.origin_loop: LoopToken | None = owner.loop
        self.origin_task: dict[str, Any] | None = None
        #: The task inside an operation on the object (the task policy), and how deep.
        self.task: object = None
        self.depth = 0

    @property
    def tracked(self) -> bool:
        return self.policy is not None

    @property
    def object_type(self) -> str:
        """``module.Qualname`` of the tracked object's type, as the user knows it."""
        kind = self._type
        if not isinstance(kind, str):
            kind = self._type = qualified_name(kind)
        return kind

    def bind(self, loop: LoopToken, stack: stacks.Stack = ()) -> None:
        """The object now belongs to ``loop`` (``stack``: where it was bound, if not
        where it was made)."""
        self.loop = loop
        if stack:
            me = threads.local.token
            self.binding = Binding(stack, me, loops.describe_task(loops.current_task(me)))

    def note(self, what: str, previous: object = None) -> None:
        """Remember a change of hands (``transfer``, ``shared``, ``unshared``) for the
        timeline, and for a transfer the owner before it: the first STORY_LIMIT, then
        only the last one is replaced."""
        entry = (time.time(), what, threads.local.token, previous)
        story = self.story
        if story is None:
            self.story = [entry]
        elif len(story) < STORY_LIMIT:
            story.append(entry)
        else:
            story[-1] = entry

    def share(self) -> None:
        """Other threads may use the object until the matching unshare() (counted)."""
        self.sharing += 1
        self.note("shared")

    def unshare(self) -> None:
        if self.sharing > 0:
            self.sharing -= 1
            self.note("unshared")

    def transfer_to_current_thread(self) -> None:
        self.note("transfer", self.owner)
        owner = self.owner = threads.local.token
        self.owner_context = threads.describe_current()
        self.pid = owner.pid
        if self.busy is FORKED:
            self.busy = None

    def __repr__(self) -> str:
        policy = self.policy.name if self.policy else "untracked"
        return f"<OwnerRecord {self.object_type} {policy} owner={self.owner!r}>"


def _untracked() -> OwnerRecord:
    record = OwnerRecord(None, "untracked", 0)
    record.owner = NEVER
    record.busy = NEVER
    return record


# The null record: class-level default for instances that were never tracked
# (made before enable(), or by a path the plugin does not see).
UNTRACKED = _untracked()

def _remember(record: OwnerRecord) -> None:
    """Every record is remembered, for marking after fork, by a weak reference whose
    callback is the set's own discard: C, so no Python code runs as a record dies (a
    WeakSet's would), and the reference goes with its record (memory returns)."""
    STATE.records.add(weakref.ref(record, _forget))


_forget = STATE.records.discard


def _compact(phase: str, _info: dict[str, Any], live: set[weakref.ref[OwnerRecord]]
             = STATE.records, size: Callable[[object], int] = sys.getsizeof) -> None:
    """A gc.callbacks entry. A set's table never shrinks as entries go, so once most
    records are gone (a million objects dropped), the next collection swaps in a copy
    of the size it needs: one C call, so no reference added or dropped meanwhile is
    lost. A growing set takes up to 128 bytes per entry (8 slots of 16): compacting
    only past 512 never copies a set that is merely growing. (Defaults, not globals:
    collections also run while the interpreter clears modules at exit.)"""
    if phase == "stop" and size(live) > 512 * len(live) + 65536:
        live.intersection_update(live)  # a set with itself: swaps in set_copy()'s table


gc.callbacks.append(_compact)


def new_record(
    policy: Policy,
    obj: object,
    object_type: str | None = None,
    stack_depth: int = 16,
    name: str | None = None,
    resource: dict[str, Any] | None = None,
    creation_stack: stacks.Stack | None = None,
    frame: FrameType | None = None,
) -> OwnerRecord:
    """A record owned by the calling thread, with the caller's stack as its creation site.

    ``creation_stack`` skips the capture: for objects made per query (cursors)
    that can reuse their parent's. ``frame`` is where the capture starts (the
    default, this call, is skipped like any of the sanitizer's own frames).
    """
    if creation_stack is None:
        creation_stack = stacks.capture(stack_depth, frame)
    record = OwnerRecord(policy, object_type or type(obj), id(obj), creation_stack, name,
                         resource, threads.describe_current())
    if record.origin_loop is not None:
        record.origin_task = loops.describe_task(loops.current_task())
    _remember(record)
    return record


def record_of(obj: object) -> OwnerRecord | None:
    """The record of a tracked object (or proxy), or None."""
    try:
        record = object.__getattribute__(obj, "_sanitizer_record")
    except AttributeError:
        record = getattr(obj, "_sanitizer_record", None)
    if isinstance(record, OwnerRecord) and record.tracked:
        return record
    return None


def qualified_type(obj: object) -> str:
    """``module.Qualname`` of what the user sees as the object's type."""
    return qualified_name(type(obj))


def qualified_name(cls: type) -> str:
    cls = getattr(cls, "__sanitizer_public_type__", None) or cls
    module = cls.__module__
    if module in ("builtins", "__main__"):
        return str(cls.__qualname__)
    # The name users write: asyncio.Queue, not asyncio.queues.Queue; asyncio.Future, not
    # _asyncio.Future (the package re-exports its modules' and accelerator's types).
    package = module.lstrip("_").partition(".")[0]
    if package != module:
        public = sys.modules.get(package)
        if public is not None and getattr(public, cls.__qualname__, None) is cls:
            module = package
    return f"{module}.{cls.__qualname__}"


def invalidate_after_fork() -> None:
    """In a forked child, every inherited record is the parent's: guards see FORKED."""
    for ref in list(STATE.records):  # a copy: a record dying meanwhile changes the set
        record = ref()
        if record is not None:
            record.busy = FORKED
            record.inside = 0  # the parent's threads are not the child's
