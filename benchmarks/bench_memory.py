"""Memory: what tracked objects and threads cost while they live, and that it all returns.

Each scenario runs in a fresh process, once plain and once sanitized, and measures
memory before (after a warm-up: imports, generated classes, the first thread),
while the objects are alive, and after they are gone (``gc.collect()``), with
tracemalloc (bytes Python allocated) and RSS (what the OS gives the process):

    python benchmarks/bench_memory.py                  # the full sizes: ~10 minutes
    python benchmarks/bench_memory.py --objects 100000 --threads 1000
    python benchmarks/bench_memory.py --no-tracemalloc  # RSS only: much faster

* ``objects``: N tracked Python objects (``@thread_affine``) alive at once, then dropped;
* ``one by one``: N tracked objects, each dropped as soon as it is made;
* ``threads``: T short-lived threads, each making and using a tracked object of its
  own and misusing one shared object (a strict violation per thread: counted,
  reported once);
* ``sqlite3``: C connections (tracked subclasses) with a cursor each, alive at once.

"Left" is after minus before: what the process keeps once everything is gone (for
``threads``, "alive" is that too: each thread is gone before the next starts). RSS
comes from a second run without tracemalloc (whose own tables would count), and is
noisier: glibc keeps freed heap memory for reuse ("trimmed": after ``malloc_trim(0)``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

PROGRAM = """\
import gc, json, os, sqlite3, sys, threading, tracemalloc

scenario, count, sanitized, traced = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", \\
    sys.argv[4] == "1"
if sanitized:
    import sanitizer
    sanitizer.enable(log_file=os.devnull)
    affine = sanitizer.thread_affine
else:
    affine = lambda cls: cls


@affine
class Box:
    def touch(self):
        return 1


def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure():
    gc.collect()
    return {"traced": tracemalloc.get_traced_memory()[0] if traced else 0, "rss": rss(),
            "records": len(STATE.records) if STATE else 0,
            "tokens": len(STATE.tokens) if STATE else 0}


SHARED = Box()


def misuse():
    mine = Box()
    mine.touch()
    SHARED.touch()  # another thread's: a strict violation


def connections(n):
    made = []
    for _ in range(n):
        conn = sqlite3.connect(":memory:")
        made.append((conn, conn.cursor()))
    return made


def run(n):
    if scenario == "objects":
        alive = [Box() for _ in range(n)]
    elif scenario == "one by one":
        for _ in range(n):
            Box().touch()
        alive = None
    elif scenario == "threads":
        for _ in range(n):
            thread = threading.Thread(target=misuse)
            thread.start()
            thread.join()
        alive = None
    else:
        alive = connections(n)
    peak = measure()
    if scenario == "sqlite3":
        for conn, cursor in alive:
            cursor.close()
            conn.close()
    del alive
    return peak


STATE = sys.modules["sanitizer.state"].STATE if sanitized else None
# The warm-up: past the first thread and, for threads, past the occurrences that
# the first violation's kind keeps (report.OCCURRENCE_LIMIT), which are bounded.
run(1100 if scenario == "threads" else 100)
if traced:
    tracemalloc.start()
before = measure()
peak = run(count)
after = measure()
try:  # glibc keeps freed heap memory for reuse: what is left once it gives it back
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
except (OSError, AttributeError):
    pass
trimmed = measure()
print(json.dumps({"before": before, "peak": peak, "after": after, "trimmed": trimmed}))
"""

SCENARIOS = ("objects", "one by one", "threads", "sqlite3")


def run(scenario: str, count: int, sanitized: bool, traced: bool) -> dict[str, dict[str, int]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    with tempfile.TemporaryDirectory() as scratch:
        proc = subprocess.run(
            [sys.executable, "-c", PROGRAM, scenario, str(count), str(int(sanitized)),
             str(int(traced))], env=env, cwd=scratch, capture_output=True, text=True,
            check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench_memory: the {scenario} run failed:\n{proc.stderr}")
    result: dict[str, dict[str, int]] = json.loads(proc.stdout.splitlines()[-1])
    return result


def per(value: int, count: int) -> str:
    return f"{value / count:,.1f}"


def mb(value: int) -> str:
    return f"{value / 1e6:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--no-tracemalloc", dest="traced", action="store_false",
                        help="RSS only: skip the runs under tracemalloc (about 3x slower)")
    parser.add_argument("--json", action="store_true", help="print the raw figures")
    args = parser.parse_args()
    counts = {"objects": args.objects, "one by one": args.objects, "threads": args.threads,
              "sqlite3": args.connections}
    print(f"Python {sys.version.split()[0]}; per object or thread, in bytes; 'left' "
          "is after everything is gone, minus before")
    header = (f"{'scenario':<11} {'n':>9}  {'variant':<9} {'traced/obj alive':>16} "
              f"{'rss/obj alive':>13} {'traced left MB':>14} {'rss left MB':>11} "
              f"{'trimmed':>7} {'records left':>12} {'tokens left':>11}")
    print(header)
    raw: dict[str, object] = {}
    for scenario in SCENARIOS:
        n = counts[scenario]
        for sanitized in (False, True):
            variant = "sanitized" if sanitized else "plain"
            # RSS from a run without tracemalloc: its own tables would be counted.
            got = run(scenario, n, sanitized, traced=False)
            raw[f"{scenario}/{variant}"] = got
            before, peak, after = got["before"], got["peak"], got["after"]
            traced, left = "-", "-"
            if args.traced:
                trace = run(scenario, n, sanitized, traced=True)
                raw[f"{scenario}/{variant}/tracemalloc"] = trace
                traced = per(trace["peak"]["traced"] - trace["before"]["traced"], n)
                left = mb(trace["after"]["traced"] - trace["before"]["traced"])
            records = after["records"] - before["records"] if sanitized else "-"
            tokens = after["tokens"] - before["tokens"] if sanitized else "-"
            print(f"{scenario:<11} {n:>9,}  {variant:<9} {traced:>16} "
                  f"{per(peak['rss'] - before['rss'], n):>13} {left:>14} "
                  f"{mb(after['rss'] - before['rss']):>11} "
                  f"{mb(got['trimmed']['rss'] - before['rss']):>7} {records!s:>12} {tokens!s:>11}",
                  flush=True)
    if args.json:
        print(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
