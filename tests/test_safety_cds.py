"""The compiled CDS parser against astropy on hostile files (issue 19, point 7).

Each case is a real ReadMe and data file. Where astropy reads the file, the compiled path (read in
chunks of 2 lines, so the hostile line is not in the first chunk) must give astropy's table value
for value; where astropy refuses it, the compiled path must refuse it too (CatalogError). Three
cases are refused although astropy reads them, because astropy's values are wrong there: a byte
range that runs backwards (astropy: an all-null column), a range narrower than its format, and a
line cut inside a numeric field (astropy: `` 0.`` of `` 0.10`` read as 0.0); a line with more
than the ReadMe describes is refused as well. On main, NUL bytes were read as blanks (null) where
astropy refuses the file, and the three cases passed silently.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from astropy.io import ascii

from xd_dask.io import CatalogError
from xd_dask.io.tables import astropy_to_arrow, open_table

README = """\
J/X/2    Hostile inputs    (Nobody, 2026)
================================================================================
Byte-by-byte Description of file: h.dat
--------------------------------------------------------------------------------
   Bytes Format Units   Label     Explanations
--------------------------------------------------------------------------------
   1-  4  I4    ---     Seq       Sequence number
   6- 10  F5.2  mag     Vmag      ? V magnitude
  12- 17  F6.3  mas     Plx       ? Parallax
  19- 26  E8.2  Jy      Flux      ? Flux
  28- 33  A6    ---     Name      Name
--------------------------------------------------------------------------------
"""
GOOD = [
    b"   1  1.23  0.100 1.50E-03 Vega  ",
    b"   2 10.00 12.345 2.25E+10 Deneb ",
    b"   3 -0.50        7.00E+00 Sirius",
    b"   4  3.33  0.010          Rigel ",
]


def _lines(**changed: bytes) -> list[bytes]:
    """GOOD with line ``l<k>`` (1-based) replaced."""
    out = list(GOOD)
    for key, line in changed.items():
        out[int(key[1:]) - 1] = line
    return out


# name: (data lines, ReadMe text, None (as astropy) or the message of a stricter refusal)
CASES = {
    "plain": (GOOD, README, None),
    "crlf_line_ends": ([ln + b"\r" for ln in GOOD], README, None),
    "nul_inside_number": (_lines(l3=b"   3 -0\x0050        7.00E+00 Sirius"), README, None),
    "nul_field": (_lines(l4=b"   4 \x00\x00\x00\x00\x00  0.010          Rigel "), README, None),
    "tab_in_number": (_lines(l3=b"   3\t-0.50        7.00E+00 Sirius"), README, None),
    "control_in_string": (_lines(l4=b"   4  3.33  0.010          Ri\x01el "), README, None),
    "del_in_number": (_lines(l3=b"   3 -0.5\x7f        7.00E+00 Sirius"), README, None),
    "latin1_in_string": (_lines(l4=b"   4  3.33  0.010          Rig\xe9l "), README, None),
    "utf8_in_string": (_lines(l4="   4  3.33  0.010          Rigél ".encode()), README, None),
    "letters_in_number": (_lines(l3=b"   3 -0.5x        7.00E+00 Sirius"), README, None),
    "exponent_beyond_22": (_lines(l3=b"   3 -0.50        7.00E+30 Sirius"), README, None),
    "trailing_string_stripped": (_lines(l4=b"   4  3.33  0.010          Ri"), README, None),
    "reversed_range": (GOOD, README.replace("  12- 17  F6.3", "  17- 12  F6.3"), "run forwards"),
    "range_narrower_than_format": (
        GOOD,
        README.replace("  12- 17  F6.3", "  13- 17  F6.3"),
        "are 5 wide but the format F6.3 is 6",
    ),
    "line_cut_inside_number": (_lines(l4=b"   4  3.33  0."), README, "ends at byte 14, inside"),
    "line_longer_than_readme": (_lines(l3=GOOD[2] + b" extra"), README, "beyond the 33"),
}


def _astropy(dat: Path, readme: Path) -> pa.Table | Exception:
    try:
        return astropy_to_arrow(ascii.read(dat, format="cds", readme=readme, guess=False))
    except Exception as exc:  # what astropy does with the file is the reference
        return exc


def _compiled(dat: Path, readme: Path) -> pa.Table:
    source = open_table(dat, readme=readme)
    return pa.concat_tables(source.batches(chunk_rows=2))


@pytest.mark.parametrize("case", sorted(CASES))
def test_cds_parser_equals_astropy_or_refuses(tmp_path, case):
    lines, readme_text, stricter = CASES[case]
    readme, dat = tmp_path / "ReadMe", tmp_path / "h.dat"
    readme.write_text(readme_text)
    dat.write_bytes(b"".join(ln + b"\n" for ln in lines))
    ref = _astropy(dat, readme)
    if stricter is not None:
        with pytest.raises(CatalogError, match=stricter) as err:
            _compiled(dat, readme)
        assert str(dat.name) in str(err.value) or "ReadMe" in str(err.value)
        assert isinstance(ref, pa.Table)  # astropy reads it: its values are the hazard
        return
    if isinstance(ref, Exception):
        with pytest.raises(CatalogError, match="h.dat") as err:
            _compiled(dat, readme)
        if any(b < 32 or b > 126 for b in b"".join(ln.rstrip(b"\r") for ln in lines)):
            assert "not printable" in str(err.value) and "line" in str(err.value)
        return
    got = _compiled(dat, readme)
    assert got.equals(ref), f"\n{got.to_pydict()}\n{ref.to_pydict()}"


def test_line_numbers_count_blank_lines_and_chunks(tmp_path):
    (tmp_path / "ReadMe").write_text(README)
    dat = tmp_path / "h.dat"
    dat.write_bytes(b"\n".join([*GOOD, b"", b"", b"   5  1.00  0."]) + b"\n")
    with pytest.raises(CatalogError, match=r"h.dat: line 7 ends at byte 14") as err:
        _compiled(dat, tmp_path / "ReadMe")
    assert err.value.row == 7 and err.value.column == "Plx"
