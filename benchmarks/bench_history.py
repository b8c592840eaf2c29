"""What ``history=N`` costs per call on a tracked object, in instructions (callgrind).

The option keeps each object's last N accesses (thread, time, caller frame) for the
HTML report's timeline. It is off by default; this measures what turning it on adds
to the hot path, against the same tracked call without it and the raw call:

    python benchmarks/bench_history.py            # 20,000 calls per run
    python benchmarks/bench_history.py --calls 5000

Counts are the difference between a program making N calls and one making none,
divided by N: the same however busy the machine is. Two identical runs still differ
by up to a few hundred instructions per call here (the interpreter's start-up and
allocator are not quite repeatable), so each figure is the median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics

import callgrind  # benchmarks/callgrind.py, beside this script

PROGRAM = """\
import os, sqlite3, sys
import sanitizer

variant, target, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
if variant != "raw":
    sanitizer.enable(log_file=os.devnull, history=int(variant))

class Thing:
    def use(self):
        return 1

if target == "sqlite3":
    conn = sqlite3.Connection(":memory:") if variant == "raw" else sqlite3.connect(":memory:")
    call = lambda: conn.execute("select 1")
else:
    thing = Thing() if variant == "raw" else sanitizer.track(Thing())
    call = thing.use
for _ in range(calls):
    call()
"""

VARIANTS = ("raw", "0", "16", "1000")
TARGETS = {"sqlite3": "sqlite3 conn.execute('select 1')", "method": "a tracked Python method"}


def count(run: tuple[str, str, int, int]) -> tuple[int, int]:
    variant, target, calls, _repeat = run
    return callgrind.count(PROGRAM, variant, target, str(calls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    calls, repeats = args.calls, args.repeats
    runs = [(v, t, n, r) for t in TARGETS for v in VARIANTS for n in (0, calls)
            for r in range(repeats)]
    counted = {run: found[0] for run, found in callgrind.all_of(runs, count).items()}
    print(f"Instructions per call (callgrind; {calls:,} calls minus none; "
          f"median of {repeats}):")
    for target, label in TARGETS.items():
        per = {v: statistics.median(
            (counted[v, target, calls, r] - counted[v, target, 0, r]) / calls
            for r in range(repeats)) for v in VARIANTS}
        tracked = per["0"]
        print(f"  {label:<36} raw {per['raw']:6.0f}   tracked {tracked:6.0f} "
              f"(x{tracked / per['raw']:.2f})" + "".join(
                  f"   history={v} {per[v]:6.0f} (+{per[v] - tracked:4.0f}, "
                  f"x{per[v] / per['raw']:.2f})" for v in VARIANTS[2:]))


if __name__ == "__main__":
    main()
