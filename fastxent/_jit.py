"""The one place that owns every Numba option: fastmath flags, caching, threading, intrinsics.

Why these flags
---------------
``FASTMATH`` lets LLVM reassociate the row sums (so they vectorise into 16 float32 / 8
float64 partial sums) and fuse multiply-adds, but deliberately leaves out ``nnan`` and
``ninf``: masked classes with ``-inf`` logits and NaN rows are normal input and must keep
IEEE semantics (``exp(-inf) = 0``, NaN in -> NaN out).

The vectorisable exponential (``fast_exp``) is compiled *without* ``reassoc``: its range
reduction rounds with the ``(v + 1.5 * 2**p) - 1.5 * 2**p`` trick, which reassociation
would fold away. Numba compiles each ``@njit`` function with its own flags and LLVM keeps
flags per instruction when it inlines, so the kernels call it as an ordinary (not
``inline="always"``) function.

Compilation is lazy and cached (``cache=True``): a call compiles only the signature it
needs, once per machine; later processes load it from the cache (``__pycache__`` next to
the package, or numba's per-user cache dir when that is read-only). ``precompile()``
compiles every supported signature ahead of time. Only the kernels and block functions that
Python calls are cached and get machine code; the helpers they call without inlining are
link-only (``LINK_ONLY``): numba lowers and optimises them and links them into each caller,
nothing more (a third less work, and the compiling process runs the same code as every
process that loads it).
"""

from __future__ import annotations

import math
import os
import sys
from types import SimpleNamespace
from typing import Any

import numba
import numba.core.codegen
import numba.core.compiler
import numba.np.arrayobj
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

#: fastmath flags for every kernel: everything LLVM's "fast" has except nnan and ninf.
FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})
#: flags for the exponential: contraction into FMA only, no reassociation (see above).
EXP_FASTMATH = frozenset({"contract"})
#: IEEE division everywhere: numba's default ("python") checks every float division for a
#: zero divisor to raise ZeroDivisionError, and that branch keeps LLVM from vectorising any
#: loop that divides (the per-lane log and the gradient coefficients of the small-C layout)
ERROR_MODEL = "numpy"


def kernel(func=None, *, parallel: bool = True):
    """Decorator for a hot row kernel: parallel, cached, GIL-free, shared fastmath flags."""

    def wrap(f):
        return numba.njit(parallel=parallel, cache=True, nogil=True, fastmath=set(FASTMATH), error_model=ERROR_MODEL)(f)

    return wrap(func) if func is not None else wrap


def helper(func):
    """Decorator for a per-row helper: inlined into the kernel by numba (so it takes the
    kernel's flags), which saves a call per row, the bulk of the time when C is small."""
    return numba.njit(cache=True, nogil=True, inline="always", fastmath=set(FASTMATH), error_model=ERROR_MODEL)(func)


class _LinkOnlyLibrary(numba.core.codegen.JITCodeLibrary):
    """A helper's code library that is linked into its callers and never run by itself:
    finalizing it links its own callees and optimises it as numba always does, but does not
    add it to the JIT engine, so no machine code is made for it (its callers' copies are
    the code that runs)."""

    def _finalize_final_module(self):
        self._finalize_dynamic_globals()
        self._verify_declare_only_symbols()
        self._finalized = True


class _LinkOnlyCompiler(numba.core.compiler.Compiler):
    """numba's pipeline for a helper that is only ever called from other numba code (see
    ``LINK_ONLY``): the lowered function goes into a _LinkOnlyLibrary, and instead of
    a callable entry point (which would make machine code) the dispatcher gets a stub that
    stands for the function when callers link it (``insert_user_function``): a builtin
    method (numba's dispatcher takes no other type) of an object of its own, so one key per
    overload. ``object.__format__`` takes one str, and numba calls an entry point with the
    tuple of the arguments, so a call from Python raises a TypeError."""

    def compile_extra(self, func):
        library = self.state.targetctx.codegen().create_library(func.__qualname__)
        library.__class__ = _LinkOnlyLibrary
        self.state.library = library
        self.state.flags.no_compile = True  # NativeLowering: no get_executable
        compiled = super().compile_extra(func)
        stub = object().__format__
        self.state.targetctx.insert_user_function(stub, compiled.fndesc, [library])
        return compiled._replace(entry_point=stub)


