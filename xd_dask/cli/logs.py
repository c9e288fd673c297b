"""Where a command's messages go: log records, warnings and errors, as text or as JSON lines.

Text (``--log-format text``, the default): log records on stderr as ``LEVEL message``; warnings
(Python's, e.g. a ConvergenceWarning, and the CLI's own) as one line ``Warning: ...`` each, once,
when they happen; an error as ``Error: <first line>`` with further lines indented. Dask's own
loggers keep their handlers.

JSON (``--log-format json``): every line the command writes is a JSON object. Events (start,
progress, summary, ...) and an error (``{"event": "error", "exit_code": ..., "type": ...,
"message": ..., "details": [...]}``; with ``-v`` a ``traceback``) go to stdout; log records and
warnings go to stderr as ``{"event": "log", "level": ..., "logger": ..., "message": ...}``
(warnings with their ``category``), Dask's, Bokeh's and Tornado's records included: their
handlers are replaced for the command and restored afterwards. (A local cluster's worker
processes print nothing in JSON mode: :func:`xd_dask.cli.progress.connected` starts them quiet;
their failures reach the error event.)

:func:`command_logging` sets this up for one command and restores the process's logging after
it, so a command can run inside a test.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
import sys
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import click

__all__ = ["command_logging", "emit_error", "is_json", "json_mode", "warn"]

#: The current command's log format ("text" or "json").
_FORMAT: contextvars.ContextVar[str] = contextvars.ContextVar("xd_dask_cli_format", default="text")
#: Libraries that print their own log records on stderr (routed to JSON in JSON mode).
ROUTED = ("distributed", "bokeh", "tornado")
#: Warning categories never shown (Python's defaults hide them too).
_HIDDEN = (ResourceWarning, DeprecationWarning, PendingDeprecationWarning)
#: The logger the CLI's warnings go through.
WARNINGS_LOGGER = "xd_dask.warnings"


def is_json() -> bool:
    """True while a command runs with ``--log-format json``."""
    return _FORMAT.get() == "json"


def _now(created: float) -> str:
    return _dt.datetime.fromtimestamp(created, _dt.timezone.utc).isoformat()


class JsonFormatter(logging.Formatter):
    """One JSON object per record (``event: "log"``)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "event": "log",
            "time": _now(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        category = getattr(record, "category", None)
        if category:
            out["category"] = category
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out)


class TextFormatter(logging.Formatter):
    """``LEVEL message``; a warning of the CLI's as ``Warning: message``."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == WARNINGS_LOGGER:
            return f"Warning: {record.getMessage()}"
        return super().format(record)


class _StderrHandler(logging.StreamHandler):
    """A handler writing to the CURRENT ``sys.stderr`` (a test's runner may replace it)."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it
        pass


def _formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter("%(levelname)s %(message)s")


def warn(text: str, category: str | None = None) -> None:
    """A one-line warning, now, through the CLI's warnings logger."""
    extra = {"category": category} if category else {}
    logging.getLogger(WARNINGS_LOGGER).warning(" ".join(str(text).split()), extra=extra)


def _show_warning(seen: set[str]):
    """A ``warnings.showwarning`` that logs each distinct warning once."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
        if issubclass(category, _HIDDEN):
            return
        text = f"{category.__name__}: {message}"
        if text in seen:
            return
        seen.add(text)
        warn(text, category.__name__)

    return show


@contextlib.contextmanager
def _swapped(
    name: str | None,
    handlers: list[logging.Handler],
    level: int | None = None,
    propagate: bool | None = None,
) -> Iterator[None]:
    """Logger ``name`` with ``handlers`` (and level, propagation) for the block, then as it
    was."""
    logger = logging.getLogger(name)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    logger.handlers[:] = handlers
    if level is not None:
        logger.setLevel(level)
    if propagate is not None:
        logger.propagate = propagate
    try:
        yield
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


@contextlib.contextmanager
def command_logging(log_format: str, verbose: int) -> Iterator[None]:
    """The command's logging (module docstring), restored on leaving."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    token = _FORMAT.set(log_format)
    with contextlib.ExitStack() as stack:
        stack.callback(_FORMAT.reset, token)
        ours = _StderrHandler(_formatter(log_format))
        stack.enter_context(_swapped("xd_dask", [ours], level=level, propagate=False))
        if log_format == "json":
            # separate handlers: a local cluster changes the level of the library's handlers
            for name in ROUTED:
                stack.enter_context(_swapped(name, [_StderrHandler(JsonFormatter())]))
            stack.enter_context(
                _swapped(None, [_StderrHandler(JsonFormatter())], level=logging.WARNING)
            )
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("always")
        warnings.showwarning = _show_warning(set())
        yield


def error_lines(message: str) -> list[str]:
    """``message`` as printed: ``Error: <first line>`` then its other lines indented."""
    lines = [ln.rstrip() for ln in message.splitlines() if ln.strip()]
    head = " ".join(lines[0].split())
    return [f"Error: {head}"] + [f"  {ln}" for ln in lines[1:]]


@contextlib.contextmanager
def json_mode() -> Iterator[None]:
    """JSON mode for the block (a usage error found while parsing, before a command runs)."""
    token = _FORMAT.set("json")
    try:
        yield
    finally:
        _FORMAT.reset(token)


def emit_error(exc: BaseException, text: str, code: int, with_type: bool, verbose: int) -> None:
    """Report a failed command: the ``Error:`` lines on stderr, or the error event on stdout."""
    if not is_json():
        if verbose and exc.__traceback__ is not None:
            traceback.print_exception(exc, file=sys.stderr)
        head = f"{type(exc).__name__}: {text}" if with_type else text
        for line in error_lines(head):
            click.echo(line, err=True)
        return
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    event: dict[str, Any] = {
        "event": "error",
        "time": _now(_dt.datetime.now().timestamp()),
        "exit_code": int(code),
        "type": type(exc).__name__,
        "message": " ".join(lines[0].split()) if lines else type(exc).__name__,
        "details": lines[1:],
    }
    if verbose and exc.__traceback__ is not None:
        event["traceback"] = "".join(traceback.format_exception(exc))
    click.echo(json.dumps(event))
