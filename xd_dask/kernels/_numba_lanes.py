"""Lane sums of the generated CPU kernels: sums over a lane block's SIMD lanes, in LLVM IR.

``_lanesum`` sums one accumulator's lanes; ``_comp_sums`` is the posterior's whole pass over the
components of a row with every field observed, in vector registers: the straight-line lane
program of :func:`.codegen.emit_numba_posterior.component_program` (the same statements the
loop form runs per lane) compiled to vector IR, its terms summed over the blocks and then over
the lanes, eight terms at a time. Both keep the order of the scalar halving tree across the
lanes, so float64 kernels give bit for bit the sums of the loop form that stores accumulators
and sums them with ``_lanesum``; float32 kernels sum part of the way in float32
(:data:`F32_CHUNK`).
"""

from __future__ import annotations

import ast

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from xd_dask.kernels.codegen import emit_numba_posterior

__all__ = ["FM_STRICT"]

# All fast-math flags except reassociation: the polynomial exp/log rely on their evaluation
# order, and the per-pair loop needs no reductions across lanes to vectorise.
FM_STRICT = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}
_FM = tuple(sorted(FM_STRICT))
#: Float32 kernels sum this many lane blocks in float32, and the first level of the lane tree
#: (lanes k and k + B/2) too, before widening to the float64 sums (float64 kernels sum in
#: float64 throughout): widening every block cost ~2.4 ns per pair at K = 64-256 and the
#: first level 1.2-2.0 ns per pair at K = 16 (d = 7, measured), and the float32 sums add ~3
#: roundings of 6e-8 to the terms' own float32 error.
F32_CHUNK = 4
_I32 = ir.IntType(32)


def _shuffle(builder, a, b, idx):
    idx = list(idx)
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(idx)), idx))


def _halve(builder, v, to: int):
    """``v`` (n lanes) -> ``to`` lanes by the halving tree's first levels, h_k = v_k + v_(k+n/2)."""
    h = v.type.count
    while h > to:
        h //= 2
        v = builder.fadd(
            _shuffle(builder, v, v, range(h)), _shuffle(builder, v, v, range(h, 2 * h))
        )
    return v


@intrinsic
def _lanesum(typingctx, arr, base, width):
    """The float64 sum of ``arr[base:base + width]`` (``width`` a literal power of two) by the
    halving tree ``h_k = a_k + a_{k + w/2}``, ..., in vector registers: one vector load, then
    log2(width) shuffles and adds, instead of ``width`` scalar loads and adds (the posterior's
    per-row sums over the lanes of its accumulators). No reassociation: the same order as that
    tree written out in scalar code, so the same result bit for bit."""
    if not isinstance(arr, types.Array) or not isinstance(width, types.IntegerLiteral):
        return None
    n = width.literal_value
    if n < 1 or n & (n - 1):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, value=args[0])
        elt = context.get_data_type(sig.args[0].dtype)
        vty = ir.VectorType(elt, n)
        ptr = builder.gep(ary.data, [args[1]], inbounds=True)
        # The element's alignment, not the vector's: the slice need not start on a vector.
        align = context.get_abi_sizeof(elt)
        v = builder.load(builder.bitcast(ptr, vty.as_pointer()), typ=vty, align=align)
        if elt != ir.DoubleType():
            v = builder.fpext(v, ir.VectorType(ir.DoubleType(), n))
        return builder.extract_element(_halve(builder, v, 1), ir.Constant(_I32, 0))

    return types.float64(arr, base, width), codegen


def _sums8(builder, P):
    """Eight <8 x double> -> one <8 x double> of their halving-tree sums, across the vectors:
    each level pairs lanes k and k + h of every vector (h = 4, 2, 1) for two vectors at once."""
    R = [
        builder.fadd(
            _shuffle(builder, P[2 * m], P[2 * m + 1], [0, 1, 2, 3, 8, 9, 10, 11]),
            _shuffle(builder, P[2 * m], P[2 * m + 1], [4, 5, 6, 7, 12, 13, 14, 15]),
        )
        for m in range(4)
    ]  # R[m] = (P[2m]'s four pair sums, P[2m+1]'s)
    U = [
        builder.fadd(
            _shuffle(builder, R[2 * m], R[2 * m + 1], [0, 1, 4, 5, 8, 9, 12, 13]),
            _shuffle(builder, R[2 * m], R[2 * m + 1], [2, 3, 6, 7, 10, 11, 14, 15]),
        )
        for m in range(2)
    ]
    even, odd = list(range(0, 16, 2)), list(range(1, 16, 2))
    return builder.fadd(_shuffle(builder, U[0], U[1], even), _shuffle(builder, U[0], U[1], odd))


