"""Progress bars for long tiled work, built on tqdm.

Every long loop in ntkit (kernel tiles, empirical-NTK blocks, UCI data sets, training sweeps, the
demo's stages) reports through :func:`progress`. A bar is drawn only when asked for *and* the stream
is a terminal, so logs, CI and pipes stay clean; ``progress=False`` silences it everywhere.
"""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

__all__ = ["progress", "progress_enabled"]

T = TypeVar("T")


def progress_enabled(flag: bool | None, stream=None) -> bool:
    """Whether to draw a bar: ``flag`` False never, otherwise only on a terminal.

    ``flag=None`` and ``flag=True`` both mean "when the stream is a terminal": a bar written into a
    log file or a pipe is noise, never information.
    """
    if flag is False:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    enabled: bool | None = True,
    leave: bool = False,
):
    """A tqdm bar over ``iterable`` (or a manual one with ``total``), silent off a terminal.

    Parameters
    ----------
    iterable : iterable, optional
        Items to iterate over; omit it and call ``bar.update(k)`` by hand.
    total : int, optional
        Number of steps (taken from ``len(iterable)`` when it has one).
    desc : str, optional
        Short label shown before the bar ("NTK tiles", "UCI data sets").
    unit : str
        Name of one step ("tile", "set").
    enabled : bool or None
        The caller's ``progress=`` argument: False silences the bar; True/None draw it on a terminal.
    leave : bool
        Keep the finished bar on screen.

    Returns
    -------
    tqdm
        Iterate over it like ``iterable``; it is also a context manager.
    """
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                disable=not progress_enabled(enabled), file=sys.stderr)
