"""Progress reporting that the library can call and the CLI can render.

The library only calls ``Progress.advance``; whether that draws a rich bar (interactive
terminal) or nothing (pipes, CI, ``--json``) is the caller's choice.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, total: int, description: str) -> None: ...
    def advance(self, done: int) -> None: ...
    def finish(self) -> None: ...


class NoProgress:
    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, done: int) -> None:
        pass

    def finish(self) -> None:
        pass
