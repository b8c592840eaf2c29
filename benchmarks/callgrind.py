"""Counting instructions with valgrind's callgrind, for the benchmarks' --instructions modes.

A count, not a time: the same however busy the machine is (on a shared 2-core
machine, identical timing runs differ by more than the overheads measured).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")
# callgrind_annotate's lines for glibc's malloc family.
_ALLOCATOR = re.compile(r"^\s*([\d,]+) \(.*/malloc/.*\[.*libc\.so.*\]$", re.MULTILINE)


#: For ``count(..., only_inside=ONLY_CALL_TRACING)``: the program runs what it measures
#: as ``sys.call_tracing(func, args)``, and only instructions inside that call count.
#: Start-up, which differs by millions of instructions between identical runs, is left out.
ONLY_CALL_TRACING = "sys_call_tracing*"


def count(program: str, *args: str, allocator: bool = False,
          only_inside: str | None = None) -> tuple[int, int]:
    """Instructions that ``python -c program args`` executes, and (with ``allocator``)
    how many of them were glibc's malloc's. Run from a temporary directory, so that
    the installed package is measured, not the source tree; without SANITIZE_THREADS.
    ``only_inside``: count only inside calls of this C function (callgrind's
    --toggle-collect), e.g. ONLY_CALL_TRACING."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # dict layouts, so counts, repeat
    env.pop("SANITIZE_THREADS", None)
    with tempfile.NamedTemporaryFile(suffix=".callgrind") as out:
        target = out.name if allocator else "/dev/null"
        toggle = [f"--toggle-collect={only_inside}"] if only_inside else []
        done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={target}",
                               *toggle, sys.executable, "-c", program, *args],
                              env=env, capture_output=True, text=True,
                              cwd=tempfile.gettempdir())
        match = _REFS.search(done.stderr)
        if done.returncode != 0 or not match:
            sys.exit(f"callgrind run failed:\n{done.stderr[-2000:]}")
        in_allocator = 0
        if allocator:
            functions = subprocess.run(["callgrind_annotate", "--threshold=100", out.name],
                                       capture_output=True, text=True, check=True).stdout
            in_allocator = sum(int(m.group(1).replace(",", ""))
                               for m in _ALLOCATOR.finditer(functions))
    return int(match.group(1).replace(",", "")), in_allocator


def all_of(runs: Sequence[T], measure: Callable[[T], tuple[int, int]]
           ) -> dict[T, tuple[int, int]]:
    """``measure`` each run, on every CPU at once (counts do not mind sharing a CPU)."""
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return dict(zip(runs, pool.map(measure, runs), strict=True))
