"""Parameters that carry their own command-line flags.

A parameters dataclass declares each field once, with :func:`option`: its default, its help
text and how it reads from a command line. :func:`add_flags` generates the argparse flags from
the fields and :func:`from_args` builds the dataclass back from the parsed arguments, so every
default exists in one place and the command line and the Python API give the same parameters
(a ``--scales 0 1`` read as floats hashes like the dataclass's ``(0.0, 1.0)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: A dataclass's field name that some flags spell differently (``compare_threshold`` is
#: ``--threshold``) lives in the field's metadata under this key.
_META = "em_option"


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """How one field reads from a command line."""

    help: str
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    #: parse one command-line word into the field's value, raising ValueError with the fix
    #: (also the argparse type, so a bad value is argparse's one-line usage error)
    parse: Callable[[Any], Any] | None = None
    #: the flag of a bool field that defaults to True (``--no-adapter-nodes``)
    negative_flag: str | None = None
    #: no flag at all (a field only the Python API sets)
    hidden: bool = False
    #: a repeatable flag (``--prompts a --prompts b``) for a tuple field
    repeat: bool = False


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    aliases: Sequence[str] = (),
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
    parse: Callable[[Any], Any] | None = None,
    negative_flag: str | None = None,
    hidden: bool = False,
    repeat: bool = False,
) -> Any:
    """A dataclass field with its flag: ``position: str = option("any", "feature identity")``."""
    spec = OptionSpec(
        help=help,
        flag=flag,
        aliases=tuple(aliases),
        choices=None if choices is None else tuple(choices),
        metavar=metavar,
        parse=parse,
        negative_flag=negative_flag,
        hidden=hidden,
        repeat=repeat,
    )
    return dataclasses.field(default=default, metadata={_META: spec})


def option_fields(cls: type) -> list[tuple[dataclasses.Field[Any], OptionSpec, Any]]:
    """(field, its option, its resolved type) of every option field of a dataclass."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_META)
        if isinstance(spec, OptionSpec):
            out.append((f, spec, hints[f.name]))
    return out


def flag_name(f: dataclasses.Field[Any], spec: OptionSpec) -> str:
    return spec.flag or "--" + f.name.replace("_", "-")


def _scalar(tp: Any) -> tuple[Any, bool, bool]:
    """(scalar type, is optional, is a tuple of that type) of a field's annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
    if origin is tuple:
        return typing.get_args(tp)[0], optional, True
    if origin is typing.Literal:
        return type(typing.get_args(tp)[0]), optional, False
    return tp, optional, False


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    seen: set[str] | None = None,
) -> None:
    """Add one flag per option field of ``cls`` to ``parser``; a field named in ``seen`` (a
    flag another dataclass of the same command already added) is skipped, and the names added
    go into it."""
    for f, spec, tp in option_fields(cls):
        if spec.hidden or (seen is not None and f.name in seen):
            continue
        if seen is not None:
            seen.add(f.name)
        scalar, _, many = _scalar(tp)
        names = [flag_name(f, spec), *spec.aliases]
        common: dict[str, Any] = {"dest": f.name, "help": spec.help}
        if spec.metavar:
            common["metavar"] = spec.metavar
        if scalar is bool and not many:
            if f.default:
                negative = spec.negative_flag or "--no-" + f.name.replace("_", "-")
                parser.add_argument(negative, action="store_false", default=True, **common)
            else:
                parser.add_argument(*names, action="store_true", default=False, **common)
            continue
        kwargs: dict[str, Any] = {"default": f.default, **common}
        if spec.parse is not None:
            kwargs["type"] = _argument_type(spec.parse, f.name)
        elif scalar in (int, float, str, Path):
            kwargs["type"] = scalar
        if spec.choices is not None:
            kwargs["choices"] = list(spec.choices)
        if many and spec.repeat:
            kwargs["action"] = "append"
            kwargs["default"] = []
        elif many:
            kwargs["nargs"] = "+"
            kwargs["default"] = list(f.default)  # type: ignore[arg-type]  # option() sets one
        parser.add_argument(*names, **kwargs)


def _argument_type(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ValueError becomes argparse's one-line usage error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = name  # argparse names the type in its message
    return convert


def from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """``cls`` built from the parsed flags of its option fields (a field without a flag in
    ``args`` keeps its default); ``overrides`` win."""
    values: dict[str, Any] = {}
    for f, _, tp in option_fields(cls):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        scalar, _, many = _scalar(tp)
        if many and value is not None:
            value = tuple(scalar(v) for v in value)
        elif scalar is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # `--threshold 1` and the API's 1.0 hash alike
        values[f.name] = value
    values.update(overrides)
    return cls(**values)


def check_shared_fields(classes: Iterable[type]) -> None:
    """Fields of the same name in several dataclasses of one command share one flag: their
    defaults and types must agree, or the flag would set them differently."""
    first: dict[str, tuple[type, Any, Any]] = {}
    for cls in classes:
        for f, _, tp in option_fields(cls):
            if f.name in first:
                other, default, other_tp = first[f.name]
                if default != f.default or other_tp != tp:
                    raise TypeError(
                        f"{cls.__name__}.{f.name} and {other.__name__}.{f.name} share the flag "
                        f"but not the default or type ({f.default!r} vs {default!r})"
                    )
            else:
                first[f.name] = (cls, f.default, tp)
