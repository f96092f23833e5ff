"""Terminal niceties that switch themselves off when output is not a terminal.

Colour and redrawn progress bars help a person watching; in a pipe, a log file or a test
they are noise (escape codes, carriage returns). So both apply only when the stream is a
TTY, and colour also respects ``NO_COLOR`` (https://no-color.org) and ``TERM=dumb``.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34",
         "magenta": "35", "cyan": "36"}  # fmt: skip
BAR_WIDTH = 24  # cells of a progress bar


def columns(fallback: int = 100) -> int:
    """The terminal's width, as shutil.get_terminal_size finds it (without importing
    shutil, whose imports cost a one-shot command a few milliseconds)."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    stream = sys.__stdout__
    try:
        return os.get_terminal_size(stream.fileno()).columns or fallback if stream else fallback
    except (ValueError, OSError):
        return fallback


def is_tty(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def colour_enabled(stream: TextIO | None = None) -> bool:
    """Colour only on a terminal, never with ``NO_COLOR`` set (to anything) or ``TERM=dumb``."""
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    return is_tty(stream)


class Style:
    """``style("text", "green", "bold")``: ANSI colours when enabled, plain text otherwise."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.enabled = colour_enabled(stream) if enabled is None else enabled

    def __call__(self, text: str, *names: str) -> str:
        if not self.enabled or not names:
            return text
        codes = ";".join(CODES[n] for n in names)
        return f"\033[{codes}m{text}\033[0m"


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """``[#########...............]  37%`` for a fraction in [0, 1]."""
    fraction = min(1.0, max(0.0, fraction))
    full = round(fraction * width)
    return f"[{'#' * full}{'.' * (width - full)}] {100 * fraction:3.0f}%"


class ProgressLine:
    """One status line: redrawn in place on a terminal, else printed once per change."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = is_tty(self.stream) if tty is None else tty
        self._last = ""
        self._drawn = False

    def update(self, text: str) -> None:
        if text == self._last:
            return
        self._last = text
        if self.tty:
            cols = columns() - 1
            self.stream.write("\r" + text[:cols].ljust(cols))
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def interrupt(self) -> None:
        """Erase the redrawn line (other output goes there); the next update redraws it."""
        if self.tty and self._drawn:
            cols = columns() - 1
            self.stream.write("\r" + " " * cols + "\r")
            self.stream.flush()
            self._drawn = False
            self._last = ""

    def clear(self) -> None:
        """End the redrawn line so that other output starts on a fresh one."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
            self._last = ""
