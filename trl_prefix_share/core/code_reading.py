"""Reading what a layer's forward does from its code, following the helpers it calls.

The structural checks (which mixers the packed path serves, whether a layer passes its keywords on) read code, never
run it, so they hold under every launcher. transformers refactors that code between minor releases: a forward that
called ``cache.update_conv_state(...)`` itself in one release calls a shared ``causal_conv1d_forward(...)`` helper in
the next, decorated, or wrapped by the ``kernels`` package in a module object that ``inspect.getsource`` cannot read.
So a check must not look for a call inside one function's text. `CodeFacts` gathers, from a forward and from every
function it calls that lives in the model's own code (its module or transformers), the calls made and the keywords
passed, parsed from the syntax tree (comments and docstrings never count).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

#: How many calls deep the helpers of a forward are followed (forward -> helper -> kernel -> its helpers).
MAX_DEPTH = 4
#: Code outside these packages (torch, the standard library) is never followed: only a model's own helpers say
#: what it does with its cache.
_FOLLOWED_PACKAGES = ("transformers",)


def plain_function(target: object) -> types.FunctionType | None:
    """The Python function behind ``target``: decorators unwrapped (``functools.wraps``), a bound method's function,
    and the function a ``kernels`` wrapper module (``use_kernel_forward_from_hub`` on a function gives an ``nn.Module``
    instance whose class's ``forward`` closes over it) stands for. None for anything else (a class, a builtin)."""
    if isinstance(target, types.MethodType):
        target = target.__func__
    if isinstance(target, types.FunctionType):
        return inspect.unwrap(target)
    forward = getattr(type(target), "forward", None)
    if isinstance(forward, types.FunctionType) and forward.__closure__:
        wrapped = [
            cell.cell_contents
            for cell in forward.__closure__
            if isinstance(getattr(cell, "cell_contents", None), types.FunctionType)
        ]
        if len(wrapped) == 1:
            return inspect.unwrap(wrapped[0])
    return None


@functools.cache
def function_source(function: Callable) -> str:
    """The source of one function, dedented; "" where it cannot be read (compiled, generated, a lambda in a REPL)."""
    plain = plain_function(function)
    if plain is None:
        return ""
    try:
        return textwrap.dedent(inspect.getsource(plain))
    except (OSError, TypeError):
        return ""


def _syntax_tree(function: types.FunctionType) -> ast.AST | None:
    source = function_source(function)
    if not source:
        return None
    try:
        return ast.parse(source)
    except SyntaxError:
        return None


def called_name(call: ast.Call) -> str | None:
    """``f(...)`` -> "f", ``obj.method(...)`` / ``self.a.b(...)`` -> the last name ("method", "b")."""
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def self_attribute(call: ast.Call) -> str | None:
    """``self.helper(...)`` -> "helper" (a method of the layer's own class); None for any other callee."""
    func = call.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self":
        return func.attr
    return None


def _followed(function: types.FunctionType, home_module: str) -> bool:
    module = getattr(function, "__module__", "") or ""
    return module == home_module or module.split(".")[0] in _FOLLOWED_PACKAGES or module.startswith("transformers_")


def _resolve(call: ast.Call, function: types.FunctionType, owner: type | None) -> types.FunctionType | None:
    """The function a call in ``function`` reaches: a global or closed-over name, or a method of ``owner``."""
    attribute = self_attribute(call)
    if attribute is not None and owner is not None:
        return plain_function(inspect.getattr_static(owner, attribute, None))
    if not isinstance(call.func, ast.Name):
        return None
    name = call.func.id
    closure = dict(zip(function.__code__.co_freevars, function.__closure__ or (), strict=False))
    if name in closure:
        try:
            target = closure[name].cell_contents
        except ValueError:  # an empty cell
            return None
    else:
        target = function.__globals__.get(name)
    return plain_function(target)


@dataclass(frozen=True)
class CodeFacts:
    """What a forward and the helpers it reaches do, read from their syntax trees.

    Attributes:
        calls: how often each name is called (``cache.update_conv_state(...)`` counts as "update_conv_state").
        keywords: ``(keyword, value)`` pairs passed in calls, the value as written (``("initial_state",
            "recurrent_state")``); ``("**", name)`` for a ``**name`` passed on.
        functions: qualified names of the functions read, in the order they were reached (for messages and tests).
    """

    calls: Counter
    keywords: frozenset[tuple[str, str]]
    functions: tuple[str, ...]

    def calls_any(self, *names: str) -> bool:
        return any(self.calls[name] for name in names)

    def passes(self, keyword: str, *values: str) -> bool:
        """Whether some call passes ``keyword=`` (with one of ``values``, when given)."""
        return any(key == keyword and (not values or value in values) for key, value in self.keywords)


def _facts_of(functions: list[tuple[types.FunctionType, type | None]], depth: int) -> CodeFacts:
    calls: Counter = Counter()
    keywords: set[tuple[str, str]] = set()
    read: list[str] = []
    seen: set[int] = set()
    frontier = functions
    for _ in range(depth + 1):
        reached: list[tuple[types.FunctionType, type | None]] = []
        for function, owner in frontier:
            if id(function) in seen:
                continue
            seen.add(id(function))
            tree = _syntax_tree(function)
            if tree is None:
                continue
            read.append(function.__qualname__)
            home = owner.__module__ if owner is not None else function.__module__
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                name = called_name(node)
                if name is not None:
                    calls[name] += 1
                for keyword in node.keywords:
                    keywords.add((keyword.arg or "**", ast.unparse(keyword.value)))
                callee = _resolve(node, function, owner)
                if callee is not None and id(callee) not in seen and _followed(callee, home):
                    reached.append((callee, owner))
        frontier = reached
    return CodeFacts(calls, frozenset(keywords), tuple(read))


@functools.cache
def forward_facts(module_class: type, depth: int = MAX_DEPTH) -> CodeFacts:
    """`CodeFacts` of ``module_class.forward`` and the helpers it calls, ``depth`` calls deep (0: the forward only)."""
    forward = plain_function(getattr(module_class, "forward", None))
    if forward is None:
        return CodeFacts(Counter(), frozenset(), ())
    return _facts_of([(forward, module_class)], depth)


def _calls_of(module_class: type, attribute: str) -> list[ast.Call]:
    """The calls ``self.<attribute>(...)`` in ``module_class.forward`` (the forward itself, not its helpers)."""
    forward = plain_function(getattr(module_class, "forward", None))
    tree = _syntax_tree(forward) if forward is not None else None
    if tree is None:
        return []
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and self_attribute(node) == attribute]


