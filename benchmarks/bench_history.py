"""What ``history=N`` costs per call on a tracked object, in instructions (callgrind).

The option keeps each object's last N accesses (thread, time, caller frame) for the
HTML report's timeline. It is off by default; this measures what turning it on adds
to the hot path, against the same tracked call without it and the raw call:

    python benchmarks/bench_history.py            # 20,000 calls per run
    python benchmarks/bench_history.py --calls 5000

Only the calls are counted: the loop runs inside ``sys.call_tracing`` and callgrind
collects inside it alone (callgrind.ONLY_CALL_TRACING), so the interpreter's
start-up, which differs by millions of instructions between identical runs, is left
out. The figure is the difference between N calls and none, divided by N: exact and
repeatable, however busy the machine is.
"""

from __future__ import annotations

import argparse

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

def loop(n):
    for _ in range(n):
        call()

sys.call_tracing(loop, (calls,))
"""

VARIANTS = ("raw", "0", "16", "1000")
TARGETS = {"sqlite3": "sqlite3 conn.execute('select 1')", "method": "a tracked Python method"}


def count(run: tuple[str, str, int]) -> tuple[int, int]:
    variant, target, calls = run
    return callgrind.count(PROGRAM, variant, target, str(calls),
                           only_inside=callgrind.ONLY_CALL_TRACING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5_000)
    calls = parser.parse_args().calls
    runs = [(v, t, n) for t in TARGETS for v in VARIANTS for n in (0, calls)]
    counted = {run: found[0] for run, found in callgrind.all_of(runs, count).items()}
    print(f"Instructions per call (callgrind, inside the loop only; {calls:,} calls "
          "minus none):")
    for target, label in TARGETS.items():
        per = {v: (counted[v, target, calls] - counted[v, target, 0]) / calls
               for v in VARIANTS}
        tracked = per["0"]
        print(f"  {label:<36} raw {per['raw']:6.0f}   tracked {tracked:6.0f} "
              f"(x{tracked / per['raw']:.2f})" + "".join(
                  f"   history={v} {per[v]:6.0f} (+{per[v] - tracked:4.0f}, "
                  f"x{per[v] / per['raw']:.2f})" for v in VARIANTS[2:]))


if __name__ == "__main__":
    main()
