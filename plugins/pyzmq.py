"""Thread-affinity checks for pyzmq: a ZeroMQ socket is used by one thread at a time.

libzmq sockets are not thread-safe: a socket may move to another thread (a
handoff), but two threads must never be inside it at once. So every socket made
while the sanitizer runs (``Context.socket()``, ``zmq.Socket(ctx, type)``, an
asyncio socket, a subclass's) gets an ``exclusive`` record. ``zmq.Socket``, a
Python subclass of the Cython socket, is patched in place: ``type()``,
``isinstance()`` and ``repr()`` are unchanged, and a call costs one guard frame.
(A guarded subclass swapped in as ``Context._socket_class`` measured 1% cheaper
per send+recv, its record in a slot, but would miss ``zmq.Socket(ctx, type)``,
asyncio sockets and users' subclasses, and change ``type()``.)

Not tracked: the Context (thread-safe: ``socket()``, ``term()``, options, from
any thread), and the draft socket types that libzmq makes thread-safe. A shadow
of a tracked socket (``zmq.Socket(sock)``, ``Socket.shadow(sock.underlying)``,
``copy(sock)``, an asyncio socket's inner one) is the same libzmq socket and
shares its record. A ``Poller.poll()`` is inside each socket it polls.

Reports carry ``resource`` = the socket type and its endpoints, never a message.
"""

from __future__ import annotations

import functools
import weakref
from types import ModuleType
from typing import Any

from sanitizer.plugin import EXCLUSIVE, OWN, Check, Context, Methods, Plugin, internal_error

RELEASE, NONE = Check.RELEASE, Check.NONE

# Socket types whose libzmq sockets are thread-safe (socket_base_t's thread_safe
# flag; ZMQ_THREAD_SAFE says so, and tests/test_pyzmq.py asks it). All are draft
# types, looked up by name (pyzmq may lack them). Not gated on zmq.DRAFT_API: the
# libzmq that pyzmq 27 bundles makes them while DRAFT_API is False.
THREAD_SAFE_TYPES = ("SERVER", "CLIENT", "RADIO", "DISH", "GATHER", "SCATTER", "PEER",
                     "CHANNEL")

# Every call that reaches the libzmq socket follows the policy: libzmq allows no
# concurrency on a socket at all, not even getsockopt (ZMQ_EVENTS runs the
# socket's command queue). The composites (send_multipart, recv_string, send_json
# ...) are guarded whole, not only through the send()/recv() they call: another
# thread's send() between two frames of a send_multipart() lands inside the
# message. Options read or set as attributes (sock.linger = 0, sock.rcvmore, hwm)
# go through get()/set(). Hot methods get exact parameter lists (OWN copies a
# Python method's own; the Cython ones would get *args, **kwargs).
SOCKET_METHODS: Methods = {
    "send": OWN, "recv": "flags=0, copy=True, track=False", "recv_into": OWN,
    "send_multipart": OWN, "recv_multipart": OWN, "send_string": OWN, "recv_string": OWN,
    "send_unicode": OWN, "recv_unicode": OWN, "send_json": OWN, "recv_json": OWN,
    "send_pyobj": OWN, "recv_pyobj": OWN, "send_serialized": OWN, "recv_serialized": OWN,
    "poll": OWN, "fileno": "",
    "set": "option, optval", "get": "option",
    "setsockopt": "option, optval", "getsockopt": "option",
    "set_string": OWN, "get_string": OWN, "setsockopt_string": OWN,
    "getsockopt_string": OWN, "setsockopt_unicode": OWN, "getsockopt_unicode": OWN,
    "set_hwm": OWN, "get_hwm": "", "subscribe": OWN, "unsubscribe": OWN,
    "join": OWN, "leave": OWN,
    "monitor": OWN, "get_monitor_socket": OWN, "disable_monitor": "",
    # These also note the endpoint in the record's resource (ENDPOINTS below).
    "bind": OWN, "connect": OWN, "unbind": OWN, "disconnect": OWN,
    "bind_to_random_port": OWN,
    # Closing in a forked child is letting go: pyzmq calls zmq_close() only in
    # the process that made the socket, so it touches nothing of the parent's
    # libzmq, which is not fork-safe at all (any other call in the child would
    # use the parent's I/O threads and mailboxes, and is reported). In the
    # parent, closing while another thread is inside the socket is a race.
    "close": ("linger=None", RELEASE), "__exit__": ("*args, **kwargs", RELEASE),
    "__enter__": ("", NONE),  # returns the socket
}
# Not guarded: `closed`, `type`, `context`, `underlying` and repr() (read the
# socket's own fields), shadow() and copy() (a new handle: it shares the
# record), and __del__: finalization, on whichever thread the GC runs, is no use.

