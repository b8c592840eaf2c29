"""The pyzmq plugin: a socket is used by one thread at a time; the Context is shared freely.

Real sockets over inproc:// and tcp://127.0.0.1, real threads. "Thread A is
inside a call on the socket" is made certain, not hoped for, with a callback
that runs inside the guarded call: ``recv_serialized(deserialize)`` calls it
with the frames it received, and it waits there until the test releases it.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from conftest import Sanitized
from support import in_thread, line_of_file, run_program, started
from support import line_of as line_in

import sanitizer
from sanitizer import stacks
from sanitizer.plugin import record_of

HERE = __file__
SOCKET = "zmq.Socket"
SECRET = b"secret-payload-42"


def line_of(marker: str) -> int:
    return line_of_file(HERE, f"# {marker}")


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    sanitizer.disable()  # first: a failed test's leftovers must not stop destroy() (raise)
    context.destroy(linger=0)


def pair(ctx: zmq.Context[Any], address: str = "tcp://127.0.0.1:0") -> tuple[Any, Any]:
    """Two connected PAIR sockets (bound to port 0 over tcp: the port is libzmq's choice)."""
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind(address)
    b.connect(a.last_endpoint.decode())
    return a, b


class Gate:
    """A deserializer that signals it is running (inside ``recv_serialized``) and waits."""

    def __init__(self, parties: int = 1) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.all_inside = threading.Barrier(parties)

    def __call__(self, frames: list[bytes]) -> list[bytes]:
        self.all_inside.wait(10)
        self.entered.set()
        assert self.release.wait(10)  # holder
        return frames


def hold(sock: Any, peer: Any, intrude: Any, name: str = "B") -> dict[str, Any]:
    """Thread A is inside ``sock.recv_serialized`` while thread ``name`` runs ``intrude``;
    the peer sends first, so nothing blocks in libzmq. Returns the intruder's outcome."""
    gate = Gate()
    peer.send(SECRET)
    a, a_outcome = started(lambda: sock.recv_serialized(gate), "A")
    try:
        assert gate.entered.wait(10)
        b, outcome = started(intrude, name)
        b.join()
    finally:
        gate.release.set()
        a.join()
    assert a_outcome == {"value": [SECRET]}
    return outcome


def race_is_reported(sock: Any, peer: Any) -> None:
    """The positive control: a real misuse of ``sock`` afterwards is reported."""
    before = len(sanitizer.violations())
    hold(sock, peer, lambda: sock.send(b"x"))
    assert len(sanitizer.violations()) == before + 1
    assert sanitizer.violations()[-1].operation == "send"


class TestTransparency:
    def test_round_trip(self, sanitized: Sanitized, ctx: zmq.Context[Any]) -> None:
        a, b = pair(ctx)
        assert type(a) is zmq.Socket and repr(a).startswith("<zmq.Socket(zmq.PAIR) at")
        assert record_of(a) is not None and record_of(b) is not None
        assert record_of(a) is not record_of(b)
        a.send(b"1")
        assert b.recv() == b"1"
        a.send(b"2", copy=False)
        assert b.recv(copy=False).bytes == b"2"
        with pytest.raises(zmq.Again):
            b.recv(flags=zmq.NOBLOCK)
        a.send_multipart([b"x", b"y"])
        assert b.recv_multipart() == [b"x", b"y"]
        a.send_string("é")
        assert b.recv_string() == "é"
        a.send_json({"k": 1})
        assert b.recv_json() == {"k": 1}
        a.send_pyobj((1, 2))
        assert b.recv_pyobj() == (1, 2)
        a.send_serialized(["p"], lambda m: [s.encode() for s in m])
        assert b.recv_serialized(lambda frames: frames[0].bytes.decode(), copy=False) == "p"
        if hasattr(zmq.Socket, "recv_into"):  # pyzmq 26.4
            a.send(b"buf")
            buffer = bytearray(8)
            assert b.recv_into(buffer) == 3 and bytes(buffer[:3]) == b"buf"
        a.linger = 0  # options as attributes go through set()/get()
        assert a.linger == 0 and a.getsockopt(zmq.LINGER) == 0 and a.rcvmore == 0
        a.hwm = 10
        assert a.hwm == 10 and a.get_hwm() == 10
        assert a.poll(0) == 0 and isinstance(a.fileno(), int)
        with ctx.socket(zmq.SUB) as sub:
            sub.subscribe("topic")
            sub.unsubscribe(b"topic")
        assert sub.closed
        assert sanitizer.violations() == []

    def test_made_directly_and_by_subclasses(self, sanitized: Sanitized,
                                            ctx: zmq.Context[Any]) -> None:
        class Mine(zmq.Socket):  # type: ignore[type-arg]
            pass
        direct = zmq.Socket(ctx, zmq.PUSH)  # not the context's: ctx.destroy() would hang on it
        try:
            mine = ctx.socket(zmq.PULL, socket_class=Mine)
            assert record_of(direct) is not None and record_of(mine) is not None
            assert type(mine) is Mine and record_of(mine) is not record_of(direct)
        finally:
            direct.close()

    def test_shadows_share_the_record(self, sanitized: Sanitized, ctx: zmq.Context[Any]) -> None:
        sock = ctx.socket(zmq.DEALER)
        record = record_of(sock)
        assert record is not None
        assert record_of(zmq.Socket(sock)) is record
        assert record_of(zmq.Socket.shadow(sock.underlying)) is record
        assert record_of(copy.copy(sock)) is record
        assert record_of(ctx.socket(zmq.DEALER)) is not record

    def test_the_context_is_not_tracked(self, sanitized: Sanitized,
                                        ctx: zmq.Context[Any]) -> None:
        assert record_of(ctx) is None and record_of(zmq.Context.instance()) is None

    def test_thread_safe_types_agree_with_libzmq(self, sanitized: Sanitized,
                                                 ctx: zmq.Context[Any]) -> None:
        # libzmq's own word, ZMQ_THREAD_SAFE, for every type this libzmq makes (the
        # draft ones too, where it has them, whatever zmq.DRAFT_API says).
        made = {}
        for kind in zmq.SocketType:
            try:
                sock = ctx.socket(kind)
            except zmq.ZMQError:
                continue  # not in this libzmq
            made[kind.name] = (bool(sock.get(zmq.THREAD_SAFE)), record_of(sock) is None)
            sock.close()
        assert {"PAIR", "PUB", "SUB", "REQ", "REP", "DEALER", "ROUTER"} <= made.keys()
        assert all(thread_safe == untracked for thread_safe, untracked in made.values()), made

    @pytest.mark.skipif(not hasattr(zmq, "SERVER"), reason="pyzmq without draft types")
    def test_thread_safe_socket_used_by_two_threads_at_once(
            self, sanitized: Sanitized, ctx: zmq.Context[Any]) -> None:
        try:
            server, client = ctx.socket(zmq.SERVER), ctx.socket(zmq.CLIENT)
        except zmq.ZMQError:
            pytest.skip("libzmq without the draft socket types")
        server.bind("inproc://server")
        client.connect("inproc://server")
        assert record_of(server) is None

        def poke() -> None:
            with pytest.raises(zmq.Again):
                server.recv(zmq.NOBLOCK)
        outcome = hold(server, client, poke)
        assert "error" not in outcome
        assert sanitizer.violations() == []

    def test_asyncio_sockets(self, sanitized: Sanitized) -> None:
        actx = zmq.asyncio.Context()
        a, b = actx.socket(zmq.PAIR), actx.socket(zmq.PAIR)
        try:
            port = a.bind_to_random_port("tcp://127.0.0.1")
            b.connect(f"tcp://127.0.0.1:{port}")

            async def main() -> list[bytes]:
                await a.send_multipart([b"x", b"y"])
                return await b.recv_multipart()  # type: ignore[no-any-return]
            assert asyncio.run(main()) == [b"x", b"y"]
            assert record_of(a) is not None
            assert record_of(a._shadow_sock) is record_of(a)  # one libzmq socket, one record
        finally:
            actx.destroy(linger=0)
        assert sanitizer.violations() == []

    def test_sockets_made_before_enable_stay_untracked(self, ctx: zmq.Context[Any],
                                                       tmp_path: Path) -> None:
        if sanitizer.is_enabled():
            sanitizer.disable()
        a, b = pair(ctx)
        sanitizer.enable(log_file=str(tmp_path / "log.jsonl"))
        try:
            assert record_of(a) is None
            hold(a, b, lambda: a.send(b"x"))  # a misuse, but of a socket we do not know
            assert sanitizer.violations() == []
        finally:
            sanitizer.disable()

    def test_disable_restores_zmq(self, ctx: zmq.Context[Any], tmp_path: Path) -> None:
        if sanitizer.is_enabled():
            sanitizer.disable()
        before = (dict(vars(zmq.Socket)), dict(vars(zmq.Poller)), dict(vars(zmq.Context)))
        sanitizer.enable(log_file=str(tmp_path / "log.jsonl"))
        assert zmq.Socket.send is not before[0]["send"] and "recv" in vars(zmq.Socket)
        assert zmq.Poller.poll is not before[1]["poll"]
        sanitizer.disable()
        assert (dict(vars(zmq.Socket)), dict(vars(zmq.Poller)), dict(vars(zmq.Context))) == before
        assert record_of(ctx.socket(zmq.PAIR)) is None


class TestCaught:
    def test_two_threads_inside_one_socket(self, sanitized: Sanitized,
                                           ctx: zmq.Context[Any]) -> None:
        a = ctx.socket(zmq.PAIR)  # created
        a.bind("inproc://caught")
        b = ctx.socket(zmq.PAIR)
        b.connect("inproc://caught")
        hold(a, b, lambda: a.send(b"intruder"))  # intruder
        [violation] = sanitizer.violations()
        assert (violation.policy, violation.object_type, violation.operation) == (
            "exclusive", SOCKET, "send")
        assert violation.thread["name"] == "B"
        assert violation.holder_thread is not None and violation.holder_thread["name"] == "A"
        assert violation.access_site is not None and violation.creation_site is not None
        assert stacks.line_of(violation.access_site) == line_of("intruder")
        assert stacks.line_of(violation.creation_site) == line_of("created")
        # The holder's stack: A inside recv_serialized, waiting in the deserializer.
        holder = [(code.co_name, stacks.line_of((code, offset)))
                  for code, offset in violation.holder_stack]
        assert ("__call__", line_of("holder")) in holder
        assert "recv_serialized" in [name for name, _ in holder]
        assert "inside a call on the same" in violation.message

    def test_the_report_names_type_and_endpoints_never_the_message(
            self, sanitized: Sanitized, ctx: zmq.Context[Any]) -> None:
        a, b = pair(ctx)
        endpoint = a.last_endpoint.decode()
        assert not endpoint.endswith(":0")  # the port libzmq chose, not the one asked for
        a.bind("inproc://also")
        a.bind("inproc://gone")
        a.unbind("inproc://gone")
        hold(a, b, lambda: a.send(SECRET))
        [record] = sanitized.records()
        assert record["resource"] == {"socket_type": "PAIR", "bind": [endpoint, "inproc://also"]}
        assert record_of(b) is not None
        assert record_of(b).resource == {"socket_type": "PAIR", "connect": [endpoint]}
        text = sanitized.log.read_text()
        assert SECRET.decode() not in text and SECRET.hex() not in text
        assert "args" not in record

    def test_bind_to_random_port_notes_the_port_it_got(self, sanitized: Sanitized,
                                                       ctx: zmq.Context[Any]) -> None:
        sock = ctx.socket(zmq.PULL)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        with pytest.raises(zmq.ZMQError):
            sock.bind(f"tcp://127.0.0.1:{port}")  # in use: not noted
        record = record_of(sock)
        assert record is not None and record.resource == {
            "socket_type": "PULL", "bind": [f"tcp://127.0.0.1:{port}"]}

    def test_raise_stops_the_intruder_before_libzmq(self, enable: Any,
                                                     ctx: zmq.Context[Any]) -> None:
        run = enable(action="log+raise")
        a, b = pair(ctx)
        outcome = hold(a, b, a.close)  # closing a socket another thread is inside
        assert isinstance(outcome.get("error"), sanitizer.ThreadAffinityError)
        assert not a.closed  # the close never reached libzmq
        a.send(b"still open")
        assert b.recv() == b"still open"
        [record] = run.records()
        assert (record["operation"], record["policy"]) == ("close", "exclusive")

    def test_a_composite_is_one_call(self, sanitized: Sanitized, ctx: zmq.Context[Any]) -> None:
        # A send_multipart() in another thread between two frames would land inside
        # the message: the composite holds the socket, not only each send() in it.
        a, b = pair(ctx)
        hold(a, b, lambda: a.send_multipart([b"1", b"2"]))
        [violation] = sanitizer.violations()
        assert violation.operation == "send_multipart"  # once: not again by send()

    def test_polling_a_socket_another_thread_is_inside(self, sanitized: Sanitized,
                                                       ctx: zmq.Context[Any]) -> None:
        a, b = pair(ctx)
        poller = zmq.Poller()
        poller.register(b, zmq.POLLIN)
        poller.register(a, zmq.POLLIN)
        hold(a, b, lambda: poller.poll(0))  # polled
        [violation] = sanitizer.violations()
        assert (violation.operation, violation.thread["name"]) == ("poll", "B")
        assert violation.access_site is not None
        assert stacks.line_of(violation.access_site) == line_of("polled")

    def test_a_poll_stopped_by_raise_lets_go_of_the_other_sockets(
            self, enable: Any, ctx: zmq.Context[Any]) -> None:
        enable(action="raise")
        a, b = pair(ctx)
        poller = zmq.Poller()
        poller.register(b, zmq.POLLIN)  # taken first, then a is found busy
        poller.register(a, zmq.POLLIN)
        outcome = hold(a, b, lambda: poller.poll(0))
        assert isinstance(outcome.get("error"), sanitizer.ThreadAffinityError)
        record = record_of(b)
        assert record is not None and record.busy is None
        in_thread(lambda: b.send(b"free"))  # b is free again
        assert a.recv() == b"free"
        assert len(sanitizer.violations()) == 1

    def test_a_shadow_is_the_same_socket(self, sanitized: Sanitized,
                                         ctx: zmq.Context[Any]) -> None:
        a, b = pair(ctx)
        shadow = zmq.Socket.shadow(a.underlying)
        hold(a, b, lambda: shadow.send(b"x"))
        assert [v.operation for v in sanitizer.violations()] == ["send"]


class TestSilent:
    def test_sequential_handoff(self, sanitized: Sanitized, ctx: zmq.Context[Any]) -> None:
        a, b = pair(ctx)

        def use(message: bytes) -> bytes:
            a.send(message)
            reply: bytes = a.recv()
            return reply
        peer, _ = started(lambda: [b.send(b.recv()) for _ in range(2)], "peer")
        assert in_thread(lambda: use(b"1"), "first") == b"1"
        assert in_thread(lambda: use(b"2"), "second") == b"2"
        peer.join()
        assert record_of(a) is not None and sanitizer.violations() == []
        race_is_reported(a, b)

    def test_per_thread_sockets_on_a_shared_context(self, sanitized: Sanitized,
                                                    ctx: zmq.Context[Any]) -> None:
        gate = Gate(parties=2)  # both threads inside their own socket at once
        pairs: list[tuple[Any, Any]] = []

        def work(index: int) -> Any:
            a, b = pair(ctx, f"inproc://worker-{index}")
            pairs.append((a, b))
            b.send(b"own")
            return a.recv_serialized(gate)
        threads = [started(lambda i=i: work(i), f"worker-{i}") for i in range(2)]
        assert gate.entered.wait(10)
        gate.release.set()
        for thread, outcome in threads:
            thread.join()
            assert outcome == {"value": [b"own"]}
        assert all(record_of(a) is not None for a, _ in pairs)
        assert sanitizer.violations() == []
        race_is_reported(*pairs[0])

    def test_a_poller_in_its_own_thread(self, sanitized: Sanitized,
                                        ctx: zmq.Context[Any]) -> None:
        a, b = pair(ctx)
        poller = zmq.Poller()
        poller.register(a, zmq.POLLIN)
        poller.register(b, zmq.POLLIN)
        b.send(b"ready")
        assert in_thread(lambda: dict(poller.poll(1000)), "poller") == {a: zmq.POLLIN}
        assert a.recv() == b"ready"  # then the sockets are free for the next thread
        assert sanitizer.violations() == []
        race_is_reported(a, b)

    def test_the_context_from_many_threads(self, sanitized: Sanitized,
                                           ctx: zmq.Context[Any]) -> None:
        shared = zmq.Context()
        ready = threading.Barrier(3)
        made: list[Any] = []

        def worker() -> str:
            sock = shared.socket(zmq.PULL)  # two threads making sockets at once
            made.append(sock)
            sock.bind(f"inproc://many-{threading.get_ident()}")
            ready.wait(10)
            try:
                sock.recv()  # until the main thread terminates the context
            except zmq.ContextTerminated:
                return "terminated"
            finally:
                sock.close()
            return "received"
        threads = [started(worker, f"worker-{i}") for i in range(2)]
        ready.wait(10)
        shared.term()  # from another thread: interrupts their recv()
        for thread, outcome in threads:
            thread.join()
            assert outcome == {"value": "terminated"}
        assert record_of(shared) is None and all(record_of(s) is not None for s in made)
        assert sanitizer.violations() == []
        race_is_reported(*pair(ctx))

    @pytest.mark.filterwarnings("ignore:Unclosed socket:ResourceWarning")
    def test_gc_finalization_on_another_thread(self, sanitized: Sanitized,
                                               ctx: zmq.Context[Any]) -> None:
        box: list[Any] = []
        finalized: list[str] = []
        handed, done = threading.Event(), threading.Event()

        def make_and_hand_over() -> None:
            dropped = ctx.socket(zmq.PUSH)  # freed by refcount in B: __del__ closes it
            dropped.bind("inproc://dropped")
            cycle: dict[str, Any] = {"sock": ctx.socket(zmq.PUSH)}  # collected by gc in B
            cycle["self"] = cycle
            for sock in (dropped, cycle["sock"]):
                assert record_of(sock) is not None
                sock.linger = 0
                weakref.finalize(sock, lambda: finalized.append(
                    threading.current_thread().name))
            box.extend([dropped, cycle])
            del dropped, cycle, sock
            handed.set()
            done.wait(10)  # stays alive: B is another thread
        owner, _ = started(make_and_hand_over, "A")
        assert handed.wait(10)

        def drop() -> None:
            box.clear()
            gc.collect()
        in_thread(drop, "B")
        done.set()
        owner.join()
        assert finalized == ["B", "B"]
        assert sanitizer.violations() == []
        race_is_reported(*pair(ctx))


class TestPrograms:
    def test_a_program_that_imports_zmq_after_start(self, tmp_path: Path) -> None:
        # SANITIZE_THREADS switches the sanitizer on before the program imports zmq.
        source = """
            import threading, zmq

            ctx = zmq.Context()
            a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)  # created
            a.bind("inproc://app")
            b.connect("inproc://app")
            entered, release = threading.Event(), threading.Event()

            def wait(frames):
                entered.set()
                release.wait(10)
                return frames

            b.send(b"hello")
            worker = threading.Thread(target=a.recv_serialized, args=(wait,))
            worker.start()
            entered.wait(10)
            a.send(b"race")  # race
            release.set()
            worker.join()
            ctx.destroy(linger=0)
        """
        proc, records = run_program(tmp_path, source)
        assert proc.returncode == 0, proc.stderr
        [record] = records
        assert (record["object_type"], record["operation"]) == (SOCKET, "send")
        assert record["access_stack"][0]["line"] == line_in(source, "race")
        assert record["creation_stack"][-1]["line"] == line_in(source, "created")
        assert record["resource"] == {"socket_type": "PAIR", "bind": ["inproc://app"]}

    def test_fork_child_may_close_but_not_use(self, tmp_path: Path) -> None:
        # libzmq is not fork-safe: the child must not use the parent's sockets. pyzmq's
        # close() in the child touches nothing of libzmq: it is letting go.
        source = """
            import gc, os, zmq, sanitizer
            from sanitizer.plugin import record_of

            ctx = zmq.Context()
            a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
            a.bind("inproc://fork")
            b.connect("inproc://fork")
            pid = os.fork()
            if pid == 0:
                code = 3
                try:
                    assert record_of(a) is not None  # tracked in the child too
                    a.close()  # let go
                    with b:
                        b.send(b"from the child")  # used
                except sanitizer.ThreadAffinityError:
                    code = 0  # raised before it reached the parent's libzmq
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
            b.send(b"parent")
            print(a.recv().decode())
            ctx.destroy(linger=0)
        """
        proc, records = run_program(tmp_path, source, "action=log+raise")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "parent"
        [record] = records
        assert (record["policy"], record["operation"]) == ("process", "send")
        assert record["pid"] != record["owner_pid"]
        assert record["access_stack"][0]["line"] == line_in(source, "used")
        assert "inherited across fork()" in record["message"]
        # __exit__'s close (after the raise) let go as well: one report only.
        assert json.dumps(record).count("from the child") == 0
