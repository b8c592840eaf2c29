"""``make demo``: run the buggy example app under the sanitizer and show the report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main() -> int:
    app = HERE / "flask_style_app.py"
    env = {**os.environ, "SANITIZE_THREADS": "format=console"}
    print(f"$ SANITIZE_THREADS=format=console python {app.relative_to(HERE.parent)}\n",
          flush=True)
    # Capture and print in order: the report goes to the child's stderr.
    result = subprocess.run([sys.executable, str(app)], env=env, capture_output=True, text=True)
    print(result.stdout + result.stderr, flush=True)
    if result.returncode != 0:
        return result.returncode
    print("\nThe same run as JSON lines (for machines): SANITIZE_THREADS=format=json\n",
          flush=True)
    # With DEMO_LOG (make demo sets it) this run also keeps each object's last accesses
    # and its JSON lines are saved there, for the HTML report.
    log = os.environ.get("DEMO_LOG")
    env["SANITIZE_THREADS"] = "format=json,history=8" if log else "format=json"
    json_run = subprocess.run([sys.executable, str(app)], env=env, capture_output=True,
                              text=True)
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        # Only the JSON lines: the exit summary for people goes to stderr too.
        Path(log).write_text("".join(line for line in json_run.stderr.splitlines(True)
                                     if line.startswith("{")))
    print(json_run.stderr.splitlines()[0][:400] + " ...")
    if json_run.returncode != 0:
        return json_run.returncode

    test = HERE / "test_shared_connection.py"
    print(f"\n$ pytest --sanitize-threads {test.relative_to(HERE.parent)}"
          "   # the same bug, caught in a test suite\n", flush=True)
    env.pop("SANITIZE_THREADS")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "--sanitize-threads", str(test)], env=env, capture_output=True,
                           text=True, cwd=HERE)
    print(tests.stdout + tests.stderr)
    # The example exists to fail under the sanitizer: anything else is a broken demo.
    return 0 if tests.returncode == 1 else tests.returncode or 1


if __name__ == "__main__":
    sys.exit(main())
