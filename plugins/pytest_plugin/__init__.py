"""pytest integration: every thread-affinity violation fails the test it happened in.

PYTEST_DONT_REWRITE (pytest would rewrite this package's asserts at every start.)

Switched on by ``--sanitize-threads[=OPTIONS]``, the ``sanitize_threads`` ini
option or ``SANITIZE_THREADS``, each taking the same option string, merged in
this order of precedence: command line > ini option > environment. A
violation fails the test running when it happens, in any thread (a thread that
outlives its test is marked "started during" the earlier one; with no test
running it is "outside any test"). ``@pytest.mark.sanitize_threads(False)``
opts a test out; its keyword arguments (``action=``, ``suppressions=``,
``policy="-exclusive"``) apply to it alone. The README's pytest section says
the rest.

This module is all that pytest imports at every start: options, ini option,
marker and fixture. It imports nothing of the sanitizer and patches nothing
until a form switches it on; then ``session`` (the running plugin), ``render``
(reports) and ``xdist`` (workers and the controller) are loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from sanitizer.options import Options
    from sanitizer.plugins.pytest_plugin.session import (  # noqa: F401 - for _PLUGIN
        ThreadViolations,
        _Plugin,
    )

OPTION = "--sanitize-threads"
REPORT_OPTION = "--sanitize-threads-report"
INI = "sanitize_threads"
MARKER = "sanitize_threads"
ENV_VAR = "SANITIZE_THREADS"  # sanitizer.options.ENV_VAR, without importing it

_PLUGIN = pytest.StashKey["_Plugin"]()
_HELP = pytest.StashKey[bool]()
_TRIED = pytest.StashKey[bool]()


# -- options ---------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sanitize-threads", "thread-affinity sanitizer")
    group.addoption(
        OPTION, dest="sanitize_threads", nargs="?", const="1", default=None,
        metavar="OPTIONS",
        help="switch the thread-affinity sanitizer on. OPTIONS: as in SANITIZE_THREADS, e.g. "
        "--sanitize-threads=action=raise; overrides the ini option, which overrides "
        "SANITIZE_THREADS")
    group.addoption(
        REPORT_OPTION, dest="sanitize_threads_report", default=None, metavar="PATH",
        help="write every thread-affinity violation, with its test's node id, to PATH as JSON")
    parser.addini(INI, "switch the thread-affinity sanitizer on, with options as in "
                  "SANITIZE_THREADS (overridden by --sanitize-threads)", default="")


def _is_option_string(token: str) -> bool:
    """Whether ``--sanitize-threads TOKEN`` gives TOKEN as the option string (not a path)."""
    if "::" in token or os.path.exists(token):
        return False
    if "=" in token:
        return True
    from sanitizer import options as opts
    from sanitizer.exceptions import ConfigError

    try:
        opts.parse(token)
    except opts.HelpRequested:
        return True
    except ConfigError:
        return False
    return True


def _fix_args(args: list[str]) -> str | None:
    """Rewrite ``--sanitize-threads PATH`` so PATH stays a test path; the last value given."""
    value = None
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            break
        if arg == OPTION:
            following = args[index + 1] if index + 1 < len(args) else None
            if following is not None and not following.startswith("-") \
                    and _is_option_string(following):
                value = following
                index += 2
                continue
            args[index] = OPTION + "=1"
            value = "1"
        elif arg.startswith(OPTION + "="):
            value = arg.partition("=")[2]
        index += 1
    return value


@dataclasses.dataclass
class _Resolved:
    options: Options | None
    sources: list[str]
    switched_off: bool  # an off word in the highest layer that said anything


def _layers(config: pytest.Config, cli_value: str | None) -> list[tuple[str, str]]:
    """The forms that were given, lowest precedence first: environment, ini, command line."""
    ini_text = config.getini(INI)
    layers = [
        (ENV_VAR, os.environ.get(ENV_VAR)),
        (f"ini option {INI}", ini_text if isinstance(ini_text, str) else None),
        (OPTION, cli_value),
    ]
    return [(source, text) for source, text in layers if text and text.strip()]


def _resolve(config: pytest.Config, layers: list[tuple[str, str]]) -> _Resolved:
    """Merge the layers in order, each one's keys overriding the ones below."""
    from sanitizer import options as opts

    options: Options | None = None
    sources: list[str] = []
    off = False
    for source, text in layers:
        parsed = opts.parse(text, source=source, base=options or opts.DEFAULTS)
        if parsed is None:
            options, sources, off = None, [], True
            continue
        if source.startswith("ini") and config.inipath is not None:
            parsed = _relative_paths(parsed, options or opts.DEFAULTS, config.inipath.parent)
        options, off = parsed, False
        sources.append(source)
    return _Resolved(options, sources, off)


