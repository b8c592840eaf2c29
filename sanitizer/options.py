"""One option vocabulary for SANITIZE_THREADS, the CLI, enable(**kw) and pytest."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sanitizer.exceptions import ConfigError

ENV_VAR = "SANITIZE_THREADS"
ACTIONS = ("log", "warn", "raise")
FORMATS = ("json", "console")
SINKS = ("output", "logging")
ON_WORDS = ("1", "on", "true", "yes")
OFF_WORDS = ("", "0", "off", "false", "no")
HELP_WORDS = ("help",)

_PLUGIN_NAME = re.compile(r"^-?[A-Za-z_][\w.-]*\Z")
#: ``plugin.key``: what a plugin's own options look like (the plugin checks the key).
_PLUGIN_KEY = re.compile(r"^[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)+\Z")
_POLICY_NAME = re.compile(r"^[A-Za-z_][\w-]*\Z")
#: How much of a bad value a message shows: a message stays one readable line.
SHOWN = 120


def shown(value: object) -> str:
    """``repr(value)``, cut to SHOWN characters: an escaped single line, whatever it holds."""
    text = repr(value)
    return text if len(text) <= SHOWN else text[:SHOWN - 3] + "..."


def _dotted(text: str) -> bool:
    return all(part.isidentifier() for part in text.split("."))


def _track_spec(item: str) -> bool:
    """``module:Name`` or ``module:Name@policy``: dotted identifiers, a policy name."""
    target, at, policy = item.partition("@")
    module, colon, attr = target.partition(":")
    return (bool(colon) and _dotted(module) and _dotted(attr)
            and (not at or _POLICY_NAME.match(policy) is not None))


@dataclasses.dataclass(frozen=True)
class Options:
    """Settings in force. Build with ``parse`` or ``from_kwargs``; never mutate."""

    action: tuple[str, ...] = ("log",)
    log_file: str | None = None
    format: str | None = None  # None: console on a TTY, JSON otherwise
    stack_depth: int = 16
    suppressions: str | None = None
    exitcode: int | None = None
    plugins: tuple[str, ...] = ()  # names; "-name" disables; empty means all
    track: tuple[str, ...] = ()  # "pkg.mod:Name" or "pkg.mod:Name@policy"
    include_args: bool = False
    plugin_options: tuple[tuple[str, str], ...] = ()  # "plugin.key=value" items
    sink: tuple[str, ...] = ("output",)  # output: log_file or stderr; logging: the logging module
    history: int = 0  # accesses kept per object for the HTML timeline (costs on the hot path)

    def plugin_enabled(self, name: str) -> bool:
        wanted = [p for p in self.plugins if not p.startswith("-")]
        if "-" + name in self.plugins:
            return False
        return not wanted or name in wanted

    def for_plugin(self, plugin: str) -> dict[str, str]:
        prefix = plugin + "."
        return {k[len(prefix):]: v for k, v in self.plugin_options if k.startswith(prefix)}

    def replace(self, **changes: Any) -> Options:
        return from_kwargs(changes, base=self, source="options")

    def to_string(self) -> str:
        """The SANITIZE_THREADS form of these options (for child processes and headers)."""
        items = []
        for spec in SPECS:
            value = getattr(self, spec.name)
            if value != spec.default:
                items.append(f"{spec.name}={spec.render(value)}")
        items += [f"{k}={v}" for k, v in self.plugin_options]
        return ",".join(items) or "1"


# -- converters: each accepts the string form and the natural Python form ----------


def _words(*choices: str) -> Callable[[Any], tuple[str, ...]]:
    """One or more of ``choices`` joined by '+' (or a sequence of them)."""
    def convert(value: Any) -> tuple[str, ...]:
        accepted = f"one or more of {', '.join(choices)} joined by '+'"
        words = value.split("+") if isinstance(value, str) else _sequence(value, accepted)
        words = [w.strip() for w in words if isinstance(w, str) and w.strip()]
        if not words or any(w not in choices for w in words):
            raise ValueError(accepted)
        return tuple(dict.fromkeys(words))
    return convert


def _sequence(value: Any, accepted: str) -> list[Any]:
    """The items of a collection given for a '+'-joined option (anything else is bad)."""
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError(accepted)
    return list(value)


def _choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return str(value)
    return convert


def _optional_path(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or "\0" in value:
        raise ValueError("a path (without NUL bytes)")
    try:
        os.fsencode(value)
    except UnicodeError:  # a lone surrogate that no file name can hold
        raise ValueError("a path that this system's file names can hold") from None
    return value


def _int(minimum: int, maximum: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        try:
            number = int(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
            number = None
        if isinstance(value, bool) or number is None or not minimum <= number <= maximum:
            raise ValueError(f"a whole number from {minimum} to {maximum}")
        return number
    return convert


def _optional_exitcode(value: Any) -> int | None:
    if value is None or value == "":
        return None
    return _int(0, 255)(value)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ON_WORDS:
        return True
    if text in OFF_WORDS:
        return False
    raise ValueError("one of 1, 0, on, off, true, false")


def _names(valid: Callable[[str], object], accepted: str) -> Callable[[Any], tuple[str, ...]]:
    def convert(value: Any) -> tuple[str, ...]:
        items = value.split("+") if isinstance(value, str) else _sequence(value, accepted)
        if not all(isinstance(i, str) for i in items):
            raise ValueError(accepted)
        items = [i.strip() for i in items if i.strip()]
        for item in items:
            if not valid(item):
                raise ValueError(accepted)
        return tuple(items)
    return convert


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    default: Any
    convert: Callable[[Any], Any]
    help: str
    metavar: str

    def render(self, value: Any) -> str:
        if isinstance(value, tuple):
            return "+".join(value)
        if isinstance(value, bool):
            return "1" if value else "0"
        return "" if value is None else str(value)


SPECS: tuple[Spec, ...] = (
    Spec("action", ("log",), _words(*ACTIONS),
         "what to do on a violation: log, warn, raise; several joined by '+'", "log+warn+raise"),
    Spec("log_file", None, _optional_path,
         "append JSON lines to this file instead of writing to stderr", "PATH"),
    Spec("format", None, _choice(*FORMATS),
         "json or console", "json|console"),
    Spec("stack_depth", 16, _int(1, 256), "frames kept per stack", "N"),
    Spec("suppressions", None, _optional_path,
         "file of rules (site:GLOB[:LINE], object:TYPE, function:NAME, policy:NAME)", "PATH"),
    Spec("exitcode", None, _optional_exitcode,
         "exit with this code if violations were found", "N"),
    Spec("plugins", (),
         _names(_PLUGIN_NAME.match, "plugin names joined by '+', '-name' to disable"),
         "plugins to enable ('sqlite3+django') or disable ('-django')",
         "NAMES"),
    Spec("track", (), _names(_track_spec, "module:Name or module:Name@policy, joined by '+'"),
         "also track these classes or factories, patched when their module is imported",
         "pkg.mod:Class[@policy]+..."),
    Spec("include_args", False, _bool,
         "log call arguments such as SQL text and parameters (they may hold data)",
         "0|1"),
    Spec("sink", ("output",), _words(*SINKS),
         "where reports go: output (log_file or stderr), logging (WARNING on the 'sanitizer' "
         "logger, the record in extra), or both joined by '+'", "output+logging"),
    Spec("history", 0, _int(0, 10_000),
         "keep each object's last N accesses for the HTML timeline (costs per call)",
         "N"),
)
SPEC_BY_NAME = {spec.name: spec for spec in SPECS}
DEFAULTS = Options()


def _fail(source: str, key: str, value: Any, accepted: str) -> ConfigError:
    return ConfigError(f"{source}: bad value {shown(value)} for {shown(key)}; expected {accepted}",
                       key=key, value=value)


def from_kwargs(values: Mapping[str, Any], *, base: Options = DEFAULTS,
                source: str = "enable()") -> Options:
    """Options from keyword arguments or parsed ``key=value`` items."""
    changes: dict[str, Any] = {}
    plugin_options = dict(base.plugin_options)
    for key, value in values.items():
        if "." in key:  # "plugin.key": handed to that plugin, which validates it
            if not _PLUGIN_KEY.match(key):
                raise ConfigError(
                    f"{source}: bad option name {shown(key)}; a plugin's own option is "
                    "PLUGIN.KEY (letters, digits, '_', '-')", key=key, value=value)
            plugin_options[key] = str(value)
            continue
        spec = SPEC_BY_NAME.get(key)
        if spec is None:
            raise ConfigError(
                f"{source}: unknown option {shown(key)}; accepted options: "
                f"{', '.join(SPEC_BY_NAME)} (or PLUGIN.KEY for a plugin's own)",
                key=key, value=value)
        try:
            changes[key] = spec.convert(value)
        except ValueError as exc:
            raise _fail(source, key, value, str(exc)) from None
    changes["plugin_options"] = tuple(sorted(plugin_options.items()))
    return dataclasses.replace(base, **changes)


def parse(text: str | None, *, source: str = ENV_VAR, base: Options = DEFAULTS) -> Options | None:
    """Parse the SANITIZE_THREADS form. None means switched off.

    A bare word (``1``, ``on``, ``log``, ``warn+raise``) or comma-separated
    ``key=value`` items, which may be mixed with action words. ``help`` raises
    HelpRequested.
    """
    text = (text or "").strip()
    if text.lower() in OFF_WORDS:
        return None
    values: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if sep:
            values[key] = value.strip()
        elif key.lower() in HELP_WORDS:
            raise HelpRequested()
        elif key.lower() in ON_WORDS:
            continue
        elif all(word in ACTIONS for word in key.split("+")):
            values["action"] = key
        else:
            raise ConfigError(
                f"{source}: bad word {shown(key)}; expected 1, on, off, help, an action "
                f"({'+'.join(ACTIONS)}), or comma-separated key=value items", key=key, value=key)
    return from_kwargs(values, base=base, source=source)


class HelpRequested(Exception):
    """``SANITIZE_THREADS=help``: print ``help_text()`` and exit."""


#: Defaults that their value does not say (help strings never state them: help_text does).
_DEFAULT_WORDS = {
    "log_file": "stderr", "format": "console on a TTY, JSON otherwise",
    "exitcode": "the program's own", "plugins": "all", "include_args": "0 (off)",
    "history": "0 (off)",
}


def default_text(spec: Spec) -> str:
    """A spec's default, as help says it once."""
    return _DEFAULT_WORDS.get(spec.name) or spec.render(spec.default) or "none"


def help_text(plugin_keys: Iterable[str] = ()) -> str:
    lines = [
        f"{ENV_VAR}: switch the thread-affinity sanitizer on and set its options.",
        f"  {ENV_VAR}=1 (or on)            defaults",
        f"  {ENV_VAR}=raise                an action word",
        f"  {ENV_VAR}=key=value,key=value  options:",
        "",
    ]
    import textwrap  # only when help is asked for

    indent = " " * 16
    for spec in SPECS:
        lines += textwrap.wrap(spec.help, 79, initial_indent=f"  {spec.name:<13} ",
                               subsequent_indent=indent)
        lines.append(f"{indent}default: {default_text(spec)}")
    if plugin_keys:
        lines += ["", "Plugin options (PLUGIN.KEY=value):"]
        lines += [f"  {key}" for key in plugin_keys]
    lines += ["", "The same keys work as sanitize-threads run --KEY VALUE, as enable(KEY=...),",
              "and in pytest as --sanitize-threads=... or the sanitize_threads ini option."]
    return "\n".join(lines)