# Methods that add (True) or remove (False) an endpoint, and the resource key.
ENDPOINTS = {"bind": ("bind", True), "connect": ("connect", True),
             "unbind": ("bind", False), "disconnect": ("connect", False)}


def _note_endpoint(sock: Any, key: str, address: Any, add: bool) -> None:
    record = Context.record_of(sock)
    if record is None:
        return
    if isinstance(address, bytes):
        address = address.decode("utf-8", "replace")
    resource = dict(record.resource or {})  # a new dict: a report built keeps its own
    endpoints = [e for e in resource.get(key, ()) if e != address]
    resource[key] = [*endpoints, address] if add else endpoints
    record.resource = {k: v for k, v in resource.items() if v}


def _with_endpoint(method: Any, key: str, add: bool) -> Any:
    """``method(self, addr)``, then the endpoint noted (bind's real one: port 0, ``*``)."""
    @functools.wraps(method)
    def call(self: Any, addr: Any) -> Any:
        result = method(self, addr)
        try:  # pyzmq's bind() returns a context manager holding LAST_ENDPOINT
            _note_endpoint(self, key, getattr(result, "addr", addr), add)
        except Exception as exc:
            internal_error(exc, f"pyzmq: noting a {key} endpoint")
        return result
    return call


def install(zmq: ModuleType, context: Context) -> None:
    socket_class: Any = zmq.Socket
    thread_safe = {getattr(zmq, name) for name in THREAD_SAFE_TYPES if hasattr(zmq, name)}
    # Live sockets by libzmq address, for shadows to find the record they share.
    by_address: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()

    def track(sock: Any) -> None:
        if sock.__dict__.get("type") in thread_safe:  # zmq.Socket.__init__ set it
            return
        if sock._shadow:
            parent = by_address.get(sock.underlying)
            record = context.record_of(parent) if parent is not None else None
            if record is not None:
                context.attach(sock, record)
                return
        record = context.record(sock, EXCLUSIVE, resource={"socket_type": sock._type_name})
        context.attach(sock, record)
        by_address[sock.underlying] = sock

    original_init = socket_class.__init__

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        # After the Cython socket exists: its type and address decide. (Its own
        # get(TYPE) in __init__ met the class's untracked record.)
        try:
            track(self)
        except Exception as exc:
            context.internal_error(exc, "tracking a zmq.Socket")

    for name, (key, add) in ENDPOINTS.items():
        if hasattr(socket_class, name):
            context.replace(socket_class, name,
                            _with_endpoint(getattr(socket_class, name), key, add))
    context.patch_class(socket_class, EXCLUSIVE, SOCKET_METHODS)
    context.replace(socket_class, "__init__", __init__)

    poller = zmq.Poller
    original_poll = poller.poll
    local = context.local

    # zmq_poll() is inside every socket it polls: an exclusive guard written by
    # hand, for all of them at once (nested generated guards cost twice as much).
    # Not seen: zmq.proxy() (imported by name, e.g. by zmq.devices) and zmq.select().
    claim, release = context.claim, context.release

    @functools.wraps(original_poll)
    def poll(self: Any, timeout: int | None = None) -> Any:
        me = local.token
        held: list[Any] = []
        try:
            reported = False
            for sock, _flags in self.sockets:
                record = getattr(sock, "_sanitizer_record", None)  # None for a raw fd
                if record is None or record.policy is None or record.busy is me:
                    continue
                held.append(record)
                holder = claim(record, me)
                if holder is not None and context.check(sock, record, "poll", holder):
                    reported = True
            if not reported:
                return original_poll(self, timeout)
            with context.quiet():
                return original_poll(self, timeout)
        finally:
            for record in held:
                release(record, me)

    context.replace(poller, "poll", poll)


plugin = Plugin(name="pyzmq", hooks={"zmq": install}, libraries=("zmq",))
