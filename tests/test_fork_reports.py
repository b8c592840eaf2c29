"""fork() while another thread is inside the sanitizer: the child's own reports never deadlock.

Each test runs a real program (a subprocess) whose threads report while its
main thread calls ``os.fork()``. Every child must make a violation, write its
report line, and ``os._exit(0)`` within a deadline; the parent polls ``waitpid``
and kills a child that is late. The program registers, before importing the
sanitizer, a fork handler of its own: it runs first in the child and records
which of the sanitizer's locks a parent thread held at the moment of the fork,
so that the tests can show that the case really happened.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import sanitizer

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")

CHILD_DEADLINE = 20.0  # seconds for one child to report and exit: a deadlock is the only
# reason to take longer

# What every program starts with: the snapshot handler, then the sanitizer, the
# deadline-bound wait, and the child's own violation.
PRELUDE = """
import json, os, signal, sys, threading, time

assert "sanitizer.state" not in sys.modules  # ours must run before its fork handler
ARGS = json.loads(sys.argv[1])
LOG, RESULTS = ARGS["log"], ARGS["results"]
HELD = []  # in a child: the sanitizer's locks that a parent thread held at fork()
INSIDE = [0]  # reports under way in the parent's reporting thread (the sink's wrapper)


def locks():
    from sanitizer.state import STATE

    found = {"lifecycle": STATE.lifecycle, "loops": STATE.loop_lock,
             "importing": STATE.importing}
    running = STATE.running
    if running is not None:
        reporter = running.reporter
        found["dedup"] = reporter.dedup._lock
        found["output"] = reporter.output._lock
        for step in reporter.steps:
            if type(step).__name__ == "Forwarder":
                found["forwarder"] = step._lock
    import logging
    found.update(("handler " + type(h).__name__, h.lock)
                 for h in logging.getLogger("sanitizer").handlers)
    return found


def snapshot():
    for name, lock in locks().items():
        if lock.acquire(blocking=False):
            lock.release()
        else:
            HELD.append(name)


os.register_at_fork(after_in_child=snapshot)

import sanitizer
from sanitizer.state import STATE


def count_reports():
    real = STATE.sink

    def counting(*args):
        INSIDE[0] += 1
        try:
            real(*args)
        finally:
            INSIDE[0] -= 1
    STATE.sink = counting


def note(**fields):
    line = json.dumps({"pid": os.getpid(), **fields}) + "\\n"
    fd = os.open(RESULTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line.encode())
    os.close(fd)


def wait(pid, deadline):
    \"\"\"The child's exit code, or None if it missed the deadline (then it is killed).\"\"\"
    end = time.monotonic() + deadline
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.005)  # polling for the exit, not ordering


@sanitizer.thread_affine
class Thing:
    def use(self):
        return 1
"""


def run(tmp_path: Path, body: str, **args: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                     subprocess.CompletedProcess[str]]:
    """Run PRELUDE + body; return the log's events, the program's notes, and the process."""
    script = tmp_path / "app.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    log, results = tmp_path / "violations.jsonl", tmp_path / "results.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    proc = subprocess.run(
        [sys.executable, str(script),
         json.dumps({"log": str(log), "results": str(results), "deadline": CHILD_DEADLINE,
                     **args})],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    notes = [json.loads(line) for line in results.read_text().splitlines()] \
        if results.exists() else []
    return events, notes, proc


def reported_by(events: list[dict[str, Any]], pid: int) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "thread_affinity_violation"
            and e["pid"] == pid]


# -- a thread reporting in a loop, the main thread forking ------------------------------------

FORKS = 50

LOOP = """
sanitizer.enable(log_file=LOG, stack_depth=256, sink="output+logging")
import logging


class Unbuffered(logging.Handler):
    # One os.write per record. (A FileHandler's buffered stream has a lock of its own
    # that CPython does not renew in a child: a thread inside its write at fork()
    # leaves the child's next flush waiting forever, with or without the sanitizer.)
    def __init__(self, path):
        super().__init__()
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, record):
        line = json.dumps({"pid": os.getpid(), "policy": record.policy})
        os.write(self.fd, (line + "\\n").encode())


logging.getLogger("sanitizer").addHandler(Unbuffered(LOG + ".logging"))
count_reports()
thing = Thing()  # the main thread's
stop = threading.Event()


def deep(n, call):
    # Many frames, each captured: a report takes long enough to be forked in.
    return deep(n - 1, call) if n else call()


