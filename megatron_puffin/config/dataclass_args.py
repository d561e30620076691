"""argparse groups generated from configuration dataclasses.

Each dataclass field becomes one flag: the name (``micro_batch_size`` -> ``--micro-batch-size``, prefixed with
the class's ``FLAG_PREFIX``), the type and default come from the field, and the help text from the string
literal written directly under the field (its attribute docstring). A field's ``metadata`` may override the
flag name (``flag``) or give ``choices``.

Values that do not convert (``--num-layers abc``) do not stop parsing: they become :class:`InvalidValue` and the
validation step reports them together with every other mistake.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import math
import os
import shlex
import textwrap
import typing
from typing import Any, Dict, List, Optional, Tuple, Type

from megatron_puffin.files import read_text


@dataclasses.dataclass(frozen=True)
class InvalidValue:
    """A command-line value that could not be converted to its field's type."""

    flag: str
    text: str
    expected: str


@functools.lru_cache(maxsize=None)
def field_docstrings(cls: type) -> Dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal under each field), by field name."""
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def flag_name(cls: type, field: dataclasses.Field) -> str:
    """The command-line flag of a dataclass field."""
    if "flag" in field.metadata:
        return field.metadata["flag"]
    return "--" + getattr(cls, "FLAG_PREFIX", "") + field.name.replace("_", "-")


def _unwrap_optional(annotation: Any) -> Tuple[Any, bool]:
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _converter(flag: str, kind: type, optional: bool):
    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        try:
            value = kind(text)
        except (TypeError, ValueError):
            return InvalidValue(flag, text, kind.__name__)
        if kind is float and not math.isfinite(value):  # no flag means NaN or infinity: it would reach the model
            return InvalidValue(flag, text, "finite number")
        return value

    convert.__name__ = kind.__name__
    return convert


def _add_field(group: argparse._ArgumentGroup, cls: type, field: dataclasses.Field, hints: Dict[str, Any]) -> None:
    flag = flag_name(cls, field)
    doc = field_docstrings(cls).get(field.name, "")
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
    kind, optional = _unwrap_optional(hints[field.name])
    dest = f"{cls.__name__}.{field.name}"
    common = dict(dest=dest, default=default, help=f"{doc} (default: {default})")
    if kind is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        return
    choices = field.metadata.get("choices")
    if typing.get_origin(kind) is typing.Literal:
        choices = list(typing.get_args(kind))
        kind = type(choices[0])
    if typing.get_origin(kind) in (list, List):
        # Repeatable flag (e.g. --task-stream A --task-stream B); the collected list replaces the default.
        (item,) = typing.get_args(kind)
        common.update(default=None, help=f"{doc} (repeatable; default: {default})")
        group.add_argument(flag, action=_ReplacingAppend, type=_converter(flag, item, False), metavar=item.__name__.upper(),
                           **common)
        return
    metavar = "{" + ",".join(map(str, choices)) + "}" if choices else kind.__name__.upper()
    common["help"] += f" [choices: {', '.join(map(str, choices))}]" if choices else ""
    group.add_argument(flag, type=_converter(flag, kind, optional), metavar=metavar, **common)


def add_dataclass_group(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """Add one argparse group with a flag per field of ``cls``."""
    hints = typing.get_type_hints(cls)
    description = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
    group = parser.add_argument_group(title, description)
    for field in dataclasses.fields(cls):
        _add_field(group, cls, field, hints)


def build_dataclass(cls: Type, namespace: argparse.Namespace, invalid: List[InvalidValue]) -> Any:
    """Instantiate ``cls`` from a parsed namespace; unconvertible values are appended to ``invalid`` and the
    field keeps its default."""
    values = {}
    for field in dataclasses.fields(cls):
        value = getattr(namespace, f"{cls.__name__}.{field.name}")
        bad = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, InvalidValue)]
        if bad:
            invalid.extend(bad)
            continue
        if value is None and field.default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            continue  # an unused repeatable flag keeps its default list
        values[field.name] = value
    return cls(**values)


def choice_errors(cls: type, instance: Any) -> List[Tuple[str, Any, List[Any]]]:
    """(flag, value, allowed) for every field whose value is outside its declared choices."""
    hints = typing.get_type_hints(cls)
    errors = []
    for field in dataclasses.fields(cls):
        kind, _ = _unwrap_optional(hints[field.name])
        choices = field.metadata.get("choices")
        if typing.get_origin(kind) is typing.Literal:
            choices = list(typing.get_args(kind))
        value = getattr(instance, field.name)
        if choices and value is not None and value not in choices:
            errors.append((flag_name(cls, field), value, choices))
    return errors


SOURCE_BOUNDARY = "--\x00flag-source"  # inserted around each flag file's flags; never typed by a user


class _SourceBoundary(argparse.Action):
    """Counts flag sources (each flag file, each stretch of the command line between them)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace._flag_source = getattr(namespace, "_flag_source", 0) + 1


