"""Overhead of a checked async database call over asyncpg, against the same call unchecked.

Two calls (``--call``): asyncpg's own ``await conn.fetchval("SELECT 1")``, and
SQLAlchemy's ``await session.execute(text("SELECT 1"))`` on an AsyncSession over
asyncpg (``session``; its ``tracked`` variant checks the session, the
AsyncConnection beneath and the asyncpg connection).

A throwaway PostgreSQL is started the way the test suite starts it
(tests/dbservers.py, imported). Three variants, each in a worker process of its
own that keeps one connection: ``raw`` (the sanitizer off: nothing patched),
``asyncio`` (the sanitizer on without the asyncpg and SQLAlchemy plugins: the
loop's own checks only, the connection untracked) and ``tracked`` (everything on: the connection's
task guard too). The workers take turns, round after round, so that the load of
the machine falls on all of them alike; each round is compared with raw's round of the
same turn, and the median of those ratios is the result.

    python benchmarks/bench_asyncpg.py                # 600 rounds of 200 calls
    python benchmarks/bench_asyncpg.py --rounds 2000 --calls 100
    python benchmarks/bench_asyncpg.py --instructions [--calls 1000] [--repeats 3]
    python benchmarks/bench_asyncpg.py --instructions --call session

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
# What one call is, by --call: asyncpg's own fetchval on one connection, or an
# SQLAlchemy AsyncSession's execute over asyncpg (one session, kept open).
SETUP = """
import asyncio, os, sys, time
variant, call = sys.argv[1], sys.argv[2]
if variant != "raw":
    import sanitizer
    sanitizer.enable(log_file=os.devnull,
                     **({"plugins": "-asyncpg+-sqlalchemy"} if variant == "asyncio" else {}))
import asyncpg
from sanitizer.plugin import record_of
QUERY = "SELECT 1"

async def connect():
    if call == "fetchval":
        conn = await asyncpg.connect(os.environ["BENCH_DSN"])
        assert (record_of(conn) is not None) == (variant == "tracked"), variant
        return conn.fetchval, conn.close
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
    dsn = os.environ["BENCH_DSN"].replace("postgresql://", "postgresql+asyncpg://", 1)
    engine = create_async_engine(dsn)
    session = AsyncSession(engine)
    assert (record_of(session) is not None) == (variant == "tracked"), variant
    statement = text(QUERY)

    async def execute(_query):
        return (await session.execute(statement)).scalar()

    async def close():
        await session.close()
        await engine.dispose()
    return execute, close
"""

# One variant's client: connects, then runs a round of N calls per line read, and
# answers with the nanoseconds it took.
WORKER = SETUP + """
async def main():
    fetchval, close = await connect()
    for _ in range(200):  # warm up: statement cache, codecs
        await fetchval(QUERY)
    print("ready", flush=True)
    for line in sys.stdin:
        calls = int(line)
        start = time.perf_counter_ns()
        for _ in range(calls):
            await fetchval(QUERY)
        print(time.perf_counter_ns() - start, flush=True)
    await close()

asyncio.run(main())
"""

# The same for callgrind: CALLS calls, then exit.
COUNTED = SETUP + """
calls = int(sys.argv[3])

async def main():
    fetchval, close = await connect()
    for _ in range(50):
        await fetchval(QUERY)
    for _ in range(calls):
        await fetchval(QUERY)
    await close()

asyncio.run(main())
"""

CALLS = {"fetchval": f"await conn.fetchval({QUERY!r})",
         "session": f"await session.execute(text({QUERY!r})) (AsyncSession over asyncpg)"}


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


def timed(rounds: int, calls: int, call: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    workers = {v: subprocess.Popen([sys.executable, "-c", WORKER, v, call],
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
    print(f"{CALLS[call]} over loopback, {rounds} rounds of {calls:,} "
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


def instructions(calls: int, repeats: int, call: str) -> None:
    # A count still varies a little with the server's timing (a reply not there yet
    # costs the client another turn of its loop), so each variant runs ``repeats``
    # times and the median is kept; the spread is printed beside it.
    def count(run: tuple[str, int, int]) -> tuple[int, int]:
        variant, n, _ = run
        return callgrind.count(COUNTED, variant, call, str(n))

    runs = [(v, n, r) for r in range(repeats) for v in VARIANTS for n in (0, calls)]
    counted = {run: found[0] for run, found in callgrind.all_of(runs, count).items()}
    per_call = {v: sorted((counted[v, calls, r] - counted[v, 0, r]) / calls
                          for r in range(repeats)) for v in VARIANTS}
    base = statistics.median(per_call["raw"])
    print(f"{CALLS[call]}: client instructions per call (callgrind; "
          f"{calls:,} calls minus none; median of {repeats} runs, and their range):")
    for variant in VARIANTS:
        value = statistics.median(per_call[variant])
        print(f"  {variant:<8} {value:9.0f}  +{value - base:6.0f}  x{value / base:.3f}  "
              f"({per_call[variant][0]:.0f}-{per_call[variant][-1]:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions with callgrind instead of timing")
    parser.add_argument("--call", choices=sorted(CALLS), default="fetchval")
    parser.add_argument("--repeats", type=int, default=3,
                        help="--instructions: runs per variant (the median is kept)")
    args = parser.parse_args()
    with postgresql() as dsn:
        os.environ["BENCH_DSN"] = dsn  # for the workers: never on a command line
        if args.instructions:
            instructions(min(args.calls, 2000), args.repeats, args.call)
        else:
            timed(args.rounds, args.calls, args.call)


if __name__ == "__main__":
    main()
