"""Progress bars for long loops (rounds of a solver, steps of training, cells of an experiment).

Drawn with ``rich`` (a well-kept library that flax already depends on): a bar, the count, the elapsed and
remaining time, and the loop's own fields (the round, the objective and the gap; or the step and the
losses), updated once per compiled chunk, never inside a compiled program. ``quiet`` (or the environment
variable ``MTL_JAX_QUIET=1``, for CI and logs) turns every bar off; nothing else changes.

    with progress.bar(total=rounds, description="dmtrl") as update:
        ...
        update(done, J=f"{J:.6g}", gap=f"{gap:.1e}")   # fields shown as "J 30.49  gap 1.0e-06"
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

__all__ = ["bar", "is_quiet", "QUIET_ENV"]

#: Set to 1 to silence every progress bar of the package (CI, batch jobs, logs).
QUIET_ENV = "MTL_JAX_QUIET"


def is_quiet(quiet: bool | None = None) -> bool:
    """``quiet`` if given, else whether ``MTL_JAX_QUIET`` is set to a true value."""
    if quiet is not None:
        return bool(quiet)
    return os.environ.get(QUIET_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def bar(total: int | None, description: str, *, quiet: bool | None = None) -> Iterator[Callable[..., None]]:
    """A progress bar over ``total`` units (None: unknown); yields ``update(completed, total=None, **fields)``.

    The bar goes to stderr (results and tables stay on stdout) and disappears from a terminal when the loop
    ends; where stderr is not a terminal (a log file), rich prints only the final state once.
    """
    if is_quiet(quiet):
        yield lambda completed, total=None, **fields: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=Console(file=sys.stderr), transient=False) as prog:
        task = prog.add_task(description, total=total, info="")

        def update(completed: int, total: int | None = None, **fields) -> None:
            info = "  ".join(f"{k} {v}" for k, v in fields.items())
            prog.update(task, completed=completed, info=info, **({} if total is None else {"total": total}))

        yield update