class _ReplacingAppend(argparse._AppendAction):
    """A repeatable flag: occurrences within one source accumulate; a later source's occurrences replace them
    (later flags win, also for lists: a command-line --task-stream replaces the flag file's streams)."""

    def __call__(self, parser, namespace, values, option_string=None):
        source = getattr(namespace, "_flag_source", 0)
        owners = namespace.__dict__.setdefault("_list_source", {})
        if owners.get(self.dest) != source:
            setattr(namespace, self.dest, None)
            owners[self.dest] = source
        super().__call__(parser, namespace, values, option_string)


class FlagFileParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose ``@file`` arguments allow ``#`` comments and several flags per line.

    A flag file may include another with an ``@file`` line; a relative path there is read from the including
    file's folder (``examples/stages/*.args`` share ``@model.args`` wherever the command runs).

    A flag file that cannot be read, is not text, has an unbalanced quote or includes itself does not stop
    parsing: the problem is kept in :attr:`flag_file_problems` and reported by the validation step.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("fromfile_prefix_chars", "@")
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.flag_file_problems: List[str] = []
        self.add_argument(SOURCE_BOUNDARY, action=_SourceBoundary, nargs=0, help=argparse.SUPPRESS)

    def convert_arg_line_to_args(self, arg_line: str) -> List[str]:
        return shlex.split(arg_line, comments=True)

    def _read_args_from_files(self, arg_strings: List[str], _including: Tuple[str, ...] = (),
                              _folder: Optional[str] = None) -> List[str]:
        expanded: List[str] = []
        for arg in arg_strings:
            if not arg or arg[0] not in self.fromfile_prefix_chars:
                expanded.append(arg)
                continue
            path = arg[1:]
            if _folder is not None and not os.path.isabs(path):
                path = os.path.join(_folder, path)
            flags = self._flag_file_args(path, _including)
            if flags is not None:
                expanded += [SOURCE_BOUNDARY, *flags, SOURCE_BOUNDARY]
        return expanded

    def _flag_file_args(self, path: str, including: Tuple[str, ...]) -> Optional[List[str]]:
        key = os.path.realpath(path)
        if key in including:
            chain = " -> ".join([*including, key])
            self.flag_file_problems.append(f"flag file @{path} includes itself ({chain}); remove that @ line")
            return None
        try:
            text = read_text(path)
            if "\x00" in text:
                raise UnicodeDecodeError("utf-8", b"", 0, 1, "NUL byte")
        except OSError as error:
            self.flag_file_problems.append(f"flag file @{path} cannot be read ({error.strerror}); check the path")
            return None
        except UnicodeDecodeError:
            self.flag_file_problems.append(f"flag file @{path} is not a text file (binary content); give a file "
                                           "of flags, e.g. examples/tiny/stage2_sft.args")
            return None
        flags: List[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                flags += self.convert_arg_line_to_args(line)
            except ValueError as error:
                self.flag_file_problems.append(f"flag file @{path} line {number}: {error} (an unbalanced quote); "
                                               "close the quote or escape it with a backslash")
        return self._read_args_from_files(flags, (*including, key), os.path.dirname(path))

