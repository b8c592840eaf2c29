"""Thread-affinity checks for Django's database connections, their cursors, and async_unsafe.

One record per ``DatabaseWrapper``, under ``strict`` (Django's own rule), made
when the wrapper is made. Everything beneath it shares that record:
``CursorWrapper``\\s and the driver connection and cursors. Django validates only
when a cursor is made (and on commit, close, savepoints); its sqlite backend
turns sqlite3's own check off. So a cursor handed to another thread, or the raw
driver connection, is caught here and nowhere else.

Which layer reports: the Django layer. The driver connection adopts the
wrapper's record as soon as ``connect()`` made it, and for sqlite3 it is made
from the sqlite3 plugin's *strict* class (Django passes
``check_same_thread=False``, which alone would mean ``exclusive``). One record
means one verdict, one sharing count (``inc_thread_sharing`` is mirrored into
it, so LiveServerTestCase is silent), and a misuse that passes through
CursorWrapper and then the driver cursor is reported once, by the outer layer
(the call then runs "quietly", as core guards do).

Not reported, because nothing is shared: a closed DatabaseWrapper, or one on an
in-memory SQLite database (fork copies it), used in a forked child, as Django's
parallel test runner does; closing a driver connection whose owner thread has
exited (cleanup, like GC). Sharing counted with ``inc_thread_sharing`` is allowed.

``async_unsafe``: Django's decorator asks ``get_running_loop()`` before database
work; that name is replaced in ``django.utils.asyncio`` (so methods decorated
before the sanitizer started are covered too) to report database work on a
thread whose event loop is running, even when DJANGO_ALLOW_ASYNC_UNSAFE is set.

One misuse, one report: the driver calls beneath Django's database work (under an
``async_unsafe`` method, a ``CursorWrapper``, or the fetches it hands out) are Django's to
check, so the drivers'
``noblock`` check stays silent there; a query from the ORM in async code is reported once,
as ``async_unsafe`` at its ``cursor()``, whether Django then raised or let it through. With
``django.async_unsafe=off``, ``noblock`` reports those driver calls as it would anywhere.
Not caught by either: a Django cursor made before the loop ran and used on it (Django
checks only where its cursors are made).
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable
from types import CodeType, FrameType, ModuleType
from typing import TYPE_CHECKING, Any

from sanitizer.plugin import (
    UNTRACKED,
    ConfigError,
    Context,
    OwnerRecord,
    Plugin,
    Policy,
    Strict,
    ThreadAffinityError,
    ThreadToken,
    Violation,
    new_record,
    qualified_type,
    record_of,
)

if TYPE_CHECKING:
    import asyncio

ALLOW_ENV = "DJANGO_ALLOW_ASYNC_UNSAFE"
ASYNC_UNSAFE_MODES = ("always", "allowed", "off")

# The DatabaseWrapper of each record, for the few checks that need it (cold path).
_wrappers: weakref.WeakKeyDictionary[OwnerRecord, weakref.ref[Any]] = (
    weakref.WeakKeyDictionary())


class DjangoStrict(Strict):
    """Strict, for a DatabaseWrapper and everything beneath it, knowing what fork copies."""

    name = "strict"

    def violated(
        self, record: OwnerRecord, token: ThreadToken, holder: object,
        obj: object = None, operation: str = "",
    ) -> str | None:
        verdict = super().violated(record, token, holder, obj, operation)
        if verdict == self.name and _closing_after_owner_exit(record, obj, operation):
            return None
        if verdict == "process" and _private_after_fork(record):
            record.transfer_to_current_thread()  # the child's own copy from now on
            return None
        return verdict



def _private_after_fork(record: OwnerRecord) -> bool:
    """An in-memory SQLite database is copied by fork(): the child's connection shares
    nothing with the parent's (Django's parallel test runner relies on this)."""
    ref = _wrappers.get(record)
    wrapper = ref() if ref is not None else None
    try:
        return bool(wrapper is not None and wrapper.vendor == "sqlite"
                    and wrapper.is_in_memory_db())
    except Exception:  # settings gone or half-built: keep the report
        return False


def _closing_after_owner_exit(record: OwnerRecord, obj: object, operation: str) -> bool:
    """Closing a driver connection whose owner thread has exited is cleanup, like GC:
    nobody else can be using it (Django's own tests close their threads' connections
    so). A DatabaseWrapper's close() stays reported: Django raises there too."""
    owner = record.owner
    if not isinstance(owner, ThreadToken) or owner.alive or operation != "close":
        return False
    ref = _wrappers.get(record)
    return ref is None or obj is not ref()


