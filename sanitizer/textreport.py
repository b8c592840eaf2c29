"""The `sanitize-threads report` command: merged findings as text, markdown, JSON or SARIF."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: Any) -> None:
    """The ``sanitize-threads report`` command."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "report", help="merge JSON-lines logs and list each violation once, most frequent first")
    parser.add_argument("logs", nargs="+", metavar="LOG")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    print("sanitize-threads report: not yet")
    return 2
