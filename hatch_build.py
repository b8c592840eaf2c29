"""Build hook: compile sanitizer/_speedups.c into the wheel, or leave the wheel pure.

Hatchling builds the package; the C compiler is driven by setuptools' build_ext (which
knows every platform's compiler, flags and extension suffix) instead of a hand-written
command line. Without a compiler, or with SANITIZE_THREADS_NO_EXTENSION=1, the wheel is
pure Python and the sanitizer uses its Python core (threads.py): slower, not different.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

MODULE = "sanitizer._speedups"
SOURCE = "sanitizer/_speedups.c"


class SpeedupsHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        if os.environ.get("SANITIZE_THREADS_NO_EXTENSION", "").strip() not in ("", "0"):
            return
        self._scratch = tempfile.TemporaryDirectory(prefix="sanitizer-build-")
        try:
            built = _compile(Path(self.root), Path(self._scratch.name))
        except Exception as exc:  # no compiler or headers: a pure wheel still works
            if os.environ.get("CI") == "true":
                raise
            print(f"sanitize-threads: the C speedups did not build ({exc}); "
                  "the wheel uses the Python core", file=sys.stderr)
            return
        build_data["force_include"][str(built)] = f"sanitizer/{built.name}"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        scratch = getattr(self, "_scratch", None)
        if scratch is not None:
            scratch.cleanup()


def _compile(root: Path, scratch: Path) -> Path:
    from setuptools import Distribution, Extension

    extension = Extension(MODULE, [str(root / SOURCE)], extra_compile_args=["-O2"])
    distribution = Distribution({"name": "sanitize-threads", "ext_modules": [extension]})
    command = distribution.get_command_obj("build_ext")
    command.build_lib = str(scratch / "lib")  # type: ignore[attr-defined]
    command.build_temp = str(scratch / "temp")  # type: ignore[attr-defined]
    command.ensure_finalized()
    command.run()
    return Path(command.get_ext_fullpath(MODULE))  # type: ignore[attr-defined]
