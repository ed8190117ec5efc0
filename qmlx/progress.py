"""Progress bars for the front ends, drawn from a library function's progress callback.

Library functions (e.g. `convert.convert`) print nothing; they take a
`progress(description, done, total)` callback, and a front end passes the one `byte_bar` gives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def byte_bar(show: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """A rich bar on stderr for work counted in bytes (size, speed, time left); yields its callback.

    With `show` false nothing is drawn (the callback still accepts the calls).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=Console(stderr=True), disable=not show) as bar:
        task = None

        def update(description: str, done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = bar.add_task(description, total=total)
            bar.update(task, description=description, completed=done, total=total)

        yield update
