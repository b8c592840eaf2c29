"""The ``sanitize-threads`` command: run a script or module with the sanitizer on."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import types
from collections.abc import Sequence

from sanitizer import options as opts
from sanitizer.exceptions import ConfigError

USAGE_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sanitize-threads",
        description="Report objects used from the wrong thread, loop or process.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run a Python script or module under the sanitizer",
        description="Run PROGRAM (a script, or -m module) with ARGS under the sanitizer. "
        f"Options start from ${opts.ENV_VAR}; flags override them. Child processes "
        "inherit the settings.")
    run.add_argument("--options", metavar="STRING",
                     help=f"options in the {opts.ENV_VAR} form, e.g. 'action=raise,format=json'")
    for spec in opts.SPECS:
        run.add_argument("--" + spec.name.replace("_", "-"), dest=spec.name, metavar=spec.metavar,
                         help=f"{spec.help} (default: {opts.default_text(spec)})")
    run.add_argument("-m", dest="module", help="run a library module as a script")
    run.add_argument("program", nargs=argparse.REMAINDER, help="script.py [ARGS...]")
    commands.add_parser("help", help="describe every option and its default")
    # Commands that read logs: each module adds its own parser, with a ``handler``.
    from sanitizer import htmlreport, textreport

    textreport.add_parser(commands)
    htmlreport.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is not None:
        code: int = handler(args)
        return code
    if args.command == "help":
        print(opts.help_text())
        return 0
    try:
        options = opts.parse(os.environ.get(opts.ENV_VAR)) or opts.DEFAULTS
        if args.options:
            options = opts.parse(args.options, source="--options", base=options) or options
        flags = {spec.name: getattr(args, spec.name) for spec in opts.SPECS
                 if getattr(args, spec.name) is not None}
        options = opts.from_kwargs(flags, base=options, source="sanitize-threads run")
    except opts.HelpRequested:
        print(opts.help_text())
        return 0
    except ConfigError as exc:
        print(f"sanitize-threads: {exc}", file=sys.stderr)
        return USAGE_ERROR
    if not args.module and not args.program:
        print("sanitize-threads: nothing to run: give script.py or -m module", file=sys.stderr)
        return USAGE_ERROR

    from sanitizer import control

    try:
        control.disable()  # the .pth may have started it with the environment's options
        control.enable(options)
    except ConfigError as exc:
        print(f"sanitize-threads: {exc}", file=sys.stderr)
        return USAGE_ERROR
    os.environ[opts.ENV_VAR] = options.to_string()  # children are sanitized the same way
    return _run(args.module, args.program)


# How ``python`` itself exits when it cannot start the program: a missing file is a
# usage error (2), a module or __main__ it cannot find, or a SyntaxError, status 1.
CANNOT_OPEN = 2
FAILED = 1


def _run(module: str | None, program: list[str]) -> int:
    """Run the program as ``python [-m module] program...`` would, and fail as it does:
    one line (or a SyntaxError as Python shows it) when the program cannot start, the
    program's own traceback, without our frames, when it raises."""
    try:
        if module:
            sys.argv = [module, *program]
            sys.path[0] = os.getcwd()
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        elif os.path.isdir(program[0]):
            sys.argv = list(program)
            runpy.run_path(program[0], run_name="__main__")  # its __main__.py
        else:
            code = _compile_script(program[0])
            if isinstance(code, int):
                return code
            _run_script(code, program)
    except ImportError as exc:
        if not _raised_by_runpy(exc):
            return _program_failed(exc)
        print(f"sanitize-threads: {exc}", file=sys.stderr)  # No module named ...
        return FAILED
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        return _program_failed(exc)
    return 0


def _compile_script(path: str) -> types.CodeType | int:
    """The script's code, or the exit status after saying, as python does, why not."""
    path = os.path.abspath(path)  # as python names a script (3.9+): __file__, tracebacks
    try:
        with open(path, "rb") as file:
            source = file.read()
    except OSError as exc:
        print(f"sanitize-threads: can't open file {path!r}: "
              f"[Errno {exc.errno}] {exc.strerror}", file=sys.stderr)
        return CANNOT_OPEN
    try:
        return compile(source, path, "exec")
    except (SyntaxError, ValueError) as exc:  # ValueError: null bytes, before 3.12
        import traceback

        sys.stderr.write("".join(traceback.format_exception_only(type(exc), exc)))
        return FAILED


#: The frames between ``sanitize-threads`` and the program (runpy is frozen on 3.11+).
_OURS = frozenset({__file__, runpy.__file__, "<frozen runpy>"})


def _raised_by_runpy(exc: ImportError) -> bool:
    """Whether runpy raised it itself (no such module, no __main__), not the program."""
    tb = exc.__traceback__
    files = set()
    while tb is not None:
        files.add(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return bool(files) and files <= _OURS


def _program_failed(exc: BaseException) -> int:
    """The program's own exception: its traceback as python shows it (from the
    program's frames on, through sys.excepthook), and python's status."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in _OURS:
        tb = tb.tb_next
    sys.excepthook(type(exc), exc.with_traceback(tb), tb)
    return FAILED


def _run_script(code: types.CodeType, argv: list[str]) -> None:
    """Run a file's code as ``__main__``, the way ``python path`` would."""
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(code.co_filename)
    main_module = types.ModuleType("__main__")
    main_module.__file__ = code.co_filename
    main_module.__builtins__ = __builtins__  # type: ignore[attr-defined]
    sys.modules["__main__"] = main_module
    exec(code, main_module.__dict__)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
