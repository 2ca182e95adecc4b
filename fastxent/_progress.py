"""Progress on stderr for the command line (``fastxent bench``, ``fastxent precompile``).

tqdm draws the bar when it is installed (the ``progress`` extra, also in ``bench`` and
``test``) and stderr is a terminal; piped, tqdm stays silent. Without tqdm each step is one
line on stderr when ``always_log`` (precompile: a minute of compiling should never be
silent), else nothing. Results go to stdout, never through here.
"""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """``with Progress(total, "what") as bar: bar.step(label)`` after each of ``total`` steps;
    ``bar.note(text)`` prints a line on stderr without breaking the bar."""

    def __init__(self, total: int, description: str, *, always_log: bool = False, unit: str = "step") -> None:
        self.total = total
        self.done = 0
        self.description = description
        self.always_log = always_log
        self._bar: Any = None
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, desc=description, unit=unit, file=sys.stderr, disable=None, leave=True)
        if self._bar.disable and always_log:  # not a terminal: tqdm is silent, so log lines instead
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def set_label(self, label: str) -> None:
        """What runs now (shown beside the bar; not logged)."""
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=True)

    def step(self, label: str = "", count: int = 1) -> None:
        """``count`` steps done; ``label`` says which."""
        self.done += count
        if self._bar is not None:
            if label:
                self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(count)
        elif self.always_log:
            print(f"[{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A line on stderr that does not break the bar."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)
