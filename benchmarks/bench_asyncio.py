"""Overhead of the sanitizer on event-loop-heavy asyncio programs, as a ratio to plain runs.

Three workloads, each a whole ``asyncio.run`` (``uvloop.run`` under uvloop):

* ``queue``: 100,000 items through one bounded ``asyncio.Queue`` (maxsize 100)
  from 100 producer tasks to 100 consumer tasks, which call ``task_done()``; then
  ``queue.join()``. A fixed pool of workers on a bounded queue
  is how queues are used (crawlers, pipelines, fan-out to a connection pool),
  and the bound makes producers wait when consumers lag, so every item costs
  futures, wakeups and ``call_soon``: the loop's hot path. 100,000 one-item tasks
  would mostly measure making tasks, which ``tasks`` measures on its own.
* ``echo``: a loopback TCP echo server (``asyncio.start_server``) and 4 clients
  (``asyncio.open_connection``) making 20,000 round trips of a 64-byte message
  between them (write, drain, readexactly): streams, transports and the selector.
* ``tasks``: 100,000 ``asyncio.create_task`` of a trivial coroutine, then one
  ``gather`` of them all.

Each run is a process of its own, plain (the sanitizer off) or sanitized
(``sanitizer.enable()`` first, so with every default plugin, before the workload
makes its loop; an asyncio plugin is picked up as soon as it is one of them). It
warms up on a tenth of the workload, then times it 3 times and keeps the fastest
(the run least disturbed by the rest of the machine). A round is plain,
sanitized, plain again, the order reversing each round, as bench_pytest.py does:
each sanitized run is compared with the mean of the two plain runs around it
(slow drift of a shared machine cancels out) and the ratio is the median over
the rounds; the two identical plain runs compared with each other (an A/A
control, "noise") show how far timings wander in this same run. The plugins
enabled in the sanitized runs are printed, and which of them installed (their
library was imported).

    python benchmarks/bench_asyncio.py [--fast] [--rounds 7] [--loop asyncio|uvloop|both]
    python benchmarks/bench_asyncio.py --instructions [--loop ...]

``--instructions`` counts instructions with valgrind's callgrind instead of
timing: each workload, a tenth of the size and without warm-up, run once plain
and once sanitized, minus a run that only starts up (and enables the sanitizer,
for the sanitized count; that start-up is printed on its own): a count, not a
time, so the same however busy the machine is (on a shared 2-core machine
identical timing runs differ by more than a few percent).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import callgrind  # benchmarks/callgrind.py, beside this script

HERE = Path(__file__).resolve().parent
VARIANTS = ("plain", "sanitized")
REPEATS = 3
LOOPS = ("asyncio", "uvloop")
PRODUCERS = CONSUMERS = 100
QUEUE_SIZE = 100
CONNECTIONS = 4
MESSAGE = b"x" * 64
HOST = "127.0.0.1"
# Workload -> its size (items, round trips, tasks); --instructions runs a tenth.
SIZES = {"queue": 100_000, "echo": 20_000, "tasks": 100_000}
CALLGRIND_DIVISOR = 10


# -- the workloads (each returns a check value: what it moved) ---------------------------

async def queue_workload(items: int) -> int:
    queue: asyncio.Queue[int] = asyncio.Queue(maxsize=QUEUE_SIZE)
    consumed = [0]

    async def produce(start: int, stop: int) -> None:
        for item in range(start, stop):
            await queue.put(item)

    async def consume() -> None:
        while True:
            await queue.get()
            consumed[0] += 1
            queue.task_done()

    consumers = [asyncio.create_task(consume()) for _ in range(CONSUMERS)]
    share = -(-items // PRODUCERS)
    await asyncio.gather(*(produce(start, min(start + share, items))
                           for start in range(0, items, share)))
    await queue.join()
    for task in consumers:
        task.cancel()
    await asyncio.gather(*consumers, return_exceptions=True)
    return consumed[0]


async def echo_workload(round_trips: int) -> int:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def client(port: int, trips: int) -> int:
        reader, writer = await asyncio.open_connection(HOST, port)
        echoed = 0
        for _ in range(trips):
            writer.write(MESSAGE)
            await writer.drain()
            echoed += len(await reader.readexactly(len(MESSAGE))) == len(MESSAGE)
        writer.close()
        await writer.wait_closed()
        return echoed

    server = await asyncio.start_server(handle, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        share = -(-round_trips // CONNECTIONS)
        trips = [min(share, round_trips - start) for start in range(0, round_trips, share)]
        echoed = await asyncio.gather(*(client(port, n) for n in trips))
    return sum(echoed)


async def tasks_workload(tasks: int) -> int:
    async def trivial(i: int) -> int:
        return i

    done = await asyncio.gather(*[asyncio.create_task(trivial(i)) for i in range(tasks)])
    return len(done)


WORKLOADS: dict[str, Callable[[int], Coroutine[Any, Any, int]]] = {
    "queue": queue_workload, "echo": echo_workload, "tasks": tasks_workload}


def run_workload(loop: str, workload: str, size: int) -> int:
    coroutine = WORKLOADS[workload](size)
    if loop == "uvloop":
        import uvloop

        result: int = uvloop.run(coroutine)
        return result
    return asyncio.run(coroutine)


# -- one run, in a process of its own ---------------------------------------------------

def child(variant: str, loop: str, workload: str, size: int, repeats: int) -> None:
    """Warm up on a tenth, then time ``repeats`` runs of the workload; print the fastest as
    JSON. With ``repeats`` 1 (--instructions), no warm-up: one run. ``size`` 0 only
    starts up (and enables the sanitizer): the --instructions baseline."""
    import sanitizer

    if variant == "sanitized":
        sanitizer.enable(log_file=os.devnull)  # every default plugin, before any loop exists
    result: dict[str, Any] = {"seconds": 0.0}
    if size:
        if repeats > 1:
            run_workload(loop, workload, max(1, size // 10))
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            # Under callgrind (--instructions) only what runs inside call_tracing counts.
            moved = sys.call_tracing(run_workload, (loop, workload, size))
            timings.append(time.perf_counter() - start)
            if moved != size:
                sys.exit(f"{workload} under {loop}: moved {moved} of {size}")
        result["seconds"] = min(timings)
    if variant == "sanitized":
        # No public API lists them: the running Sanitizer's own list (read, not changed).
        from sanitizer import control

        running = control.running()
        assert running is not None
        result["plugins"] = [p.name for p in running.plugins]
        result["installed"] = sorted(p.name for p in running.plugins
                                     if any(m in sys.modules for m in p.hooks))
        result["violations"] = sum(v.count for v in sanitizer.violations())
    print(json.dumps(result))


def child_command(variant: str, loop: str, workload: str, size: int,
                  repeats: int = REPEATS) -> list[str]:
    return [sys.executable, str(HERE / "bench_asyncio.py"), "--child",
            variant, loop, workload, str(size), str(repeats)]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SANITIZE_THREADS", "PYTHONDONTWRITEBYTECODE"))}
    env["PYTHONHASHSEED"] = "0"
    return env


def run_child(variant: str, loop: str, workload: str, size: int) -> dict[str, Any]:
    done = subprocess.run(child_command(variant, loop, workload, size), env=child_env(),
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{variant} {workload} under {loop} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- timing -------------------------------------------------------------------------------

def timing(loops: list[str], rounds: int) -> None:
    print(f"{rounds} rounds of plain, sanitized, plain again (order reversing each round), "
          f"each the fastest of {REPEATS} runs in its process; Python {sys.version.split()[0]}")
    seen: dict[str, Any] = {}
    runs = ("plain", "sanitized", "plain again")
    for loop in loops:
        times: dict[tuple[str, str], list[float]] = {(w, r): [] for w in WORKLOADS for r in runs}
        for round_number in range(rounds):
            order = runs if round_number % 2 == 0 else runs[::-1]
            for workload in WORKLOADS:
                for name in order:
                    result = run_child(name.split()[0], loop, workload, SIZES[workload])
                    times[workload, name].append(result["seconds"])
                    if name == "sanitized":
                        seen = result
                        if result["violations"]:
                            print(f"  ! {workload} under {loop}: {result['violations']} "
                                  "violation(s) reported in a correct program")
        print(f"\n{loop} loop: seconds, medians over the rounds; ratio: sanitized / plain, "
              "noise: plain again / plain (medians of each round's)")
        print(f"  {'workload':<10}{'plain':>10}{'sanitized':>11}{'ratio':>9}{'noise':>9}")
        for workload in WORKLOADS:
            first, again = times[workload, "plain"], times[workload, "plain again"]
            sanitized = times[workload, "sanitized"]
            ratio = statistics.median(s / ((a + b) / 2)
                                      for s, a, b in zip(sanitized, first, again, strict=True))
            noise = statistics.median(b / a for a, b in zip(first, again, strict=True))
            print(f"  {workload:<10}{statistics.median(first + again):>9.3f}s"
                  f"{statistics.median(sanitized):>10.3f}s{ratio:>9.3f}{noise:>9.3f}")
    show_plugins(seen)


def show_plugins(result: dict[str, Any]) -> None:
    if not result:
        return
    print(f"\nsanitizer plugins enabled in the sanitized runs: {', '.join(result['plugins'])}; "
          f"installed (library imported): {', '.join(result['installed']) or 'none'}")
    if "asyncio" not in result["plugins"]:
        print("  (no asyncio plugin yet: the ratios measure the sanitizer's mere presence)")


# -- instructions ---------------------------------------------------------------------------

def count(run: tuple[str, str, str, int]) -> tuple[int, int]:
    """Instructions of one child process under callgrind: of the workload only (inside
    sys.call_tracing), or for the start-up baseline (size 0) of the whole process."""
    variant, loop, workload, size = run
    program = (f"import sys; sys.path.insert(0, {str(HERE)!r}); "
               "import bench_asyncio; bench_asyncio.main()")
    return callgrind.count(program, *child_command(variant, loop, workload, size, 1)[2:],
                           only_inside=callgrind.ONLY_CALL_TRACING if size else None)


def instructions(loops: list[str]) -> None:
    sizes = {w: n // CALLGRIND_DIVISOR for w, n in SIZES.items()}
    # The baseline only starts up (no loop is made): one per variant, for every loop.
    baselines = [(v, "asyncio", "queue", 0) for v in VARIANTS]
    runs = baselines + [(v, loop, w, n) for loop in loops for v in VARIANTS
                        for w, n in sizes.items()]
    start = time.perf_counter()
    counted = {run: found[0] for run, found in callgrind.all_of(runs, count).items()}
    print(f"Instructions per workload run (callgrind, inside the workload only: start-up, "
          f"which moves by millions between identical runs, is left out; "
          f"{time.perf_counter() - start:.0f} s)")
    for loop in loops:
        print(f"\n{loop} loop:")
        print(f"  {'workload':<22}{'plain':>14}{'sanitized':>14}{'ratio':>8}")
        base = {v: counted[v, "asyncio", "queue", 0] for v in VARIANTS}
        for workload, size in sizes.items():
            plain, sanitized = (counted[v, loop, workload, size] for v in VARIANTS)
            print(f"  {f'{workload} ({size:,})':<22}{plain:>14,}{sanitized:>14,}"
                  f"{sanitized / plain:>8.3f}")
        print(f"  {'start-up (no workload)':<22}{base['plain']:>14,}{base['sanitized']:>14,}"
              f"{base['sanitized'] / base['plain']:>8.3f}")
    show_plugins(run_child("sanitized", loops[0], "tasks", 1))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        variant, loop, workload, size, repeats = sys.argv[2:7]
        child(variant, loop, workload, int(size), int(repeats))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer rounds (3)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 7)")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions with valgrind (callgrind) instead of timing")
    parser.add_argument("--loop", choices=(*LOOPS, "both"), default="asyncio",
                        help="the event loop to run the workloads under (default asyncio)")
    args = parser.parse_args()
    if args.instructions and shutil.which("valgrind") is None:
        parser.error("--instructions needs valgrind (apt install valgrind)")
    loops = list(LOOPS) if args.loop == "both" else [args.loop]
    if "uvloop" in loops and importlib.util.find_spec("uvloop") is None:
        print("uvloop is not installed: its runs are skipped (pip install uvloop)")
        loops.remove("uvloop")
        if not loops:
            return
    if args.instructions:
        instructions(loops)
    else:
        timing(loops, args.rounds or (3 if args.fast else 7))


if __name__ == "__main__":
    main()
