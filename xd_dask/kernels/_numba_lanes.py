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
        scr_a, ld_a, rb_a = (
            context.make_array(sig.args[k])(context, builder, value=args[k]) for k in (0, 1, 4)
        )
        uoff, nblk, o0 = args[2], args[3], args[5]
        i64 = uoff.type
        elt = context.get_data_type(sig.args[0].dtype)
        dbl = ir.DoubleType()
        vty = ir.VectorType(elt, B)
        chunk_blocks = 1 if elt == dbl else F32_CHUNK
        acc_t = ir.VectorType(dbl, B if elt == dbl else 8)  # float32: lanes halved first

        def C(v):
            return ir.Constant(i64, v)

        def at(arr, off):
            return builder.gep(arr.data, [off], inbounds=True)

        def splat(s):
            v = builder.insert_element(ir.Constant(vty, None), s, ir.Constant(_I32, 0))
            return _shuffle(builder, v, v, [0] * B)

        uref = {
            f"uref{a}": splat(builder.load(at(scr_a, builder.add(uoff, C(a * B)))))
            for a in range(d)
        }

        def block_terms(blk, group):
            """The group's terms at one block (vectors of the compute dtype)."""
            base = {
                "sb": builder.mul(blk, C(nS * B)),
                "lb": builder.mul(blk, C(B)),
            }
            arrays = {"sb": scr_a, "lb": ld_a}

            def load(name, off):
                p = at(arrays[name], builder.add(base[name], C(off)))
                return builder.load(
                    builder.bitcast(p, vty.as_pointer()), typ=vty, align=context.get_abi_sizeof(elt)
                )

            env = dict(uref)
            for st in stmts:  # dead ones (unused by the group) are removed by LLVM
                env[st.targets[0].id] = _lane_value(builder, st.value, env, load)
            return [_lane_value(builder, terms[t], env, load) for t in group]

        def chunk(c0, first, group, acc, part):
            """acc (+)= float64 of the sum over blocks c0, c0 + 1, ... (at most chunk_blocks of
            them) in the compute dtype, first block first."""
            for p, v in zip(part, block_terms(c0, group), strict=True):
                builder.store(v, p)  # a chunk's first block assigns: no add of a zero
            left = builder.sub(nblk, c0)
            n = builder.select(
                builder.icmp_signed("<", left, C(chunk_blocks)), left, C(chunk_blocks)
            )
            with cgutils.for_range(builder, builder.sub(n, C(1))) as loop:
                blk = builder.add(c0, builder.add(loop.index, C(1)))
                for p, v in zip(part, block_terms(blk, group), strict=True):
                    builder.store(builder.fadd(builder.load(p), v, flags=_FM), p)
            for a, p in zip(acc, part, strict=True):
                v = builder.load(p)
                if elt != dbl:  # the first level of the lane tree in float32, then widen
                    v = builder.fpext(_halve(builder, v, 8), ir.VectorType(dbl, 8))
                builder.store(v if first else builder.fadd(builder.load(a), v, flags=_FM), a)

        chunks = builder.udiv(builder.add(nblk, C(chunk_blocks - 1)), C(chunk_blocks))
        for g0 in range(0, len(terms), 8):
            group = range(g0, min(g0 + 8, len(terms)))
            acc = [cgutils.alloca_once(builder, acc_t) for _ in group]
            part = [cgutils.alloca_once(builder, vty) for _ in group]
            chunk(C(0), True, group, acc, part)
            with cgutils.for_range(builder, builder.sub(chunks, C(1))) as loop:
                c0 = builder.mul(builder.add(loop.index, C(1)), C(chunk_blocks))
                chunk(c0, False, group, acc, part)
            P = [_halve(builder, builder.load(a), 8) for a in acc]
            P += [ir.Constant(ir.VectorType(dbl, 8), None)] * (8 - len(P))
            F = _sums8(builder, P)
            for j, t in enumerate(group):
                off = builder.add(o0, C(t * RB))
                builder.store(builder.extract_element(F, ir.Constant(_I32, j)), at(rb_a, off))
        return context.get_dummy_value()

    return types.none(scr, ld, uoff, nblk, rb, o0, *lits), codegen