#: njit options of a helper that only other numba code calls: its code is linked into theirs
#: and never run by itself (no machine code of its own, nothing cached: its callers are)
LINK_ONLY = {"pipeline_class": _LinkOnlyCompiler, "no_cpython_wrapper": True, "no_cfunc_wrapper": True}


def overload_options(fastmath: frozenset[str]) -> dict[str, Any]:
    """``jit_options`` of an ``@overload`` implementation (a link-only helper)."""
    return {"fastmath": set(fastmath), "error_model": ERROR_MODEL, **LINK_ONLY}


def outlined_helper(func):
    """Decorator for a large per-row helper that numba must not inline (LLVM still may):
    the kernels' flags, compiled once per process instead of into every kernel, link-only.

    Without numba's reference counting (``_nrt=False``): these take the block's arrays from
    their caller, which holds them, and allocate nothing (numba refuses to compile one that
    does). With it, each view of a row (``x[i]``, ``grad[i]``, ``e[:w]``) is an
    ``NRT_incref`` / ``NRT_decref`` call, several a row that LLVM cannot prune across the
    row code's branches, and each call makes LLVM spill and reload the vector registers
    (all caller-saved): float32 65536 x 128, one thread, 11.4 -> 9.0 ms (docs/DESIGN.md)."""
    return numba.njit(**OUTLINED_OPTIONS)(func)


#: njit options of an outlined helper (``outlined_helper``); also the ``jit_options`` of an
#: ``@overload`` whose implementation is such a helper's body
OUTLINED_OPTIONS: dict[str, Any] = {
    "nogil": True, "fastmath": set(FASTMATH), "error_model": ERROR_MODEL, "_nrt": False, **LINK_ONLY,
}  # fmt: skip


def exact_helper(func):
    """Decorator for scalar per-row arithmetic that must round exactly as written in every
    kernel that calls it: no fastmath flags, and not inlined by numba (LLVM may still
    inline it, but keeps each instruction's own flags), so whether an ``a * b + c`` becomes
    an FMA cannot depend on the code around the call (loss only and loss+grad would
    otherwise differ in the last bit). ``fastmath=False`` must be explicit: numba gives a
    callee that does not set it its caller's fastmath flags."""
    return numba.njit(nogil=True, fastmath=False, error_model=ERROR_MODEL, **LINK_ONLY)(func)


def exp_helper(func):
    """Decorator for the elementary functions (``fast_log``): contraction into FMA only, no
    reassociation, so they round the same in every kernel that inlines them."""
    return numba.njit(nogil=True, fastmath=set(EXP_FASTMATH), error_model=ERROR_MODEL, **LINK_ONLY)(func)


@intrinsic
def two_to_the_rounded(typingctx, v):
    """``2**k`` for ``v = k + 1.5 * 2**p`` (p = 23 for float32, 52 for float64).

    Adding ``1.5 * 2**p`` to a float of magnitude < 2**(p-1) leaves the rounded integer
    ``k`` in the low mantissa bits of ``v``; this subtracts the bits of ``1.5 * 2**p``,
    adds the exponent bias and shifts ``k`` into the exponent field, in the float's own
    integer width (numba would widen int32 arithmetic to int64, which does not vectorise
    as well). ``k`` must lie in the normal exponent range; the caller clamps.
    """
    if v == types.float32:
        int_type, round_bits, bias, mantissa = ir.IntType(32), 0x4B400000, 127, 23
    elif v == types.float64:
        int_type, round_bits, bias, mantissa = ir.IntType(64), 0x4338000000000000, 1023, 52
    else:
        return None
    sig = v(v)

    def codegen(context, builder, signature, args):
        bits = builder.bitcast(args[0], int_type)
        biased = builder.add(bits, ir.Constant(int_type, bias - round_bits))
        exponent = builder.shl(biased, ir.Constant(int_type, mantissa))
        return builder.bitcast(exponent, args[0].type)

    return sig, codegen


@intrinsic
def float_as_int(typingctx, v):
    """The bits of a float as the signed integer of its width (a bit cast, no conversion)."""
    widths = {types.float32: (types.int32, ir.IntType(32)), types.float64: (types.int64, ir.IntType(64))}
    if v not in widths:
        return None
    result_type, llvm_type = widths[v]

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_type)

    return result_type(v), codegen


