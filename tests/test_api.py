"""The public API: track, thread_affine, transfer, shared, actions, suppressions, options."""

from __future__ import annotations

import sqlite3
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Sanitized
from support import found, held, in_thread, inside_query, raising, tracked

import sanitizer
from sanitizer import options as opts


class Account:
    def __init__(self) -> None:
        self.balance = 0

    def deposit(self, amount: int) -> None:
        self.balance += amount

    def hold(self, wait: Callable[[], object]) -> None:
        """Stay inside a call on this account until ``wait()`` returns (support.held)."""
        wait()

    def __enter__(self) -> Account:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class TestTrack:
    def test_python_object_is_tracked_in_place(self, sanitized: Sanitized) -> None:
        account = sanitizer.track(Account(), name="main account")
        assert type(account) is Account
        account.deposit(1)
        in_thread(lambda: account.deposit(2), name="intruder")
        [violation] = sanitizer.violations()
        assert violation.policy == "strict" and violation.operation == "deposit"
        assert violation.object_name == "main account"
        assert account.balance == 3  # the call went ahead (action=log)

    def test_untracked_instances_of_a_patched_class_stay_silent(
            self, sanitized: Sanitized) -> None:
        account = sanitizer.track(Account())
        plain = Account()
        in_thread(lambda: plain.deposit(1))
        assert sanitizer.violations() == []
        # The control: the tracked instance of the same (patched) class is watched.
        in_thread(lambda: account.deposit(1))
        assert found() == [("strict", "deposit")]

    def test_c_object_is_wrapped_in_a_transparent_proxy(self, sanitized: Sanitized) -> None:
        tracked = sanitizer.track(sqlite3.connect(":memory:", check_same_thread=False),
                                  policy="exclusive")
        assert isinstance(tracked, sqlite3.Connection)
        assert sanitizer.track(tracked) is tracked  # already tracked

    def test_second_policy_on_one_class_gets_a_proxy(self, sanitized: Sanitized) -> None:
        strict = sanitizer.track(Account())
        exclusive = sanitizer.track(Account(), policy="exclusive")
        assert type(strict) is Account and type(exclusive) is not Account
        assert isinstance(exclusive, Account)
        tracked(exclusive)
        in_thread(lambda: exclusive.deposit(1))  # handoff: fine under exclusive
        assert sanitizer.violations() == []
        in_thread(lambda: strict.deposit(1))
        assert [v.policy for v in sanitizer.violations()] == ["strict"]
        with held(exclusive.hold):  # the control: an overlap is what exclusive forbids
            exclusive.deposit(1)
        assert found() == [("strict", "deposit"), ("exclusive", "deposit")]

    def test_track_is_a_no_op_while_disabled(self) -> None:
        assert not sanitizer.is_enabled()
        account = Account()
        assert sanitizer.track(account) is account
        assert "_sanitizer_record" not in vars(account)

    def test_transfer_makes_the_caller_the_owner(self, sanitized: Sanitized) -> None:
        account = sanitizer.track(Account())

        def take_over() -> None:
            sanitizer.transfer(account)
            account.deposit(1)
        tracked(account)
        in_thread(take_over)
        assert sanitizer.violations() == []
        account.deposit(1)  # the main thread no longer owns it
        assert [v.policy for v in sanitizer.violations()] == ["strict"]
        assert found() == [("strict", "deposit")]

    def test_shared_allows_cross_thread_use_inside_only(self, sanitized: Sanitized) -> None:
        account = sanitizer.track(Account())
        tracked(account)
        with sanitizer.shared(account), sanitizer.shared(account):  # nests, counted
            in_thread(lambda: account.deposit(1))
        assert sanitizer.violations() == []
        in_thread(lambda: account.deposit(1))
        assert len(sanitizer.violations()) == 1
        assert found() == [("strict", "deposit")]


@sanitizer.thread_affine
class Session:
    def query(self) -> str:
        return "rows"

    def __iter__(self) -> Any:
        return iter([1])


