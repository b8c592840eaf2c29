"""pytest-xdist: each worker attributes its own tests; the controller gathers their records.

A worker's per-test records travel in its reports' user properties (the same
JSON that JUnit XML shows), its session-level records and suppression hits in
its worker output. The controller runs no tests and no sanitizer.
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Any

import pytest

from sanitizer.plugins.pytest_plugin.render import PROPERTY

if TYPE_CHECKING:
    from sanitizer.plugins.pytest_plugin.session import _Plugin

WORKER_OUTPUT = "sanitize_threads"
WORKER_RULES = "sanitize_threads_rules"  # each worker's suppression hits, by origin


def roles(config: pytest.Config) -> tuple[bool, bool]:
    """(a worker, the controller): neither without xdist."""
    worker = hasattr(config, "workerinput")
    controller = not worker and config.getoption("dist", "no") not in ("no", None)
    return worker, controller


def worker_id(config: pytest.Config) -> str | None:
    workerinput = getattr(config, "workerinput", None)
    return workerinput["workerid"] if workerinput is not None else None


def take_report(plugin: _Plugin, report: pytest.TestReport) -> None:
    """On the controller: a worker's records travel in its teardown reports."""
    if report.when == "teardown":
        for name, value in report.user_properties:
            if name == PROPERTY and isinstance(value, str):
                with contextlib.suppress(ValueError):
                    plugin.take(json.loads(value))


def take_node_output(plugin: _Plugin, node: Any) -> None:
    """On the controller, when a worker ends: its session records and rule hits."""
    output = getattr(node, "workeroutput", None) or {}
    for data in json.loads(output.get(WORKER_OUTPUT, "[]")):
        plugin.take(data)
    for origin, (rule, hits) in json.loads(output.get(WORKER_RULES, "{}")).items():
        plugin.rule_hits.setdefault(origin, [rule, 0])[1] += int(hits)


def send_output(plugin: _Plugin) -> None:
    """On a worker, at session end: what the controller takes in take_node_output."""
    output = plugin.config.workeroutput  # type: ignore[attr-defined]
    output[WORKER_OUTPUT] = json.dumps(plugin.session_records(), default=repr)
    output[WORKER_RULES] = json.dumps(plugin.rule_hits)