@intrinsic
def int_as_float(typingctx, i):
    """The float whose bits are the signed integer ``i`` (int32 -> float32, int64 -> float64)."""
    widths = {types.int32: (types.float32, ir.FloatType()), types.int64: (types.float64, ir.DoubleType())}
    if i not in widths:
        return None
    result_type, llvm_type = widths[i]

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_type)

    return result_type(i), codegen


@intrinsic
def prefetch_for_write(typingctx, array, index):
    """A hint that ``array.flat[index]`` (C-contiguous) is about to be written: LLVM's
    ``llvm.prefetch`` with rw=1. Takes the write-allocate miss of the line off the path of
    the stores that follow (scalar stores of a fresh output row otherwise each wait for it)."""
    if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0]).data
        pointer = builder.gep(data, [args[1]])
        void_pointer = builder.bitcast(pointer, ir.IntType(8).as_pointer())
        module = builder.module
        function_type = ir.FunctionType(
            ir.VoidType(), [void_pointer.type, ir.IntType(32), ir.IntType(32), ir.IntType(32)]
        )
        prefetch = cgutils_get_or_insert_function(module, function_type, "llvm.prefetch.p0i8")
        builder.call(
            prefetch,
            [
                void_pointer,
                ir.Constant(ir.IntType(32), 1),
                ir.Constant(ir.IntType(32), 3),
                ir.Constant(ir.IntType(32), 1),
            ],
        )
        return context.get_dummy_value()

    return types.void(array, index), codegen


@intrinsic
def half_to_float(typingctx, bits):
    """The float32 value of the IEEE half-precision number whose bits are the uint16 ``bits``:
    LLVM's ``fpext half -> float`` (exact; vectorised as ``vcvtph2ps`` with F16C/AVX-512)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        half = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def float_to_half(typingctx, v):
    """The bits (uint16) of float32 ``v`` rounded to half precision: LLVM's ``fptrunc`` (round
    to nearest even, overflow to inf, NaN stays NaN; ``vcvtps2ph``)."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(half, ir.IntType(16))

    return types.uint16(v), codegen


#: LLVM function attributes that let the vectoriser use 512-bit registers (see wide_vectors)
_WIDE_VECTOR_ATTRIBUTES = ('"prefer-vector-width"="512"', '"min-legal-vector-width"="512"')


@intrinsic
def wide_vectors(typingctx):
    """Marks the function being compiled to vectorise with 512-bit registers where the CPU
    has them (AVX-512): LLVM's tuning for every AVX-512 Intel core prefers 256-bit vectors
    (``prefer-256-bit``: the clock drop of heavy 512-bit code on Skylake-SP), and numba
    offers no per-function switch. These kernels are long vector loops of FMAs, where the
    wider registers pay (measured: C = 1000, one thread, 562 -> 485 ns a row). The
    attributes are what clang's ``-mprefer-vector-width=512`` sets; on a CPU without
    AVX-512 they change nothing. Call it in the prange body and in every outlined helper
    (the functions that hold the loops after inlining)."""

    def codegen(context, builder, signature, args):
        attributes = builder.function.attributes
        for attribute in _WIDE_VECTOR_ATTRIBUTES:
            set.add(attributes, attribute)  # string attributes: llvmlite's add() knows only keywords
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def address_as(typingctx, address, dtype):
    """The int64 ``address`` as a ``CPointer`` to ``dtype`` (a NumPy scalar type), for
    ``numba.carray``: how a block function (``block_cfunc``) reads its arrays."""
    element = dtype.dtype if isinstance(dtype, types.NumberClass) else dtype
    sig = types.CPointer(element)(address, dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(element)))

    return sig, codegen


@intrinsic
def pack_array(typingctx, packed, k, array):
    """Writes the C-contiguous ``array``'s address and shape to ``packed[k:]`` (an int64
    array) and returns the next free slot, ``k + 1 + ndim``. An intrinsic, not a numba
    helper: the block arguments' packing calls it twelve times in each of its four
    specialisations, and numba types and inlines a helper's IR at each call (~0.1 s of CPU
    per specialisation; this emits the stores directly)."""
    sig = types.int64(packed, k, array)

    def codegen(context, builder, signature, args):
        packed_type, _, array_type = signature.args
        slots = context.make_array(packed_type)(context, builder, value=args[0]).data
        value = context.make_array(array_type)(context, builder, value=args[2])
        int64 = ir.IntType(64)
        fields = [builder.ptrtoint(value.data, int64), *numba.core.cgutils.unpack_tuple(builder, value.shape)]
        for d, field in enumerate(fields):
            builder.store(field, builder.gep(slots, [builder.add(args[1], int64(d))]))
        return builder.add(args[1], int64(len(fields)))

    return sig, codegen


