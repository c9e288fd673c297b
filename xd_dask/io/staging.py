"""Compiled column access shared by the row builders: Arrow buffers read in place, in blocks.

:func:`column_buffers` gives the address of a column's value buffer and validity bitmap;
:func:`stage_block` (Numba) copies ``BLOCK_ROWS`` rows of every column into one flat float64
block (row k of the block at ``k * BLOCK_STRIDE``), nulls as NaN, plus one row per listed value
column saying whether it is valid (not null). No per-column NumPy copy of a whole column is made,
whatever the column's dtype (float32/float64; integers and decimals are cast) or null pattern.
"""

from __future__ import annotations

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from xd_dask.codecache import numba_cache_ok

_CACHE = numba_cache_ok(__file__)  # Numba's on-disk cache only where no one else writes

__all__ = ["BLOCK_ROWS", "BLOCK_STRIDE", "batch_buffers", "column_buffers", "stage_block"]


# Column access by address: the staging loop reads Arrow's value buffers and validity bitmaps in
# place, whatever the dtypes or null pattern of a particular file.
@intrinsic
def _load_f64(typingctx, addr, idx):
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.DoubleType().as_pointer())
        return builder.load(builder.gep(ptr, [args[1]]))

    return types.float64(types.int64, types.int64), codegen


@intrinsic
def _load_f32(typingctx, addr, idx):
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.FloatType().as_pointer())
        return builder.load(builder.gep(ptr, [args[1]]))

    return types.float32(types.int64, types.int64), codegen


@intrinsic
def _load_u8(typingctx, addr, idx):
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(8).as_pointer())
        return builder.load(builder.gep(ptr, [args[1]]))

    return types.uint8(types.int64, types.int64), codegen


#: Rows per block of the compiled pass, and the stride (in values) between the rows of the flat
#: block arrays: padded so that the ~35 rows streamed together do not all map to the same L1
#: cache sets (a stride of exactly 4 KiB made the pass ~2x slower). Literals in generated code.
BLOCK_ROWS = 1024
BLOCK_STRIDE = BLOCK_ROWS + 8


@numba.njit(cache=_CACHE, inline="always")
def _valid_rows(va, off, m, out, base):
    """out[base + i] = 1.0 if bit off + i of the validity bitmap at address va is set, else 0.0
    (a byte at a time when the bitmap is byte-aligned, so the inner loop vectorises)."""
    i0 = 0
    if (off & 7) == 0:
        o8 = off >> 3
        nb = m >> 3
        for jb in range(nb):
            bits = _load_u8(va, o8 + jb)
            for q in range(8):
                out[base + jb * 8 + q] = np.float64((bits >> q) & 1)
        i0 = nb << 3
    for i in range(i0, m):
        j = off + i
        out[base + i] = np.float64((_load_u8(va, j >> 3) >> (j & 7)) & 1)


@numba.njit(cache=_CACHE, nogil=True, error_model="numpy")
def stage_block(b0, m, addr, is_f32, vaddr, voff, val_col, cosv, IN):
    """Copy rows b0..b0+m of every column into the flat block ``IN`` (row k at k * BLOCK_STRIDE).

    Rows 0..ncol-1: values as float64 with NaN for nulls; then one row per feature, 1.0 where the
    value is not null; then one row per cosine divisor.
    """
    ncol = addr.shape[0]
    nfeat = val_col.shape[0]
    B = BLOCK_STRIDE
    valid = np.empty(B)
    for k in range(ncol):
        a = addr[k]
        base = k * B
        if is_f32[k]:
            for i in range(m):
                IN[base + i] = np.float64(_load_f32(a, b0 + i))
        else:
            for i in range(m):
                IN[base + i] = _load_f64(a, b0 + i)
        va = vaddr[k]
        if va != 0:
            _valid_rows(va, voff[k] + b0, m, valid, 0)
            for i in range(m):
                IN[base + i] = IN[base + i] if valid[i] > 0.5 else np.nan
    for f in range(nfeat):
        k = val_col[f]
        va = vaddr[k]
        base = (ncol + f) * B
        if va == 0:
            for i in range(m):
                IN[base + i] = 1.0
        else:
            _valid_rows(va, voff[k] + b0, m, IN, base)
    base = (ncol + nfeat) * B
    for s in range(cosv.shape[0]):
        for i in range(m):
            IN[base + s * B + i] = cosv[s, b0 + i]


def column_buffers(arr: pa.Array, name: str) -> tuple[pa.Array, int, bool, int, int]:
    """(array kept alive, value address, is float32, validity address or 0, bit offset)."""
    t = arr.type
    if not (pa.types.is_float64(t) or pa.types.is_float32(t)):
        if not (
            pa.types.is_integer(t)
            or pa.types.is_floating(t)
            or pa.types.is_decimal(t)
            or pa.types.is_null(t)
        ):
            raise TypeError(f"column {name!r} has non-numeric type {t}")
        arr = pc.cast(arr, pa.float64(), safe=False)
        t = arr.type
    is_f32 = pa.types.is_float32(t)
    bufs = arr.buffers()
    if bufs[1] is None or (arr.null_count > 0 and bufs[0] is None):  # all-null (null type)
        arr = pa.array(np.zeros(len(arr)), mask=np.ones(len(arr), bool))
        bufs = arr.buffers()
        is_f32 = False
    itemsize = 4 if is_f32 else 8
    addr = bufs[1].address + arr.offset * itemsize
    if arr.null_count == 0:
        return arr, addr, is_f32, 0, 0
    return arr, addr, is_f32, bufs[0].address, arr.offset


def batch_buffers(
    batch: pa.RecordBatch, names: tuple[str, ...] | list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[pa.Array]]:
    """(addr, is_f32, vaddr, voff, keep): :func:`column_buffers` of every column of ``batch``
    (``names`` label them in errors). ``keep`` holds the arrays whose buffers are addressed (cast
    copies included): keep it referenced until the compiled pass has returned."""
    ncol = len(names)
    addr = np.zeros(ncol, np.int64)
    is_f32 = np.zeros(ncol, np.bool_)
    vaddr = np.zeros(ncol, np.int64)
    voff = np.zeros(ncol, np.int64)
    keep = []
    for k, name in enumerate(names):
        arr, addr[k], is_f32[k], vaddr[k], voff[k] = column_buffers(batch.column(k), name)
        keep.append(arr)
    return addr, is_f32, vaddr, voff, keep