def _relative_paths(options: Options, base: Options, directory: Path) -> Options:
    for key in ("suppressions", "log_file"):
        value = getattr(options, key)
        if value and value != getattr(base, key) and not os.path.isabs(value):
            options = options.replace(**{key: str(directory / value)})
    return options


def _activate(config: pytest.Config, cli_value: str | None) -> None:
    """Start the plugin if any form switches it on; once per config."""
    if config.stash.get(_TRIED, False):
        return
    config.stash[_TRIED] = True
    layers = _layers(config, cli_value)
    if not layers:
        return  # the common case: imports nothing, patches nothing
    capture = config.pluginmanager.getplugin("capturemanager")
    quiet = (capture.global_and_fixture_disabled() if capture is not None
             else contextlib.nullcontext())
    with quiet:  # the sanitizer dups stderr: the real one, not the capture file
        _start(config, layers)


def _start(config: pytest.Config, layers: list[tuple[str, str]]) -> None:
    from sanitizer import options as opts
    from sanitizer.exceptions import ConfigError

    try:
        resolved = _resolve(config, layers)
    except opts.HelpRequested:
        config.stash[_HELP] = True
        return
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    session = sys.modules.get(f"{__name__}.session")
    if resolved.options is None:
        control = sys.modules.get("sanitizer.control")
        active = session is not None and session.active()
        if resolved.switched_off and not active and control is not None:
            control.disable()  # started by the .pth, switched off for this run
        return
    from sanitizer.plugins.pytest_plugin.session import _Plugin

    plugin = _Plugin(config, resolved.options, resolved.sources)
    try:
        plugin.start()
    except ConfigError as exc:  # unreadable suppressions, unknown plugin ...
        plugin.stop()
        raise pytest.UsageError(str(exc)) from None
    config.stash[_PLUGIN] = plugin
    config.add_cleanup(plugin.stop)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, args: list[str]) -> None:
    # Early, so that objects made while conftest.py files are imported are tracked,
    # as they are when SANITIZE_THREADS starts the sanitizer.
    value = _fix_args(args)
    if value is None:
        value = getattr(early_config.known_args_namespace, "sanitize_threads", None)
    _activate(early_config, value)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(enabled=True, *, action=None, suppressions=None, policy=None): "
        "thread-affinity sanitizer settings for this test; sanitize_threads(False) opts out")
    _activate(config, config.option.sanitize_threads)  # if registered after the early hook
    if config.stash.get(_HELP, False):
        from sanitizer.options import help_text

        sys.stdout.write(help_text() + "\n")
        pytest.exit("sanitize-threads: help shown", returncode=0)
    plugin = config.stash.get(_PLUGIN, None)
    if plugin is not None and not config.pluginmanager.is_registered(plugin):
        plugin.configure()
        config.pluginmanager.register(plugin, "sanitize_threads_session")


# -- what a test sees --------------------------------------------------------------


@pytest.fixture
def thread_violations(request: pytest.FixtureRequest) -> ThreadViolations:
    """The thread-affinity violations seen so far in this test; ``.expect()`` consumes them
    (see ``session.ThreadViolations``)."""
    plugin = request.config.stash.get(_PLUGIN, None)
    run = plugin.current if plugin is not None else None
    if plugin is None or run is None or run.item is not request.node:
        pytest.skip("thread_violations needs the sanitizer: run pytest --sanitize-threads")
    return run.violations


def _say(config: pytest.Config, line: str) -> None:
    """One line on the terminal (outside any test's captured output)."""
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        terminal.write_line(line, red=True)
    elif sys.__stderr__ is not None:
        sys.__stderr__.write(line + "\n")