@intrinsic
def unpack_array(typingctx, packed, k, dtype, ndim):
    """``(array, next slot)``: the C-contiguous array of ``dtype`` (a NumPy scalar type) and
    ``ndim`` (a constant) whose address and shape ``pack_array`` wrote to ``packed[k:]``,
    owned by the caller (no reference counting), as ``numba.carray`` would make it."""
    if not isinstance(ndim, types.IntegerLiteral):
        return None  # (numba then types the call again with the constant's literal type)
    element = dtype.dtype if isinstance(dtype, types.NumberClass) else dtype
    array_type = types.Array(element, ndim.literal_value, "C")
    sig = types.Tuple((array_type, types.int64))(packed, k, dtype, ndim)

    def codegen(context, builder, signature, args):
        slots = context.make_array(signature.args[0])(context, builder, value=args[0]).data
        int64 = ir.IntType(64)
        slot = [builder.gep(slots, [builder.add(args[1], int64(d))]) for d in range(array_type.ndim + 1)]
        fields = [builder.load(pointer) for pointer in slot]  # the address, then the shape
        itemsize = context.get_abi_sizeof(context.get_data_type(element))
        strides = [int64(itemsize)]
        for extent in reversed(fields[2:]):
            strides.insert(0, builder.mul(strides[0], extent))
        array = context.make_array(array_type)(context, builder)
        data = builder.inttoptr(fields[0], context.get_value_type(types.CPointer(element)))
        numba.np.arrayobj.populate_array(
            array, data=data, shape=fields[1:], strides=strides, itemsize=int64(itemsize), meminfo=None
        )
        next_slot = builder.add(args[1], int64(len(fields)))
        return context.make_tuple(builder, signature.return_type, [array._getvalue(), next_slot])

    return sig, codegen


@intrinsic
def call_by_address(typingctx, function, block, thread, packed):
    """``function(block, thread, packed)`` for the C function at the int64 address
    ``function``, of signature ``void(int64, int64, int64)`` (a ``block_cfunc``). The
    address is an argument, not a constant, so the kernel that calls it stays cacheable
    and carries none of its code."""
    sig = types.void(function, block, thread, packed)

    def codegen(context, builder, signature, args):
        function_type = ir.FunctionType(ir.VoidType(), [ir.IntType(64)] * 3)
        builder.call(builder.inttoptr(args[0], function_type.as_pointer()), args[1:])
        return context.get_dummy_value()

    return sig, codegen


# --- the small-C layout's transposes: 16 x 16 tiles in registers -----------------------
# The lanes layout (C <= SMALL_C) moves 16 rows x up to 16 classes of a row-major block to
# ``buf[c * lanes + r]`` and back. Element by element that is one scalar load and one scalar
# store per logit each way. Here the tile is 16 vector loads (one per row, masked to the
# row's ``width`` classes and to the ``rows`` rows that exist), the classic four stages of
# two-source shuffles (64 in all: vunpck / vpermt2ps / vshuff on AVX-512), and 16 vector
# stores (one per class); the Cython kernels do the same in C (``_cy_xent_simd.h``). The
# masks mean nothing outside the tile's rows and classes is read or written: a masked-off
# lane is not accessed (LLVM's ``llvm.masked.load`` / ``llvm.masked.store``).

