"""Each option is declared once, on a config dataclass field: its type, default and help.

`Annotated[T, opt("help")]` makes a field the option `--field-name` (or the flags given; a
bool becomes `--x/--no-x`) whose default is the field's own; `arg("help")` makes a required
positional argument. Fields without either are settings no command exposes. The CLI is derived
from these specs (`etl.command`), so a default or a help text lives in one place. Free of typer:
config modules import this and stay light.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints


@dataclass(frozen=True)
class Opt:
    """CLI metadata of one field."""

    help: str
    flags: tuple[str, ...] = ()
    argument: bool = False


def opt(help: str, *flags: str) -> Opt:
    """An option; `flags` replace the default `--field-name` (e.g. "--checkpoint", "--ckpt")."""
    return Opt(help, flags)


def arg(help: str) -> Opt:
    """A required positional argument (a list type takes one or more values)."""
    return Opt(help, argument=True)


@dataclass(frozen=True)
class Only:
    """Marks a command parameter `Annotated[Config, only("a", "b")]`: expose just these fields."""

    names: tuple[str, ...]


def only(*names: str) -> Only:
    return Only(names)


@dataclass(frozen=True)
class OptionSpec:
    """One exposed field: what a CLI needs to parse it."""

    name: str
    type: Any  # the field's type, without its Annotated metadata
    meta: Opt
    default: Any = dataclasses.MISSING
    default_factory: Callable[[], Any] | None = None

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING and self.default_factory is None

    @property
    def is_bool(self) -> bool:
        return self.type is bool or set(_union_args(self.type)) == {bool, type(None)}

    @property
    def flags(self) -> tuple[str, ...]:
        if self.meta.flags:
            return self.meta.flags
        dashed = self.name.replace("_", "-")
        return (f"--{dashed}/--no-{dashed}",) if self.is_bool else (f"--{dashed}",)

    def same_option(self, other: OptionSpec) -> bool:
        """Whether two dataclasses declare the same option (one CLI option can feed both)."""
        return (
            self.type == other.type
            and self.default == other.default
            and self.flags == other.flags
            and self.meta.argument == other.meta.argument
            and (self.default_factory is None) == (other.default_factory is None)
        )


def _union_args(tp: Any) -> tuple[Any, ...]:
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else ()


def option_specs(cls: type, selected: Only | None = None) -> list[OptionSpec]:
    """The exposed fields of dataclass `cls` (all, or those `selected`), in field order."""
    hints = get_type_hints(cls, include_extras=True)
    specs = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        meta = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Opt)), None)
        if meta is None or (selected is not None and f.name not in selected.names):
            continue
        factory = None if f.default_factory is dataclasses.MISSING else f.default_factory
        specs.append(OptionSpec(f.name, get_args(hint)[0], meta, f.default, factory))
    if selected is not None:
        unknown = set(selected.names) - {s.name for s in specs}
        if unknown:
            raise TypeError(f"{cls.__name__}: no options named {sorted(unknown)}")
    return specs


def split_annotation(hint: Any) -> tuple[Any, Only | None]:
    """`Annotated[Config, only(...)]` -> (Config, the selection); `Config` -> (Config, None)."""
    if get_origin(hint) is Annotated:
        base, *extras = get_args(hint)
        return base, next((e for e in extras if isinstance(e, Only)), None)
    return hint, None
