"""The `sanitize-threads html` command: a static, self-contained HTML report with timelines."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: Any) -> None:
    """The ``sanitize-threads html`` command."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "html", help="write a static HTML report (index, one page per violation, timelines)")
    parser.add_argument("logs", nargs="+", metavar="LOG")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    print("sanitize-threads html: not yet")
    return 2
