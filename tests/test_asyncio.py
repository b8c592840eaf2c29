"""The asyncio plugin: objects belong to their loop and its thread; what is allowed is silent."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from conftest import Sanitized
from support import found, line_of, line_of_file, run_program, started, tracked

import sanitizer

HERE = str(Path(__file__).resolve())


def in_worker(target: Callable[[], Any]) -> dict[str, Any]:
    """Run ``target`` in a plain thread (no loop there) and wait; its result or error."""
    thread, outcome = started(target, "worker")
    thread.join(10)
    assert not thread.is_alive()
    return outcome


def run(coroutine: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(coroutine())


# -- from a thread that is not the loop's ---------------------------------------------------


class TestFromAnotherThread:
    def test_a_future_completed_from_a_thread_names_its_waiting_task(
            self, sanitized: Sanitized) -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()

            async def waiter() -> Any:
                return await fut  # waits here

            task = asyncio.ensure_future(waiter())
            await asyncio.sleep(0)  # the waiter now waits: fut has its wakeup callback
            in_worker(lambda: fut.set_result(1))  # completed off the loop's thread
            loop.call_soon_threadsafe(lambda: None)  # wake the selector, as CPython cannot
            assert await task == 1

        run(main)
        (record,) = sanitized.records()
        assert (record["policy"], record["object_type"], record["operation"]) == (
            "loop", "asyncio.Future", "set_result")
        assert record["thread"]["name"] == "worker"
        assert record["owner_loop"]["state"] == "running"
        assert record["owner_loop"]["thread"]["name"] == "MainThread"
        assert record["holder_task"]["coroutine"].endswith("waiter")
        assert record["holder_stack"][0]["line"] == line_of_file(HERE, "# waits here")
        assert record["after_the_fact"] is True
        assert "call_soon_threadsafe(fut.set_result" in record["hint"]

    def test_after_the_fact_is_reported_but_never_raised(self, enable: Any) -> None:
        log = enable(action="log+raise")

        async def main() -> Any:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            task = asyncio.ensure_future(asyncio.shield(fut))
            await asyncio.sleep(0)
            outcome = in_worker(lambda: fut.set_result(2))
            loop.call_soon_threadsafe(lambda: None)
            return outcome, await task

        outcome, value = run(main)
        assert "error" not in outcome and value == 2  # raising would have hung the waiter
        assert [r["operation"] for r in log.records()] == ["set_result"]

    def test_a_bound_queue_fed_from_a_thread_is_refused_before_it_changes(
            self, enable: Any) -> None:
        enable(action="log+raise")

        async def main() -> None:
            queue: asyncio.Queue[int] = asyncio.Queue()
            getter = asyncio.ensure_future(queue.get())  # binds the queue to this loop
            await asyncio.sleep(0)
            outcome = in_worker(lambda: queue.put_nowait(1))  # put from thread
            assert isinstance(outcome.get("error"), sanitizer.ThreadAffinityError)
            assert queue.qsize() == 0  # refused before the state changed
            queue.put_nowait(2)
            assert await getter == 2

        run(main)
        (violation,) = sanitizer.violations()
        assert (violation.policy, violation.operation) == ("loop", "put_nowait")
        event = violation.event()
        assert event["owner_loop"]["state"] == "running"
        assert event["bound_task"]["name"]  # bound when the getter first waited
        assert event["bound_stack"]
        assert "belongs to event loop L" in violation.message

    def test_event_set_and_loop_methods_from_a_thread(self, sanitized: Sanitized) -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            event = asyncio.Event()
            waiter = asyncio.ensure_future(event.wait())
            await asyncio.sleep(0)
            in_worker(event.set)
            in_worker(lambda: loop.call_soon(print))
            in_worker(lambda: loop.call_later(5, print).cancel())
            loop.call_soon_threadsafe(lambda: None)
            await waiter

        run(main)
        assert sorted(found()) == [("loop", "call_later"), ("loop", "call_soon"),
                                   ("loop", "set")]

    def test_call_soon_from_a_thread_raises_before_scheduling(self, enable: Any) -> None:
        enable(action="log+raise")
        called: list[int] = []

        async def main() -> None:
            loop = asyncio.get_running_loop()
            outcome = in_worker(lambda: loop.call_soon(called.append, 1))
            assert isinstance(outcome.get("error"), sanitizer.ThreadAffinityError)
            await asyncio.sleep(0)

        run(main)
        assert called == []
        assert found() == [("loop", "call_soon")]

    def test_create_task_from_a_thread_names_the_line(self, tmp_path: Path) -> None:
        source = """
            import asyncio, threading

            async def job():
                return 1

            async def main():
                loop = asyncio.get_running_loop()
                def worker():
                    loop.create_task(job())  # wrong thread
                thread = threading.Thread(target=worker, name="worker")
                thread.start()
                thread.join()
                loop.call_soon_threadsafe(lambda: None)
                await asyncio.sleep(0)

            asyncio.run(main())  # loop made
        """
        proc, records = run_program(tmp_path, source)
        assert proc.returncode == 0, proc.stderr
        (record,) = records
        assert (record["policy"], record["operation"]) == ("loop", "create_task")
        user = [f for f in record["access_stack"] if f["file"].endswith("app.py")]
        assert user[0]["line"] == line_of(source, "wrong thread")
        assert record["owner_loop"]["created"].endswith(f"app.py:{line_of(source, 'loop made')}"
                                                        " in <module>")
        assert record["owner_loop"]["serial"] == 1
        assert "event loop L1" in record["message"]
        assert "thread-affinity (loop)" in proc.stderr  # the exit summary


# -- under another loop ---------------------------------------------------------------------


class TestUnderAnotherLoop:
    def test_a_lock_bound_in_one_run_used_in_the_next_even_uncontended(
            self, sanitized: Sanitized) -> None:
        lock = asyncio.Lock()  # module-level style

        async def contend() -> None:
            async def hold() -> None:
                async with lock:
                    await asyncio.sleep(0)
            await asyncio.gather(hold(), hold())  # the second waits: binds the lock

        run(contend)

        async def again() -> None:
            async with lock:  # uncontended: CPython would not raise here
                pass

        run(again)
        record = sanitized.records()[0]
        assert (record["policy"], record["operation"]) == ("loop", "acquire")
        assert record["owner_loop"]["state"] == "closed"
        assert record["loop"]["state"] == "running"
        assert record["loop"]["serial"] > record["owner_loop"]["serial"]
        assert record["task"]["coroutine"].endswith("again")
        assert record["bound_task"]["coroutine"].endswith("hold")
        assert "is bound to event loop L" in record["message"]

    def test_a_module_level_lock_in_a_second_asyncio_run(self, tmp_path: Path) -> None:
        source = """
            import asyncio

            LOCK = asyncio.Lock()  # made at import

            async def worker():
                async with LOCK:  # used here
                    await asyncio.sleep(0)

            async def main():
                await asyncio.gather(worker(), worker())

            asyncio.run(main())
            try:
                asyncio.run(main())
            except RuntimeError as exc:
                print(exc)  # asyncio notices only when the lock is contended
        """
        proc, records = run_program(tmp_path, source)
        assert proc.returncode == 0, proc.stderr
        assert "is bound to a different event loop" in proc.stdout  # after our report
        record = records[0]
        assert (record["policy"], record["object_type"], record["operation"]) == (
            "loop", "asyncio.Lock", "acquire")
        assert record["creation_stack"][0]["line"] == line_of(source, "made at import")
        user = [f for f in record["access_stack"] if f["file"].endswith("app.py")]
        assert user[0]["line"] == line_of(source, "used here")
        assert (record["owner_loop"]["serial"], record["owner_loop"]["state"]) == (1, "closed")
        assert (record["loop"]["serial"], record["loop"]["state"]) == (2, "running")
        assert record["task"]["coroutine"] == "worker"
        assert record["bound_task"]["coroutine"] == "worker"

    def test_a_queue_of_one_thread_s_loop_used_under_another_thread_s_loop(
            self, sanitized: Sanitized) -> None:
        ready, done = threading.Event(), threading.Event()
        holder: dict[str, Any] = {}

        def owner() -> None:
            async def main() -> None:
                queue: asyncio.Queue[int] = asyncio.Queue()
                holder["getter"] = asyncio.ensure_future(queue.get())
                await asyncio.sleep(0)  # bound now
                holder["queue"] = queue
                ready.set()
                while not done.is_set():
                    await asyncio.sleep(0.001)
                holder["getter"].cancel()
            asyncio.run(main())

        thread = threading.Thread(target=owner, name="owner")
        thread.start()
        assert ready.wait(10)

        async def intruder() -> None:
            holder["queue"].put_nowait(1)

        try:
            run(intruder)
        finally:
            done.set()
            thread.join(10)
        assert found() == [("loop", "put_nowait")]
        record = sanitized.records()[0]
        assert record["owner_loop"]["thread"]["name"] == "owner"


# -- what is allowed ------------------------------------------------------------------------


class TestAllowed:
    def test_the_thread_safe_entry_points(self, sanitized: Sanitized) -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            tracked(loop)
            queue: asyncio.Queue[int] = asyncio.Queue()
            getter = asyncio.ensure_future(queue.get())
            await asyncio.sleep(0)
            assert tracked(queue).loop is not None  # bound: a put from a thread would count

            def worker() -> None:
                loop.call_soon_threadsafe(queue.put_nowait, 1)
                # A coroutine made in this thread, run on the loop:
                asyncio.run_coroutine_threadsafe(queue.put(2), loop).result(10)

            await loop.run_in_executor(None, worker)
            assert await getter == 1
            assert await queue.get() == 2
            fut = asyncio.wrap_future(loop.run_in_executor(None, lambda: 3))
            assert await fut == 3
            assert await asyncio.to_thread(lambda: 4) == 4

        run(main)
        assert sanitized.records() == []

    def test_setup_before_the_loop_thread_starts_and_teardown_after_it_stops(
            self, sanitized: Sanitized) -> None:
        loop = asyncio.new_event_loop()
        tracked(loop)
        queue: asyncio.Queue[int] = asyncio.Queue()
        started = threading.Event()
        loop.call_soon(started.set)  # before the loop runs: setup
        task = loop.create_task(queue.get())
        task.add_done_callback(lambda _: loop.stop())
        thread = threading.Thread(target=loop.run_forever, name="loop")
        thread.start()
        assert started.wait(10)
        loop.call_soon_threadsafe(queue.put_nowait, 5)
        thread.join(10)
        assert tracked(queue).loop is not None
        assert task.result() == 5
        queue.put_nowait(6)  # after it stopped: teardown
        assert queue.get_nowait() == 6
        loop.run_until_complete(asyncio.sleep(0))  # and it may run again, here
        loop.close()
        assert sanitized.records() == []

    def test_primitives_used_on_their_own_loop_and_unbound_ones_anywhere(
            self, sanitized: Sanitized) -> None:
        async def main() -> None:
            lock, event, cond = asyncio.Lock(), asyncio.Event(), asyncio.Condition()
            sem, queue = asyncio.BoundedSemaphore(2), asyncio.Queue()  # type: ignore[var-annotated]
            for obj in (lock, event, cond, sem, queue):
                tracked(obj)
            async with lock:
                pass
            async with cond:
                cond.notify_all()
            async with sem:
                await queue.put(1)
                assert await queue.get() == 1
            event.set()
            await event.wait()
            waiter = asyncio.ensure_future(event.wait())
            event.clear()
            await asyncio.sleep(0)
            event.set()
            await waiter
            assert tracked(event).loop is not None

        run(main)
        lock = asyncio.Lock()  # never bound: a plain thread may use it
        in_worker(lambda: lock.locked())
        assert sanitized.records() == []

    def test_reads_are_not_checked(self, sanitized: Sanitized) -> None:
        async def main() -> None:
            queue: asyncio.Queue[int] = asyncio.Queue()
            event = asyncio.Event()
            getter = asyncio.ensure_future(queue.get())
            waiter = asyncio.ensure_future(event.wait())
            await asyncio.sleep(0)
            assert tracked(queue).loop is not None and tracked(event).loop is not None
            assert in_worker(lambda: (queue.qsize(), queue.empty(), event.is_set()))[
                "value"] == (0, True, False)
            event.set()
            queue.put_nowait(0)
            await asyncio.gather(getter, waiter)

        run(main)
        assert sanitized.records() == []

    def test_nest_asyncio_re_entry(self, tmp_path: Path) -> None:
        pytest.importorskip("nest_asyncio")
        # In its own process: nest_asyncio patches asyncio for good.
        source = """
            import asyncio, nest_asyncio
            from sanitizer.ownership import record_of

            loop = asyncio.new_event_loop()
            nest_asyncio.apply(loop)

            async def inner():
                queue = asyncio.Queue()
                getter = asyncio.ensure_future(queue.get())
                await asyncio.sleep(0)
                assert record_of(queue).loop is not None
                queue.put_nowait(7)
                return await getter

            async def outer():
                assert record_of(loop) is not None
                return loop.run_until_complete(inner())  # re-entered, as Jupyter does

            print(loop.run_until_complete(outer()))
            loop.close()
        """
        proc, records = run_program(tmp_path, source)
        assert (proc.returncode, proc.stdout.strip()) == (0, "7"), proc.stderr
        assert records == []

    def test_finalization_on_another_thread(self, sanitized: Sanitized) -> None:
        class Closer:
            def __init__(self, queue: asyncio.Queue[int]) -> None:
                self.queue = queue

            def __del__(self) -> None:
                self.queue.put_nowait(0)

        async def main() -> None:
            queue: asyncio.Queue[int] = asyncio.Queue()
            getter = asyncio.ensure_future(queue.get())
            await asyncio.sleep(0)
            assert tracked(queue).loop is not None
            box = [Closer(queue)]

            def drop() -> None:
                box.clear()  # the last reference dies here: __del__ runs on this thread
                gc.collect()

            in_worker(drop)
            getter.cancel()

        run(main)
        assert sanitized.records() == []

    def test_coroutines_made_in_a_thread_and_awaited_on_the_loop(
            self, sanitized: Sanitized) -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[int] = asyncio.Queue()
            getter = asyncio.ensure_future(queue.get())
            await asyncio.sleep(0)
            assert tracked(queue).loop is not None
            made = in_worker(lambda: queue.put(3))["value"]  # not awaited here
            await made  # awaited on the loop: fine
            assert await getter == 3
            assert loop is asyncio.get_running_loop()

        run(main)
        assert sanitized.records() == []


# -- other loops and backends ---------------------------------------------------------------


class TestOtherLoops:
    def test_uvloop_still_sees_primitives_used_from_a_thread(self, sanitized: Sanitized) -> None:
        uvloop = pytest.importorskip("uvloop")

        async def main() -> None:
            queue: asyncio.Queue[int] = asyncio.Queue()
            getter = asyncio.ensure_future(queue.get())
            await asyncio.sleep(0)
            assert tracked(queue).loop is not None
            in_worker(lambda: queue.put_nowait(1))
            queue.put_nowait(2)  # the control: from the loop's thread
            await getter

        uvloop.run(main())
        assert found() == [("loop", "put_nowait")]

    def test_uvloop_correct_use_is_silent(self, sanitized: Sanitized) -> None:
        uvloop = pytest.importorskip("uvloop")

        async def main() -> None:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[int] = asyncio.Queue()
            getter = asyncio.ensure_future(queue.get())
            await asyncio.sleep(0)
            assert tracked(queue).loop is not None
            await loop.run_in_executor(None, loop.call_soon_threadsafe, queue.put_nowait, 1)
            assert await getter == 1

        uvloop.run(main())
        assert sanitized.records() == []

    def test_anyio_on_trio_takes_no_part(self, sanitized: Sanitized) -> None:
        anyio = pytest.importorskip("anyio")
        pytest.importorskip("trio")

        async def main() -> int:
            lock, event = anyio.Lock(), anyio.Event()
            send, receive = anyio.create_memory_object_stream[int](1)
            async with lock:
                await send.send(1)
            result = await anyio.to_thread.run_sync(lambda: 2)
            event.set()
            await event.wait()
            return int(await receive.receive()) + result

        assert anyio.run(main, backend="trio") == 3
        assert sanitized.records() == []
        assert sanitizer.is_enabled()


def test_the_noblock_option_is_checked(enable: Any) -> None:
    with pytest.raises(sanitizer.ConfigError, match=r"asyncio\.noblock='sometimes'"):
        enable(**{"asyncio.noblock": "sometimes"})


def test_call_soon_with_a_pending_future_from_a_thread_is_a_plain_call_soon(
        sanitized: Sanitized) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        pending = loop.create_future()
        in_worker(lambda: loop.call_soon(print, pending))  # not a completion: no crash
        loop.call_soon_threadsafe(lambda: None)
        pending.cancel()

    run(main)
    assert found() == [("loop", "call_soon")]


def test_where_methods_cannot_be_copied_wrappers_check_the_same(
        enable: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from sanitizer import inline

    monkeypatch.setattr(inline, "with_prologue", lambda *args: None)  # no source, say
    enable(action="log+raise")
    called: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int] = asyncio.Queue()
        getter = asyncio.ensure_future(queue.get())
        await asyncio.sleep(0)
        assert tracked(queue).loop is not None  # bound through the wrapped _get_loop
        outcome = in_worker(lambda: loop.call_soon(called.append, 1))
        assert isinstance(outcome.get("error"), sanitizer.ThreadAffinityError)
        loop.call_soon_threadsafe(queue.put_nowait, 2)  # the way across: silent
        assert await getter == 2

    run(main)
    assert called == []
    assert found() == [("loop", "call_soon")]


# -- objects made before the sanitizer was on -----------------------------------------------


def test_a_loop_and_queue_made_before_enabling_run_unchecked(tmp_path: Path) -> None:
    """They have no record (asyncio's classes are patched later): nothing breaks, nothing
    is reported for them, and what is made afterwards is checked (the positive control)."""
    if sanitizer.is_enabled():
        sanitizer.disable()
    loop = asyncio.new_event_loop()
    queue: asyncio.Queue[int] = asyncio.Queue()
    lock = asyncio.Lock()
    sanitizer.enable(log_file=str(tmp_path / "violations.jsonl"))
    try:
        async def use() -> int:
            async with lock:
                queue.put_nowait(1)
                loop.call_soon(lambda: None)
                return await queue.get()

        assert loop.run_until_complete(use()) == 1
        in_worker(lambda: queue.put_nowait(2))  # off the loop's thread, but untracked
        assert sanitizer.violations() == []

        async def late() -> int:
            made: asyncio.Queue[int] = asyncio.Queue()
            getter = asyncio.ensure_future(made.get())
            await asyncio.sleep(0)  # the getter waits: asyncio bound the queue to the loop
            assert tracked(made).loop is not None
            in_worker(lambda: made.put_nowait(2))  # reported
            loop.call_soon_threadsafe(lambda: None)
            return await getter

        assert loop.run_until_complete(late()) == 2
        assert [v.operation for v in sanitizer.violations()] == ["put_nowait"]
    finally:
        loop.close()
        sanitizer.disable()
