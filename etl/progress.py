"""The one progress bar of every batch command (extract, train, infer): rich, on stderr.

`progress_bar(unit=...)` counts items with their rate and ETA; `info=True` adds a column that
shows a task's `info` field (e.g. the running loss). Disabled bars cost nothing.
"""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _RateColumn(ProgressColumn):
    """Items per second, e.g. `412.3 regions/s`."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text(f"{speed:.1f} {self.unit}/s" if speed else f"-- {self.unit}/s")


def progress_bar(
    *, unit: str, enabled: bool = True, info: bool = False, transient: bool = False
) -> Progress:
    """A bar per task: description, bar, done/total, rate in `unit`/s, elapsed, ETA."""
    columns: list[ProgressColumn] = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(unit),
    ]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*columns, disable=not enabled, transient=transient)