def calls_attribute(module_class: type, attribute: str) -> bool:
    """Whether ``module_class.forward`` itself calls ``self.<attribute>(...)``."""
    return bool(_calls_of(module_class, attribute))


def calls_passing_kwargs(module_class: type, attribute: str) -> bool:
    """Whether ``module_class.forward`` calls ``self.<attribute>(...)`` handing its ``**kwargs`` on."""
    return any(any(keyword.arg is None for keyword in call.keywords) for call in _calls_of(module_class, attribute))


def function_facts(function: Callable, depth: int = MAX_DEPTH) -> CodeFacts:
    """`CodeFacts` of a plain function (a module-level helper) and the helpers it calls, ``depth`` calls deep."""
    plain = plain_function(function)
    if plain is None:
        return CodeFacts(Counter(), frozenset(), ())
    return _facts_of([(plain, None)], depth)


def body_calls(function: Callable) -> list[ast.Call] | None:
    """Every call in a function's body (its decorators left out); None where its source cannot be read."""
    plain = plain_function(function)
    tree = _syntax_tree(plain) if plain is not None else None
    if tree is None or not tree.body or not isinstance(tree.body[0], ast.FunctionDef | ast.AsyncFunctionDef):
        return None
    return [node for statement in tree.body[0].body for node in ast.walk(statement) if isinstance(node, ast.Call)]
