"""Write `docs/api.md`: the API reference of every name in `trl_prefix_share.__all__`, from the code itself.

    OMP_NUM_THREADS=1 .venv/bin/python docs/make_api.py [--out docs/api.md]

Generated from signatures, dataclass fields and docstrings, so the reference cannot drift from the code silently:
`tests/test_docs.py` fails when a public name or a config field is missing from the committed file, or when a
field's type, default or description there differs from the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import textwrap
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
DEFAULT_OUT = DOCS / "api.md"
PACKAGE = "trl_prefix_share"

#: Reading order of the reference; names of `__all__` not listed here land in "Other" (never dropped).
SECTIONS: dict[str, list[str]] = {
    "Trainers": [
        "PrefixSharedDPOTrainer",
        "GroupedPrefixSharedDPOTrainer",
        "PrefixSharedRewardTrainer",
        "PrefixSharedORPOTrainer",
        "PrefixSharedCPOTrainer",
        "PrefixSharedGRPOTrainer",
        "PrefixSharedRLOOTrainer",
    ],
    "Configs": [
        "PrefixShareArguments",
        "PrefixSharedDPOConfig",
        "PrefixSharedRewardConfig",
        "PrefixSharedORPOConfig",
        "PrefixSharedCPOConfig",
        "PrefixSharedGRPOConfig",
        "PrefixSharedRLOOConfig",
    ],
    "Stepwise DPO (sDPO)": ["StepwiseDPO", "StepwiseDPOConfig"],
    "Data: collator, grouping, sampler": ["PrefixSharedPreferenceCollator", "GroupByPrompt", "PromptGroupedSampler"],
    "Models and attention": [
        "UnsupportedModelError",
        "PrefixShareFallbackWarning",
        "register_attention",
        "ATTENTION_NAME",
    ],
}

#: Constants carry no docstring: their one-line description lives here.
CONSTANTS = {
    "ATTENTION_NAME": "Name of the attention implementation registered with transformers' `AttentionInterface` (and "
    "its mask function with `AttentionMaskInterface`); a switched model has `config._attn_implementation` set to it.",
}

#: Fields that have no entry in their class docstring get this description instead of an empty cell.
UNDOCUMENTED = "(No description in the class docstring.)"

_SECTION_HEADER = re.compile(r"^(Parameters|Args|Arguments|Attributes|Example|Examples|Returns|Raises):\s*$")
_ENTRY = re.compile(r"^(\w+)(?:\s*\(.*\))?:\s*(.*)$")


# -- reading the code --------------------------------------------------------------------------------------------------


def public_objects() -> dict[str, Any]:
    """Every name of `__all__`, the lazily exported ORPO/CPO ones included (their import warns: silenced)."""
    package = importlib.import_module(PACKAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: getattr(package, name) for name in package.__all__}


def split_docstring(obj: Any) -> tuple[str, dict[str, list[str]]]:
    """A docstring's prose (before the first `Name:` section header) and its sections' lines, dedented."""
    doc = inspect.cleandoc(obj.__doc__) if obj.__doc__ else ""
    prose: list[str] = []
    sections: dict[str, list[str]] = {}
    current: list[str] = prose
    for line in doc.splitlines():
        header = _SECTION_HEADER.match(line)
        if header:
            current = sections.setdefault(header.group(1), [])
        elif current is not prose and line and not line[0].isspace():
            current = prose  # back at the header's indentation: the section is over
            current.append(line)
        else:
            current.append(line)
    dedented = {name: textwrap.dedent("\n".join(lines)).strip("\n").splitlines() for name, lines in sections.items()}
    return "\n".join(prose).strip(), dedented


def parameter_docs(obj: Any) -> dict[str, str]:
    """One line per documented parameter/field, from the `Parameters:` / `Args:` / `Attributes:` sections."""
    _, sections = split_docstring(obj)
    found: dict[str, str] = {}
    for name in ("Parameters", "Args", "Arguments", "Attributes"):
        current: str | None = None
        for line in sections.get(name, []):
            entry = _ENTRY.match(line) if line and not line[0].isspace() else None
            if entry:
                current = entry.group(1)
                found[current] = entry.group(2).strip()
            elif current and line.strip():
                found[current] = (found[current] + " " + line.strip()).strip()
    return found


def field_description(cls: type, name: str) -> str:
    """A field's description: the first class in the MRO whose docstring documents it."""
    for klass in cls.__mro__:
        if klass.__doc__ and name in (docs := parameter_docs(klass)):
            return docs[name]
    return UNDOCUMENTED


def trl_base(cls: type) -> type | None:
    """The first TRL (or transformers) class `cls` derives from: what its fields and parameters mean upstream."""
    for klass in cls.__mro__[1:]:
        if klass.__module__.split(".")[0] in {"trl", "transformers"}:
            return klass
    return None


