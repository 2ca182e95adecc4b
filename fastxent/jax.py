"""fastxent inside JAX: ``cross_entropy`` usable under ``jax.jit``, ``jax.grad`` and
``jax.vmap``, through an XLA FFI custom call (the kernels read XLA's logits and labels
buffers and write its loss and gradient buffers in place, no copy) and a
``jax.custom_vjp`` whose forward keeps the gradient of the same fused pass.

    import jax, jax.numpy as jnp, fastxent.jax as fxj
    loss = jax.jit(fxj.cross_entropy)(logits, labels)          # = optax's ...with_integer_labels(...).mean()
    grads = jax.grad(fxj.cross_entropy)(logits, labels)

The custom call's handler is a Python function behind a C function pointer (``ctypes``),
registered with ``jax.ffi.register_ffi_target`` once per set of options; XLA calls it with
its C call frame (``xla/ffi/api/c_api.h``), from which it views the buffers as NumPy arrays.
The gradient's output aliases the logits operand (``input_output_aliases``): the kernel runs
in place on that buffer, so where the logits die there (a matmul's output in a training
step) XLA allocates no second N x C buffer; where the caller's logits live on, XLA copies
them into the output first. An exception in the handler becomes an XLA error with its
message (a bad label's row and value), never a silent success.
Where ``jax.ffi`` is missing (older JAX) or the logits are not float32 / float64, it falls
back to ``jax.pure_callback``, which copies the operands to the host and the results back
(for 4096 x 32000 float32 the operand copy alone took 320 ms, more than the kernel).

CPU only (the callback hands device buffers to NumPy); float32 / float64 logits ``(..., C)``
and integer labels ``logits.shape[:-1]``; the keywords are :func:`fastxent.cross_entropy`'s
(``reduction`` "mean", "sum" or "none"; "none" differentiates through ``jax.vjp`` with any
cotangent). The ``jax`` extra installs JAX.
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
from typing import Any

import numpy as np

try:
    import jax
    import jax.numpy as jnp
except ImportError:
    raise ImportError("fastxent.jax needs JAX: pip install 'fastxent[jax]'") from None

import fastxent as _fx

__all__ = ["cross_entropy"]


def _host_loss_and_grad(logits, labels, options):
    """The fused pass on the host: (loss, gradient) in the logits' dtype."""
    x = np.asarray(logits)
    loss, grad = _fx.cross_entropy_with_grad(x, np.asarray(labels), **dict(options))
    return np.asarray(loss, dtype=x.dtype), grad.astype(x.dtype, copy=False)


def _host_loss(logits, labels, options):
    x = np.asarray(logits)
    return np.asarray(_fx.cross_entropy(x, np.asarray(labels), **dict(options)), dtype=x.dtype)


def _shapes(logits, options):
    reduction = dict(options)["reduction"]
    loss_shape = logits.shape[:-1] if reduction == "none" else ()
    return jax.ShapeDtypeStruct(loss_shape, logits.dtype), jax.ShapeDtypeStruct(logits.shape, logits.dtype)


# --- the XLA FFI custom call: a handler over XLA's C call frame ----------------------
# The structs of xla/ffi/api/c_api.h that the handler reads (C layout, x86-64 and aarch64).
_Pointer = ctypes.c_void_p


class _ExtensionBase(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int), ("next", _Pointer)]


class _ApiVersion(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _Pointer),
        ("major_version", ctypes.c_int),
        ("minor_version", ctypes.c_int),
    ]


class _Metadata(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("api_version", _ApiVersion),
        ("traits", ctypes.c_uint32),
        ("state_type_id", ctypes.c_int64),
    ]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))]


class _Operands(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _Pointer),
        ("size", ctypes.c_int64),
        ("types", _Pointer),
        ("items", ctypes.POINTER(_Pointer)),
    ]


class _Attributes(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _Pointer),
        ("size", ctypes.c_int64),
        ("types", _Pointer),
        ("names", _Pointer),
        ("attrs", _Pointer),
    ]


class _CallFrame(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.POINTER(_ExtensionBase)),
        ("api", _Pointer),
        ("ctx", _Pointer),
        ("stage", ctypes.c_int),
        ("args", _Operands),
        ("rets", _Operands),
        ("attrs", _Attributes),
        ("future", _Pointer),
    ]


