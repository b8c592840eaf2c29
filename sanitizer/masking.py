"""Masking credentials out of what reports carry: argument values (``include_args``) and
``resource``. Cold path only: it runs when a report is built.

What is masked, wherever it appears in a value (strings, bytes, and containers of them):
a URL's password (``postgresql://user:PASSWORD@host/db``, SQLAlchemy URLs), a
``password=``/``passwd=``/``pwd=`` item of a connection string (libpq's
``host=h password=secret``, ODBC's ``PWD=secret;``), the value under a key or argument
whose name says it is a secret (``password``, ``passwd``, ``secret``, ``token`` ...), and
SQL's ``PASSWORD '...'`` / ``IDENTIFIED BY '...'`` literals.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

#: Names of arguments and keys whose values are secrets (searched, case-insensitive).
_SECRET_NAME = re.compile(r"pass|pwd|secret|token|credential|api_?key|private_?key",
                          re.IGNORECASE)
_PATTERNS = (
    # SQL: ALTER ROLE r PASSWORD 'x', CREATE USER u IDENTIFIED BY 'x', PASSWORD('x').
    (re.compile(r"(\b(?:password|identified\s+by)(?:\s*=\s*|\s+|\s*\(\s*)(?:\w+\s*\(\s*)?)"
                r"'(?:''|\\.|[^'\\])*'", re.IGNORECASE),
     rf"\g<1>'{MASK}'"),
    # scheme://user:PASSWORD@host: the password is everything up to the last '@' of the
    # token (a password may hold '@'; masking too much is the safe side).
    (re.compile(r"(://[^\s:/?#@'\"]*:)[^\s'\"]*(@)"), rf"\g<1>{MASK}\g<2>"),
    # key=value connection strings: libpq (quoted '...', \-escapes), ODBC ({...}, ;).
    (re.compile(r"(\b(?:password|passwd|pwd)\s*=\s*)"
                r"(?:'(?:\\.|[^'\\])*'|\{[^}]*\}|(?:\\.|[^\s\\;,'\"])+)", re.IGNORECASE),
     rf"\g<1>{MASK}"),
)


def is_secret_name(name: object) -> bool:
    """Whether an argument or key of this name holds a secret (``password``, ``passwd``)."""
    return isinstance(name, str) and _SECRET_NAME.search(name) is not None


def mask_text(text: str) -> str:
    """``text`` with every password it visibly holds replaced by ``***``."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def mask(value: Any, depth: int = 0) -> Any:
    """``value`` with its secrets masked: strings and bytes by their text, mappings by key
    names too, lists, tuples and sets item by item. Other objects are returned as they
    are (their repr is masked as text where it is written: ``masked_repr``)."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("utf-8", "replace")
        masked = mask_text(text)
        return value if masked == text else masked.encode("utf-8")
    if depth > 8:  # nested past any real argument: the text pass below still runs
        return value
    if isinstance(value, Mapping):
        try:
            return {k: MASK if is_secret_name(k) else mask(v, depth + 1)
                    for k, v in value.items()}
        except Exception:  # an odd mapping: its repr is masked as text all the same
            return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [mask(item, depth + 1) for item in value]
        try:
            return type(value)(items) if type(value) in (list, tuple, set, frozenset) \
                else tuple(items)
        except TypeError:  # items no longer hashable: shown as a list
            return items
    return value


def masked_repr(value: Any, limit: int = 200) -> str:
    """The repr of ``value`` with its secrets masked, cut to ``limit`` characters (after
    masking, so that a cut never leaves the start of a password unmasked)."""
    try:
        text = repr(mask(value))
    except Exception:  # the program's own __repr__ failed: say what it was
        text = f"<{type(value).__name__} object (repr failed)>"
    return mask_text(text)[:limit]


def mask_resource(resource: Mapping[str, Any]) -> dict[str, Any]:
    """A record's ``resource`` with its secrets masked (values passed straight from a
    driver's arguments may be a DSN)."""
    return {key: MASK if is_secret_name(key) else mask(value)
            for key, value in resource.items()}
