"""Who is inside an exclusive object's calls: claims on a record, atomic without the GIL.

A record's ``busy`` is the first thread inside a call (None when idle); ``inside``
counts the other calls in progress, each of which overlapped someone. When the first
thread leaves while others are inside, it leaves CROWD behind, so that whoever enters
next still sees that it overlaps them; the last of them to leave makes it idle. So
every entry made while another call is inside is seen, however many overlap.

Under the GIL on 3.11+ the guards do these steps inline: nothing in them lets another
thread run or a signal handler raise between a read and the write after it. Elsewhere
(free-threaded builds; 3.10, whose eval loop may switch threads between any two
steps) they call ``claim`` and ``release``: the C core's (_speedups.Claims, one
critical section on the record each), or the locked Python ones below.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

from sanitizer import threads
from sanitizer.ownership import CROWD, OwnerRecord
from sanitizer.state import fork_safe

#: Whether guards claim through ``claim``/``release`` rather than inline.
CALLED = threads.FREE_THREADED or sys.version_info < (3, 11)


class _Claims:
    """The Python version of _speedups.Claims (the same contract, under one lock)."""

    def __init__(self) -> None:
        self._lock = fork_safe(threading.Lock())

    def claim(self, record: OwnerRecord, me: threads.ThreadToken) -> object:
        """None if ``me`` is now the first inside; else who is (a thread, or CROWD), with
        this call counted in ``inside``."""
        with self._lock:
            holder = record.busy
            if holder is None:
                record.busy = me
            else:
                record.inside += 1
            return holder

    def release(self, record: OwnerRecord, me: threads.ThreadToken) -> None:
        """The end of a call that ``claim`` let in."""
        with self._lock:
            if record.busy is me:
                record.busy = CROWD if record.inside else None
            elif record.inside > 0:
                record.inside -= 1
                if not record.inside and record.busy is CROWD:
                    record.busy = None


def _claims() -> _Claims:
    if threads.CORE == "c":
        from sanitizer import _speedups  # type: ignore[attr-defined]

        slots = vars(OwnerRecord)  # the member descriptors of its __slots__
        c: _Claims = _speedups.Claims(OwnerRecord, slots["busy"], slots["inside"], CROWD)
        return c
    return _Claims()


CLAIMS = _claims()
claim: Callable[[OwnerRecord, threads.ThreadToken], object] = CLAIMS.claim
release: Callable[[OwnerRecord, threads.ThreadToken], None] = CLAIMS.release