class _Buffer(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _Pointer),
        ("dtype", ctypes.c_int),
        ("data", _Pointer),
        ("rank", ctypes.c_int64),
        ("dims", ctypes.POINTER(ctypes.c_int64)),
    ]


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _Pointer),
        ("message", ctypes.c_char_p),
        ("errc", ctypes.c_int),
    ]


class _ApiHead(ctypes.Structure):  # XLA_FFI_Api up to its first function, XLA_FFI_Error_Create
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", _Pointer),
        ("api_version", _ApiVersion),
        ("internal_api", _Pointer),
        ("error_create", _Pointer),
    ]


_HANDLER = ctypes.CFUNCTYPE(_Pointer, ctypes.POINTER(_CallFrame))
_ERROR_CREATE = ctypes.CFUNCTYPE(_Pointer, ctypes.POINTER(_ErrorCreateArgs))
_EXTENSION_METADATA = 1  # XLA_FFI_Extension_Metadata
_STAGE_EXECUTE = 3  # XLA_FFI_ExecutionStage_EXECUTE
_FFI_API_VERSION = (0, 3)  # the c_api.h these structs follow (XLA_FFI_API_MAJOR, _MINOR)
_ERROR_INVALID_ARGUMENT, _ERROR_INTERNAL = 3, 13
#: XLA_FFI_DataType -> NumPy (the logits and labels the handler takes)
_BUFFER_DTYPES: dict[int, np.dtype] = {
    11: np.dtype(np.float32),
    12: np.dtype(np.float64),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
}
_FFI_LOGITS = (np.dtype(np.float32), np.dtype(np.float64))


def _buffer_array(pointer: int, writeable: bool) -> np.ndarray:
    """An XLA_FFI_Buffer as a NumPy view of XLA's memory (row-major, as ffi_call lays it out)."""
    buffer = ctypes.cast(pointer, ctypes.POINTER(_Buffer)).contents
    shape: tuple[int, ...] = tuple(int(buffer.dims[d]) for d in range(buffer.rank))
    dtype = _BUFFER_DTYPES[buffer.dtype]
    if math.prod(shape) == 0 or not buffer.data:
        return np.empty(shape, dtype)  # (nothing to read or write)
    memory = (ctypes.c_char * (math.prod(shape) * dtype.itemsize)).from_address(buffer.data)
    array = np.frombuffer(memoryview(memory), dtype).reshape(shape)
    array.flags.writeable = writeable
    return array


def _data(pointer: int) -> int | None:
    """The address of an XLA_FFI_Buffer's memory."""
    return ctypes.cast(pointer, ctypes.POINTER(_Buffer)).contents.data


def _ffi_error(frame: Any, error: Exception) -> int | None:
    """An XLA_FFI_Error for ``error`` (XLA raises it as XlaRuntimeError with this message)."""
    head = _ApiHead.from_address(frame.api)
    create = _ERROR_CREATE(head.error_create)
    code = _ERROR_INVALID_ARGUMENT if isinstance(error, (ValueError, TypeError, IndexError)) else _ERROR_INTERNAL
    message = f"{type(error).__name__}: {error}".encode()
    args = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None, message, code)
    return create(ctypes.byref(args))


def _make_handler(options: tuple, with_grad: bool):
    """The handler of one set of options: loss only, or loss and gradient (rets 0 and 1)."""
    keywords = dict(options)

    def handle(frame_pointer):
        frame = frame_pointer.contents
        try:
            if frame.extension_start and frame.extension_start.contents.type == _EXTENSION_METADATA:
                extension = ctypes.cast(frame.extension_start, ctypes.POINTER(_MetadataExtension)).contents
                metadata = extension.metadata.contents
                major, minor = _FFI_API_VERSION
                metadata.api_version = _ApiVersion(ctypes.sizeof(_ApiVersion), None, major, minor)
                metadata.traits = 0
                return None
            if frame.stage != _STAGE_EXECUTE:
                return None
            labels = _buffer_array(frame.args.items[1], False)
            loss_out = _buffer_array(frame.rets.items[0], True)
            if with_grad:  # the gradient's buffer is the logits' (aliased): in place
                logits = _buffer_array(frame.rets.items[1], True)
                if _data(frame.args.items[0]) != _data(frame.rets.items[1]):  # (never seen: XLA aliases)
                    logits[...] = _buffer_array(frame.args.items[0], False)
                loss, _ = _fx.cross_entropy_with_grad(logits, labels, out=logits, **keywords)
            else:
                loss = _fx.cross_entropy(_buffer_array(frame.args.items[0], False), labels, **keywords)
            loss_out[...] = loss
            return None
        except Exception as error:  # an error for XLA to raise, never a silent success
            return _ffi_error(frame, error)

    return _HANDLER(handle)


