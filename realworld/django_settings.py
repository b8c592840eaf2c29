"""Settings for Django's runtests.py: its own test_sqlite, with a runner that records outcomes."""

from __future__ import annotations

import json
import os
import time
import unittest
from typing import Any

from django.test.runner import DiscoverRunner
from test_sqlite import *  # noqa: F403 - runtests.py puts Django's tests/ on sys.path

TEST_RUNNER = "django_settings.RecordingRunner"
RESULTS_ENV = "REALWORLD_RESULTS"  # where the runner writes its JSON


class RecordingResult(unittest.TextTestResult):
    """Django's usual text result, also keeping each test's outcome and time window."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tests: dict[str, dict[str, Any]] = {}

    def _entry(self, test: unittest.TestCase) -> dict[str, Any]:
        return self.tests.setdefault(test.id(), {"outcomes": []})

    def startTest(self, test: unittest.TestCase) -> None:
        self._entry(test)["start"] = time.time()
        super().startTest(test)

    def stopTest(self, test: unittest.TestCase) -> None:
        super().stopTest(test)
        self._entry(test)["stop"] = time.time()

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self._entry(test)["outcomes"].append("passed")

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addFailure(test, err)
        self._entry(test)["outcomes"].append("failed")

    def addError(self, test: unittest.TestCase, err: Any) -> None:
        super().addError(test, err)  # also setUpClass errors, under their own id
        self._entry(test)["outcomes"].append("error")

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        self._entry(test)["outcomes"].append("skipped")

    def addExpectedFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self._entry(test)["outcomes"].append("xfail")

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        super().addUnexpectedSuccess(test)
        self._entry(test)["outcomes"].append("xpass")

    def addSubTest(self, test: unittest.TestCase, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:  # a failed subtest fails its test
            failed = issubclass(err[0], test.failureException)
            self._entry(test)["outcomes"].append("failed" if failed else "error")

    def stopTestRun(self) -> None:
        super().stopTestRun()
        with open(os.environ[RESULTS_ENV], "w") as out:
            json.dump(self.tests, out)


class RecordingRunner(DiscoverRunner):
    """DiscoverRunner with RecordingResult (unless --debug-sql or --pdb asks for theirs)."""

    def get_resultclass(self) -> Any:
        return super().get_resultclass() or RecordingResult