def _lane_value(builder, node, env: dict, load):
    """Vector IR of one expression of a lane program: names, + - *, unary minus and loads
    ``arr[<int> + l]`` / ``arr[l]`` (``load(arr, offset)``); anything else raises."""
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        sl = node.slice
        if isinstance(sl, ast.Name):
            return load(node.value.id, 0)
        if isinstance(sl, ast.BinOp) and isinstance(sl.left, ast.Constant):
            return load(node.value.id, int(sl.left.value))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        a = _lane_value(builder, node.left, env, load)
        b = _lane_value(builder, node.right, env, load)
        return getattr(builder, _OPS[type(node.op)])(a, b, flags=_FM)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return builder.fneg(_lane_value(builder, node.operand, env, load), flags=_FM)
    raise NotImplementedError(f"lane program: {ast.unparse(node)}")


_OPS = {ast.Add: "fadd", ast.Sub: "fsub", ast.Mult: "fmul"}


class _ComponentPass:
    """The IR of :func:`_comp_sums` at one call: the lane program evaluated at a block, and a
    group's sums over the blocks and the lanes."""

    def __init__(self, context, builder, sig, args, dims, stmts):
        d, self.B, self.nS = dims
        self.b, self.stmts = builder, stmts
        self.scr, self.ld = (
            context.make_array(sig.args[k])(context, builder, value=args[k]) for k in (0, 1)
        )
        self.nblk, self.i64 = args[3], args[2].type
        self.elt = context.get_data_type(sig.args[0].dtype)
        self.align = context.get_abi_sizeof(self.elt)
        self.f64 = self.elt == ir.DoubleType()
        self.vty = ir.VectorType(self.elt, self.B)
        self.chunk_blocks = 1 if self.f64 else F32_CHUNK
        self.acc_t = ir.VectorType(ir.DoubleType(), self.B if self.f64 else 8)  # float32: halved
        self.row = {  # the row's shift, as vectors
            f"uref{a}": self.splat(
                builder.load(self.at(self.scr, builder.add(args[2], self.C(a * self.B))))
            )
            for a in range(d)
        }

    def C(self, v: int):
        return ir.Constant(self.i64, v)

    def at(self, arr, off):
        return self.b.gep(arr.data, [off], inbounds=True)

    def splat(self, s):
        v = self.b.insert_element(ir.Constant(self.vty, None), s, ir.Constant(_I32, 0))
        return _shuffle(self.b, v, v, [0] * self.B)

    def terms_at(self, blk, group: list) -> list:
        """The group's terms at block ``blk`` (vectors of the compute dtype)."""
        b = self.b
        base = {"sb": b.mul(blk, self.C(self.nS * self.B)), "lb": b.mul(blk, self.C(self.B))}
        arrays = {"sb": self.scr, "lb": self.ld}

        def load(name, off):
            p = self.at(arrays[name], b.add(base[name], self.C(off)))
            return b.load(b.bitcast(p, self.vty.as_pointer()), typ=self.vty, align=self.align)

        env = dict(self.row)
        for st in self.stmts:  # those the group does not use are removed by LLVM
            env[st.targets[0].id] = _lane_value(b, st.value, env, load)
        return [_lane_value(b, t, env, load) for t in group]

    def _chunk(self, c0, first: bool, group: list, acc: list, part: list) -> None:
        """acc (+)= float64 of the sum over blocks c0, c0 + 1, ... (at most chunk_blocks of
        them) in the compute dtype, first block first."""
        b, C = self.b, self.C
        for p, v in zip(part, self.terms_at(c0, group), strict=True):
            b.store(v, p)  # a chunk's first block assigns: no add of a zero
        left = b.sub(self.nblk, c0)
        n = b.select(b.icmp_signed("<", left, C(self.chunk_blocks)), left, C(self.chunk_blocks))
        with cgutils.for_range(b, b.sub(n, C(1))) as loop:
            blk = b.add(c0, b.add(loop.index, C(1)))
            for p, v in zip(part, self.terms_at(blk, group), strict=True):
                b.store(b.fadd(b.load(p), v, flags=_FM), p)
        for a, p in zip(acc, part, strict=True):
            v = b.load(p)
            if not self.f64:  # the first level of the lane tree in float32, then widen
                v = b.fpext(_halve(b, v, 8), ir.VectorType(ir.DoubleType(), 8))
            b.store(v if first else b.fadd(b.load(a), v, flags=_FM), a)

    def group_sums(self, group: list):
        """<8 x double>: the sums of (up to eight) terms over the blocks, then the lanes."""
        b, C = self.b, self.C
        acc = [cgutils.alloca_once(b, self.acc_t) for _ in group]
        part = [cgutils.alloca_once(b, self.vty) for _ in group]
        self._chunk(C(0), True, group, acc, part)
        chunks = b.udiv(b.add(self.nblk, C(self.chunk_blocks - 1)), C(self.chunk_blocks))
        with cgutils.for_range(b, b.sub(chunks, C(1))) as loop:
            self._chunk(
                b.mul(b.add(loop.index, C(1)), C(self.chunk_blocks)), False, group, acc, part
            )
        P = [_halve(b, b.load(a), 8) for a in acc]
        return _sums8(b, P + [ir.Constant(ir.VectorType(ir.DoubleType(), 8), None)] * (8 - len(P)))


