"""Typer commands derived from option dataclasses, and the one mapping of user errors.

`command(app)` registers a function whose parameters are option dataclasses (`etl.options`).
Every exposed field becomes one CLI option; a field that several of them declare alike is one
option feeding each. The dataclasses are built and `validate()`d, then the function runs. A
`PatchetlError` raised in any of that prints `error: <message>` on stderr and exits 2, without
a traceback: the message already names the file, the entry and the fix.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, get_type_hints

import typer

from etl.errors import PatchetlError
from etl.options import OptionSpec, option_specs, split_annotation

F = TypeVar("F", bound=Callable[..., None])


def fail(message: str, code: int = 2) -> NoReturn:
    """Print an error for the user (no traceback) and exit with `code`."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """The one mapping: a `PatchetlError` becomes its message and exit status 2."""
    try:
        yield
    except PatchetlError as exc:
        fail(str(exc))


@dataclass(frozen=True)
class _Group:
    """One parameter of the command function: its dataclass and the options it takes."""

    param: str
    cls: type
    names: tuple[str, ...]


def _groups(func: Callable[..., None]) -> tuple[list[_Group], dict[str, OptionSpec]]:
    hints = get_type_hints(func, include_extras=True)
    groups: list[_Group] = []
    specs: dict[str, OptionSpec] = {}
    for param in inspect.signature(func).parameters:
        cls, selected = split_annotation(hints[param])
        own = option_specs(cls, selected)
        for spec in own:
            first = specs.setdefault(spec.name, spec)
            if not first.same_option(spec):
                raise TypeError(
                    f"{func.__name__}: option {spec.name!r} is declared differently "
                    f"by {cls.__name__} and an earlier group; make them agree"
                )
        groups.append(_Group(param, cls, tuple(s.name for s in own)))
    return groups, specs


def _parameter(spec: OptionSpec) -> inspect.Parameter:
    info: Any
    if spec.meta.argument:
        info = typer.Argument(..., help=spec.meta.help, show_default=False)
    else:
        default = spec.default_factory() if spec.default_factory else spec.default
        info = typer.Option(
            ... if spec.required else default,
            *spec.flags,
            help=spec.meta.help,
            show_default=default != [],
        )
    return inspect.Parameter(
        spec.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=spec.type
    )


def command(app: typer.Typer, name: str | None = None) -> Callable[[F], F]:
    """Register the decorated function on `app`; its options come from its dataclass params."""

    def register(func: F) -> F:
        groups, specs = _groups(func)

        def callback(**values: Any) -> None:
            with user_errors():
                configs = {}
                for g in groups:
                    config = g.cls(**{n: values[n] for n in g.names})
                    if callable(validate := getattr(config, "validate", None)):
                        validate()
                    configs[g.param] = config
                func(**configs)

        callback.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [_parameter(s) for s in specs.values()]
        )
        callback.__annotations__ = {n: s.type for n, s in specs.items()}
        callback.__name__, callback.__doc__ = func.__name__, func.__doc__
        app.command(name)(callback)
        return func

    return register
