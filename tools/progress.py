"""Progress of slow engine work, as one line of text the front end may show (or not).

The engine says what it is doing (`with status("simulating 2 blocks of Llama-3.1-70B"): ...`,
`note("trial step 2/3, 1,234 tokens/s")`); the front end decides how to show it by installing a
reporter (`use(reporter)`): the CLI draws a rich status line on stderr when stderr is a terminal
and the output is not --json. Without a reporter every call is a no-op, so library use, tests, the
agent and the Slack bot see nothing. This module imports nothing heavy (no rich, no torch).

A reporter is any callable taking the current line (str) or None when there is nothing to show.
Nested `status` blocks restore the outer line on exit. Thread-safe enough for one writer: the
reporter is a module global, the stack of lines is per thread.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

Reporter = Callable[[Optional[str]], None]

_reporter: Optional[Reporter] = None
_local = threading.local()


def _stack() -> list[str]:
    s = getattr(_local, "stack", None)
    if s is None:
        s = _local.stack = []
    return s


def _show(line: Optional[str]) -> None:
    r = _reporter
    if r is None:
        return
    try:
        r(line)
    except Exception:  # noqa: BLE001 - a broken progress line must never break the work it describes
        pass


def active() -> bool:
    """True when a front end shows progress (work may skip building expensive messages otherwise)."""
    return _reporter is not None


@contextmanager
def use(reporter: Optional[Reporter]) -> Iterator[None]:
    """Install `reporter` for the duration of the block (None: show nothing)."""
    global _reporter
    previous = _reporter
    _reporter = reporter
    try:
        yield
    finally:
        _show(None)
        _reporter = previous


@contextmanager
def status(line: str) -> Iterator[None]:
    """Show `line` while the block runs; the enclosing line comes back afterwards."""
    stack = _stack()
    stack.append(line)
    _show(line)
    try:
        yield
    finally:
        stack.pop()
        _show(stack[-1] if stack else None)


def note(line: str) -> None:
    """Replace the current line (e.g. a step counter) until the enclosing `status` ends."""
    stack = _stack()
    if stack:
        stack[-1] = line
    _show(line)