def public_path(cls: type) -> str:
    """Shortest importable dotted path of a class (`trl.DPOTrainer`, not `trl.trainer.dpo_trainer.DPOTrainer`)."""
    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        module = ".".join(parts[:end])
        try:
            if getattr(importlib.import_module(module), cls.__name__, None) is cls:
                return f"{module}.{cls.__name__}"
        except ImportError:
            continue
    return f"{cls.__module__}.{cls.__name__}"


def added_fields(cls: type) -> list[dataclasses.Field]:
    """The dataclass fields of `cls` that its TRL base config lacks (all fields when it has no TRL base)."""
    base = trl_base(cls)
    inherited = {f.name for f in dataclasses.fields(base)} if base and dataclasses.is_dataclass(base) else set()
    return [f for f in dataclasses.fields(cls) if f.name not in inherited]


# -- rendering ---------------------------------------------------------------------------------------------------------


def markdown_text(text: str, names: Iterable[str]) -> str:
    """Docstring markup to GitHub markdown: HF-doc links to code (linked within the page), rst ``x`` to `x`."""
    known = set(names)

    def link(match: re.Match) -> str:
        target = match.group(1).lstrip("~")
        short = target.rsplit(".", 1)[-1]
        return f"[`{short}`](#{anchor(short)})" if short in known else f"`{target}`"

    text = re.sub(r"\[`([\w.~]+)`\]", link, text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def anchor(name: str) -> str:
    """GitHub's heading anchor of `### \\`name\\``."""
    return re.sub(r"[^a-z0-9_-]", "", name.lower())


def cell(text: str) -> str:
    """A markdown table cell: pipes escaped (also inside code spans, as GitHub expects), one line."""
    return " ".join(text.split()).replace("|", "\\|")


def render_default(value: Any) -> str:
    """Stable text of a default value (functions by name, never by address)."""
    if value is inspect.Parameter.empty or value is dataclasses.MISSING:
        return "required"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def field_default(field: dataclasses.Field) -> str:
    if field.default_factory is not dataclasses.MISSING:
        return render_default(field.default_factory())
    return render_default(field.default)


def field_row(cls: type, field: dataclasses.Field, names: Iterable[str] = ()) -> str:
    """The table row of one config field (the test compares it with the committed file).

    The type is the annotation as written in the source, read from the class that declares the field: TRL's
    argument parser replaces `field.type` in place with the resolved type when it parses a config."""
    description = markdown_text(field_description(cls, field.name), names)
    kind = cell(source_annotation(cls, field))
    return f"| `{field.name}` | `{kind}` | `{cell(field_default(field))}` | {cell(description)} |"


def source_annotation(cls: type, field: dataclasses.Field) -> str:
    """The field's annotation text from the class body that declares it (falls back to `field.type`)."""
    for klass in cls.__mro__:
        annotations = klass.__dict__.get("__annotations__", {})
        if field.name in annotations:
            return annotation_text(annotations[field.name])
    return annotation_text(field.type)


def field_table(cls: type, fields: list[dataclasses.Field], names: Iterable[str]) -> list[str]:
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    return rows + [field_row(cls, f, names) for f in fields]


def annotation_text(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def signature_block(name: str, function: Callable, skip_self: bool) -> list[str]:
    """A call signature, one parameter per line, as a python code block."""
    parameters = list(inspect.signature(function).parameters.values())[1 if skip_self else 0 :]
    lines = []
    for parameter in parameters:
        text = parameter.name
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            text = "*" + text
        elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
            text = "**" + text
        if annotation := annotation_text(parameter.annotation):
            text += f": {annotation}"
        if parameter.default is not inspect.Parameter.empty:
            text += f" = {render_default(parameter.default)}"
        lines.append(f"    {text},")
    body = ["```python", f"{name}(", *lines, ")", "```"] if lines else ["```python", f"{name}()", "```"]
    return body


def parameter_table(function: Callable, documented: dict[str, str], names: Iterable[str]) -> list[str]:
    """Parameters with their docstring line, when the class documents them."""
    parameters = list(inspect.signature(function).parameters.values())[1:]
    if not any(p.name in documented for p in parameters):
        return []
    rows = ["| parameter | description |", "|---|---|"]
    for parameter in parameters:
        rows.append(f"| `{parameter.name}` | {cell(markdown_text(documented.get(parameter.name, ''), names))} |")
    return rows


def own_methods(cls: type) -> list[tuple[str, Callable, type]]:
    """Public methods (and `__call__`) defined by this package's classes in the MRO, first definition wins."""
    seen: dict[str, tuple[str, Callable, type]] = {}
    for klass in cls.__mro__:
        if not klass.__module__.startswith(PACKAGE):
            continue
        for name, value in vars(klass).items():
            public = not name.startswith("_") or name == "__call__"
            if public and inspect.isfunction(value) and name not in seen:
                seen[name] = (name, value, klass)
    return sorted(seen.values())


def method_lines(cls: type, names: Iterable[str]) -> list[str]:
    """One line per public method: its parameters and the first paragraph of its docstring."""
    lines = []
    base = trl_base(cls)
    for name, function, _ in own_methods(cls):
        summary = split_docstring(function)[0].split("\n\n")[0].replace("\n", " ")
        if not summary and base is not None and hasattr(base, name):
            summary = f"Overrides `{public_path(base)}.{name}`."
        parameters = list(inspect.signature(function).parameters)[1:]
        text = f"- `{name}({', '.join(parameters)})`"
        lines.append(f"{text}: {markdown_text(summary, names)}" if summary else text)
    return lines


def base_text(base: type, names: Iterable[str]) -> str:
    """A base class: linked within the page when public here, else its importable path."""
    if base.__name__ in set(names) and base.__module__.startswith(PACKAGE):
        return f"[`{base.__name__}`](#{anchor(base.__name__)})"
    return f"`{public_path(base)}`"


def class_lines(name: str, cls: type, names: list[str]) -> list[str]:
    prose, sections = split_docstring(cls)
    base = trl_base(cls)
    bases = [b for b in cls.__bases__ if b is not object]
    lines = [f"### `{name}`", "", f"`from {PACKAGE} import {name}`"]
    if bases:
        lines[-1] += "; subclass of " + ", ".join(base_text(b, names) for b in bases) + "."
    lines += ["", markdown_text(prose, names), ""]
    if dataclasses.is_dataclass(cls):
        lines += config_lines(cls, base, names)
    elif issubclass(cls, BaseException):
        pass  # raised by the package, not built by users
    else:
        lines += ["Constructor:", "", *signature_block(name, cls.__init__, skip_self=True), ""]
        table = parameter_table(cls.__init__, parameter_docs(cls), names)
        if base is not None and not table:
            lines += [f"Parameters mean what they mean for `{public_path(base)}`.", ""]
        lines += [*table, ""] if table else []
        methods = method_lines(cls, names)
        lines += ["Methods:", "", *methods, ""] if methods else []
    for example in ("Example", "Examples"):
        if example in sections:
            lines += ["Example:", "", *sections[example], ""]
    return lines


def config_lines(cls: type, base: type | None, names: list[str]) -> list[str]:
    fields = added_fields(cls)
    if base is not None:
        intro = (
            f"Every field of `{public_path(base)}` (see TRL's documentation), plus these {len(fields)} "
            "(from [`PrefixShareArguments`](#prefixsharearguments)):"
        )
    else:
        intro = "Fields:"
    return [intro, "", *field_table(cls, fields, names), ""]


def object_lines(name: str, obj: Any, names: list[str]) -> list[str]:
    if inspect.isclass(obj):
        return class_lines(name, obj, names)
    if callable(obj):
        prose = split_docstring(obj)[0]
        return [f"### `{name}`", "", *signature_block(name, obj, skip_self=False), "", markdown_text(prose, names), ""]
    description = CONSTANTS.get(name, "")
    return [f"### `{name}`", "", f"`{name} = {obj!r}`", "", description, ""]


def render() -> str:
    """The whole of `docs/api.md`."""
    objects = public_objects()
    names = list(objects)
    grouped = {title: [n for n in members if n in objects] for title, members in SECTIONS.items()}
    listed = {n for members in grouped.values() for n in members}
    grouped["Other"] = [n for n in names if n not in listed]
    lines = [
        "# API reference",
        "",
        f"Every public name of `{PACKAGE}` (its `__all__`). Generated by `docs/make_api.py` from the signatures, "
        "dataclass fields and docstrings; regenerate with `OMP_NUM_THREADS=1 .venv/bin/python docs/make_api.py` "
        "rather than editing by hand (`tests/test_docs.py` checks it against the code).",
        "",
        "The trainers take TRL's own configs too: a plain `trl.DPOConfig` (or `RewardConfig`, `ORPOConfig`, "
        "`CPOConfig`) works, and every prefix-sharing field it lacks takes the default below.",
        "",
    ]
    for title, members in grouped.items():
        if members:
            lines.append(f"- {title}: " + ", ".join(f"[`{n}`](#{anchor(n)})" for n in members))
    lines.append("")
    for title, members in grouped.items():
        if not members:
            continue
        lines += [f"## {title}", ""]
        for name in members:
            lines += object_lines(name, objects[name], names)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output markdown file")
    args = parser.parse_args(argv)
    Path(args.out).write_text(render(), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
