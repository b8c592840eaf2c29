"""All of the sanitizer's global state, in one object, and the one fork handler that renews it.

As structlog keeps its configuration in ``_config.py``, every module reads and
writes its shared state here, and nowhere else. Two kinds live in it:

* **configuration**, which enable() and the plugins set up (the running
  sanitizer, the guards' sink, registered policies, thread describers,
  library prefixes, stack boundaries, import hooks): the running sanitizer
  saves it when it starts and restores it when it stops, so that disable() is
  the exact inverse of enable();
* **bookkeeping** of the process (thread tokens and their serials, the live
  owner records, the locks): it outlives any one sanitizer, and is renewed
  in a forked child.

Every lock the sanitizer makes is made through ``fork_safe``, so that the fork
handler reinitialises it in the child, as ``logging`` does with its handlers'
locks: a thread that held one at ``fork()`` (mid-report) does not exist there,
and would otherwise never release it.

Importing this module imports nothing else of the sanitizer.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

    from sanitizer.control import Sanitizer
    from sanitizer.loops import LoopToken, TaskSupport
    from sanitizer.ownership import OwnerRecord
    from sanitizer.policies import Policy, Sink
    from sanitizer.threads import ThreadDescriber, ThreadToken


_Lock = TypeVar("_Lock")
#: Every lock made by fork_safe (weakly: a dead reporter's goes with it).
_LOCKS: weakref.WeakSet[Any] = weakref.WeakSet()


def fork_safe(lock: _Lock) -> _Lock:
    """``lock`` (a threading.Lock or RLock), reinitialised in a forked child by the
    fork handler; every lock of the sanitizer and its plugins is made through it."""
    _LOCKS.add(lock)
    return lock


@dataclasses.dataclass
class Blocking:
    """Which kinds of blocking call on a running loop's thread are reported (``noblock``)."""

    #: Calls that wait on a server (network database drivers).
    network: bool = False
    #: Calls that work in-process (sqlite3, DuckDB): common and harmless in async code.
    local: bool = False


class State:
    """The process's sanitizer state; ``STATE`` is the only instance."""

    def __init__(self) -> None:
        # -- configuration: saved by Sanitizer.start, restored by Sanitizer.stop --
        self.running: Sanitizer | None = None
        self.lifecycle = fork_safe(threading.RLock())  # enable/disable
        #: Where guards report (the running sanitizer's Reporter.report), or None.
        self.sink: Sink | None = None
        #: Policies by name: the built-ins, and those of the running plugins.
        self.policies: dict[str, Policy] = {}
        #: Phrases about the current thread (plugins': e.g. its asgiref role).
        self.describers: list[ThreadDescriber] = []
        #: Path fragments of instrumented libraries: their frames are not "sites".
        self.library_prefixes: list[str] = []
        #: Directories of the program's runner (pytest): stack capture stops there.
        self.boundaries: list[str] = []
        #: Module name -> post-import hooks (wrapt's trampolines stay for the process).
        self.import_hooks: dict[str, list[Callable[[Any], None]]] = {}
        #: @thread_affine classes: the user's declarations, patched whenever one runs.
        self.affine_classes: weakref.WeakKeyDictionary[type, Policy] = (
            weakref.WeakKeyDictionary())
        #: What the event-loop plugin lends about its tasks (loops.TaskSupport), or None.
        self.tasks: TaskSupport | None = None
        #: Which blocking calls on a running loop's thread are reported (policies.NoBlock).
        self.noblock = Blocking()
        #: Plugins' "the library checked this blocking call itself" (Context.excuse_blocking).
        self.blocking_excuses: list[Callable[[], bool]] = []
        #: Accesses each new record keeps (the ``history`` option; 0: none).
        self.history = 0
        #: Per thread: the record that objects recorded now join (Context.deriving).
        self.deriving = threading.local()
        # -- caches of the above, cleared whenever it changes --
        self.kinds: dict[str, int] = {}  # file name -> stacks.USER/INTERNAL/BOUNDARY
        self.library_cache: dict[str, bool] = {}  # file name -> a library's?
        # -- bookkeeping of the process --
        self.local: Any = None  # the threads module's token local (hot path)
        self.serials = itertools.count(1)  # thread serials, never reused: T0 is main
        self.tokens: weakref.WeakValueDictionary[int, ThreadToken] = (
            weakref.WeakValueDictionary())  # live tokens by thread ident
        #: Weak references to the live owner records, for marking after fork: each
        #: one's callback is this set's discard (ownership._remember).
        self.records: set[weakref.ref[OwnerRecord]] = set()
        self.loop_serials = itertools.count(1)  # loop serials, never reused (L1, L2 ...)
        self.loop_tokens: weakref.WeakKeyDictionary[Any, LoopToken] = (
            weakref.WeakKeyDictionary())
        self.loop_lock = fork_safe(threading.Lock())
        #: Held while the reporter imports structlog (its first event): a child forked
        #: meanwhile cannot import it (Reporter.reset_after_fork).
        self.importing = fork_safe(threading.Lock())

    def save(self) -> dict[str, Any]:
        """A copy of the configuration, for restore()."""
        return {"sink": self.sink, "policies": dict(self.policies),
                "describers": list(self.describers),
                "library_prefixes": list(self.library_prefixes),
                "boundaries": list(self.boundaries), "tasks": self.tasks,
                "noblock": dataclasses.astuple(self.noblock),
                "blocking_excuses": list(self.blocking_excuses), "history": self.history}

    def restore(self, saved: dict[str, Any]) -> None:
        """Put the configuration back as save() found it."""
        self.sink = saved["sink"]
        self.policies = saved["policies"]
        self.describers = saved["describers"]
        self.library_prefixes = saved["library_prefixes"]
        self.boundaries = saved["boundaries"]
        self.tasks = saved["tasks"]
        # In place: guards hold the object.
        self.noblock.network, self.noblock.local = saved["noblock"]
        self.blocking_excuses = saved["blocking_excuses"]
        self.history = saved["history"]
        self.kinds.clear()
        self.library_cache.clear()

    def configuration(self) -> dict[str, Any]:
        """What a test compares to see that nothing was left behind."""
        return {**self.save(), "running": self.running,
                "import_hooks": {k: list(v) for k, v in self.import_hooks.items() if v}}


STATE = State()


def _after_fork_in_child() -> None:
    """The one fork handler: renew the child's state, in dependency order."""
    import_cut_short = STATE.importing.locked()
    # First: whatever follows may take one. The parent's threads that held them
    # (a report half-written, a record list half-pruned) are gone in the child.
    for lock in list(_LOCKS):
        lock._at_fork_reinit()
    modules = sys.modules
    threads = modules.get("sanitizer.threads")
    if threads is not None:
        threads.renew_after_fork()  # first: the others ask for the current token
    loops = modules.get("sanitizer.loops")
    if loops is not None:
        loops.renew_after_fork()
    ownership = modules.get("sanitizer.ownership")
    if ownership is not None:
        ownership.invalidate_after_fork()
    if STATE.running is not None:
        STATE.running.renew_after_fork(import_cut_short)


os.register_at_fork(after_in_child=_after_fork_in_child)
