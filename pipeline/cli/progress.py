"""The progress bar of a long command: one tqdm bar on stderr, fed by the API's callbacks."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Bar:
    """`on_total`, `progress` and `on_status`, as the API calls them: the bar opens when
    the total is known (disable=None: a bar on a terminal, silence when piped or in CI)."""

    desc: str
    bars: list[Any] = field(default_factory=list)

    def on_total(self, n: int) -> None:
        from tqdm import tqdm

        self.bars.append(tqdm(total=n, unit="img", disable=None, file=sys.stderr, desc=self.desc))

    def progress(self, n: int) -> None:
        self.bars[0].update(n)

    def on_status(self, text: str) -> None:
        if self.bars:
            self.bars[0].set_postfix_str(text)


@contextmanager
def progress_bar(desc: str) -> Iterator[Bar]:
    """A `Bar` whose tqdm bars are closed however the command ends."""
    bar = Bar(desc)
    try:
        yield bar
    finally:
        for b in bar.bars:
            b.close()
