"""The ``xd-dask`` group, its one error handler, and options made from the key table.

Every command is registered with :func:`command`, which adds ``-v/--verbose`` (and
``--log-format`` where asked), sets up logging, and maps what the command raises to an exit code
and a message:

====  =========================================================================================
code  meaning
====  =========================================================================================
0     success
2     the command cannot run as given: usage, configuration (bad key or value, missing file),
      schema, model file, catalogue listing (no files, a file listed twice, an id in two files,
      a catalogue changed since the checkpoint ``resume`` continues), the output directory in
      use or holding foreign files, GPU unavailable
1     the work failed: a bad row or unreadable file met while reading (``--on-bad drop`` skips
      and counts bad rows), a fit that diverged, a lost cluster, an I/O error; a rejected
      nightly run
====  =========================================================================================

A failure prints ``Error: <one line>`` on stderr; a library message of several lines (a
diverged fit naming its rows) continues on indented lines below it. Python tracebacks and the
"Compute Failed" blocks of a local cluster's workers are shown only with ``-v``. Warnings (e.g.
non-convergence) are shown once each, one line, when they happen. With ``--log-format json``
every line is JSON: the error is an ``error`` event on stdout (same exit code), warnings and log
records (Dask's too) are JSON records on stderr (:mod:`xd_dask.cli.logs`).
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

import click

from xd_dask import __version__
from xd_dask.cli import logs
from xd_dask.config import key as config_key

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="xd-dask")
def main() -> None:
    """Extreme Deconvolution Gaussian mixtures for partitioned catalogues on Dask.

    \b
    Exit codes: 0 success; 2 usage, configuration or input that cannot be used as given;
    1 the work failed (-v shows tracebacks).
    """


# --------------------------------------------------------------------------- errors
def _usage_errors() -> tuple[type[BaseException], ...]:
    """Errors in what was asked for (exit 2), as opposed to failures while working (exit 1)."""
    from xd_dask.distributed import GPUUnavailableError  # noqa: PLC0415
    from xd_dask.distributed.checkpoint import CheckpointError  # noqa: PLC0415
    from xd_dask.distributed.layout import LayoutError  # noqa: PLC0415
    from xd_dask.distributed.manifest import ManifestError  # noqa: PLC0415
    from xd_dask.io.schema import SchemaError  # noqa: PLC0415
    from xd_dask.jobs.config import ConfigError  # noqa: PLC0415
    from xd_dask.locks import LockError  # noqa: PLC0415
    from xd_dask.model import ModelFileError  # noqa: PLC0415
    from xd_dask.utils import OutputError  # noqa: PLC0415

    return (
        ConfigError,
        SchemaError,
        ModelFileError,
        GPUUnavailableError,
        LockError,
        ManifestError,
        CheckpointError,
        LayoutError,
        OutputError,
        FileExistsError,
    )


_LIBRARY_HINT = "Use on_bad='drop'"
_CLI_HINT = 'Use --on-bad drop (job file: catalog.on_bad = "drop")'
_DROP = 'or --on-bad drop (job file: catalog.on_bad = "drop")'
_ZERO_ERROR = re.compile(r"column '([^']+)': noise covariance is not positive definite \(value 0")


def message(exc: BaseException) -> str:
    """The text of ``exc`` as the CLI shows it: the library's hints in the CLI's words, and a
    zero error column named with its remedy, the schema's ``error_floor``."""
    text = str(exc).replace(_LIBRARY_HINT, _CLI_HINT).strip() or type(exc).__name__
    zero = _ZERO_ERROR.search(text)
    if zero and getattr(exc, "reason", None) in (None, "not_positive_definite"):
        text = text.replace(
            _CLI_HINT,
            f"A zero error: give the feature whose error column is {zero.group(1)!r} an "
            "error_floor in the schema (in the error's unit, e.g. half its last digit: 0.0005 "
            f"for errors given to 0.001; `xd-dask schema init` proposes one), {_DROP}",
            1,
        )
    return text


