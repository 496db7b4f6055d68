"""Command-line flags generated from a configuration dataclass, so each option is documented once.

A field's help text is the docstring written under it (read from the class's source); its type and default
come from the annotation and the default. ``--field-name`` sets ``field_name``; ``bool`` fields become
switches (``--field-name`` / ``--no-field-name``; ``None``, "auto", when neither is given for ``bool | None``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from collections.abc import Iterable

@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (collapsed to one paragraph); a subclass's own
    docstring wins over its bases'."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _flag_type(cls: type, name: str):
    """The field's type, ``X`` for ``X | None``."""
    hint = typing.get_type_hints(cls)[name]
    args = set(typing.get_args(hint)) - {type(None)}
    return args.pop() if len(args) == 1 and type(None) in typing.get_args(hint) else hint


def add_arguments(parser: argparse.ArgumentParser, cls: type, names: Iterable[str],
                  defaults: dict[str, object] | None = None) -> None:
    """One flag per field in ``names``; ``defaults`` overrides the dataclass's defaults in the help text and
    the parsed values (for commands whose sensible default differs)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    docs = field_docs(cls)
    for name in names:
        f = fields[name]
        default = (defaults or {}).get(name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        kind = _flag_type(cls, name)
        flag = "--" + name.replace("_", "-")
        shown = {None: "auto", True: "on", False: "off"}[default] if kind is bool else default
        help_text = docs.get(name, "") + ("" if shown is None else f" (default {shown})")
        help_text = help_text.replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, type=lambda s: tuple(int(v) for v in s.split(",")), default=default,
                                metavar="N,N,...", help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def values(args: argparse.Namespace, cls: type, names: Iterable[str]) -> dict[str, object]:
    """The parsed values of the flags :func:`add_arguments` made, as keyword arguments of ``cls``."""
    return {name: getattr(args, name) for name in names}
