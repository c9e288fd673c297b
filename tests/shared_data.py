"""Where the project's shared real-data samples are: ``../shared/data/gaia`` beside the checkout
(how CI lays it out), else ``/work/shared/data/gaia`` (the development machines)."""

from __future__ import annotations

from pathlib import Path

_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "gaia",
    Path("/work/shared/data/gaia"),
)

#: Directory of the real Gaia DR3/EDR3 extracts (see its PROVENANCE.md).
GAIA_DIR = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])
