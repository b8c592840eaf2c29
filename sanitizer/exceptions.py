"""The sanitizer's exception and warning hierarchy."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sanitizer.report import Violation


class SanitizerError(Exception):
    """Base class of every exception the sanitizer raises on purpose."""


class ConfigError(SanitizerError, ValueError):
    """A bad option: the message is one line that names the key and the accepted values."""

    def __init__(self, message: str, *, key: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.key = key
        self.value = value


class ThreadAffinityError(SanitizerError, RuntimeError):
    """Raised in the offending thread, before the call reaches the library (action=raise)."""

    def __init__(self, violation: Violation) -> None:
        super().__init__(violation.message)
        self.violation = violation


class ThreadAffinityWarning(RuntimeWarning):
    """Issued for a violation when the action includes ``warn``."""
