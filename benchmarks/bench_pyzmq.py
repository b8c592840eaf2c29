"""Per-call overhead of tracked pyzmq sockets, as a ratio to the raw call, in one run.

The hot path: a PAIR over ``inproc://``, one small message sent and received.
Three variants, each in its own process: ``raw`` (the sanitizer off: zmq
untouched), ``tracked`` (a socket made while it runs) and ``untracked`` (a
socket made before ``enable()``: its class is patched but it has no record, as
for the thread-safe draft types). Uses pyperf, as bench_sqlite.py does.

    python benchmarks/bench_pyzmq.py            # quick (pyperf --fast)
    python benchmarks/bench_pyzmq.py --rigorous # slower, tighter
    python benchmarks/bench_pyzmq.py --instructions

``--instructions`` counts instructions per call with valgrind's callgrind
instead of timing (a program making N calls minus one making none, divided by
N): the same however busy the machine is. It counts every thread, libzmq's own
included; over inproc they take no part in sending a message.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import callgrind  # benchmarks/callgrind.py, beside this script
import pyperf
import zmq

import sanitizer

MESSAGE = b"12345678"
VARIANTS = ("raw", "untracked", "tracked")
_pairs: dict[str, tuple[Any, Any]] = {}


def make_pair() -> tuple[Any, Any]:
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    address = f"inproc://bench-{len(_pairs)}"
    a.bind(address)
    b.connect(address)
    return a, b


def pair(variant: str) -> tuple[Any, Any]:
    """The variant's sockets, in the state the variant names (each runs in its own worker)."""
    if variant not in _pairs:
        if variant == "tracked":
            sanitizer.enable(log_file=os.devnull)
            _pairs[variant] = make_pair()
        else:
            sanitizer.disable()
            _pairs[variant] = make_pair()
            if variant == "untracked":
                sanitizer.enable(log_file=os.devnull)
    return _pairs[variant]


def time_send_recv(loops: int, variant: str) -> float:
    a, b = pair(variant)
    send, recv = a.send, b.recv
    start = pyperf.perf_counter()
    for _ in range(loops):
        send(MESSAGE)
        recv()
    return pyperf.perf_counter() - start


def time_multipart(loops: int, variant: str) -> float:
    a, b = pair(variant)
    send, recv = a.send_multipart, b.recv_multipart
    parts = [b"topic", MESSAGE]
    start = pyperf.perf_counter()
    for _ in range(loops):
        send(parts)
        recv()
    return pyperf.perf_counter() - start


# Per-call operations for --instructions: (what, statement), on the pair a, b.
OPERATIONS = (
    ("a.send(msg); b.recv()", "a.send(msg); b.recv()"),
    ("send_multipart + recv_multipart (2 frames)",
     "a.send_multipart([msg, msg]); b.recv_multipart()"),
    ("send_string + recv_string", "a.send_string('x'); b.recv_string()"),
    ("a.rcvmore (an option as attribute)", "a.rcvmore"),
    ("poller.poll(0), one socket", "poller.poll(0)"),
)
PROGRAM = """
import os, sys, zmq
import sanitizer
from sanitizer.plugin import record_of
variant, index, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if variant == "tracked":
    sanitizer.enable(log_file=os.devnull)
ctx = zmq.Context()
a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
a.bind("inproc://bench")
b.connect("inproc://bench")
if variant == "untracked":
    sanitizer.enable(log_file=os.devnull)
assert (record_of(a) is not None) == (variant == "tracked")
poller = zmq.Poller()
poller.register(b, zmq.POLLIN)
msg = b"12345678"
statement = {operations}[index]
exec(compile("for _ in range(calls):\\n    " + statement, "<bench>", "exec"))
a.close(); b.close(); ctx.term()
"""


def count(run: tuple[str, int, int]) -> tuple[int, int]:
    """Instructions of the whole program: ``calls`` of operation ``index`` on ``variant``."""
    variant, index, calls = run
    program = PROGRAM.format(operations=[o[1] for o in OPERATIONS])
    return callgrind.count(program, variant, str(index), str(calls))


def instructions(calls: int = 20_000) -> None:
    """Per-call instructions of each operation, raw, untracked and tracked, and the ratio."""
    runs = [(v, i, n) for i in range(len(OPERATIONS)) for v in VARIANTS for n in (0, calls)]
    counted = {run: found[0] for run, found in callgrind.all_of(runs, count).items()}
    print(f"Instructions per call (callgrind; {calls:,} calls minus none):")
    for index, (label, _) in enumerate(OPERATIONS):
        per_call = {v: (counted[v, index, calls] - counted[v, index, 0]) / calls
                    for v in VARIANTS}
        base = per_call["raw"]
        print(f"  {label:<44} raw {base:7.0f}" + "".join(
            f"   {v} {per_call[v]:7.0f} (+{per_call[v] - base:5.0f}, x{per_call[v] / base:.2f})"
            for v in VARIANTS[1:]))


def main() -> None:
    if "--instructions" in sys.argv:
        instructions()
        return
    runner = pyperf.Runner()
    runner.metadata["description"] = __doc__.splitlines()[0]
    os.environ.pop("SANITIZE_THREADS", None)
    results: dict[str, Any] = {}
    for variant in VARIANTS:
        results[f"send+recv {variant}"] = runner.bench_time_func(
            f"send+recv {variant}", time_send_recv, variant)
        results[f"multipart {variant}"] = runner.bench_time_func(
            f"send_multipart+recv_multipart {variant}", time_multipart, variant)
    if runner.args.worker or any(r is None for r in results.values()):
        return
    print("\nPer send+recv, median (ns); overhead = variant - raw, measured in this run:")
    for kind, label in (("send+recv", "send + recv"), ("multipart", "send/recv_multipart")):
        base = float(results[f"{kind} raw"].median()) * 1e9
        print(f"  {label:<22} raw       {base:8.0f}")
        for variant in VARIANTS[1:]:
            value = float(results[f"{kind} {variant}"].median()) * 1e9
            print(f"  {label:<22} {variant:<9} {value:8.0f}  +{value - base:5.0f} ns  "
                  f"x{value / base:.2f}")


if __name__ == "__main__":
    main()
