"""Real pre-forking servers under SANITIZE_THREADS: gunicorn workers inherit the sanitizer."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import line_of, read_records

pytest.importorskip("gunicorn")

APP = """
    import sqlite3, threading
    DB = sqlite3.connect(":memory:", check_same_thread=False)  # opened in the master
    DB.execute("create table hits(n)")

    def app(environ, start_response):
        DB.execute("insert into hits values (1)")  # used in a forked worker
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [race() if environ["PATH_INFO"] == "/race" else b"ok"]

    def race():
        # The control: another thread is inside a query while this one sets an option.
        from sanitizer.ownership import record_of
        inside, release = threading.Event(), threading.Event()
        def hold():
            inside.set()
            release.wait(10)
            return 1
        DB.create_function("hold", 0, hold)
        holder = threading.Thread(target=lambda: DB.execute("select hold()").fetchall())
        holder.start()
        inside.wait(10)
        try:
            DB.text_factory = bytes  # raced: changes how the holder's rows decode
        finally:
            release.set()
            holder.join()
        DB.text_factory = str
        return b"tracked" if record_of(DB) is not None else b"untracked"
"""


def request(path: Path, deadline: float, url: str = "/") -> bytes:
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
                sock.sendall(f"GET {url} HTTP/1.0\r\n\r\n".encode())
                return b"".join(iter(lambda: sock.recv(4096), b""))
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # polling for the server socket to appear, with a deadline


@pytest.mark.parametrize(("preload", "expected"), [(True, ["process"]), (False, [])])
def test_gunicorn_workers(tmp_path: Path, preload: bool, expected: list[str]) -> None:
    """--preload opens the connection in the master: workers share it across fork()."""
    (tmp_path / "wsgi.py").write_text(textwrap.dedent(APP))
    log, sock = tmp_path / "v.jsonl", tmp_path / "g.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    env["SANITIZE_THREADS"] = f"log_file={log}"
    gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent))
    assert gunicorn is not None
    command = [gunicorn, "-w", "1", "-b", f"unix:{sock}", "wsgi:app"]
    server = subprocess.Popen(command + (["--preload"] if preload else []), cwd=tmp_path,
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        response = request(sock, time.monotonic() + 30)
        assert response.endswith(b"ok")
        if not preload:  # the control of the silent case: one race on the same DB
            assert read_records(log) == []  # written before the worker sent its response
            response = request(sock, time.monotonic() + 30, "/race")
            assert response.split(b"\r\n\r\n", 1)[1] == b"tracked"
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    records = read_records(log)  # written before the worker sent its response
    if not preload:
        race, *records = records
        assert (race["policy"], race["operation"], race["access_stack"][0]["line"]) == (
            "exclusive", "text_factory", line_of(APP, "raced")), stderr
    assert [r["policy"] for r in records] == expected, stderr
    if preload:
        [record] = records
        assert record["pid"] != record["owner_pid"]
        assert record["creation_stack"][0]["line"] == 3
        assert record["access_stack"][0]["line"] == 7
