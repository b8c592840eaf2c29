"""The task policy's span notes: a TASK guard's exit takes its own note only, so a span
that outlasts its call (an open transaction's, opened beneath a Session's guard) stays
noted for the helper tasks the holder starts later."""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import Sanitized
from support import tracked

from sanitizer import ownership, policies


class Thing:
    """A stand-in for an object with an async operation (an AsyncSession's execute)."""

    async def op(self, keep: ownership.OwnerRecord | None = None) -> None:
        if keep is not None:  # as a driver's plugin notes a transaction it opens here
            policies.SPANS.set((keep, asyncio.current_task(), policies.SPANS.get()))


def test_a_note_kept_inside_a_guard_outlives_the_guard(sanitized: Sanitized) -> None:
    guarded = policies.TASK_POLICY.guard(Thing.op, "op")
    outer, kept = Thing(), Thing()
    outer._sanitizer_record = ownership.new_record(policies.TASK_POLICY, outer)  # type: ignore[attr-defined]
    kept_record = ownership.new_record(policies.TASK_POLICY, kept)

    async def main() -> Any:
        holder = asyncio.current_task()
        await guarded(outer, kept_record)
        span = policies.SPANS.get()
        assert span is not None and span[:2] == (kept_record, holder) and span[2] is None
        assert tracked(outer).task is None  # the guard's own span ended

        async def helper() -> bool:
            return policies._helper_of(kept_record, holder)

        await guarded(outer)  # a span whose note is on top still resets as before
        assert policies.SPANS.get() is span
        return await asyncio.create_task(helper())

    assert asyncio.run(main()) is True
    assert sanitized.records() == []