_TARGETS: dict = {}  # (options, with_grad) -> the registered target's name
_HANDLERS: list = []  # the ctypes callbacks, alive as long as XLA may call them
_TARGETS_LOCK = threading.Lock()


def _target(options: tuple, with_grad: bool) -> str | None:
    """The FFI target for these options (registered on first use), or None without jax.ffi."""
    key = (options, with_grad)
    with _TARGETS_LOCK:
        name = _TARGETS.get(key)
        if name is None:
            ffi = getattr(jax, "ffi", None)
            if ffi is None or not hasattr(ffi, "register_ffi_target"):
                return None
            name = f"fastxent_cross_entropy_{len(_TARGETS)}"
            handler = _make_handler(options, with_grad)
            ffi.register_ffi_target(name, ffi.pycapsule(ctypes.cast(handler, _Pointer).value), platform="cpu")
            _HANDLERS.append(handler)
            _TARGETS[key] = name
    return name


def _through_ffi(logits, labels, options, with_grad: bool):
    """The custom call's results, or None where it does not apply (see the module docstring)."""
    if np.dtype(logits.dtype) not in _FFI_LOGITS or np.dtype(labels.dtype) not in _BUFFER_DTYPES.values():
        return None
    name = _target(options, with_grad)
    if name is None:
        return None
    loss_shape, grad_shape = _shapes(logits, options)
    results = (loss_shape, grad_shape) if with_grad else loss_shape
    aliases = {0: 1} if with_grad else None
    return jax.ffi.ffi_call(name, results, vmap_method="sequential", input_output_aliases=aliases)(logits, labels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cross_entropy(logits, labels, options):
    loss = _through_ffi(logits, labels, options, False)
    if loss is not None:
        return loss
    loss_shape, _ = _shapes(logits, options)
    return jax.pure_callback(
        functools.partial(_host_loss, options=options), loss_shape, logits, labels, vmap_method="sequential"
    )


def _forward(logits, labels, options):
    results = _through_ffi(logits, labels, options, True)
    if results is not None:
        loss, grad = results
        return loss, (grad, labels)
    loss_shape, grad_shape = _shapes(logits, options)
    loss, grad = jax.pure_callback(
        functools.partial(_host_loss_and_grad, options=options),
        (loss_shape, grad_shape),
        logits,
        labels,
        vmap_method="sequential",
    )
    return loss, (grad, labels)


def _backward(options, residuals, cotangent):
    grad, labels = residuals
    if dict(options)["reduction"] == "none":
        scaled = grad * cotangent[..., None]
    else:
        scaled = grad * cotangent
    labels_cotangent = np.zeros(labels.shape, dtype=jax.dtypes.float0)
    return scaled, labels_cotangent


_cross_entropy.defvjp(_forward, _backward)


def cross_entropy(
    logits: Any,
    labels: Any,
    *,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> Any:
    """:func:`fastxent.cross_entropy` as a JAX function (jit, grad, vmap). ``weight`` must be
    a concrete array (not traced); the options are static."""
    options = (
        ("weight", None if weight is None else np.asarray(weight, np.float64)),
        ("ignore_index", int(ignore_index)),
        ("reduction", reduction),
        ("label_smoothing", float(label_smoothing)),
        ("z_loss", float(z_loss)),
        ("logit_scale", float(logit_scale)),
        ("softcap", None if softcap is None else float(softcap)),
    )
    return _cross_entropy(logits, jnp.asarray(labels), _Static(options))


class _Static(tuple):
    """The options as a hashable static argument (the weight compared by its values)."""

    def __new__(cls, items):
        return super().__new__(cls, items)

    def _key(self):
        return tuple((k, tuple(v.tolist()) if isinstance(v, np.ndarray) else v) for k, v in self)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key() == other._key()