@sanitizer.thread_affine(policy="exclusive")
class Pool:
    def get(self, wait: threading.Event | None = None, entered: threading.Event | None = None
            ) -> str:
        if entered is not None:
            entered.set()
        if wait is not None:
            wait.wait(10)
        return "conn"


class TestThreadAffine:
    def test_methods_and_use_dunders_are_checked(self, sanitized: Sanitized) -> None:
        session = Session()
        assert session.query() == "rows"
        in_thread(session.query)
        in_thread(lambda: list(session))
        assert sorted(v.operation for v in sanitizer.violations()) == ["__iter__", "query"]

    def test_class_is_untouched_while_disabled(self) -> None:
        assert Session.query.__qualname__ == "Session.query"
        assert "__sanitizer_policy__" not in vars(Session)

    def test_disable_restores_the_class(self, sanitized: Sanitized) -> None:
        assert "__sanitizer_policy__" in vars(Session)
        sanitizer.disable()
        assert "__sanitizer_policy__" not in vars(Session)
        in_thread(Session().query)  # nothing to report, nothing raised

    def test_an_instance_made_before_enabling_is_untracked_not_broken(
            self, tmp_path: Path) -> None:
        early = Session()  # no record: the class is patched after it was made
        sanitizer.enable(log_file=str(tmp_path / "violations.jsonl"))
        try:
            assert in_thread(early.query) == "rows"
            assert in_thread(lambda: list(early)) == [1]
            assert sanitizer.violations() == []
            in_thread(Session().query)  # positive control: one made now is tracked
            assert [v.operation for v in sanitizer.violations()] == ["query"]
        finally:
            sanitizer.disable()

    def test_exclusive_allows_handoff_and_catches_overlap(self, sanitized: Sanitized) -> None:
        pool = Pool()
        tracked(pool)
        in_thread(pool.get)  # handoff
        assert sanitizer.violations() == []
        entered, release = threading.Event(), threading.Event()
        holder = threading.Thread(target=pool.get, args=(release, entered), name="holder")
        holder.start()
        entered.wait(10)
        pool.get()
        release.set()
        holder.join()
        [violation] = sanitizer.violations()
        assert violation.policy == "exclusive"
        assert violation.holder_thread is not None
        assert violation.holder_thread["name"] == "holder"


class Registry:
    def put(self, record: object, func: object = None, /, holder: object = (), *,
            policy: str = "p", **state: object) -> tuple[object, ...]:
        return (record, func, holder, policy, state)


class TestGuardSignatures:
    def test_guards_copy_python_signatures_and_never_shadow_parameters(
            self, sanitized: Sanitized) -> None:
        import inspect

        original = Registry.put
        registry = sanitizer.track(Registry())
        guard = Registry.put
        assert guard is not original
        assert inspect.signature(guard, follow_wrapped=False) == inspect.signature(original)
        assert guard.__code__.co_argcount == original.__code__.co_argcount
        assert guard.__code__.co_kwonlyargcount == original.__code__.co_kwonlyargcount
        assert guard.__defaults__ == original.__defaults__  # the same default objects
        assert registry.put(1) == (1, None, (), "p", {})
        assert registry.put(1, 2, holder=3, policy="q", me=4) == (1, 2, 3, "q", {"me": 4})
        with pytest.raises(TypeError):
            registry.put(record=1)  # positional-only stays positional-only
        in_thread(lambda: registry.put(5))
        assert [v.operation for v in sanitizer.violations()] == ["put"]


class TestLayers:
    def test_one_misuse_is_reported_once_across_layers(self, sanitized: Sanitized) -> None:
        @sanitizer.thread_affine
        class Ledger:  # a tracked wrapper over a tracked object, like an ORM over a driver
            def __init__(self) -> None:
                self.account = sanitizer.track(Account())

            def record(self) -> None:
                self.account.deposit(1)  # also strict, also the wrong thread: same misuse

        ledger, loose = Ledger(), sanitizer.track(Account(), name="loose")

        def misuse() -> None:
            ledger.record()
            loose.deposit(1)  # after the reported call returned: checked as usual
        in_thread(misuse)
        assert [(v.operation, v.object_name) for v in sanitizer.violations()] == [
            ("record", None), ("deposit", "loose")]