def error_lines(exc: BaseException, with_type: bool) -> list[str]:
    """The message of ``exc`` as printed: ``Error: <first line>`` then indented lines."""
    text = message(exc)
    return logs.error_lines(f"{type(exc).__name__}: {text}" if with_type else text)


def fail(
    message_or_exc: str | BaseException,
    code: int = EXIT_FAILURE,
    *,
    with_type: bool = False,
    verbose: int = 0,
):
    """Report the error (``Error:`` lines, or the JSON error event) and exit with ``code``."""
    exc = message_or_exc if isinstance(message_or_exc, BaseException) else Exception(message_or_exc)
    logs.emit_error(exc, message(exc), code, with_type, verbose)
    sys.exit(code)


def warn(text: str) -> None:
    """A one-line warning, now (``Warning: ...`` on stderr, or a JSON log record)."""
    logs.warn(text)


class _Command(click.Command):
    """A command whose usage errors (bad option values, missing arguments) are the JSON error
    event when its arguments ask for ``--log-format json``."""

    def make_context(self, info_name, args, parent=None, **extra):  # type: ignore[override]
        wants_json = _asks_json(args)
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            if not wants_json:
                raise
            with logs.json_mode():
                logs.emit_error(exc, exc.format_message(), exc.exit_code, False, 0)
            raise click.exceptions.Exit(exc.exit_code) from None


def _asks_json(args: Iterable[str]) -> bool:
    args = list(args)
    pairs = zip(args, args[1:], strict=False)
    return "--log-format=json" in args or any(a == "--log-format" and b == "json" for a, b in pairs)


def command(
    name: str | None = None,
    *,
    group: click.Group | None = None,
    json_output: bool = False,
    usage: tuple[type[BaseException], ...] = (),
) -> Callable[[Callable[..., Any]], click.Command]:
    """Register ``fn`` as a command of ``group`` (default :data:`main`) with the error handler.

    Adds ``-v/--verbose`` (and ``--log-format text|json`` with ``json_output``). The function
    receives ``verbose`` / ``log_format`` only if its signature names them.
    usage : further exception types that are usage errors (exit 2) for this command (a
        CatalogError, a bad or unreadable input met while working, stays a failure).
    """

    def decorate(fn: Callable[..., Any]) -> click.Command:
        wanted = set(inspect.signature(fn).parameters)

        @functools.wraps(fn)
        def wrapper(*args: Any, verbose: int = 0, log_format: str = "text", **kwargs: Any):
            if "verbose" in wanted:
                kwargs["verbose"] = verbose
            if "log_format" in wanted:
                kwargs["log_format"] = log_format
            return run_handled(lambda: fn(*args, **kwargs), verbose, log_format, usage)

        cmd = wrapper
        if json_output:
            cmd = log_format_option(cmd)
        cmd = click.option(
            "-v", "--verbose", count=True, help="Log progress (-v) or debug (-vv); tracebacks."
        )(cmd)
        return (group or main).command(name, cls=_Command)(cmd)

    return decorate


#: ``--log-format text|json`` (every command that prints events has it).
log_format_option = click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: every output line is a JSON object (events and errors on stdout, log records "
    "and warnings on stderr).",
)


def run_handled(
    body: Callable[[], Any],
    verbose: int,
    log_format: str,
    usage: tuple[type[BaseException], ...] = (),
) -> Any:
    """Run ``body`` under the one error handler (module docstring), with the command's
    logging (:func:`xd_dask.cli.logs.command_logging`)."""
    with logs.command_logging(log_format, verbose):
        try:
            return body()
        except click.exceptions.Exit:
            raise
        except click.ClickException as exc:
            if not logs.is_json():
                raise
            fail(exc, exc.exit_code)
        except Exception as exc:
            _fail_with(exc, usage, verbose)


