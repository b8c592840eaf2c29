"""SARIF 2.1.0 for code-scanning tools: one result per finding, one rule per policy met.

The access site is a result's location; the creation site and the holder's site
(the other thread's first frame outside libraries, where the policy has one) are
its related locations; the
stacks are its code flows. Paths under the current directory are relative to
``%SRCROOT%``, others are ``file://`` URIs. Nothing in it points at the network.
"""

from __future__ import annotations

import os
import pathlib
import urllib.parse
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from sanitizer import logs, stacks

VERSION = "2.1.0"
SRCROOT = "%SRCROOT%"

#: Each policy's rule: (what it reports, how such bugs are usually fixed). An
#: event's own ``hint`` (its policy's words) is preferred as the help.
POLICIES: dict[str, tuple[str, str]] = {
    "strict": ("An object used from a thread other than the one that owns it.",
               "Give each thread its own (a connection per thread, or a pool), or hand it "
               "over explicitly with sanitizer.transfer()."),
    "exclusive": ("An object used by two threads at the same time.",
                  "Serialize its use with a lock, or give each thread its own."),
    "process": ("An object inherited across fork() and used in the child process.",
                "Open it after the fork, in each process (a post-fork hook, no --preload)."),
    "concurrent": ("An object used by one thread while another was inside a call on it.",
                   "Serialize its use with a lock, or give each thread its own."),
    "loop": ("An asyncio object used under another event loop, or from a thread other "
             "than the one running its loop.",
             "Use it only on its own loop; from other threads, call_soon_threadsafe or "
             "asyncio.run_coroutine_threadsafe."),
    "event-loop": ("An event loop's thread-unsafe method called from another thread.",
                   "Use loop.call_soon_threadsafe or asyncio.run_coroutine_threadsafe."),
    "task": ("An object entered by a second asyncio task while another was inside an "
             "operation on it.",
             "Give each task its own (a pool), or guard it with an asyncio.Lock."),
    "noblock": ("A blocking driver call on a thread whose event loop is running.",
                "Use the library's async driver, or run the call in a thread "
                "(asyncio.to_thread)."),
}
UNKNOWN_POLICY = ("An object used against its thread-affinity policy.",
                  "See the message for the owner and the offending use.")


def _version() -> str:
    try:
        return metadata.version("sanitize-threads")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "0"


def sarif(findings: Sequence[logs.Finding], root: str | None = None) -> dict[str, Any]:
    """The SARIF log of ``findings``; ``root`` (default: the current directory) is %SRCROOT%."""
    root = os.path.abspath(root or os.getcwd())
    policies = list(dict.fromkeys(f.policy for f in findings))
    return {
        "version": VERSION,
        "runs": [{
            "tool": {"driver": {
                "name": "sanitize-threads",
                "version": _version(),
                "rules": [_rule(policy, findings) for policy in policies],
            }},
            "originalUriBaseIds": {SRCROOT: {"uri": pathlib.Path(root).as_uri() + "/"}},
            "results": [_result(f, policies.index(f.policy), root) for f in findings],
        }],
    }


def _rule(policy: str, findings: Sequence[logs.Finding]) -> dict[str, Any]:
    short, help_text = POLICIES.get(policy, UNKNOWN_POLICY)
    hint = next((str(f.event["hint"]) for f in findings
                 if f.policy == policy and f.event.get("hint")), None)
    help_text = hint or help_text
    return {
        "id": policy,
        "name": "".join(part.capitalize() for part in policy.split("-")) + "Policy",
        "shortDescription": {"text": short},
        "fullDescription": {"text": f"{short} {help_text}"},
        "help": {"text": help_text},
        "defaultConfiguration": {"level": "warning"},
    }


def _result(finding: logs.Finding, rule_index: int, root: str) -> dict[str, Any]:
    event = finding.event
    result: dict[str, Any] = {
        "ruleId": finding.policy,
        "ruleIndex": rule_index,
        "level": "warning",
        "message": {"text": str(event.get("message") or finding.policy)},
        "locations": [location] if (location := _location(finding.access_site, root)) else [],
        "partialFingerprints": {"sanitizeThreads/v1": finding.fingerprint},
        "properties": {"count": finding.count, "processes": len(finding.processes),
                       "hosts": sorted(finding.hosts), "objectType": finding.object_type,
                       "operation": finding.operation},
    }
    related: list[dict[str, Any]] = []
    for site, message in ((finding.creation_site, "created here"),
                          (_site_of(event.get("holder_stack")), "in use at the same time here")):
        found = _location(site, root, message, len(related) + 1)
        if found:
            related.append(found)
    if related:
        result["relatedLocations"] = related
    flows = []
    for field, what in (("access_stack", "used"), ("creation_stack", "created"),
                        ("holder_stack", "in use at the same time")):
        steps = [{"location": found} for frame in _frames(event.get(field))
                 if (found := _location(frame, root, f"{what}: {frame.get('function', '?')}"))]
        if steps:
            flows.append({"message": {"text": what}, "locations": steps[::-1]})  # outermost first
    if flows:
        result["codeFlows"] = [{"threadFlows": flows}]
    return result


def _frames(stack: object) -> list[dict[str, Any]]:
    return [f for f in stack if isinstance(f, dict)] if isinstance(stack, list) else []


def _site_of(stack: object) -> dict[str, Any] | None:
    """A stack's site as the events choose theirs: its first frame outside libraries
    (the holder waits in threading.py, inside the user's function), else its first."""
    frames = _frames(stack)
    user = [f for f in frames if stacks.library_of(str(f.get("file", ""))) is None]
    chosen = user or frames
    return chosen[0] if chosen else None


def artifact(path: str, root: str) -> dict[str, str] | None:
    """An artifactLocation: relative to %SRCROOT% when under it, else a file:// URI;
    None for a pseudo file (``<string>``), which no tool could open."""
    if not path or path.startswith("<") or not os.path.isabs(path):
        return None
    prefix = os.path.join(root, "")
    if path.startswith(prefix):
        return {"uri": urllib.parse.quote(pathlib.PurePath(path[len(prefix):]).as_posix()),
                "uriBaseId": SRCROOT}
    return {"uri": pathlib.Path(path).as_uri()}


def _location(site: dict[str, Any] | None, root: str, message: str | None = None,
              id: int | None = None) -> dict[str, Any] | None:
    if not site:
        return None
    place = artifact(str(site.get("file", "")), root)
    if place is None:
        return None
    physical: dict[str, Any] = {"artifactLocation": place}
    line = site.get("line")
    if isinstance(line, int) and line >= 1:
        physical["region"] = {"startLine": line}
    location: dict[str, Any] = {"physicalLocation": physical}
    if site.get("function"):
        location["logicalLocations"] = [{"name": str(site["function"]), "kind": "function"}]
    if message:
        location["message"] = {"text": message}
    if id is not None:
        location["id"] = id
    return location
