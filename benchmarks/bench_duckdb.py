"""Per-call overhead of tracked DuckDB connections and relations, as a ratio to the raw call.

Uses pyperf (calibrated loops, worker processes, medians), like bench_sqlite.py.
"raw" is plain DuckDB: the sanitizer is off while it is timed (a running sanitizer
patches the relation class for every connection, tracked or not); "tracked" is a
connection from duckdb.connect() while it runs.

    python benchmarks/bench_duckdb.py            # quick (pyperf --fast)
    python benchmarks/bench_duckdb.py --rigorous # slower, tighter
    python benchmarks/bench_duckdb.py --instructions

``--instructions`` counts instructions per call with valgrind's callgrind
instead of timing: the difference between a program making N calls and one
making none, divided by N. A count, not a time, so it is the same however busy
the machine is. DuckDB runs with one thread (``threads=1``) so that its worker
pool adds no noise to the counts.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import callgrind  # benchmarks/callgrind.py, beside this script
import pyperf

import sanitizer

VARIANTS = ("raw", "tracked")
# (label, setup, statement) on ``con``: the hot paths, a cheap checked read, and the
# cost of a new tracked connection (a cursor: one-off class, record, creation stack).
OPERATIONS = (
    ("con.execute(q).fetchall()", "", "con.execute('select 1').fetchall()"),
    ("con.sql(q).fetchall()", "", "con.sql('select 1').fetchall()"),
    ("rel.fetchall()", "rel = con.sql('select 1')", "rel.fetchall()"),
    ("rel.columns", "rel = con.sql('select 1 as a')", "rel.columns"),
    ("con.cursor().close()", "", "con.cursor().close()"),
)
# Calls per operation for --instructions: enough that the run-to-run noise of the
# program around them (some 10^6 instructions) is small per call.
CALLS = (200, 200, 200, 20_000, 2_000)


def connection(variant: str) -> Any:
    """A connection, with the sanitizer on for "tracked" and off for "raw"."""
    if sanitizer.is_enabled():
        sanitizer.disable()
    if variant == "tracked":
        sanitizer.enable(log_file=os.devnull)
    import duckdb

    con = duckdb.connect(config={"threads": 1})
    assert (type(con) is duckdb.DuckDBPyConnection) == (variant == "raw")
    return con


def time_operation(loops: int, variant: str, index: int) -> float:
    _, setup, statement = OPERATIONS[index]
    scope = {"con": connection(variant)}
    exec(setup, scope)
    code = compile(f"for _ in range(loops):\n    {statement}", "<bench>", "exec")
    scope["loops"] = loops
    start = pyperf.perf_counter()
    exec(code, scope)
    elapsed = pyperf.perf_counter() - start
    sanitizer.disable()
    return elapsed


PROGRAM = """
import os, sys
import sanitizer
variant, index, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if variant == "tracked":
    sanitizer.enable(log_file=os.devnull)
import duckdb
con = duckdb.connect(config={{"threads": 1}})
assert (type(con) is duckdb.DuckDBPyConnection) == (variant == "raw")
setup, statement = {operations}[index]
exec(setup)
code = compile("for _ in range(calls):\\n    " + statement, "<bench>", "exec")
exec(code)
"""


def count(run: tuple[str, int, int]) -> tuple[int, int]:
    """Instructions of the whole program (``calls`` of operation ``index``): in all, and
    in glibc's allocator (malloc, free and their helpers)."""
    variant, index, calls = run
    program = PROGRAM.format(operations=[(o[1], o[2]) for o in OPERATIONS])
    return callgrind.count(program, variant, str(index), str(calls), allocator=True)


def instructions() -> None:
    """Per-call instructions of each operation, raw and tracked, and the ratio.

    DuckDB allocates with glibc's malloc, whose cost per call varies by some 5% with
    the heap's history (what the program allocated before: the sanitizer's imports,
    say); so the counts are also given without the allocator's share, which is where
    the guards' own instructions show.
    """
    runs = [(v, i, n) for i, calls in enumerate(CALLS) for v in VARIANTS for n in (0, calls)]
    counted = callgrind.all_of(runs, count)

    def per_call(variant: str, index: int, without_allocator: bool) -> float:
        calls = CALLS[index]
        made, none = counted[variant, index, calls], counted[variant, index, 0]
        if without_allocator:
            return (made[0] - made[1] - none[0] + none[1]) / calls
        return (made[0] - none[0]) / calls

    print("Instructions per call (callgrind; N calls minus none), raw -> tracked:")
    print(f"  {'':<28} {'N':>6} {'all':<36} outside the allocator")
    for index, (label, _, _) in enumerate(OPERATIONS):
        line = f"  {label:<28} {CALLS[index]:6,}"
        for without_allocator in (False, True):
            raw, tracked = (per_call(v, index, without_allocator) for v in VARIANTS)
            line += (f" {raw:9,.0f} -> {tracked:9,.0f} "
                     f"({tracked - raw:+7,.0f}, x{tracked / raw:.3f})")
        print(line)


def main() -> None:
    if "--instructions" in sys.argv:
        instructions()
        return
    runner = pyperf.Runner()
    runner.metadata["description"] = __doc__.splitlines()[0]
    os.environ.pop("SANITIZE_THREADS", None)
    results: dict[tuple[str, int], Any] = {}
    for index, (label, _, _) in enumerate(OPERATIONS):
        for variant in VARIANTS:
            results[variant, index] = runner.bench_time_func(
                f"{label} {variant}", time_operation, variant, index)
    if runner.args.worker or any(r is None for r in results.values()):
        return
    print("\nPer call, median (ns); overhead = tracked - raw, measured in this run:")
    for index, (label, _, _) in enumerate(OPERATIONS):
        raw, tracked = (float(results[v, index].median()) * 1e9 for v in VARIANTS)
        print(f"  {label:<28} raw {raw:10,.0f}   tracked {tracked:10,.0f} "
              f"({tracked - raw:+8,.0f} ns, x{tracked / raw:.3f})")


if __name__ == "__main__":
    main()