@intrinsic
def _comp_sums(typingctx, scr, ld, uoff, nblk, rb, o0, d_, B_, nS_, RB_):
    """The posterior's pass over the components of one row with all ``d`` fields observed:
    for each term t of :func:`.codegen.emit_numba_posterior.component_program` its sum over
    the ``nblk`` lane blocks (block 0 first; float64, or in float32 kernels float32 within
    chunks of :data:`F32_CHUNK` blocks, each chunk's lanes k and k + B/2 then added in float32
    and widened) and then over the ``B`` lanes (the halving tree, float64), stored at
    ``rb[o0 + t * RB]``. ``scr`` holds the pair pass's scratch blocks (``nS`` rows of ``B``
    lanes each), ``ld`` the responsibilities, ``scr[uoff + a * B]`` the row's shift
    ``uref{a}``. Literals: d, B (a power of two >= 8), nS, RB.

    Nothing is stored per lane: eight terms' accumulators stay in registers through the blocks,
    then one transposing tree sums them. Against the loop form, which stores and reloads
    35 x 16 float64 per row at d = 7 (measured, kernel alone, 20,000 rows, one thread): float64
    -2.3 to -2.9 ns per pair at K = 16-64, the same sums bit for bit; float32 -2.3 to -2.4 at
    K = 64-256 with the chunks and -1.2 to -2.0 at K = 16 with the first lane level in float32.
    (Rows with unobserved fields keep the loop form: this pass, which evaluates the lane program
    once per group of eight terms, was slower there - K = 64, two fields unobserved, float64
    24.4 -> 31.1 ns per pair.)"""
    lits = (d_, B_, nS_, RB_)
    if not all(isinstance(v, types.IntegerLiteral) for v in lits):
        return None
    d, B, nS, RB = (v.literal_value for v in lits)
    if B < 8 or B & (B - 1):
        return None
    stmts, terms = emit_numba_posterior.component_program(d, B)
    stmts = [ast.parse(s).body[0] for s in stmts]
    terms = [ast.parse(t, mode="eval").body for t in terms]

    def codegen(context, builder, sig, args):
        cp = _ComponentPass(context, builder, sig, args, (d, B, nS), stmts)
        rb_a = context.make_array(sig.args[4])(context, builder, value=args[4])
        for g0 in range(0, len(terms), 8):
            group = terms[g0 : g0 + 8]
            F = cp.group_sums(group)
            for j in range(len(group)):
                off = builder.add(args[5], cp.C((g0 + j) * RB))
                builder.store(builder.extract_element(F, ir.Constant(_I32, j)), cp.at(rb_a, off))
        return context.get_dummy_value()

    return types.none(scr, ld, uoff, nblk, rb, o0, *lits), codegen
