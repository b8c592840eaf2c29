"""Renderers (a console report for people, JSON lines for machines) and the sink they write to."""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import threading
from collections.abc import Callable
from typing import Any

from sanitizer import stacks
from sanitizer.options import Options

EVENT = "thread_affinity_violation"
#: At exit, one per process that reported: each kind's count, times and threads.
SUMMARY_EVENT = "thread_affinity_summary"
#: The version of the events' fields (README, "Event fields"). Readers of a log
#: (logs.py) read what they know of a newer one and say so once.
SCHEMA = 1
#: This machine, as events name it: logs from several hosts are merged.
HOST = os.uname().nodename


def iso(seconds: float) -> str:
    """A ``time.time()`` as the events' timestamps are written: ISO 8601, UTC, with Z."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


class OwnDescriptor:
    """A descriptor the sanitizer opened itself, reopened (by ``reopen``) whenever the
    program closed it or put a file of its own under its number (a daemon's
    ``closerange``, a ``dup2``): the sanitizer never writes to, or closes, the program's.

    Checked before each write; writes are rare (one per unique violation). With
    ``by_path``, a file of ours that was deleted (or its folder) is reopened too:
    lines written to an unlinked file are lost without a trace.
    """

    def __init__(self, reopen: Callable[[], int], *, now: bool = True,
                 by_path: bool = False) -> None:
        self.reopen = reopen
        self.by_path = by_path
        self.fd = -1
        self._identity: tuple[int, int] | None = None
        if now:
            self._open()  # an OSError here, at start, is a bad path failing early

    def _open(self) -> None:
        self.fd = self.reopen()
        self._identity = _identity(self.fd)

    def write(self, data: bytes) -> None:
        """Write all of ``data``, to a descriptor of ours, or raise the OSError."""
        if self.fd < 0:
            self._open()
        else:
            try:
                st = os.fstat(self.fd)
                ours = (st.st_dev, st.st_ino) == self._identity
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise
                ours = False
            if not ours:
                self._open()  # the old number is the program's now (or free)
            elif self.by_path and st.st_nlink == 0:
                fd, self.fd = self.fd, -1
                os.close(fd)  # still ours, but nobody can read what goes there
                self._open()  # the path again; fails if its folder is gone
        while data:
            written = os.write(self.fd, data)
            data = data[written:]


#: Where the system keeps links to descriptors (/dev/stdout -> /proc/self/fd/1): followed.
_SYSTEM_LINK_DIRS = ("/dev", "/dev/fd")


class LineWriter:
    """structlog's logger at the end of our pipeline: one ``os.write`` per event.

    A single write of a whole line, on an O_APPEND descriptor, keeps lines from
    many threads and processes whole, and survives a following ``os._exit``.

    It writes only to the descriptor it opened itself (OwnDescriptor). A line that
    cannot be written is counted as lost, said once on fd 2, and never raised into
    the program.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path  # None: stderr
        self.name = path or "stderr"
        self.lost = 0
        self.failure: OSError | None = None
        # One check-reopen-write at a time (no leaked reopens); reentrant, so that a
        # signal handler reporting in the middle of a write cannot deadlock the program.
        self._lock = threading.RLock()
        #: fd 2's file when we started (None: not open for writing): "stderr" from then on,
        #: where people are told (``tell``) through a copy of our own.
        self._stderr = _writable_identity(2)
        # With no stderr at all, every report to it is counted as lost (never raised).
        self._told = OwnDescriptor(self._dup_stderr, now=self._stderr is not None)
        self._out = self._told if path is None else OwnDescriptor(self._open, by_path=True)

    @property
    def fd(self) -> int:
        return self._out.fd

    def _open(self) -> int:
        """A new descriptor for our destination, close-on-exec: children never inherit it."""
        if self.path is None:
            # Reports go to stderr, even if the program later rebinds sys.stderr;
            # os.dup's copy is non-inheritable (PEP 446), i.e. close-on-exec.
            return os.dup(2)
        # Owner-only (0600) always, not only with include_args: several processes append to
        # one log and the first to create it sets the mode, whatever its own options. Not
        # through a symlink at the last component: a planted link must not redirect reports
        # (but /dev/stdout, /dev/stderr and /dev/fd/N are the system's own links).
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        if os.path.dirname(os.path.abspath(self.path)) not in _SYSTEM_LINK_DIRS:
            flags |= os.O_NOFOLLOW
        try:
            return os.open(self.path, flags, 0o600)
        except (OSError, ValueError) as exc:
            if getattr(self, "_out", None) is not None:
                raise  # a reopen (the path worked at start): counted as lost by msg
            # At start: a bad option, said in one line as any other is.
            from sanitizer.exceptions import ConfigError
            from sanitizer.options import shown

            if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
                reason = "is a symbolic link (not followed)"
            else:
                reason = (f"cannot open: {exc.strerror}" if isinstance(exc, OSError)
                          else "not a file name")
            raise ConfigError(f"log_file={shown(self.path)}: {reason}",
                              key="log_file", value=self.path) from None

    def _dup_stderr(self) -> int:
        """A new descriptor for stderr, close-on-exec (os.dup, PEP 446): fd 2 again, but only
        while it is the file it was when we started. A program that closed fd 2 gets that
        number for its next file, which must never get our lines."""
        if self._stderr is None or _writable_identity(2) != self._stderr:
            raise OSError(errno.EBADF, "stderr was closed or replaced by the program")
        return os.dup(2)

    def _write(self, data: bytes) -> None:
        """Write all of ``data`` to our destination, or raise the OSError."""
        self._out.write(data)

    def msg(self, message: str) -> None:
        """Write one event line; if it cannot be written, count it as lost instead."""
        data = _line(message)
        with self._lock:
            if self.failure is None:
                try:
                    self._write(data)
                    return
                except OSError as exc:  # ENOSPC, EPIPE, EIO, a failed reopen, ...
                    self.failure = exc
                    self._say_failure(exc)
            self.lost += 1

    warning = error = info = critical = debug = msg

    def write_text(self, text: str) -> None:
        """Lines that are not reports (the exit summary): best effort, not counted."""
        with self._lock:
            if self.failure is None:
                try:
                    self._write(_line(text))
                except OSError:
                    pass

    def tell(self, text: str) -> None:
        """Lines for people on stderr (the first loss, the exit summary), best effort: to
        the stderr we started with, never into a file the program put on fd 2 since."""
        with self._lock:
            try:
                self._told.write(_line(text))
            except OSError:
                pass  # stderr may be the very destination that broke

    def _say_failure(self, exc: OSError) -> None:
        """The first loss is said once, on stderr; later ones only count."""
        self.tell(f"sanitizer: cannot write reports to {self.name}: {exc}; "
                  "further reports are counted, not written")

    def reset_after_fork(self) -> None:
        """A child counts (and says) its own losses; the lock may have been held at fork."""
        self._lock = threading.RLock()
        self.lost = 0
        self.failure = None


