"""Overhead of a checked asyncpg call, ``await conn.fetchval("SELECT 1")``, against plain asyncpg.

A throwaway PostgreSQL is started the way the test suite starts it
(tests/dbservers.py, imported). Three variants, each in a worker process of its
own that keeps one connection: ``raw`` (the sanitizer off: nothing patched),
``asyncio`` (the sanitizer on without the asyncpg plugin: the loop's own checks
only, the connection untracked) and ``tracked`` (everything on: the connection's
task guard too). The workers take turns, round after round, so that the load of
the machine falls on all of them alike; each round is compared with raw's round of the
same turn, and the median of those ratios is the result.

    python benchmarks/bench_asyncpg.py                # 600 rounds of 200 calls
    python benchmarks/bench_asyncpg.py --rounds 2000 --calls 100
    python benchmarks/bench_asyncpg.py --instructions

``--instructions`` counts instructions per call with valgrind's callgrind instead
of timing (a program making N calls minus one making none, divided by N): the same
however busy the machine is. Only the client is counted; the server is not
under valgrind.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import callgrind  # benchmarks/callgrind.py, beside this script

VARIANTS = ("raw", "asyncio", "tracked")
QUERY = "SELECT 1"

# One variant's client: connects, then runs a round of N calls per line read, and
# answers with the nanoseconds it took.
WORKER = """
import asyncio, os, sys, time
variant = sys.argv[1]
if variant != "raw":
    import sanitizer
    sanitizer.enable(log_file=os.devnull,
                     **({"plugins": "-asyncpg"} if variant == "asyncio" else {}))
import asyncpg
from sanitizer.plugin import record_of
QUERY = "SELECT 1"

async def main():
    conn = await asyncpg.connect(os.environ["BENCH_DSN"])
    assert (record_of(conn) is not None) == (variant == "tracked"), variant
    fetchval = conn.fetchval
    for _ in range(200):  # warm up: statement cache, codecs
        await fetchval(QUERY)
    print("ready", flush=True)
    for line in sys.stdin:
        calls = int(line)
        start = time.perf_counter_ns()
        for _ in range(calls):
            await fetchval(QUERY)
        print(time.perf_counter_ns() - start, flush=True)
    await conn.close()

asyncio.run(main())
"""

# The same for callgrind: CALLS calls, then exit.
COUNTED = """
import asyncio, os, sys
variant, calls = sys.argv[1], int(sys.argv[2])
if variant != "raw":
    import sanitizer
    sanitizer.enable(log_file=os.devnull,
                     **({"plugins": "-asyncpg"} if variant == "asyncio" else {}))
import asyncpg
from sanitizer.plugin import record_of
QUERY = "SELECT 1"

async def main():
    conn = await asyncpg.connect(os.environ["BENCH_DSN"])
    assert (record_of(conn) is not None) == (variant == "tracked"), variant
    fetchval = conn.fetchval
    for _ in range(50):
        await fetchval(QUERY)
    for _ in range(calls):
        await fetchval(QUERY)
    await conn.close()

asyncio.run(main())
"""


@contextmanager
def postgresql() -> Iterator[str]:
    """A throwaway server, started by tests/dbservers.py's own code; its DSN."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import dbservers  # the test suite's helper (tests/ is on the path only from here)

    server = dbservers.postgresql_server.__wrapped__()  # the fixture's generator
    try:
        yield next(server).dsn
    finally:
        next(server, None)  # the fixture's teardown: stops the server, removes its files


def timed(rounds: int, calls: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    workers = {v: subprocess.Popen([sys.executable, "-c", WORKER, v],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                   env=env, cwd=tempfile.gettempdir())
               for v in VARIANTS}
    per_call: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for worker in workers.values():
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        for index in range(rounds):
            # Turns rotate: no variant always runs first (or after the same neighbour).
            order = VARIANTS[index % 3:] + VARIANTS[:index % 3]
            for variant in order:
                worker = workers[variant]
                assert worker.stdin is not None and worker.stdout is not None
                worker.stdin.write(f"{calls}\n")
                worker.stdin.flush()
                per_call[variant].append(int(worker.stdout.readline()) / calls)
    finally:
        for worker in workers.values():
            if worker.stdin is not None:
                worker.stdin.close()
            worker.wait(60)
    print(f"await conn.fetchval({QUERY!r}) over loopback, {rounds} rounds of {calls:,} "
          "calls: median per call, and the median ratio to raw's round of the same turn "
          "(quartiles):")
    base = statistics.median(per_call["raw"])
    for variant in VARIANTS:
        value = statistics.median(per_call[variant])
        # Against the raw round next to it in time: the machine's load changes slowly.
        ratios = [t / r for t, r in zip(per_call[variant], per_call["raw"], strict=True)]
        spread = statistics.quantiles(ratios, n=4)
        print(f"  {variant:<8} {value / 1000:7.2f} us  +{(value - base) / 1000:5.2f} us  "
              f"x{statistics.median(ratios):.3f} ({spread[0]:.3f}-{spread[2]:.3f})")


def instructions(calls: int) -> None:
    def count(run: tuple[str, int]) -> tuple[int, int]:
        variant, n = run
        return callgrind.count(COUNTED, variant, str(n))

    runs = [(v, n) for v in VARIANTS for n in (0, calls)]
    counted = {run: found[0] for run, found in callgrind.all_of(runs, count).items()}
    per_call = {v: (counted[v, calls] - counted[v, 0]) / calls for v in VARIANTS}
    base = per_call["raw"]
    print(f"await conn.fetchval({QUERY!r}): client instructions per call (callgrind; "
          f"{calls:,} calls minus none):")
    for variant in VARIANTS:
        print(f"  {variant:<8} {per_call[variant]:9.0f}  +{per_call[variant] - base:6.0f}  "
              f"x{per_call[variant] / base:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions with callgrind instead of timing")
    args = parser.parse_args()
    with postgresql() as dsn:
        os.environ["BENCH_DSN"] = dsn  # for the workers: never on a command line
        if args.instructions:
            instructions(min(args.calls, 2000))
        else:
            timed(args.rounds, args.calls)


if __name__ == "__main__":
    main()
