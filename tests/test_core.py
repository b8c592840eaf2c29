"""The per-thread token, in both cores: the C one (_speedups.Local) and the Python one."""

from __future__ import annotations

import gc
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from sanitizer import threads

try:
    from sanitizer import _speedups  # type: ignore[attr-defined]
except ImportError:
    _speedups = None


class Token:
    """A stand-in for ThreadToken, so that each test counts the tokens it made."""

    def __init__(self) -> None:
        self.ident = threading.get_ident()


def c_local() -> Any:
    if _speedups is None:
        pytest.skip("the C core did not build")
    return _speedups.Local(Token)


def python_local() -> Any:
    class Local(threading.local):
        def __init__(self) -> None:
            self.token = Token()

        ident = staticmethod(threading.get_ident)

    return Local()


@pytest.fixture(params=[c_local, python_local], ids=["c", "python"])
def local(request: pytest.FixtureRequest) -> Any:
    make: Callable[[], Any] = request.param
    return make()


def in_thread(func: Callable[[], Any]) -> Any:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(func()))
    thread.start()
    thread.join()
    return result[0]


def test_one_token_per_thread(local: Any) -> None:
    mine = local.token
    assert local.token is mine
    assert mine.ident == threading.get_ident()
    theirs = in_thread(lambda: (local.token, local.token))
    assert theirs[0] is theirs[1]
    assert theirs[0] is not mine
    assert local.token is mine  # the other thread's read did not replace ours


def test_threads_reading_in_turn_keep_their_own(local: Any) -> None:
    # Two live threads alternating: the C core's one-entry cache misses every time.
    barrier = threading.Barrier(2)
    seen: dict[str, list[Any]] = {"a": [], "b": []}

    def read(name: str) -> None:
        for _ in range(50):
            barrier.wait()
            seen[name].append((local.token, local.ident(), threading.get_ident()))

    workers = [threading.Thread(target=read, args=(name,)) for name in seen]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for reads in seen.values():
        assert len({id(token) for token, _, _ in reads}) == 1
        assert all(ident == real and token.ident == real for token, ident, real in reads)
    assert seen["a"][0][0] is not seen["b"][0][0]


def test_ident_is_get_ident(local: Any) -> None:
    assert local.ident() == threading.get_ident()
    ident, real = in_thread(lambda: (local.ident(), threading.get_ident()))
    assert ident == real


def test_setting_the_token_changes_only_this_thread(local: Any) -> None:
    original = local.token
    replacement = Token()
    local.token = replacement
    assert local.token is replacement
    other = in_thread(lambda: local.token)
    assert other is not replacement and other is not original
    assert local.token is replacement


def test_a_finished_threads_token_is_released(local: Any) -> None:
    ref = in_thread(lambda: weakref.ref(local.token))
    local.token  # noqa: B018 (a read from another thread lets the C cache go)
    gc.collect()
    assert ref() is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_the_forked_child_gets_a_new_token() -> None:
    parent = threads.local.token
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: renewed by the sanitizer's at-fork hook
        try:
            token = threads.local.token
            ok = token is not parent and token.pid == os.getpid()
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    os.close(read)
    assert answer == b"1"


def test_ci_uses_the_c_core() -> None:
    """CI builds the extension: a wheel that silently fell back would measure the wrong
    core. (SANITIZE_THREADS_CORE=python runs choose the Python one on purpose.)"""
    if os.environ.get("CI") != "true":
        pytest.skip("only asserted in CI")
    wanted = os.environ.get("SANITIZE_THREADS_CORE", "").strip().lower() or "c"
    assert wanted == threads.CORE