def _line(text: str) -> bytes:
    """One line, encoded: what a single write sends."""
    return (text.rstrip("\n") + "\n").encode("utf-8", "replace")


def _identity(fd: int) -> tuple[int, int]:
    """Which file a descriptor is open on."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _writable_identity(fd: int) -> tuple[int, int] | None:
    """Which file ``fd`` is open on for writing; None if it is closed or read-only (with fd
    2 closed at start, site.py's .pth file is fd 2 while the sanitizer starts)."""
    try:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            return None
        return _identity(fd)
    except OSError:
        return None


def render_console(_logger: object, _method: str, event_dict: dict[str, Any]) -> str:
    """A ThreadSanitizer-like report for people."""
    if event_dict.get("event") != EVENT:
        import structlog

        return structlog.dev.ConsoleRenderer(colors=False)(_logger, _method, event_dict)
    e = event_dict

    def thread(info: dict[str, Any], pid: int, alive: bool = True) -> str:
        state = "" if alive else ", exited"
        return (f"thread T{info['serial']} '{info['name']}' (ident {info['ident']}, "
                f"native {info['native_id']}{state}) in pid {pid}")

    def loop(info: dict[str, Any]) -> str:
        state = info.get("state", "idle")
        runner = info.get("thread")
        if state == "running" and runner:
            state = f"running in thread T{runner.get('serial')} '{runner.get('name')}'"
        elif state == "closed" and info.get("closed"):
            state = f"closed at {info['closed']}"
        return f"event loop L{info.get('serial')} {info.get('type', '')} ({state})"

    def task(info: dict[str, Any]) -> str:
        coroutine = info.get("coroutine")
        return f"'{info.get('name')}'" + (f" ({coroutine}())" if coroutine else "")


    what = e["object_type"] + (f" {e['object_name']!r}" if e.get("object_name") else "")
    lines = [
        "=" * 18,
        f"WARNING: thread-affinity violation ({e['policy']}) on {what} at {e['object_id']}",
        f"  {e['message']}",
        f"  {e['operation']} by {thread(e['thread'], e['pid'])}:",
        *_console_frames(e["access_stack"]),
    ]
    lines += [f"    ({c})" for c in e.get("context", ())]
    if e.get("holder_thread"):
        lines.append(f"  At the same time in use by {thread(e['holder_thread'], e['pid'])}:")
        lines += _console_frames(e.get("holder_stack") or [])
    elif e.get("holder_task"):
        lines.append(f"  At the same time inside: task {task(e['holder_task'])}, waiting at:")
        lines += _console_frames(e.get("holder_stack") or [])
    created = e.get("root_type") or e["object_type"]
    if e.get("owner_loop") and e.get("bound_stack"):
        by = f" in task {task(e['bound_task'])}" if e.get("bound_task") else ""
        lines.append(f"  {created} bound to {loop(e['owner_loop'])}{by}:")
        lines += _console_frames(e["bound_stack"])
    elif e.get("owner_loop"):
        lines.append(f"  {created} belongs to {loop(e['owner_loop'])}")
    lines.append(f"  {created} created by "
                 f"{thread(e['owner_thread'], e['owner_pid'], e['owner_alive'])}:")
    lines += _console_frames(e["creation_stack"])
    lines += [f"    ({c})" for c in e.get("owner_context", ())]
    if e.get("resource"):
        lines.append("  resource: " + ", ".join(f"{k}={v}" for k, v in e["resource"].items()))
    if e.get("args"):
        lines.append("  arguments: " + ", ".join(f"{k}={v}" for k, v in e["args"].items()))
    if e.get("hint"):
        lines.append(f"  hint: {e['hint']}")
    user = [f for f in e["access_stack"] if not stacks.is_library_file(str(f["file"]))]
    site = (user or e["access_stack"] or [None])[0]
    where = f"{site['file']}:{site['line']} in {site['function']}" if site else "<unknown>"
    lines += [f"SUMMARY: thread-affinity ({e['policy']}) {where}", "=" * 18]
    return "\n".join(lines)


def _console_frames(stack: list[dict[str, Any]]) -> list[str]:
    """A stack as a traceback shows it, innermost first: each frame with its source line
    (when the file is here), and a run of more than ``stacks.FOLD_OVER`` frames of one
    library as its first frame and a count. Frames keep their numbers in the stack."""
    if not stack:
        return ["    <no Python frames>"]
    lines: list[str] = []
    number = 0
    for run in stacks.fold(stack):
        shown = run.frames
        if run.library is not None and len(shown) > stacks.FOLD_OVER:
            shown = shown[:1]
        for frame in shown:
            lines.append(f"    #{number} {frame['file']}:{frame['line']} in {frame['function']}")
            number += 1
            try:
                source = stacks.source_lines(str(frame["file"]), int(str(frame["line"])))
            except (ValueError, OSError):
                source = []
            if source and source[0][1].strip():
                lines.append(f"        {source[0][1].strip()}")
        hidden = len(run.frames) - len(shown)
        if hidden:
            lines.append(f"    ... {hidden} frames in {run.library}")
            number += hidden
    return lines


def _json_default(value: object) -> str:
    return repr(value)


def processors(fmt: str) -> list[Callable[..., Any]]:
    """The pipeline, top to bottom: level, timestamp, then one renderer."""
    import structlog  # only once there is something to report: ~15 ms of start-up

    renderer: Callable[..., Any] = (
        render_console if fmt == "console"
        else structlog.processors.JSONRenderer(default=_json_default)
    )
    return [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        renderer,
    ]


def open_output(options: Options) -> tuple[LineWriter, str]:
    """Where events go, and their format (opened at start: a bad path fails early)."""
    writer = LineWriter(options.log_file or None)
    fmt = options.format or ("console" if not options.log_file and os.isatty(writer.fd)
                             else "json")
    return writer, fmt


def build_logger(writer: LineWriter, fmt: str) -> Any:
    """Our own pipeline: never ``structlog.configure()``, the app's logging is not ours."""
    import structlog

    return structlog.wrap_logger(
        writer,
        processors=processors(fmt),
        wrapper_class=structlog.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=False,
    )
