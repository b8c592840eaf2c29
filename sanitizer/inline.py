"""Checks compiled into a copy of a pure-Python function, from its own source: no extra frame.

A guard is a frame of its own between the caller and the method. For the
hottest methods of pure-Python libraries (asyncio's loop and queues), that
frame costs more than the method's own work. Here the check becomes the first
statements of a copy of the method, compiled from the method's source in its
own module, with its own file name and line numbers: tracebacks and
``inspect.signature`` are unchanged, and a call costs a few attribute reads.

Only what can be copied faithfully is: a plain function or coroutine function
whose source is available, with no decorators, closures or private
(name-mangled) names, and no names of ours. Anything else gets None, and the
caller falls back to a guard.
"""

from __future__ import annotations

import ast
import functools
import inspect
import linecache
import sys
import textwrap
from collections.abc import Callable
from types import CodeType, FunctionType
from typing import Any

RESERVED_PREFIX = "_g_"
GUARD_FILENAME = "<sanitizer-guard>"  # stacks.GUARD_FILENAME: this module imports none of ours


def with_prologue(func: Callable[..., Any], prologue: str, names: dict[str, Any],
                  ) -> FunctionType | None:
    """A copy of ``func`` that runs ``prologue`` first (``{self}`` in it: the first
    parameter's name); None if ``func`` cannot be copied faithfully.

    ``names`` are what the prologue uses besides the function's own globals; each must
    start with ``_g_``.
    """
    tree = _definition(func)
    if tree is None:
        return None
    definition = tree.body[0]
    assert isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef))
    arguments = definition.args
    first = (arguments.posonlyargs + arguments.args)[:1]
    if not first:
        return None
    statements = ast.parse(prologue.replace("{self}", first[0].arg)).body
    body = definition.body
    docstring = (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                 and isinstance(body[0].value.value, str))
    at = 1 if docstring else 0
    for statement in statements:  # reported at the def line, where a guard would be
        for node in ast.walk(statement):
            if hasattr(node, "lineno"):
                node.lineno = node.end_lineno = definition.lineno  # type: ignore[attr-defined]
                node.col_offset = node.end_col_offset = 0  # type: ignore[attr-defined]
    definition.body = body[:at] + statements + body[at:]
    # Defaults and annotations are copied from the function itself, not re-evaluated.
    arguments.defaults = []
    arguments.kw_defaults = [None] * len(arguments.kwonlyargs)
    for argument in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                     arguments.vararg, arguments.kwarg):
        if argument is not None:
            argument.annotation = None
    definition.returns = None
    code = func.__code__
    # Compiled inside a factory whose parameters are ``names``: the copy reads them as
    # closure cells, and everything else from the function's own module.
    factory = ast.parse(f"def _g_factory({', '.join(names)}):\n    pass\n").body[0]
    assert isinstance(factory, ast.FunctionDef)
    factory.body = [definition, ast.Return(ast.Name(definition.name, ast.Load()))]
    module = ast.Module([factory], [])
    ast.fix_missing_locations(module)
    try:
        compiled = compile(module, code.co_filename, "exec")
    except (SyntaxError, ValueError):
        return None
    scope: dict[str, Any] = {}
    exec(compiled, func.__globals__, scope)
    copy: FunctionType = scope["_g_factory"](*names.values())
    copy.__defaults__ = func.__defaults__
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__annotations__ = dict(getattr(func, "__annotations__", {}))
    copy.__qualname__ = func.__qualname__
    copy.__module__ = func.__module__
    copy.__doc__ = func.__doc__
    copy.__dict__.update(getattr(func, "__dict__", {}))
    copy.__wrapped__ = func  # type: ignore[attr-defined]
    if sys.version_info >= (3, 11):  # tracebacks name the method, not the factory
        copy.__code__ = copy.__code__.replace(
            co_qualname=code.co_qualname)  # type: ignore[call-arg, attr-defined, unused-ignore]
    return copy


def wrapped_with_prologue(func: Callable[..., Any], prologue: str, names: dict[str, Any]
                          ) -> FunctionType:
    """The fallback of ``with_prologue``: a wrapper named as ``func`` that runs the same
    ``prologue`` (``{self}``: its first argument), then calls ``func``; a frame dearer."""
    source = (f"def _g_factory(_g_func, {', '.join(names)}):\n"
              f"    def {func.__name__}(_g_self, /, *args, **kwargs):\n"
              + textwrap.indent(prologue.replace("{self}", "_g_self"), " " * 8)
              + "        return _g_func(_g_self, *args, **kwargs)\n"
              f"    return {func.__name__}\n")
    scope: dict[str, Any] = {}
    # The guards' file name: its frame is ours, never a report's site.
    exec(compile(source, GUARD_FILENAME, "exec"), scope)
    wrapper: FunctionType = scope["_g_factory"](func, *names.values())
    functools.update_wrapper(wrapper, func)
    return wrapper


def _definition(func: Callable[..., Any]) -> ast.Module | None:
    """A fresh parse of ``func``'s definition if it can be copied faithfully, else None."""
    if not isinstance(func, FunctionType) or func.__closure__:
        return None
    code = func.__code__
    if code.co_flags & (inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR):
        return None  # a prologue would run at the first next(), not at the call
    names = (*code.co_varnames, *code.co_names, *code.co_freevars, *code.co_cellvars)
    if any(n.startswith(RESERVED_PREFIX) or (n.startswith("__") and not n.endswith("__"))
           for n in names):
        return None
    tree = _parse(code)
    if tree is None:
        return None
    found = tree.body[0]
    if not isinstance(found, (ast.FunctionDef, ast.AsyncFunctionDef)) or \
            found.name != func.__name__ or found.decorator_list:
        return None
    if any(_private(node) for node in ast.walk(found)):
        return None  # compiled outside its class, the name would not be mangled
    if isinstance(found, ast.AsyncFunctionDef) != inspect.iscoroutinefunction(func):
        return None
    return tree


def _private(node: ast.AST) -> bool:
    name = node.id if isinstance(node, ast.Name) else (
        node.attr if isinstance(node, ast.Attribute) else "")
    return name.startswith("__") and not name.endswith("__")


def _parse(code: CodeType) -> ast.Module | None:
    """The function's own lines, parsed, with the file's line numbers. Its last line is
    the last one its code (or code nested in it) runs, plus what a statement's closing
    brackets need: far cheaper than inspect.getsource, which tokenizes in Python."""
    lines = linecache.getlines(code.co_filename)
    start = code.co_firstlineno
    if not lines or start > len(lines):
        return None
    end = max(_last_line(code), start)
    indent = len(lines[start - 1]) - len(lines[start - 1].lstrip())
    for _ in range(64):
        try:
            tree = ast.parse(textwrap.dedent("".join(lines[start - 1:end])))
        except (SyntaxError, ValueError):
            if end >= len(lines):
                return None
            following = lines[end]
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                return None
            end += 1
            continue
        if len(tree.body) != 1:
            return None
        ast.increment_lineno(tree, start - 1)
        return tree
    return None


def _last_line(code: CodeType) -> int:
    """The last line that ``code``, or code nested in it, runs."""
    lines = [line for _, _, line in code.co_lines() if line is not None]
    lines += [_last_line(c) for c in code.co_consts if isinstance(c, CodeType)]
    return max(lines, default=0)



