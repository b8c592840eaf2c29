"""What a call through wrapt costs, beside the sanitizer's own guard, per ``conn.execute``.

The README's comparison with wrapt quotes what this prints (with the wrapt and
Python versions), not fixed numbers: each way of intercepting
``conn.execute("select 1")`` on an in-memory sqlite3 connection, against the raw
call:

- ``wrapt.ObjectProxy`` around the connection (what ``Context.proxy`` uses);
- ``wrapt.FunctionWrapper`` on the class's ``execute``, with a pass-through wrapper
  (as ``wrapt.wrap_function_wrapper`` patches a method: bound at each access);
- the sanitizer's generated guard (a tracked connection, ``strict``).

    python benchmarks/bench_wrapt.py                 # wall time, interleaved rounds
    python benchmarks/bench_wrapt.py --instructions  # callgrind, the same on every run

Wall time: rounds of each variant in turn (the order rotating each round), each
variant's time per call minus raw's in the same round; the median over rounds,
so that the machine's slow drifts cancel. Instructions: a program making N calls
minus one making none, divided by N.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import callgrind  # benchmarks/callgrind.py, beside this script
import wrapt

import sanitizer

VARIANTS = ("raw", "ObjectProxy", "FunctionWrapper", "guard")
LABELS = {"raw": "raw sqlite3", "ObjectProxy": "wrapt.ObjectProxy(conn)",
          "FunctionWrapper": "wrapt.FunctionWrapper on Connection.execute",
          "guard": "sanitizer guard (strict)"}
SETUP = """
import os, sqlite3, wrapt
import sanitizer

def passthrough(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs)

class Wrapped(sqlite3.Connection):
    pass

# As wrapt.wrap_function_wrapper patches a method: a descriptor on the class, bound per access.
Wrapped.execute = wrapt.FunctionWrapper(sqlite3.Connection.execute, passthrough)

def make(variant):
    if variant == "guard":
        return sqlite3.connect(":memory:")
    if variant == "ObjectProxy":
        return wrapt.ObjectProxy(sqlite3.Connection(":memory:"))
    if variant == "FunctionWrapper":
        return Wrapped(":memory:")
    return sqlite3.Connection(":memory:")
"""
PROGRAM = SETUP + """
import sys
sanitizer.enable(log_file=os.devnull)
variant, calls = sys.argv[1], int(sys.argv[2])
conn = make(variant)
for _ in range(calls):
    conn.execute("select 1")
"""


def versions() -> str:
    return f"wrapt {wrapt.__version__}, Python {sys.version.split()[0]}"


def makers() -> dict[str, Callable[[], Any]]:
    scope: dict[str, Any] = {}
    exec(SETUP, scope)
    return {v: (lambda v=v: scope["make"](v)) for v in VARIANTS}


def per_call(conn: Any, loops: int) -> float:
    """Seconds per ``conn.execute("select 1")``, the attribute looked up each call."""
    start = time.perf_counter()
    for _ in range(loops):
        conn.execute("select 1")
    return (time.perf_counter() - start) / loops


def timings(rounds: int = 31, loops: int = 20_000) -> None:
    os.environ.pop("SANITIZE_THREADS", None)
    sanitizer.enable(log_file=os.devnull)
    calls = {v: make() for v, make in makers().items()}
    assert type(calls["guard"]) is not sqlite3.Connection  # tracked
    for conn in calls.values():
        per_call(conn, loops)  # warm up
    added: dict[str, list[float]] = {v: [] for v in VARIANTS}
    raw: list[float] = []
    for turn in range(rounds):
        order = VARIANTS[turn % len(VARIANTS):] + VARIANTS[:turn % len(VARIANTS)]
        measured = {v: per_call(calls[v], loops) for v in order}
        raw.append(measured["raw"])
        for v in VARIANTS:
            added[v].append(measured[v] - measured["raw"])
    base = statistics.median(raw) * 1e9
    print(f"conn.execute('select 1'), wall time per call ({versions()}; median of "
          f"{rounds} interleaved rounds of {loops:,} calls, each against raw's in its round):")
    print(f"  {LABELS['raw']:<42} {base:7.0f} ns")
    for v in VARIANTS[1:]:
        extra = statistics.median(added[v]) * 1e9
        print(f"  {LABELS[v]:<42} {base + extra:7.0f} ns  +{extra:4.0f} ns "
              f"(x{(base + extra) / base:.2f})")


def count(run: tuple[str, int]) -> tuple[int, int]:
    variant, calls = run
    return callgrind.count(PROGRAM, variant, str(calls))


def instructions(calls: int = 20_000) -> None:
    runs = [(v, n) for v in VARIANTS for n in (0, calls)]
    counted = {run: found[0] for run, found in callgrind.all_of(runs, count).items()}
    each = {v: (counted[v, calls] - counted[v, 0]) / calls for v in VARIANTS}
    base = each["raw"]
    print(f"conn.execute('select 1'), instructions per call ({versions()}; callgrind, "
          f"{calls:,} calls minus none):")
    print(f"  {LABELS['raw']:<42} {base:7,.0f}")
    for v in VARIANTS[1:]:
        print(f"  {LABELS[v]:<42} {each[v]:7,.0f}  +{each[v] - base:5,.0f} "
              f"(x{each[v] / base:.2f})")


def main() -> None:
    if "--instructions" in sys.argv:
        instructions()
    else:
        timings()


if __name__ == "__main__":
    main()