def reporter():
    site = 0
    while not stop.is_set():
        site += 1
        # A new access site each time: each is the first of its kind, so that every
        # report goes all the way (dedup, the log line, the logging handler).
        space = {}
        exec(compile("def use(thing):\\n    thing.use()\\n", f"site{site}.py", "exec"), space)
        deep(250, lambda: space["use"](thing))


thread = threading.Thread(target=reporter, name="reporter")
thread.start()
children = []
for _ in range(ARGS["forks"]):
    spin = time.monotonic() + 1.0
    while not INSIDE[0] and time.monotonic() < spin:
        pass  # fork while the reporter is inside a report, as often as it can be had
    pid = os.fork()
    if pid == 0:
        inside = INSIDE[0]
        thing.use()  # the parent's object, in the child: its first report
        note(held=HELD, inside=inside)
        os._exit(0)
    children.append((pid, wait(pid, ARGS["deadline"])))
stop.set()
thread.join()
note(children=children)
"""


def test_every_child_reports_and_exits_while_a_thread_reports_in_a_loop(tmp_path: Path) -> None:
    events, notes, _ = run(tmp_path, LOOP, forks=FORKS)
    *kids, parent = notes
    children = dict(parent["children"])
    assert len(children) == FORKS
    late = [pid for pid, code in children.items() if code is None]
    assert late == [], f"{len(late)} of {FORKS} children deadlocked"
    assert set(children.values()) == {0}
    assert {k["pid"] for k in kids} == {int(pid) for pid in children}
    pids = [int(pid) for pid in children]
    for pid in pids:
        (event,) = reported_by(events, pid)  # the child's one report, on disk
        assert event["policy"] == "process"
    # The case was really there: forks made while the reporter was inside a report,
    # and while it held one of the sanitizer's locks (seen from the child).
    inside = sum(1 for k in kids if k["inside"])
    holding = sum(1 for k in kids if k["held"])
    assert inside >= FORKS // 2, inside
    assert holding >= 1, [k["held"] for k in kids]
    # The logging sink, through logging's own (fork-safe) handler lock, got them too.
    sent = Path(f"{tmp_path / 'violations.jsonl'}.logging").read_text().splitlines()
    by_children = [json.loads(line) for line in sent if json.loads(line)["pid"] in pids]
    assert sorted(e["pid"] for e in by_children) == sorted(pids)
    assert {e["policy"] for e in by_children} == {"process"}


# -- a thread parked inside each lock, deterministically ------------------------------------

# Each case: code that makes the "parker" thread stop inside the critical section of
# one lock (through a hook in the real path), and what the child then does that
# needs the same lock.
PARKED = """
inside, release = threading.Event(), threading.Event()


def park():
    if threading.current_thread().name == "parker":
        inside.set()
        release.wait(60)


CASE = ARGS["case"]
if CASE == "forwarder":  # a process that forwards to a collector (pytest's children)
    channel = LOG + ".forwarded"
    open(channel, "w").close()
    os.environ["SANITIZE_THREADS_FORWARD"] = f"1:{channel}"
sanitizer.enable(log_file=LOG, sink="output+logging" if CASE == "logging" else "output")
thing = Thing()
reporter = STATE.running.reporter


def again():  # the parker's report: a new kind each time (the dedup table grows)
    space = {}
    exec(compile("def use(thing):\\n    thing.use()\\n", f"site-{CASE}.py", "exec"), space)
    space["use"](thing)


if CASE == "importing":  # the first report imports structlog: fork() in the middle
    class Parking:
        def find_spec(self, name, path=None, target=None):
            if name == "structlog.processors":
                park()
            return None  # the usual finders import it
    sys.meta_path.insert(0, Parking())
    parker = again
elif CASE == "dedup":  # Violation.occurred runs under Dedup's lock
    from sanitizer import report
    occurred = report.Violation.occurred
    def parked_occurred(self, other):
        park()
        occurred(self, other)
    report.Violation.occurred = parked_occurred
    parker = again
elif CASE in ("output", "lifecycle"):  # the descriptor write, under LineWriter's RLock
    out = reporter.output._out
    write = out.write
    def parked_write(data):
        park()
        write(data)
    out.write = parked_write
    parker = again
    if CASE == "lifecycle":  # disable() holds STATE.lifecycle while it logs the summary
        other = threading.Thread(target=thing.use, name="other")
        other.start()
        other.join()  # one event logged: disable() has a summary to write
        parker = sanitizer.disable