class AsyncUnsafe(Policy):
    """No database work (Django's @async_unsafe) on a thread whose event loop is running."""

    name = "async_unsafe"
    advice = "wrap the database work in asgiref's sync_to_async"

    def violated(
        self, record: OwnerRecord, token: ThreadToken, holder: object,
        obj: object = None, operation: str = "",
    ) -> str | None:
        return super().violated(record, token, holder, obj, operation) or self.name

    def enter(self, obj: object, record: OwnerRecord, operation: str) -> Any:
        if _running_loop() is not None:
            _report_async(obj, record, operation)

    def describe(self, violation: Violation, record: OwnerRecord,
                 token: ThreadToken) -> str:
        if violation.policy != self.name:
            return super().describe(violation, record, token)
        loop = _running_loop()  # on the reporting thread: its own loop
        allowed = bool(os.environ.get(ALLOW_ENV))
        return (f"{violation.object_type}.{violation.operation} called by thread "
                f"{token.label} '{token.current_name()}' while its event loop "
                f"{type(loop).__name__} at {id(loop):#x} is running: database work blocks the "
                "loop"
                + (f" ({ALLOW_ENV} is set, so Django did not raise)" if allowed
                   else " (Django raises SynchronousOnlyOperation next)"))


def _running_loop() -> Any:
    asyncio = sys.modules.get("asyncio")  # never imported by the plugin itself
    return asyncio.events._get_running_loop() if asyncio is not None else None


DJANGO_STRICT = DjangoStrict()
ASYNC_UNSAFE = AsyncUnsafe()

CURSOR_METHODS: dict[str, str] = {
    "execute": "sql, params=None", "executemany": "sql, param_list",
    "callproc": "procname, params=None, kparams=None",
    "__enter__": "", "__exit__": "type, value, traceback",
}
# A CursorWrapper is checked against its DatabaseWrapper's record (record_from="db"),
# read on each call: no per-cursor work, and cursors made before enable() stay unchecked.
# Names of the Django methods that call validate_thread_sharing, as users know them.
OPERATIONS = {"_prepare_cursor": "cursor", "_cursor": "cursor"}

# -- DatabaseWrapper ------------------------------------------------------------------


