"""A small threaded web app with a classic bug: one sqlite3 connection shared by all requests.

This is the shape of many Flask and http.server apps: a module-level
connection opened with check_same_thread=False "to make the error go away",
then used by every request thread. Under load two requests use it at once and
interleave their transactions. Run it under the sanitizer:

    SANITIZE_THREADS=1 python examples/flask_style_app.py
"""

from __future__ import annotations

import http.server
import sqlite3
import threading
import urllib.request

DB = sqlite3.connect(":memory:", check_same_thread=False)  # shared by every request: the bug
DB.execute("create table visits(path text, n integer)")

# A request handler that takes a while inside the database (here: a slow SQL
# function), so that two requests meet inside it, deterministically.
first_inside = threading.Event()
second_done = threading.Event()


def slow_lookup(path: str) -> str:
    if not first_inside.is_set():
        first_inside.set()
        second_done.wait(5)  # hold the connection until the other request is served
    return path


DB.create_function("slow_lookup", 1, slow_lookup)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        DB.execute("insert into visits values (slow_lookup(?), 1)", (self.path,))
        DB.commit()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, name="server", daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    slow = threading.Thread(target=urllib.request.urlopen, args=(url + "/slow",), name="client")
    slow.start()
    first_inside.wait(5)
    urllib.request.urlopen(url + "/fast").read()  # served while /slow holds the connection
    second_done.set()
    slow.join()
    server.shutdown()
    total = DB.execute("select count(*) from visits").fetchone()[0]
    print(f"served {total} requests")


if __name__ == "__main__":
    main()
