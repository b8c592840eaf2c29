"""SARIF 2.1.0 from real logs: valid against the schema, and every location at its real line."""

from __future__ import annotations

import json
import linecache
import os
import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from support import line_of

from sanitizer import logs, sarifreport

SCHEMA = json.loads((Path(__file__).parent / "data" / "sarif-schema-2.1.0.json").read_text())

# A race (exclusive, with a holder thread inside a query) and a strict misuse.
PROGRAM = """
    import sqlite3, threading

    db = sqlite3.connect(":memory:", check_same_thread=False)  # race made
    inside, release = threading.Event(), threading.Event()
    def hold():
        inside.set()
        release.wait(60)  # holder waits
        return 1
    db.create_function("hold", 0, hold)
    holder = threading.Thread(target=lambda: db.execute("select hold()").fetchall())
    holder.start()
    inside.wait(60)
    try:
        db.text_factory = bytes  # raced
    finally:
        release.set()
        holder.join()

    mine = sqlite3.connect(":memory:")  # strict made
    def use():
        try:
            mine.execute("select 1")  # strict used
        except sqlite3.ProgrammingError:
            pass
    thread = threading.Thread(target=use)
    thread.start()
    thread.join()
"""


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, logs.Reading]:
    root = tmp_path_factory.mktemp("sarif")
    (root / "app.py").write_text(textwrap.dedent(PROGRAM))
    log = root / "v.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    env["SANITIZE_THREADS"] = f"log_file={log}"
    proc = subprocess.run([sys.executable, "app.py"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return root, logs.read([str(log)])


def locations(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every location in the document: results', related ones, and the code flows'."""
    for result in document["runs"][0]["results"]:
        yield from result["locations"]
        yield from result.get("relatedLocations", [])
        for flow in result.get("codeFlows", []):
            for thread_flow in flow["threadFlows"]:
                yield from (step["location"] for step in thread_flow["locations"])


def path_of(document: dict[str, Any], location: dict[str, Any]) -> str:
    artifact = location["physicalLocation"]["artifactLocation"]
    uri = artifact["uri"]
    if "uriBaseId" in artifact:
        base = document["runs"][0]["originalUriBaseIds"][artifact["uriBaseId"]]["uri"]
        uri = urllib.parse.urljoin(base, uri)
    assert uri.startswith("file:///")
    return urllib.request.url2pathname(urllib.parse.urlparse(uri).path)


def test_valid_and_every_location_is_a_real_line(logged: tuple[Path, logs.Reading],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root, reading = logged
    monkeypatch.chdir(root)
    document = sarifreport.sarif(reading.findings)
    jsonschema.Draft4Validator(SCHEMA).validate(document)
    seen = 0
    for location in locations(document):
        path = path_of(document, location)
        line = location["physicalLocation"]["region"]["startLine"]
        assert os.path.isfile(path) and linecache.getline(path, line).strip(), (path, line)
        seen += 1
    assert seen > 10  # the stacks' frames too, the standard library's among them
    app = str(root / "app.py")
    marked = {(path_of(document, loc), loc["physicalLocation"]["region"]["startLine"])
              for loc in locations(document)}
    for marker in ("race made", "raced", "holder waits", "strict made", "strict used"):
        assert (app, line_of(PROGRAM, marker)) in marked, marker


def test_results_rules_and_related_locations(logged: tuple[Path, logs.Reading],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root, reading = logged
    monkeypatch.chdir(root)
    run = sarifreport.sarif(reading.findings)["runs"][0]
    assert run["tool"]["driver"]["name"] == "sanitize-threads"
    assert "informationUri" not in run["tool"]["driver"]
    rules = {rule["id"]: rule for rule in run["tool"]["driver"]["rules"]}
    assert sorted(rules) == ["exclusive", "strict"]
    # Every event carries its policy's hint, which the rule's help is.
    [strict] = [f for f in reading.findings if f.policy == "strict"]
    assert strict.event["hint"] and rules["strict"]["help"]["text"] == strict.event["hint"]
    by_rule = {result["ruleId"]: result for result in run["results"]}
    race = by_rule["exclusive"]
    assert race["level"] == "warning" and "text_factory" in race["message"]["text"]
    assert run["tool"]["driver"]["rules"][race["ruleIndex"]]["id"] == "exclusive"
    where = race["locations"][0]["physicalLocation"]
    assert where["artifactLocation"] == {"uri": "app.py", "uriBaseId": "%SRCROOT%"}
    assert where["region"] == {"startLine": line_of(PROGRAM, "raced")}
    created, holder = race["relatedLocations"]
    assert created["message"]["text"] == "created here"
    assert created["physicalLocation"]["region"]["startLine"] == line_of(PROGRAM, "race made")
    assert holder["message"]["text"] == "in use at the same time here"
    assert holder["physicalLocation"]["region"]["startLine"] == line_of(PROGRAM, "holder waits")
    finding = next(f for f in reading.findings if f.policy == "exclusive")
    assert race["partialFingerprints"] == {"sanitizeThreads/v1": finding.fingerprint}
    assert race["properties"]["count"] == 1 and race["properties"]["processes"] == 1
    [only_created] = by_rule["strict"]["relatedLocations"]  # no holder: strict has none
    assert only_created["message"]["text"] == "created here"


def test_outside_the_root_file_uris_and_pseudo_files(logged: tuple[Path, logs.Reading],
                                                     tmp_path: Path) -> None:
    root, reading = logged
    finding = next(f for f in reading.findings if f.policy == "strict")
    elsewhere = sarifreport.sarif([finding], root=str(tmp_path))["runs"][0]["results"][0]
    uri = elsewhere["locations"][0]["physicalLocation"]["artifactLocation"]
    assert uri == {"uri": (root / "app.py").as_uri()}
    event = {**finding.event, "access_site": {"file": "<string>", "line": 1, "function": "f"},
             "access_stack": [{"file": "<string>", "line": 1, "function": "f"}],
             "hint": "a connection per thread, or a pool"}
    pseudo = logs.Finding(finding.fingerprint, event, counts=dict(finding.counts))
    document = sarifreport.sarif([pseudo], root=str(root))
    jsonschema.Draft4Validator(SCHEMA).validate(document)
    run = document["runs"][0]
    assert run["results"][0]["locations"] == []  # no file a tool could open
    assert run["tool"]["driver"]["rules"][0]["help"]["text"] == (
        "a connection per thread, or a pool")  # the event's own hint


def test_every_known_policy_has_its_help() -> None:
    assert set(sarifreport.POLICIES) == {"strict", "exclusive", "process", "concurrent",
                                         "loop", "event-loop", "task", "noblock"}
    assert all(short.endswith(".") and fix.endswith(".")
               for short, fix in sarifreport.POLICIES.values())
    document = sarifreport.sarif([])
    jsonschema.Draft4Validator(SCHEMA).validate(document)
    assert document["runs"][0]["results"] == []