def _install_base(base: ModuleType, context: Context) -> None:
    cls = base.BaseDatabaseWrapper
    context.replace(cls, "_sanitizer_record", UNTRACKED)

    def init(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
             ) -> Any:
        if "_sanitizer_record" not in vars(instance):
            alias = kwargs.get("alias", args[1] if len(args) > 1 else "default")
            instance.__dict__["_sanitizer_record"] = _wrapper_record(instance, alias)
        return wrapped(*args, **kwargs)

    context.wrap(cls, "__init__", init)
    original_validate = cls.validate_thread_sharing
    original_cursor = cls._cursor
    local = context.local

    def validate_thread_sharing(self: Any) -> None:
        record = self._sanitizer_record
        if local.token is not record.owner and not _renewed_after_fork(self, record):
            caller = sys._getframe(1).f_code.co_name
            context.check(self, record, OPERATIONS.get(caller, caller))
        original_validate(self)  # Django raises its own DatabaseError, unchanged

    # Django validates after the driver made the cursor: check on entry instead, so
    # that the report names cursor() and the driver's own check stays quiet.
    def _cursor(self: Any, name: Any = None) -> Any:
        record = self._sanitizer_record
        if (local.token is not record.owner and not _renewed_after_fork(self, record)
                and context.check(self, record, "cursor")):
            with context.quiet():  # reported: the driver beneath stays silent
                return original_cursor(self, name)
        return original_cursor(self, name)

    context.replace(cls, "validate_thread_sharing", validate_thread_sharing)
    context.replace(cls, "_cursor", _cursor)

    # Django's counted sharing is the record's: cursors and the driver honour it too.
    def inc(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        result = wrapped(*args, **kwargs)
        record = record_of(instance)
        if record is not None:
            record.share()
        return result

    def dec(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        result = wrapped(*args, **kwargs)  # raises below zero: then nothing to mirror
        record = record_of(instance)
        if record is not None:
            record.unshare()
        return result

    context.wrap(cls, "inc_thread_sharing", inc)
    context.wrap(cls, "dec_thread_sharing", dec)

    def connect(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> Any:
        record = record_of(instance)
        if record is not None:
            _renewed_after_fork(instance, record)
        result = wrapped(*args, **kwargs)
        record = record_of(instance)
        driver = getattr(instance, "connection", None)
        if record is not None and driver is not None:
            _adopt(driver, record)
        return result

    context.wrap(cls, "connect", connect)


def _wrapper_record(wrapper: Any, alias: Any) -> OwnerRecord:
    record = new_record(
        wrapper, DJANGO_STRICT, object_type=qualified_type(wrapper), name=str(alias),
        resource={"alias": alias, "vendor": getattr(wrapper, "vendor", "unknown")})
    _wrappers[record] = weakref.ref(wrapper)
    return record


def _renewed_after_fork(wrapper: Any, record: OwnerRecord) -> bool:
    """A closed wrapper in a forked child holds nothing of the parent's: the child may
    use it afresh, as Django's parallel test runner does (close, then reconnect)."""
    if record.pid == os.getpid() or record.policy is None:
        return False
    if vars(wrapper).get("connection") is not None:
        return False  # an inherited open connection: a real use across fork
    wrapper.__dict__["_sanitizer_record"] = _wrapper_record(wrapper, record.name)
    return True


def _adopt(driver: Any, record: OwnerRecord) -> None:
    """The driver connection (tracked by its own plugin) joins the wrapper's record."""
    if record_of(driver) is not None:
        Context.attach(driver, record)  # a driver without the slot stays as it is


def _install_sqlite_backend(backend: ModuleType, context: Context) -> None:
    """Django connects with check_same_thread=False, which alone would make the
    sqlite3 connection exclusive: made as part of the wrapper (Context.deriving),
    the sqlite3 plugin guards it by the wrapper's strict policy, with its record."""

    def get_new_connection(wrapped: Any, instance: Any, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> Any:
        record = record_of(instance)
        if record is None:
            return wrapped(*args, **kwargs)
        with context.deriving(record):
            return wrapped(*args, **kwargs)

    context.wrap(backend, "DatabaseWrapper.get_new_connection", get_new_connection)


# -- CursorWrapper --------------------------------------------------------------------


def _install_utils(utils: ModuleType, context: Context) -> None:
    cls = utils.CursorWrapper
    for name, params in CURSOR_METHODS.items():
        original = vars(cls).get(name)
        if original is not None:
            context.replace(cls, name, context.guard(DJANGO_STRICT, original, name, params,
                                                     record_from="db"))

    local = context.local
    original_getattr = cls.__getattr__
    original_iter = cls.__iter__

    # Delegated attributes (fetchone, close, rowcount ...) and iteration reach the
    # driver cursor later, outside this call: if it shares the record, it reports.
    def __getattr__(self: Any, attr: str) -> Any:
        record = self.db._sanitizer_record
        if local.token is not record.owner and not _driver_tracked(self, record):
            context.check(self, record, attr)
        return original_getattr(self, attr)

    def __iter__(self: Any) -> Any:
        record = self.db._sanitizer_record
        if local.token is not record.owner and not _driver_tracked(self, record):
            context.check(self, record, "__iter__")
        return original_iter(self)

    context.replace(cls, "__getattr__", __getattr__)
    context.replace(cls, "__iter__", __iter__)


def _driver_tracked(wrapper: Any, record: OwnerRecord) -> bool:
    """Whether the driver cursor beneath checks the same record (then it reports)."""
    cursor = vars(wrapper).get("cursor")
    if not Context.guarded_class(type(cursor)):
        return False
    # sqlite3 cursors read their connection's record.
    return (record_of(cursor) or record_of(getattr(cursor, "connection", None))) is record


# -- async_unsafe ---------------------------------------------------------------------


def _install_asyncio(module: ModuleType, context: Context) -> None:
    mode = context.options.get("async_unsafe", "always")
    if mode not in ASYNC_UNSAFE_MODES:
        raise ConfigError(f"bad value {mode!r} for django.async_unsafe; expected one of: "
                          f"{', '.join(ASYNC_UNSAFE_MODES)}", key="django.async_unsafe",
                          value=mode)
    if mode == "off":
        return
    import asyncio  # django.utils.asyncio has just imported it

    real = asyncio.get_running_loop
    get_loop = asyncio.events._get_running_loop
    only_allowed = mode == "allowed"

    def get_running_loop() -> asyncio.AbstractEventLoop:
        loop = get_loop()
        if loop is None:
            return real()  # raises RuntimeError, which async_unsafe expects
        if only_allowed and not os.environ.get(ALLOW_ENV):
            return loop  # Django raises SynchronousOnlyOperation: that is the report
        try:
            _async_unsafe_call(sys._getframe(1))
        except (ThreadAffinityError, Warning):
            raise  # asked for: action=raise, or warnings turned into errors
        except Exception as exc:
            context.internal_error(exc, "async_unsafe")
        return loop

    context.replace(module, "get_running_loop", get_running_loop)
    context.excuse_blocking(_beneath_django(module.async_unsafe(lambda: None).__code__))


def _beneath_django(inner: CodeType) -> Callable[[], bool]:
    """Whether a blocking driver call is Django's database work, which ``async_unsafe``
    covers (the noblock check asks, on its cold path): beneath an ``async_unsafe``
    method (``inner`` is the code all of them share), a CursorWrapper's call, or the
    error wrapper Django puts around the driver's fetches that a CursorWrapper hands out."""
    def beneath() -> bool:
        files = {getattr(sys.modules.get(name), "__file__", None)
                 for name in ("django.db.backends.utils", "django.db.utils")}
        frame: FrameType | None = sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            if code is inner or code.co_filename in files:
                return True
            frame = frame.f_back
        return False
    return beneath


def _async_unsafe_call(frame: FrameType) -> None:
    """Report the @async_unsafe function running in ``frame`` (cold: a loop is running)."""
    code = frame.f_code
    if code.co_name != "inner":
        return  # someone else in django.utils.asyncio asked for the loop
    # Decorated methods call each other (cursor -> ensure_connection -> connect):
    # the outermost one is the user's call, and the only one reported.
    outer = frame.f_back
    while outer is not None:
        if outer.f_code is code:
            return
        outer = outer.f_back
    func = frame.f_locals.get("func")
    args = frame.f_locals.get("args") or ()
    obj = args[0] if args else func
    record = record_of(obj) or new_record(obj, ASYNC_UNSAFE)
    if record.policy is not None:
        _report_async(obj, record, getattr(func, "__name__", "call"))


def _report_async(obj: object, record: OwnerRecord, operation: str) -> None:
    Context.report(obj, record, operation, ASYNC_UNSAFE.name, ASYNC_UNSAFE)


# -- asgiref roles ---------------------------------------------------------------------


def describe_thread() -> str | None:
    """Where in asgiref the calling thread is: loop, thread-sensitive or executor thread."""
    sync = sys.modules.get("asgiref.sync")
    if sync is None:
        return None
    handler = sync.SyncToAsync.thread_handler.__code__
    outer_sync = sync.AsyncToSync.__call__.__code__
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code is handler:
            sensitive = getattr(frame.f_locals.get("self"), "_thread_sensitive", None)
            if sensitive:
                return ("asgiref: in sync_to_async(thread_sensitive=True), on the "
                        f"thread-sensitive thread ({_sensitive_thread(sync, frame)})")
            return ("asgiref: in sync_to_async(thread_sensitive=False), on an executor "
                    "thread that other calls share in turn")
        if code is outer_sync:
            return ("asgiref: in async_to_sync; this thread also runs the thread-sensitive "
                    "sync_to_async calls made below it")
        frame = frame.f_back
    if _running_loop() is not None:
        return "asgiref: on the event-loop thread"
    return None


def _sensitive_thread(sync: ModuleType, frame: FrameType | None) -> str:
    executor = _executor_of(frame)
    if executor is None:
        return "the thread that called async_to_sync"
    if executor is sync.SyncToAsync.single_thread_executor:
        return "the process-wide single-thread executor, the default"
    if executor in list(sync.SyncToAsync.context_to_thread_executor.values()):
        return "a ThreadSensitiveContext's thread, e.g. one per ASGI request"
    return "an executor thread"


def _executor_of(frame: FrameType | None) -> Any:
    """The ThreadPoolExecutor whose worker runs ``frame`` (its _threads set lags behind)."""
    futures_thread = sys.modules.get("concurrent.futures.thread")
    worker = getattr(getattr(futures_thread, "_worker", None), "__code__", None)
    while frame is not None:
        if frame.f_code is worker:
            reference = frame.f_locals.get("executor_reference")
            return reference() if reference is not None else None
        frame = frame.f_back
    return None


plugin = Plugin(
    name="django",
    hooks={
        "django.utils.asyncio": _install_asyncio,
        "django.db.backends.base.base": _install_base,
        "django.db.backends.utils": _install_utils,
        "django.db.backends.sqlite3.base": _install_sqlite_backend,
    },
    libraries=("django", "asgiref"),
    describe_thread=describe_thread,
    policies=(ASYNC_UNSAFE,),
    options={"async_unsafe": "report database work on a thread running an event loop: "
                             "always (default), allowed (only when DJANGO_ALLOW_ASYNC_UNSAFE "
                             "is set, where Django stays silent), off"},
)
