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
                         help=spec.help)
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

    if args.module:
        sys.argv = [args.module, *args.program]
        sys.path[0] = os.getcwd()
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    else:
        _run_script(args.program[0], args.program)
    return 0


def _run_script(path: str, argv: list[str]) -> None:
    """Run a file as ``__main__``, the way ``python path`` would."""
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as file:
        code = compile(file.read(), path, "exec")
    main_module = types.ModuleType("__main__")
    main_module.__file__ = path
    main_module.__builtins__ = __builtins__  # type: ignore[attr-defined]
    sys.modules["__main__"] = main_module
    exec(code, main_module.__dict__)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