class TestActions:
    def test_raise_stops_the_call_before_the_library(self, enable: Any) -> None:
        enable(action="raise")
        conn = sqlite3.connect(":memory:")
        with pytest.raises(sanitizer.ThreadAffinityError) as info:
            in_thread(lambda: conn.execute("select 1"))
        assert info.value.violation.policy == "strict"
        assert "belongs to thread T" in str(info.value)
        with pytest.raises(sanitizer.ThreadAffinityError):  # every time, not only the first
            in_thread(lambda: conn.execute("select 1"))

    def test_warn_issues_a_warning_at_the_access_site(self, enable: Any) -> None:
        enable(action="warn")
        account = sanitizer.track(Account())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            in_thread(lambda: account.deposit(1))
        [warning] = [w for w in caught if w.category is sanitizer.ThreadAffinityWarning]
        assert warning.filename == __file__

    def test_log_plus_raise(self, enable: Any) -> None:
        run = enable(action="log+raise")
        account = sanitizer.track(Account())
        with pytest.raises(sanitizer.ThreadAffinityError):
            in_thread(lambda: account.deposit(1))
        assert len(run.records()) == 1


class TestSuppressions:
    def test_rules_suppress_and_unused_ones_are_listed(self, enable: Any,
                                                       tmp_path: Path) -> None:
        rules = tmp_path / "suppressions.txt"
        rules.write_text("# comment\nobject:*Account\nsite:nowhere.py:12\nfunction:no.such\n")
        run = enable(suppressions=str(rules))
        account = sanitizer.track(Account())
        tracked(account)
        in_thread(lambda: account.deposit(1))
        assert run.records() == []
        summary = "\n".join(sanitizer_running().reporter.exit_summary())
        assert "nowhere.py" in summary and "no.such" in summary and "Account" not in summary

    def test_site_and_function_rules(self, enable: Any, tmp_path: Path) -> None:
        rules = tmp_path / "s.txt"
        # The function is the creation stack's (the worker's stack has only the lambda).
        for rule in (f"site:*/{Path(__file__).name}", "function:*test_site_and_function_rules"):
            rules.write_text(f"{rule}\n")
            run = enable(suppressions=str(rules))
            account = sanitizer.track(Account())
            tracked(account)
            in_thread(lambda: account.deposit(1))  # noqa: B023 - called at once
            assert run.records() == []
            summary = "\n".join(sanitizer_running().reporter.exit_summary())
            assert "never matched" not in summary, summary  # the rule hid a real report
        # The control: the same misuse under rules that do not match it is reported.
        rules.write_text("site:*/nowhere.py\nfunction:no.such\n")
        run = enable(suppressions=str(rules))
        account = sanitizer.track(Account())
        in_thread(lambda: account.deposit(1))
        assert [(r["policy"], r["operation"]) for r in run.records()] == [("strict", "deposit")]

    def test_bad_rule_names_file_and_line(self, tmp_path: Path) -> None:
        rules = tmp_path / "s.txt"
        rules.write_text("object:ok\nsight:typo.py\n")
        with pytest.raises(sanitizer.ConfigError, match=r"s.txt:2: bad rule 'sight:typo.py'"):
            sanitizer.enable(suppressions=str(rules))
        assert not sanitizer.is_enabled()


def sanitizer_running() -> Any:
    from sanitizer import control
    return control.running()


