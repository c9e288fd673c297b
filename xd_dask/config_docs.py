"""The files generated from the configuration table (:mod:`xd_dask.config`): the packaged
``xd_dask/defaults/job.toml`` (:func:`defaults_toml`) and the README's table of a section's keys
(:func:`markdown_table`); :func:`write_generated` rewrites them
(``python -m xd_dask.config --write README.md``).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import tomli_w

from xd_dask.config import SECTIONS, Key, job_keys

__all__ = ["defaults_toml", "markdown_table", "write_generated"]


# --------------------------------------------------------------------------- job.toml
_HEADER = """\
# xd-dask job configuration: the packaged defaults (every key that a job file may set).
# GENERATED from the key table in xd_dask/config.py (`python -m xd_dask.config`): edit the table.
#
# Precedence, highest first:
#   1. command-line flags (`-k 64`, or `--set fit.n_components=64` for any key)
#   2. environment variables XD_DASK_<SECTION>__<KEY> (double underscore between levels), e.g.
#      XD_DASK_FIT__N_COMPONENTS=64, XD_DASK_FIT__STEP__KAPPA=0.7, XD_DASK_CLUSTER__GPU=true;
#      values are read as TOML values ("true", "3", "[\\"a\\", \\"b\\"]"), else as plain strings
#   3. the job file given on the command line (TOML, same layout as this file)
#   4. this file
# Unknown keys and bad values are errors that name the key and where it was set. Relative paths
# are relative to the current working directory. An empty string (or 0 where the comment says
# so) means "not set". [brackets]: the allowed values; (flag): the command-line flag.
"""
_COLUMN = 29
_WIDTH = 100
_NBSP = "\u00a0"


def _toml_value(v: Any) -> str:
    return tomli_w.dumps({"v": v})[4:].strip()


def _key_lines(k: Key) -> list[str]:
    bits = [k.help]
    if k.type in (int, float) or k.choices:
        bits.append(f"[{k.allowed()}]".replace(" ", _NBSP))  # never broken across lines
    if k.flag:
        bits.append(f"({k.flag})")
    if k.doc:
        bits.append("- " + " ".join(k.doc.split()))
    left = f"{k.leaf} = {_toml_value(k.default)}"
    if len(left) >= _COLUMN - 1:
        lines, width = [left], _WIDTH - _COLUMN - 2
        body = textwrap.wrap(" ".join(bits), width)
    else:
        first = textwrap.wrap(" ".join(bits), _WIDTH - _COLUMN - 2)
        lines = [f"{left.ljust(_COLUMN)}# {first[0]}"]
        body = first[1:]
    lines += [" " * _COLUMN + f"# {line}" for line in body]
    return [line.replace(_NBSP, " ") for line in lines]


def defaults_toml() -> str:
    """The text of ``xd_dask/defaults/job.toml``: every job key, its default and its help."""
    out = [_HEADER.rstrip("\n")]
    current = None
    for k in job_keys():
        if k.section != current:
            current = k.section
            head = f"[{current}]"
            note = SECTIONS.get(current, "")
            out += ["", f"{head.ljust(_COLUMN)}# {note}" if note else head]
        out += _key_lines(k)
    return "\n".join(out) + "\n"


def markdown_table(section: str) -> str:
    """The keys of ``section`` as a Markdown table (key, default, allowed values, flag, meaning),
    as the README shows them."""
    rows = ["| key | default | allowed | flag | meaning |", "|---|---|---|---|---|"]
    for k in job_keys():
        if k.section != section:
            continue
        allowed = k.allowed() if k.type in (int, float) or k.choices else ""
        flag = f"`{k.flag}`" if k.flag else ""
        text = k.help + (f"; {' '.join(k.doc.split())}" if k.doc else "")
        rows.append(f"| `{k.leaf}` | `{_toml_value(k.default)}` | {allowed} | {flag} | {text} |")
    return "\n".join(rows) + "\n"


def write_generated(readme: str | None = None) -> list[str]:
    """Rewrite the files generated from the table: ``xd_dask/defaults/job.toml`` and, when
    ``readme`` (README.md of a source checkout) is given, its table of [fit] keys."""
    job = Path(__file__).parent / "defaults" / "job.toml"
    job.write_text(defaults_toml(), encoding="utf-8")
    written = [str(job)]
    if readme:
        lines = Path(readme).read_text(encoding="utf-8").splitlines(keepends=True)
        head = markdown_table("fit").splitlines(keepends=True)[0]
        start = lines.index(head)
        end = start
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        lines[start:end] = markdown_table("fit").splitlines(keepends=True)
        Path(readme).write_text("".join(lines), encoding="utf-8")
        written.append(str(readme))
    return written