#: the shuffles of a 16 x 16 transpose, v[r][c] -> v[c][r]: (a) rows 2i, 2i+1 interleaved
#: per 128-bit lane; (b) as pairs; (c), (d) whole 128-bit lanes
_TRANSPOSE_STAGES = (
    (
        (0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29),
        (2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31),
    ),
    (
        (0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
        (2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31),
    ),
    (
        (0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
        (8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31),
    ),
    (
        (0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
        (4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31),
    ),
)
#: which two vectors each stage combines, into which two: (first, second) -> (2 outputs)
_TRANSPOSE_PAIRS = (
    [(2 * i, 2 * i + 1, 2 * i, 2 * i + 1) for i in range(8)],
    [(4 * i + j, 4 * i + 2 + j, 4 * i + 2 * j, 4 * i + 2 * j + 1) for i in range(4) for j in range(2)],
    [(8 * i + k, 8 * i + 4 + k, 8 * i + k, 8 * i + 4 + k) for i in range(2) for k in range(4)],
    [(4 * i + k, 8 + 4 * i + k, 8 * i + k, 8 * i + 4 + k) for i in range(2) for k in range(4)],
)
_I32, _I64 = ir.IntType(32), ir.IntType(64)


def _int_vector(int_type, values):
    """An LLVM constant vector of integers."""
    return ir.Constant(ir.VectorType(int_type, 16), [ir.Constant(int_type, v) for v in values])


def _transpose16(builder, vectors):
    """The 16 vectors of 16 elements of a tile, transposed (LLVM ``shufflevector``s)."""
    for (low, high), pairs in zip(_TRANSPOSE_STAGES, _TRANSPOSE_PAIRS, strict=True):
        out = [None] * 16
        for first, second, low_at, high_at in pairs:
            out[low_at] = builder.shuffle_vector(vectors[first], vectors[second], _int_vector(_I32, low))
            out[high_at] = builder.shuffle_vector(vectors[first], vectors[second], _int_vector(_I32, high))
        vectors = out
    return vectors


def _tile_mask(builder, width, rows, r):
    """``<16 x i1>``: lane < width, all false when r >= rows."""
    # (compared in 32 bits: one vpcmpgtd instead of two 64-bit compares and a kunpck)
    limit = builder.select(builder.icmp_signed(">", rows, ir.Constant(_I64, r)), width, ir.Constant(_I64, 0))
    limit = builder.trunc(limit, _I32)  # width <= 16
    splat = builder.insert_element(ir.Constant(ir.VectorType(_I32, 16), None), limit, ir.Constant(_I32, 0))
    splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(_I32, 16), None))
    return builder.icmp_signed("<", _int_vector(_I32, range(16)), splat)


def _tile_pointer(context, builder, array_type, array, row, column, vector):
    """The address of ``array[row, column]`` (2-D, C layout) or ``array[row + column]`` (1-D)
    as a pointer to a vector."""
    view = context.make_array(array_type)(context, builder, array)
    if array_type.ndim == 2:
        index = builder.add(builder.mul(row, builder.extract_value(view.shape, 1)), column)
    else:
        index = builder.add(row, column)
    return builder.bitcast(builder.gep(view.data, [index]), vector.as_pointer())


def _tile_types(matrix, lanes):
    """Whether these are a tile's arrays: a 2-D C-layout float array and a 1-D one of its dtype."""
    return (
        isinstance(matrix, types.Array)
        and matrix.ndim == 2
        and matrix.layout == "C"
        and isinstance(lanes, types.Array)
        and lanes.ndim == 1
        and lanes.dtype == matrix.dtype
        and matrix.dtype in (types.float32, types.float64)
    )


def _masked_name(operation, element):
    return f"llvm.masked.{operation}.v16{'f32' if isinstance(element, ir.FloatType) else 'f64'}.p0"


@intrinsic
def rows_to_lanes16(typingctx, x, row0, column0, rows, width, buf, start, stride):
    """``buf[start + c * stride + r] = x[row0 + r, column0 + c]`` for r < 16, c < width (<= 16);
    the lanes r >= rows get 0 (all of them when rows <= 0). Reads only those rows and
    classes; writes only c < width."""
    if not _tile_types(x, buf):
        return None
    sig = types.void(x, types.int64, types.int64, types.int64, types.int64, buf, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        x_value, row0_value, column0_value, rows_value, width_value, buf_value, start_value, stride_value = args
        element = context.get_value_type(signature.args[0].dtype)
        vector = ir.VectorType(element, 16)
        load_type = ir.FunctionType(vector, [vector.as_pointer(), _I32, ir.VectorType(ir.IntType(1), 16), vector])
        masked_load = cgutils_get_or_insert_function(builder.module, load_type, _masked_name("load", element))
        vectors = []
        for r in range(16):
            row = builder.add(row0_value, ir.Constant(_I64, r))
            pointer = _tile_pointer(context, builder, signature.args[0], x_value, row, column0_value, vector)
            mask = _tile_mask(builder, width_value, rows_value, r)
            vectors.append(builder.call(masked_load, [pointer, ir.Constant(_I32, 4), mask, ir.Constant(vector, None)]))
        vectors = _transpose16(builder, vectors)
        for c in range(16):
            with builder.if_then(builder.icmp_signed(">", width_value, ir.Constant(_I64, c)), likely=True):
                at = builder.add(start_value, builder.mul(stride_value, ir.Constant(_I64, c)))
                pointer = _tile_pointer(
                    context, builder, signature.args[5], buf_value, at, ir.Constant(_I64, 0), vector
                )
                builder.store(vectors[c], pointer, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def lanes_to_rows16(typingctx, buf, start, stride, width, g, row0, column0, rows):
    """``g[row0 + r, column0 + c] = buf[start + c * stride + r]`` for r < rows (<= 16), c < width
    (<= 16): the way back of ``rows_to_lanes16``. Writes only those rows and classes."""
    if not _tile_types(g, buf):
        return None
    sig = types.void(buf, types.int64, types.int64, types.int64, g, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        buf_value, start_value, stride_value, width_value, g_value, row0_value, column0_value, rows_value = args
        element = context.get_value_type(signature.args[0].dtype)
        vector = ir.VectorType(element, 16)
        store_type = ir.FunctionType(
            ir.VoidType(), [vector, vector.as_pointer(), _I32, ir.VectorType(ir.IntType(1), 16)]
        )
        masked_store = cgutils_get_or_insert_function(builder.module, store_type, _masked_name("store", element))
        vectors = []
        for c in range(16):  # the classes past width load class 0 again (their lanes are not stored)
            inside = builder.icmp_signed(">", width_value, ir.Constant(_I64, c))
            at = builder.add(
                start_value,
                builder.mul(stride_value, builder.select(inside, ir.Constant(_I64, c), ir.Constant(_I64, 0))),
            )
            pointer = _tile_pointer(context, builder, signature.args[0], buf_value, at, ir.Constant(_I64, 0), vector)
            vectors.append(builder.load(pointer, align=4))
        vectors = _transpose16(builder, vectors)
        for r in range(16):
            row = builder.add(row0_value, ir.Constant(_I64, r))
            pointer = _tile_pointer(context, builder, signature.args[4], g_value, row, column0_value, vector)
            mask = _tile_mask(builder, width_value, rows_value, r)
            builder.call(masked_store, [vectors[r], pointer, ir.Constant(_I32, 4), mask])
        return context.get_dummy_value()

    return sig, codegen


#: the signature of a block function: (block, kernel thread, address of its packed arguments)
BLOCK_SIGNATURE = types.void(types.int64, types.int64, types.int64)


#: set to 1 to compile the parallel kernels that go through the cache (the distillation's and
#: the score's: ``_numba_kernels.compiled_through_the_cache``) in the calling process instead
#: of a child; the child, and precompile's workers, set it for themselves
COMPILE_IN_PROCESS_ENV = "FASTXENT_COMPILE_IN_PROCESS"


def child_process_environment() -> dict[str, str]:
    """The environment of a child Python process that compiles into numba's cache for this
    one (a kernel's child, precompile's workers): this process's, with its module path (so
    the child imports the same package) and COMPILE_IN_PROCESS_ENV set (what the child
    compiles, it compiles itself: its work goes to the cache anyway)."""
    environment = dict(os.environ, **{COMPILE_IN_PROCESS_ENV: "1"})
    environment["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
    return environment


#: the options of every block function (``numba.cfunc``'s keywords besides the signature)
_BLOCK_OPTIONS = {"nogil": True, "fastmath": set(FASTMATH), "error_model": ERROR_MODEL}


def block_cfunc(func):
    """Compiles ``func`` now (or loads it from the cache) as a C function of BLOCK_SIGNATURE
    with the kernels' flags: a block of rows, called by address from a parallel kernel
    (``call_by_address``). Called on first use, not at import: a ``cfunc`` compiles when
    it is created."""
    return numba.cfunc(BLOCK_SIGNATURE, cache=True, **_BLOCK_OPTIONS)(func)


def load_cached_overload(dispatcher, signature: tuple) -> bool:
    """Whether ``dispatcher`` holds its overload for the argument types ``signature`` after
    this call: compiled or loaded before, or loaded now from numba's on-disk cache, as a call
    would (numba's ``Dispatcher.compile``, split at its cache lookup). Compiles nothing: False
    if the cache does not hold it, or if this numba's internals differ."""
    from numba.core.compiler_lock import global_compiler_lock

    try:
        with global_compiler_lock:
            if signature in dispatcher.overloads:
                return True
            result = dispatcher._cache.load_overload(signature, dispatcher.targetctx)
            if result is None:
                return False
            dispatcher._cache_hits[signature] += 1
            dispatcher.targetctx.insert_user_function(result.entry_point, result.fndesc, [result.library])
            dispatcher.add_overload(result)
    except (AttributeError, TypeError, RuntimeError):
        return False
    return True


def cgutils_get_or_insert_function(module, function_type, name):
    from numba.core import cgutils

    return cgutils.get_or_insert_function(module, function_type, name)


# The kernels call ``math.log``/``math.exp``/``math.isinf`` through ``kernel_math``: the math
# module itself when compiled. Under NUMBA_DISABLE_JIT=1 (the coverage run) the kernels run
# as Python, where ``math.log(0.0)`` and ``math.exp(1000.0)`` raise instead of returning
# -inf and inf (C semantics), so there ``kernel_math`` has the compiled semantics, from NumPy.
kernel_math: Any = math

if numba.config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1 (the coverage run): plain-Python twins, all here
    _ROUNDING = {
        np.dtype(np.float32): (np.int32, 0x4B400000, 127, 23),
        np.dtype(np.float64): (np.int64, 0x4338000000000000, 1023, 52),
    }
    _BITS = {np.dtype(np.float32): np.int32, np.dtype(np.float64): np.int64}
    _FLOATS = {np.dtype(np.int32): np.float32, np.dtype(np.int64): np.float64}

    def two_to_the_rounded(v):  # noqa: F811 - replaces the intrinsic, which Python cannot call
        """Pure-Python ``two_to_the_rounded``: the same bit operations on a NumPy scalar."""
        int_type, round_bits, bias, mantissa = _ROUNDING[np.asarray(v).dtype]
        bits = np.asarray(v).view(int_type)
        with np.errstate(over="ignore"):
            exponent = (bits + int_type(bias - round_bits)) << int_type(mantissa)
        return np.asarray(exponent, int_type).view(np.asarray(v).dtype)[()]

    def float_as_int(v):  # noqa: F811
        value = np.asarray(v)
        if value.dtype not in _BITS:  # a Python float is a float64
            value = value.astype(np.float64)
        return value.view(_BITS[value.dtype])[()]

    def half_to_float(bits):  # noqa: F811
        return np.asarray(bits, np.uint16).view(np.float16).astype(np.float32)[()]

    def float_to_half(v):  # noqa: F811
        with np.errstate(over="ignore"):
            return np.asarray(np.float32(v).astype(np.float16)).view(np.uint16)[()]

    def rows_to_lanes16(x, row0, column0, rows, width, buf, start, stride):  # noqa: F811
        rows = max(0, min(16, rows))
        tile = np.zeros((width, 16), x.dtype)
        tile[:, :rows] = x[row0 : row0 + rows, column0 : column0 + width].T
        for c in range(width):
            buf[start + c * stride : start + c * stride + 16] = tile[c]

    def lanes_to_rows16(buf, start, stride, width, g, row0, column0, rows):  # noqa: F811
        for c in range(width):
            g[row0 : row0 + rows, column0 + c] = buf[start + c * stride : start + c * stride + rows]

    def prefetch_for_write(array, index):  # noqa: F811 - a hint only
        return None

    def wide_vectors():  # noqa: F811 - a code-generation hint only
        return None

    def int_as_float(i):  # noqa: F811
        value = np.asarray(i)
        if value.dtype not in _FLOATS:
            value = value.astype(np.int64)
        return value.view(_FLOATS[value.dtype])[()]

    def _ieee_log(v):
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.log(np.float64(v)))

    def _ieee_exp(v):
        with np.errstate(over="ignore"):
            return float(np.exp(np.float64(v)))

    kernel_math = SimpleNamespace(
        log=_ieee_log, exp=_ieee_exp, tanh=math.tanh, isinf=math.isinf, factorial=math.factorial
    )