class TestNeverBreakTheHost:
    def test_internal_error_is_reported_once_and_the_call_goes_ahead(
            self, sanitized: Sanitized, monkeypatch: pytest.MonkeyPatch) -> None:
        from sanitizer import report

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("bug in the sanitizer")
        monkeypatch.setattr(report, "build", broken)
        account = sanitizer.track(Account())
        in_thread(lambda: account.deposit(1))
        in_thread(lambda: account.deposit(1))
        assert account.balance == 2
        lines = [line for line in sanitized.log.read_text().splitlines()
                 if "sanitizer_internal_error" in line]
        assert len(lines) == 1 and "bug in the sanitizer" in lines[0]

    def test_enable_is_idempotent(self, sanitized: Sanitized) -> None:
        from sanitizer import control

        first = control.running()
        sanitizer.enable(action="raise")
        assert control.running() is first

    def test_track_option_patches_on_import(self, enable: Any, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp_path / "thirdparty_client.py").write_text(
            "class Client:\n    def get(self):\n        return 1\n"
            "def make():\n    return Client()\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        enable(track="thirdparty_client:Client")
        assert "thirdparty_client" not in sys.modules  # never imported by us
        import thirdparty_client  # type: ignore[import-not-found]

        client = thirdparty_client.make()
        in_thread(client.get)
        assert [v.object_type for v in sanitizer.violations()] == ["thirdparty_client.Client"]
        sys.modules.pop("thirdparty_client")


    def test_track_option_wraps_factories(self, enable: Any, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp_path / "thirdparty_factory.py").write_text(
            "import sqlite3\ndef open_db():\n"
            "    return sqlite3.Connection(':memory:', check_same_thread=False)\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        enable(track="thirdparty_factory:open_db@exclusive")
        import thirdparty_factory  # type: ignore[import-not-found]

        conn = thirdparty_factory.open_db()  # a plain C connection: comes back as a proxy
        assert isinstance(conn, sqlite3.Connection) and type(conn) is not sqlite3.Connection
        tracked(conn)
        in_thread(lambda: conn.execute("select 1"))  # handoff under exclusive: silent
        assert sanitizer.violations() == []
        # The control: a statement while another thread is inside one is reported
        # (and raised, before it would wait for SQLite's connection mutex).
        with inside_query(conn), raising(), pytest.raises(sanitizer.ThreadAffinityError):
            conn.execute("select 1")
        assert found() == [("exclusive", "execute")]
        sanitizer.disable()
        assert type(thirdparty_factory.open_db()) is sqlite3.Connection  # unpatched
        sys.modules.pop("thirdparty_factory")


class TestOptions:
    def test_one_vocabulary(self) -> None:
        parsed = opts.parse("action=warn+raise,stack_depth=4,format=json")
        assert parsed == opts.from_kwargs({"action": "warn+raise", "stack_depth": 4,
                                           "format": "json"})
        assert parsed is not None and parsed.action == ("warn", "raise")

    @pytest.mark.parametrize("text", ["1", "on", "true", "yes"])
    def test_on_words_mean_defaults(self, text: str) -> None:
        assert opts.parse(text) == opts.DEFAULTS

    @pytest.mark.parametrize("text", ["", "0", "off", "no"])
    def test_off_words(self, text: str) -> None:
        assert opts.parse(text) is None

    def test_bare_action_word(self) -> None:
        parsed = opts.parse("raise")
        assert parsed is not None and parsed.action == ("raise",)

    @pytest.mark.parametrize(("text", "fragment"), [
        ("stack_depth=0", "'stack_depth'; expected a whole number from 1 to 256"),
        ("action=shout", "'action'; expected one or more of log, warn, raise"),
        ("exitcode=300", "'exitcode'"),
        ("track=not a spec", "'track'"),
        ("colour=red", "unknown option 'colour'; accepted options: action, log_file"),
    ])
    def test_errors_name_key_and_accepted_values(self, text: str, fragment: str) -> None:
        with pytest.raises(sanitizer.ConfigError) as info:
            opts.parse(text)
        assert fragment in str(info.value)
        assert "\n" not in str(info.value)

    def test_round_trip_through_the_environment_form(self) -> None:
        options = opts.from_kwargs({"action": "raise", "stack_depth": 3, "track": "a.b:C"})
        assert opts.parse(options.to_string()) == options

    def test_plugins_selection(self) -> None:
        only = opts.parse("plugins=sqlite3")
        assert only is not None and only.plugin_enabled("sqlite3")
        assert not only.plugin_enabled("django")
        without = opts.parse("plugins=-django")
        assert without is not None and without.plugin_enabled("sqlite3")
        assert not without.plugin_enabled("django")

    def test_unknown_plugin_is_a_config_error(self) -> None:
        with pytest.raises(sanitizer.ConfigError, match="unknown plugin 'nosuch'"):
            sanitizer.enable(plugins="nosuch")
        assert not sanitizer.is_enabled()


class TestThirdPartyPlugin:
    def test_entry_point_plugin_from_the_readme(self, tmp_path: Path) -> None:
        """A plugin installed under the sanitizer.plugins entry point is found and used."""
        import subprocess

        site = tmp_path / "site"
        info = site / "mylib_sanitizer-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: mylib-sanitizer\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(
            "[sanitizer.plugins]\nmylib = mylib_sanitizer:plugin\n")
        (site / "mylib.py").write_text(
            "class Client:\n"
            "    def get(self, entered=None, release=None):\n"
            "        if entered: entered.set(); release.wait(10)\n"
            "        return 1\n"
            "def connect():\n"
            "    return Client()\n")
        (site / "mylib_sanitizer.py").write_text(
            "from sanitizer.plugin import Context, Plugin\n"
            "from sanitizer.policies import EXCLUSIVE_POLICY\n"
            "def install(module, context: Context) -> None:\n"
            "    def connect(wrapped, instance, args, kwargs):\n"
            "        return context.track(wrapped(*args, **kwargs), EXCLUSIVE_POLICY)\n"
            "    context.wrap(module, 'connect', connect)\n"
            "plugin = Plugin(name='mylib', hooks={'mylib': install}, libraries=('mylib',))\n")
        app = tmp_path / "app.py"
        app.write_text(
            "import threading, sanitizer\n"
            "sanitizer.enable(log_file='/dev/null')\n"
            "import mylib\n"
            "client = mylib.connect()\n"
            "handoff = threading.Thread(target=client.get)  # a handoff: fine\n"
            "handoff.start(); handoff.join()  # done before the holder starts\n"
            "entered, release = threading.Event(), threading.Event()\n"
            "holder = threading.Thread(target=client.get, args=(entered, release))\n"
            "holder.start(); entered.wait(10)\n"
            "client.get()  # overlaps the holder\n"
            "release.set(); holder.join()\n"
            "print([(v.policy, v.object_type) for v in sanitizer.violations()])\n")
        env = {k: v for k, v in __import__("os").environ.items()
               if not k.startswith("SANITIZE_THREADS")}
        env["PYTHONPATH"] = str(site)
        out = subprocess.run([sys.executable, str(app)], capture_output=True, text=True,
                             env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[('exclusive', 'mylib.Client')]"


class TestImportHooks:
    def test_hooks_fire_when_another_finder_comes_first_or_the_finder_was_dropped(
            self, enable: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """pytest's assertion rewriter goes first for the modules it rewrites, and
        pytester restores sys.meta_path; neither may stop modules being patched."""
        import importlib.machinery

        from wrapt.importer import ImportHookFinder

        (tmp_path / "late_client.py").write_text(
            "class Client:\n    def get(self):\n        return 1\n")
        monkeypatch.syspath_prepend(str(tmp_path))

        class FirstFinder(importlib.machinery.PathFinder):  # like pytest's rewriter
            pass
        monkeypatch.setattr(sys, "meta_path", [FirstFinder, *(
            f for f in sys.meta_path if not isinstance(f, ImportHookFinder))])
        enable(track="late_client:Client")
        assert isinstance(sys.meta_path[0], ImportHookFinder)
        import late_client  # type: ignore[import-not-found]

        in_thread(late_client.Client().get)
        assert [v.object_type for v in sanitizer.violations()] == ["late_client.Client"]
        sys.modules.pop("late_client")
