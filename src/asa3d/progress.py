"""Progress bars of long runs: one tqdm line with ETA on stderr, or a line a caller provides.

Training loops take a ``BarFactory`` (``(total, initial, desc) -> bar``) instead of creating a
tqdm themselves, so a caller that runs several of them in a row (the ``evaluate`` grid: its
pretrainings, then its cells) can show all of them on one line with one ETA. A bar needs
``update(n)``, ``set_postfix(...)``, ``set_description(...)`` and ``close()``, as tqdm's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

BarFactory = Callable[[int, int, str], Any]


def console_bar(total: int, initial: int, desc: str) -> Any:
    """A tqdm line (stderr) with ETA, drawn on a terminal only (no carriage returns in a log
    file); it leaves the screen when it closes."""
    from tqdm.auto import tqdm

    from asa3d.console import progress_kwargs

    return tqdm(total=total, initial=initial, unit="it", desc=desc, leave=False, **progress_kwargs())


class SharedLine:
    """One tqdm line for several training loops run in a row, in stages (the ``evaluate`` grid:
    each pretraining is a stage, then all its cells are one).

    A stage's total is the work still to do: work finished before this process started (resumed
    cells, the iterations a resumed run had already done) is never counted, so the rate, and the
    ETA, are measured on this process's work only. ``loop`` hands a training loop a
    ``BarFactory``; the loop's ``update`` calls move this line."""

    def __init__(self, enabled: bool, desc: str = "grid") -> None:
        self._bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            from asa3d.console import progress_kwargs

            self._bar = tqdm(total=0, unit="it", desc=desc, **progress_kwargs())
        self._pending_total = False

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    def stage(self, desc: str, total: int | None = None) -> None:
        """Start a stage: the count and the clock restart; ``total=None``: the first loop's."""
        if self._bar is None:
            return
        self._bar.reset(total=total or 0)
        self._pending_total = total is None
        self._bar.set_description_str(desc, refresh=True)

    def describe(self, desc: str, postfix: str = "") -> None:
        if self._bar is not None:
            self._bar.set_description_str(desc, refresh=False)
            self._bar.set_postfix_str(postfix, refresh=True)

    def loop(self, label: str, expected: int | None = None) -> _Loop:
        """``with line.loop(name, expected) as factory: train(..., progress=factory)``. On a clean
        exit the line is moved to the end of the loop's ``expected`` iterations even if the loop
        reported fewer (or none)."""
        return _Loop(self, label, expected)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _Loop:
    def __init__(self, line: SharedLine, label: str, expected: int | None) -> None:
        self.line, self.label, self.expected = line, label, expected
        self.initial = 0
        self.count = 0

    def __enter__(self) -> BarFactory | None:
        return self._make if self.line.enabled else None

    def _make(self, total: int, initial: int, desc: str) -> _LoopBar:
        bar = self.line._bar
        self.initial = int(initial)
        if self.line._pending_total:  # a stage whose total is this loop's
            bar.reset(total=max(0, total - self.initial))
            self.line._pending_total = False
        elif self.initial:  # already done before this process: not work of this run
            bar.total = max(bar.n, bar.total - self.initial)
            bar.refresh()
        return _LoopBar(self)

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None and self.line.enabled and self.expected is not None:
            left = self.expected - self.initial - self.count
            if left > 0:
                self.line._bar.update(left)


class _LoopBar:
    """What a training loop sees: tqdm's calls, forwarded to the shared line."""

    def __init__(self, loop: _Loop) -> None:
        self.loop = loop

    def update(self, n: int = 1) -> None:
        self.loop.count += n
        self.loop.line._bar.update(n)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**dict(ordered_dict or {}), **kwargs}
        text = " ".join(f"{k}={v}" for k, v in items.items())
        self.loop.line._bar.set_postfix_str(f"{self.loop.label} {text}".strip(), refresh=refresh)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        pass  # the line's description is the grid's (stage, cells done)

    def close(self) -> None:
        pass  # the line outlives each loop
