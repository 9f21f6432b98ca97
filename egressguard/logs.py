"""Logging configuration (structlog), in one place: JSON lines on stderr, console output on a terminal.

structlog is imported and configured when the first event is emitted, not at start: importing it
costs ~20-30 ms (it imports asyncio, and ssl with it), which commands that log nothing (`plan`,
`schema`, `explain`, `--help`) and debug events that are filtered out need not pay.
"""

from __future__ import annotations

import sys
from typing import Any

# How `configure` asked for events to be shown; None: configure was not called (structlog's defaults).
_wanted: tuple[bool, bool] | None = None
_done = False


def configure(verbose: bool = False, json_output: bool | None = None) -> None:
    global _wanted, _done
    _wanted = (verbose, (not sys.stderr.isatty()) if json_output is None else json_output)
    _done = False


def _structlog() -> Any:
    """structlog, configured as asked (imported on the first event)."""
    global _done
    import logging  # noqa: PLC0415

    import structlog  # noqa: PLC0415

    if _wanted is not None and not _done:
        verbose, json_output = _wanted
        renderer: structlog.typing.Processor = (
            structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False)
        )
        structlog.configure(
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                renderer,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.INFO),
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
            cache_logger_on_first_use=False,
        )
        _done = True
    return structlog


def load() -> None:
    """Import and configure structlog now: before a process drops privileges, so that its first
    event does not depend on what the new user may read (e.g. a Python under /root)."""
    _structlog()


class Logger:
    """A structlog logger for `name`, made when it first emits an event."""

    def __init__(self, name: str) -> None:
        self.name = name

    def debug(self, event: str, **facts: Any) -> None:
        if _wanted is None or _wanted[0]:  # filtered out unless verbose: no import for nothing
            _structlog().get_logger(self.name).debug(event, **facts)

    def info(self, event: str, **facts: Any) -> None:
        _structlog().get_logger(self.name).info(event, **facts)

    def warning(self, event: str, **facts: Any) -> None:
        _structlog().get_logger(self.name).warning(event, **facts)

    def error(self, event: str, **facts: Any) -> None:
        _structlog().get_logger(self.name).error(event, **facts)


def get_logger(name: str = "egressguard") -> Logger:
    return Logger(name)