def _fail_with(exc: Exception, usage: tuple[type[BaseException], ...], verbose: int) -> None:
    """Exit with the code of ``exc`` (module docstring), reporting it."""
    from xd_dask.io.reader import CatalogError  # noqa: PLC0415

    failed = isinstance(exc, CatalogError)
    if isinstance(exc, _usage_errors() + usage) and not failed:
        fail(exc, EXIT_USAGE, verbose=verbose)
    fail(exc, EXIT_FAILURE, with_type=not failed, verbose=verbose)


# --------------------------------------------------------------------------- options from keys
def _param(name: str) -> str:
    return name.replace(".", "__")


def key_option(name: str, *, flag: str | None = None, help: str | None = None) -> Callable:
    """A click option for config key ``name``: its flag, type and help from the key table.

    The value reaches the command as ``<section>__<key>`` (None when not given); ranges and
    choices are checked with the table's check (one message style, naming the key and the flag).
    """
    k = config_key(name)
    decls = (flag or k.flag or "--" + k.leaf.replace("_", "-")).split("/")
    allowed = f"{name}: {k.allowed()}" if k.type in (int, float) else name
    text = help or f"{_cli_help(k.help)} [{allowed}]"
    if k.type is bool:
        flags = "/".join(decls) if len(decls) == 2 else decls[0]
        return click.option(flags, _param(name), default=None, help=text)
    ptype: Any = {int: click.INT, float: click.FLOAT}.get(k.type, click.STRING)
    metavar = "|".join(k.choices) if k.choices else None
    return click.option(*decls, _param(name), type=ptype, default=None, metavar=metavar, help=text)


def _cli_help(text: str) -> str:
    """A key's help as a flag's: a key the job needs is required of the flag only when neither
    the job file nor the environment sets it (click's "(required)" would say otherwise)."""
    if text.endswith(" (required)"):
        return text.removesuffix(" (required)") + "; needed here unless the job file sets it"
    return text


def key_options(*names: str) -> Callable:
    """Options for several keys (in the order given)."""

    def apply(fn: Callable) -> Callable:
        for name in reversed(names):
            fn = key_option(name)(fn)
        return fn

    return apply


#: Key options of a fit (fit, nightly, render-job).
FIT_KEYS = (
    "catalog.path",
    "catalog.schema",
    "catalog.on_bad",
    "catalog.holdout",
    "catalog.holdout_rows",
    "fit.n_components",
    "fit.method",
    "fit.max_iter",
    "fit.tol",
    "fit.epochs",
    "fit.wave_size",
    "fit.waves",
    "fit.waves_per_epoch",
    "fit.learning_rate",
    "fit.seed",
    "fit.init",
    "output.dir",
)
#: Key options of every command that may start or join a cluster.
CLUSTER_KEYS = (
    "cluster.scheduler_address",
    "cluster.scheduler_file",
    "cluster.n_workers",
    "cluster.threads_per_worker",
    "cluster.gpu",
)

set_option = click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="Set any config key, e.g. --set fit.step.kappa=0.7 (repeatable).",
)


def overrides(params: dict[str, Any], extra: Iterable[str] = ()) -> tuple[dict, dict]:
    """({key: value}, {key: source}) from the key options that were given (removed from
    ``params``) and the ``--set`` assignments (later ones win)."""
    from xd_dask.jobs.config import parse_assignment  # noqa: PLC0415

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for param in [p for p in params if "__" in p]:
        value = params.pop(param)
        if value is None:
            continue
        name = param.replace("__", ".")
        values[name] = value
        sources[name] = f"command line {config_key(name).flag or '--' + config_key(name).leaf}"
    for text in list(params.pop("assignments", None) or ()) + list(extra):
        name, value = parse_assignment(text)
        values[name] = value
        sources[name] = "command line --set"
    return values, sources


def load_job(job_file: Any, params: dict[str, Any], fixed: dict[str, Any] | None = None):
    """The job configuration: defaults < job file < environment < flags (< ``fixed``)."""
    from xd_dask.jobs.config import load_config  # noqa: PLC0415

    values, sources = overrides(params)
    for name, value in (fixed or {}).items():
        values[name] = value
        sources[name] = "command line"
    return load_config(job_file, values, override_sources=sources)
