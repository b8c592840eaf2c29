"""Shared by the real-world suites: fetch an sdist, run twice, compare outcomes, check reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

# Worst first: a test reported twice (call failed, teardown errored) keeps the worst.
RANK = ["error", "failed", "xpass", "passed", "xfail", "skipped"]

# (policy, test file relative to the suite's test root, function of the innermost
# frame in that tree) -> why it is a real cross-thread use.
Expected = Mapping[tuple[str, str, str], str]


@dataclass
class Run:
    """One pass over the suite: its outcomes per test id and, when sanitized, its reports."""

    label: str
    seconds: float = 0.0
    returncodes: list[int] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)
    reports: list[dict] = field(default_factory=list)

    def record(self, test_id: str, outcome: str) -> None:
        old = self.outcomes.get(test_id)
        if old is None or RANK.index(outcome) < RANK.index(old):
            self.outcomes[test_id] = outcome

    def counts(self) -> str:
        found = [o for o in RANK if o in self.outcomes.values()]
        return ", ".join(f"{list(self.outcomes.values()).count(o)} {o}" for o in found)


def fetch_sdist(project: str, version: str, workdir: Path) -> Path:
    """Download and unpack the sdist of ``project==version``; the unpacked directory."""
    print(f"== fetching the {project} {version} sdist from the index", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--no-binary", ":all:", f"{project}=={version}", "-d", str(workdir)],
                   check=True)
    archive = next(p for p in workdir.iterdir() if p.name.lower().startswith(project.lower())
                   and p.name.endswith(".tar.gz"))
    with tarfile.open(archive) as tar:
        try:
            tar.extractall(workdir, filter="data")
        except TypeError:  # Python without extraction filters (before 3.10.12)
            tar.extractall(workdir)  # the project's own sdist, from the index
    return workdir / archive.name.removesuffix(".tar.gz")  # sdists unpack to name-version/


def environment(log: Path | None, pythonpath: Path | None = None) -> dict[str, str]:
    """The child's environment: SANITIZE_THREADS unset (plain) or logging to ``log``."""
    env = {k: v for k, v in os.environ.items() if k != "SANITIZE_THREADS"}
    if log is not None:
        env["SANITIZE_THREADS"] = f"log,log_file={log}"
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath),
                                                          env.get("PYTHONPATH")]))
    return env


def require_sanitizer(env: Mapping[str, str], flags: tuple[str, ...] = ()) -> None:
    """Stop unless the .pth switches the sanitizer on in ``env``: no vacuous clean run."""
    probe = subprocess.run([sys.executable, *flags, "-c",
                            "import sys, sanitizer; sys.exit(not sanitizer.is_enabled())"],
                           env=env)
    if probe.returncode != 0:
        sys.exit(f"the sanitizer is not on with SANITIZE_THREADS={env.get('SANITIZE_THREADS')}")


def timed(run: Run, cmd: list[str], cwd: Path, env: Mapping[str, str], output: Path) -> None:
    """Run ``cmd`` with its output in ``output``; add its wall time and exit status to ``run``."""
    print(f"-- {run.label}: {' '.join(cmd[1:])}  (output: {output})", flush=True)
    start = time.perf_counter()
    with output.open("w") as out:
        code = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
                              ).returncode
    seconds = time.perf_counter() - start
    run.seconds += seconds
    run.returncodes.append(code)
    print(f"   exit status {code} in {seconds:.1f} s", flush=True)


def read_log(log: Path) -> list[dict]:
    """The sanitizer's JSON lines; the summary lines are dropped."""
    if not log.exists():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("event") != "thread_affinity_summary"]


def timestamp(record: dict) -> float:
    """A report's time as seconds since the epoch."""
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


def site(frames: list[dict], root: Path) -> tuple[str, int, str] | None:
    """The innermost frame in ``root`` (the suite's test tree): (relative file, line, function)."""
    prefix = str(root.resolve()) + os.sep
    for frame in frames:
        path = str(Path(frame["file"]).resolve())
        if path.startswith(prefix):
            return path[len(prefix):], frame["line"], frame["function"]
    return None


def describe(frames: list[dict], root: Path) -> str:
    found = site(frames, root)
    if found is not None:
        return f"{found[0]}:{found[1]} in {found[2]}"
    if frames:
        return f"{frames[0]['file']}:{frames[0]['line']} in {frames[0]['function']}"
    return "?"


def verdict(plain: Run, sanitized: Run, root: Path, expected: Expected,
            test_of: Callable[[dict], str]) -> int:
    """Print the comparison, the ratio and every report; 0 when nothing changed and all
    reports, and only they, are the expected ones."""
    ok = True
    print(f"\n== outcomes: plain: {plain.counts()}; sanitized: {sanitized.counts()}")
    changed = sorted(t for t in plain.outcomes.keys() | sanitized.outcomes.keys()
                     if plain.outcomes.get(t) != sanitized.outcomes.get(t))
    for test in changed:
        print(f"CHANGED: {test}: plain {plain.outcomes.get(test, 'absent')}, "
              f"sanitized {sanitized.outcomes.get(test, 'absent')}")
    if plain.returncodes != sanitized.returncodes:
        print(f"CHANGED: exit statuses {plain.returncodes} (plain) vs "
              f"{sanitized.returncodes} (sanitized)")
        ok = False
    ok = ok and not changed
    if not changed:
        print(f"no outcome changed ({len(plain.outcomes)} tests)")
    for test, outcome in sorted(plain.outcomes.items()):
        if outcome in ("failed", "error"):
            print(f"note: {test} is {outcome} in the plain run too")
    print(f"\n== wall time: plain {plain.seconds:.1f} s, sanitized {sanitized.seconds:.1f} s, "
          f"ratio {sanitized.seconds / plain.seconds:.2f}")

    print(f"\n== {len(sanitized.reports)} sanitizer record(s)")
    found = set()
    for record in sanitized.reports:
        if record.get("event") != "thread_affinity_violation":
            print(f"SANITIZER ERROR: {json.dumps(record)}")
            ok = False
            continue
        where = site(record["access_stack"], root)
        key = (record["policy"], where[0], where[2]) if where else (record["policy"], "?", "?")
        found.add(key)
        why = expected.get(key)
        print(f"{'expected' if why else 'UNEXPECTED'}: {record['policy']} on "
              f"{record['object_type']}.{record['operation']} (x{record.get('count', 1)})\n"
              f"  test:     {test_of(record)}\n"
              f"  access:   {describe(record['access_stack'], root)} "
              f"on thread {record['thread']['name']!r}\n"
              f"  created:  {describe(record['creation_stack'], root)} "
              f"on thread {record['owner_thread']['name']!r}\n"
              f"  why:      {why or 'NOT IN THE EXPECTED LIST: a false alarm until explained'}")
        ok = ok and why is not None
    for key in sorted(set(expected) - found):
        print("MISSED (expected, not reported):", *key)
        ok = False
    print(f"\n{'PASS' if ok else 'FAIL'}: {len(changed)} outcome(s) changed, {len(found)} "
          f"distinct report(s), {len(found & set(expected))} of {len(expected)} expected")
    return 0 if ok else 1
