"""Bad configuration, fuzzed with hypothesis: option strings, plugin options, ``track=``
specs, suppressions files, the pytest option and ini value.

Whatever the input (random text and bytes, unicode, NUL bytes, huge numbers, very long
strings), the sanitizer says at most one line that names the key, and never raises
anything but ConfigError at the caller. End to end, the program keeps its own exit code
and pytest gives a usage error (exit 4). Examples are derandomized, so that the suite
stays deterministic; ``SANITIZER_FUZZ=explore`` draws new ones, many more of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import sanitizer
from sanitizer import options as opts
from sanitizer.exceptions import ConfigError
from sanitizer.render import LineWriter
from sanitizer.suppressions import RULE_KINDS, load_suppressions

settings.register_profile("default", derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=2000, database=None, deadline=None)
settings.load_profile("explore" if os.environ.get("SANITIZER_FUZZ") == "explore"
                      else "default")
EXPLORE = os.environ.get("SANITIZER_FUZZ") == "explore"
#: End-to-end runs (a process each): few, and more when exploring.
PROCESSES = 200 if EXPLORE else 25
PYTEST_PROCESSES = 100 if EXPLORE else 12

# -- what bad configuration is made of ---------------------------------------------------

ODD = ["", " ", "0", "-1", "1e9", "inf", "nan", "1_6", "\u0661\u0666", "\u00b2", "\0", "a\0b",
       "\n", "\r\n", "\x85", "\u2028", "=", ",", "+", "@", ":", "#", "-", ".", "..", "/",
       "help", "raise", "log+", "+log", "os:path", "a:b@", "a:b@zzz", "a..b:c", "a:b.",
       "sqlite3.", ".x", "\udcff", "\U0001f600",
       str(2**64), str(-2**63), "-" + "9" * 400, "\t\x1b[31m\x07"]
KEYS = [spec.name for spec in opts.SPECS] + [
    "dbapi.drivers", "asyncio.noblock", "django.async_unsafe", "sqlite3.x", "nosuch.key",
    "pytest.x", "sqlalchemy.", "-dbapi.drivers", "a.b.c"]

#: Past int()'s 4,300 digits, and very long strings.
huge = st.one_of(st.integers(4300, 6000).map(lambda n: "9" * n),
                 st.integers(10_000, 20_000).map(lambda n: "x" * n))
text = st.one_of(
    huge,
    st.text(max_size=60),
    st.text(st.characters(codec="utf-8"), max_size=60),
    st.binary(max_size=60).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.integers().map(str),
    st.integers(min_value=10**18).map(str),
    st.sampled_from(ODD),
)
name_part = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,8}\Z")
track_spec = st.one_of(
    text,
    st.builds(lambda m, a, p: f"{m}:{a}{p}",
              st.one_of(name_part, st.sampled_from(["a.b", "x..y", "1a", ""])),
              st.one_of(name_part, st.sampled_from(["A.b", "b.", "", "é"])),
              st.sampled_from(["", "@strict", "@exclusive", "@nosuch", "@", "@a b"])),
)
value = st.one_of(text, track_spec, st.lists(st.sampled_from(["log", "warn", "raise", ""]),
                                             max_size=3).map("+".join))
item = st.builds(lambda key, val: key if val is None else f"{key}={val}",
                 st.one_of(st.sampled_from(KEYS), text), st.one_of(st.none(), value))
option_string = st.one_of(text, st.lists(item, max_size=5).map(",".join))


def assert_one_clear_line(exc: BaseException, *, short: bool = True) -> None:
    """The message is one line, names its key, and (from our own code) stays short."""
    assert isinstance(exc, ConfigError), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert len(message.splitlines()) == 1, message
    assert exc.key is not None
    assert any(form in message for form in (exc.key, repr(exc.key), opts.shown(exc.key))), (
        message, exc.key)
    if short:
        assert len(message) < 800, message


# -- in-process: parse, from_kwargs, enable -------------------------------------------------


@given(option_string)
@example("stack_depth=" + "9" * 5000)
@example("sqlite3.x\ny=1")
@example("track=a:b.")
@example("log_file=a\0b")
@example("suppressions=\udcff\ud800")
def test_parse_raises_only_one_line_config_errors(text: str) -> None:
    try:
        parsed = opts.parse(text)
    except opts.HelpRequested:
        assert "help" in text.lower()
    except Exception as exc:
        assert_one_clear_line(exc)
    else:  # a valid string: its options are what they claim to be
        assert parsed is None or isinstance(parsed.stack_depth, int)


odd_objects = st.one_of(
    text, st.none(), st.booleans(), st.integers(), st.floats(), st.binary(max_size=20),
    st.lists(st.one_of(text, st.integers(), st.none()), max_size=3),
    st.tuples(text), st.sets(st.integers(), max_size=2), st.dictionaries(text, text, max_size=2),
)


@given(st.dictionaries(st.one_of(st.sampled_from(KEYS), text), odd_objects, max_size=4))
@example({"stack_depth": float("inf")})
@example({"action": b"log"})
@example({"track": [1, 2]})
@example({"log_file": b"/tmp/x"})
def test_from_kwargs_raises_only_one_line_config_errors(values: dict[str, Any]) -> None:
    try:
        opts.from_kwargs(values)
    except Exception as exc:
        assert_one_clear_line(exc)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def target_module() -> Iterator[str]:
    """A module that ``track=`` specs can name: a class, a factory, a constant, a built-in."""
    module = types.ModuleType("fuzz_target")

    class Klass:
        def method(self) -> int:
            return 1

    module.Klass = Klass  # type: ignore[attr-defined]
    module.factory = lambda: Klass()  # type: ignore[attr-defined]
    module.CONSTANT = 3  # type: ignore[attr-defined]
    module.Builtin = dict  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    yield module.__name__
    del sys.modules[module.__name__]


targets = st.builds(
    lambda attr, policy: f"fuzz_target:{attr}{policy}",
    st.one_of(st.sampled_from(["Klass", "factory", "CONSTANT", "Builtin", "Klass.method",
                               "Klass.nosuch", "nosuch", "nosuch.deeper"]), name_part),
    st.sampled_from(["", "@strict", "@exclusive", "@transaction", "@nosuch"]))
plugin_options = st.dictionaries(
    st.sampled_from(["dbapi.drivers", "asyncio.noblock", "django.async_unsafe", "sqlite3.x",
                     "nosuch.key", "dbapi.nosuch"]),
    st.one_of(text, st.sampled_from(["network", "all", "off", "always", "allowed",
                                     "pg8000+mydriver", "fuzz_no_such_driver"])),
    max_size=2)


@settings(max_examples=60 if not EXPLORE else 500,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(targets, track_spec), max_size=3), plugin_options)
@example(["fuzz_target:Builtin"], {})
@example(["fuzz_target:nosuch.deeper"], {})
@example(["fuzz_target:Klass@nosuch"], {})
def test_enable_with_fuzzed_track_specs_and_plugin_options(
        scratch: Path, target_module: str, capfd: pytest.CaptureFixture[str],
        specs: list[str], plugin_opts: dict[str, str]) -> None:
    """enable() raises only a one-line ConfigError; a spec that names something that is not
    there (or cannot be tracked) is one line on stderr when its module is imported."""
    if sanitizer.is_enabled():
        sanitizer.disable()
    capfd.readouterr()
    try:
        sanitizer.enable(log_file=str(scratch / "enable.jsonl"), track="+".join(specs),
                         **plugin_opts)
    except Exception as exc:
        assert_one_clear_line(exc, short=False)  # a plugin's own words may quote it whole
    finally:
        sanitizer.disable()
    err = capfd.readouterr().err.splitlines()
    assert len(err) <= len(specs), err
    assert all(line.startswith("sanitizer: track=") and line.endswith("; not tracked")
               for line in err), err


# -- in-process: suppressions files and log file paths --------------------------------------

rule_line = st.one_of(
    text,
    st.builds(lambda kind, pattern, line: f"{kind}:{pattern}{line}",
              st.one_of(st.sampled_from(RULE_KINDS), text), text,
              st.one_of(st.just(""), st.integers().map(lambda n: f":{n}"),
                        st.sampled_from([":\u00b2", ":\u0661", ":" + "9" * 5000, ":", "::"]))),
)
rules_text = st.lists(rule_line, max_size=6).map("\n".join)
EVENT = {"object_type": "sqlite3.Connection", "policy": "strict",
         "access_stack": [{"file": "/app/x.py", "line": 3, "function": "f"}],
         "creation_site": {"file": "/app/y.py", "line": 1, "function": "<module>"}}


@given(st.one_of(st.binary(max_size=300),
                 rules_text.map(lambda t: t.encode("utf-8", "surrogatepass"))))
@example(b"\xff\xfe site:x")
@example(b"site:x.py:\xc2\xb2")
@example(b"site:x.py:" + b"9" * 5000)
@example(b"site::12")
def test_suppressions_files_load_or_give_one_line(scratch: Path, content: bytes) -> None:
    path = scratch / "rules.supp"
    path.write_bytes(content)
    try:
        rules = load_suppressions(str(path))
    except Exception as exc:
        assert_one_clear_line(exc)
        return
    for rule in rules:  # loaded rules match without raising, live and after the fact
        assert rule.matches(EVENT) in (True, False)


file_name = st.one_of(text, st.text(min_size=200, max_size=400)).filter(
    lambda name: "/" not in name and name not in ("", ".", ".."))


@given(file_name)
@example("a\0b")
@example("\ud800")
@example("x" * 300)
def test_suppressions_paths_and_log_file_paths_give_one_line(scratch: Path, name: str
                                                             ) -> None:
    path = str(scratch / "paths" / name)
    os.makedirs(scratch / "paths", exist_ok=True)
    with pytest.raises(ConfigError) as info:  # none of these files exists
        load_suppressions(path)
    assert_one_clear_line(info.value)
    try:
        writer = LineWriter(path)
    except Exception as exc:
        assert_one_clear_line(exc)
    else:
        os.close(writer.fd)
        os.unlink(path)


# -- end to end: the .pth path, and pytest ---------------------------------------------------

def _to_bytes(text: str) -> bytes:
    """As the environment would hold it (os.fsencode), or with '?' where it cannot."""
    try:
        return os.fsencode(text)
    except UnicodeError:
        return text.encode("utf-8", "replace")


# An environment variable cannot hold a NUL byte: everything else can be in one.
env_value = st.one_of(st.binary(max_size=80), option_string.map(_to_bytes)).map(
    lambda raw: raw.replace(b"\0", b"")).filter(bool)


def _environment(**extra: bytes) -> dict[bytes, bytes]:
    env = {k: v for k, v in os.environb.items() if not k.startswith(b"SANITIZE_THREADS")}
    env.update({k.encode(): v for k, v in extra.items()})
    return env


@settings(max_examples=PROCESSES)
@given(env_value)
@example(b"stack_depth=" + b"9" * 10_000)
@example(b"log_file=/proc/nowhere/x,\xff\xfe")
@example(b"track=os:nosuch")
@example(b"suppressions=.")
def test_the_pth_path_keeps_the_exit_code_and_says_at_most_one_line(
        scratch: Path, raw: bytes) -> None:
    try:  # help prints the options and exits 0, by design: not a bad configuration
        opts.parse(os.fsdecode(raw))
    except opts.HelpRequested:
        assume(False)
    except ConfigError:
        pass
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.exit(7)"], cwd=scratch,
                          env=_environment(SANITIZE_THREADS=raw), capture_output=True,
                          timeout=60)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 7, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) <= 1, lines
    assert all(line.startswith("sanitizer: ") for line in lines), lines


SUITE = "def test_ok():\n    assert True\n"


def run_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (directory / "test_ok.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANITIZE_THREADS")}
    # Only our plugin: a third of the start-up, and no other plugin's words on stderr.
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "sanitizer.plugins.pytest_plugin", *args],
                          cwd=directory, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_usage_error_or_run(proc: subprocess.CompletedProcess[str]) -> None:
    """A usage error (exit 4) in one line, or a run that passed; never a traceback."""
    assert "Traceback" not in proc.stdout + proc.stderr
    if proc.returncode == pytest.ExitCode.USAGE_ERROR:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("ERROR: "), proc.stderr
    else:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "1 passed" in proc.stdout or "help shown" in proc.stdout + proc.stderr


argument = st.one_of(text, option_string).filter(
    lambda t: "\0" not in t and all(not 0xD800 <= ord(c) <= 0xDFFF for c in t))


@settings(max_examples=PYTEST_PROCESSES)
@given(argument)
@example("stack_depth=" + "9" * 10_000)
@example("log_file=/proc/nowhere/x")
@example("track=a:b@zzz")
def test_the_pytest_option_gives_a_usage_error(tmp_path_factory: pytest.TempPathFactory,
                                               value: str) -> None:
    assert_usage_error_or_run(run_pytest(tmp_path_factory.mktemp("cli"),
                                         f"--sanitize-threads={value}"))


LINE_BREAKS = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
ini_value = argument.map(lambda t: "".join(c for c in t if c not in LINE_BREAKS).strip()
                         ).filter(bool)


@settings(max_examples=PYTEST_PROCESSES)
@given(ini_value)
@example("stack_depth=" + "9" * 10_000)
@example("suppressions=missing.supp")
@example("sqlite3.nosuch=1")
def test_the_ini_value_gives_a_usage_error(tmp_path_factory: pytest.TempPathFactory,
                                           value: str) -> None:
    directory = tmp_path_factory.mktemp("ini")
    (directory / "pytest.ini").write_text(
        textwrap.dedent(f"""\
            [pytest]
            sanitize_threads = {value}
            """), encoding="utf-8")
    assert_usage_error_or_run(run_pytest(directory))