elif CASE == "forwarder":  # the channel write, under the forwarder's lock
    (forwarder,) = [s for s in reporter.steps if type(s).__name__ == "Forwarder"]
    write = forwarder._out.write
    def parked_write(data):
        park()
        write(data)
    forwarder._out.write = parked_write
    parker = again
elif CASE == "logging":  # the application's handler, under its lock
    import logging
    class Parking(logging.Handler):
        def emit(self, record):
            park()
    logging.getLogger("sanitizer").addHandler(Parking())
    parker = again
elif CASE == "loops":  # a new loop's token, made under STATE.loop_lock
    from sanitizer import loops
    token_init = loops.LoopToken.__init__
    def parked_init(self, loop, stack):
        park()
        token_init(self, loop, stack)
    loops.LoopToken.__init__ = parked_init
    class Loop:
        pass
    parker = lambda: loops.token_for(Loop())

thread = threading.Thread(target=parker, name="parker")
thread.start()
assert inside.wait(60), "the parker never got inside"
pid = os.fork()
if pid == 0:
    if CASE == "lifecycle":
        sanitizer.enable(log_file=LOG)  # the lock disable() held in the parent
    elif CASE == "loops":
        from sanitizer import loops
        loops.token_for(Loop())
    thing.use()  # the child's first report
    note(held=HELD)
    os._exit(0)
code = wait(pid, ARGS["deadline"])
release.set()
thread.join()
note(child=pid, code=code)
"""

CASES = {
    "importing": "importing",
    "dedup": "dedup",
    "output": "output",
    "forwarder": "forwarder",
    "logging": "handler Parking",
    "lifecycle": "lifecycle",
    "loops": "loops",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_child_forked_while_a_thread_holds_a_lock_reports(tmp_path: Path, case: str) -> None:
    events, notes, _ = run(tmp_path, PARKED, case=case)
    *kids, parent = notes
    assert parent["code"] == 0, f"the child missed its deadline ({case})"
    child = kids[-1]
    assert CASES[case] in child["held"]  # it was held at fork(), by the parker
    pid = parent["child"]
    if case == "forwarder":  # a forwarding process: the child's report went to the channel
        forwarded = Path(f"{tmp_path / 'violations.jsonl'}.forwarded").read_text()
        assert f'"child_pid":{pid}' in forwarded
    (event,) = reported_by(events, pid)
    assert event["policy"] == "process"


# -- every lock is one the fork handler renews ----------------------------------------------

PACKAGE = Path(sanitizer.__file__).parent
#: Locks made otherwise, and why that is safe.
RENEWED_OTHERWISE = {
    # Replaced by LineWriter.reset_after_fork, through the running reporter's.
    ("render.py", "RLock"),
    # A forked child's copy of the pytest plugin never takes it (on_violation's pid test).
    ("plugins/pytest_plugin/session.py", "Lock"),
}


def made_locks() -> list[tuple[str, str, bool]]:
    """(file, Lock or RLock, wrapped in fork_safe) for every lock made in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        wrapped = {id(arg) for node in ast.walk(tree) if isinstance(node, ast.Call)
                   and getattr(node.func, "id", getattr(node.func, "attr", None)) == "fork_safe"
                   for arg in node.args}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("Lock", "RLock")
                    and getattr(node.func.value, "id", None) == "threading"):
                found.append((str(path.relative_to(PACKAGE)), node.func.attr,
                              id(node) in wrapped))
    return found


def test_every_lock_of_the_sanitizer_is_renewed_in_a_forked_child() -> None:
    locks = made_locks()
    assert len(locks) >= 8  # the check finds them
    bare = {(where, kind) for where, kind, wrapped in locks if not wrapped}
    assert bare == RENEWED_OTHERWISE


def test_a_fork_safe_lock_held_at_fork_is_free_in_the_child() -> None:
    import threading

    from sanitizer.state import fork_safe

    lock, rlock = fork_safe(threading.Lock()), fork_safe(threading.RLock())
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with lock, rlock:
            held.set()
            done.wait(30)
    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(30)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            free = lock.acquire(timeout=5) and rlock.acquire(timeout=5)
            os._exit(0 if free else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        done.set()
        thread.join()
    assert os.waitstatus_to_exitcode(status) == 0
    assert not lock.locked()  # the parent's were never touched
