"""Numpy arrays out of a pickle, without unpickling it.

A pickle is a program for the pickle machine: its ``GLOBAL`` and ``REDUCE`` opcodes import and call whatever
the file names, so loading a user's pickle runs the user's code. This module never runs that machine.
:func:`read_array_pickle` walks the opcodes with :func:`pickletools.genops` (which only decodes them), accepts
the few that a pickle of nested tuples of plain numpy arrays uses (protocols 2 to 4, as ``pickle.dumps`` and
Python 2's ``cPickle`` write them), and interprets them symbolically: the three callables such a pickle names
(numpy's ``_reconstruct``, ``numpy.dtype``, ``_codecs.encode``, and ``bytes()`` for an empty array) become
descriptions of an array (shape, dtype code, byte order, raw bytes), and the arrays are made from those with
:func:`numpy.frombuffer`. Any other
opcode, name, call or argument is refused with a ``ValueError`` before anything is built.

Sizes are bounded: the memo, the stack and the number of opcodes; an array's declared shape must match the
bytes it carries. The caller bounds the pickle's own size (:func:`lightning_dualform.datasets.load_mnist_pickle`
reads at most ``max_bytes`` of a decompressed file).

Example::

    parts = read_array_pickle(raw)      # e.g. ((x, y), (x, y), (x, y)) of read-only numpy arrays
"""

from __future__ import annotations

import pickletools
import re
from typing import Any, cast

import numpy as np

__all__ = ["read_array_pickle"]

# What a pickle of numpy arrays names (numpy 1 and 2 spell the module of ``_reconstruct`` differently).
_RECONSTRUCT = frozenset({"numpy.core.multiarray _reconstruct", "numpy._core.multiarray _reconstruct"})
_NDARRAY, _DTYPE, _ENCODE = "numpy ndarray", "numpy dtype", "_codecs encode"
_BYTES = frozenset({"__builtin__ bytes", "builtins bytes"})  # protocol 2 writes an empty array's b"" as bytes()
_GLOBALS = _RECONSTRUCT | _BYTES | {_NDARRAY, _DTYPE, _ENCODE}

# Opcodes that only push a value decoded by genops (Python 2's byte strings arrive as latin-1 text).
_PUSH_INT = frozenset({"BININT", "BININT1", "BININT2"})
_PUSH_TEXT = frozenset({"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"})
_PUSH_BYTES = frozenset({"BINBYTES", "SHORT_BINBYTES", "BINBYTES8"})
_PUSH_PY2_STR = frozenset({"BINSTRING", "SHORT_BINSTRING"})
_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})
_TUPLE_N = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}

# Plain numeric dtypes only: no objects, strings, records or sub-arrays.
_DTYPE_CODE = re.compile(r"^(b1|[iu][1248]|f[248])$")
_MAX_NDIM = 32  # numpy's own limit


class _Global:
    """A name the pickle imports (never imported here)."""

    def __init__(self, name: str) -> None:
        self.name = name


class _DtypeSpec:
    """``numpy.dtype(code)`` with the byte order its ``BUILD`` sets."""

    def __init__(self, code: str) -> None:
        self.code: str = code
        self.byteorder: str | None = None

    def dtype(self) -> np.dtype:
        order = "=" if self.byteorder in (None, "|") else self.byteorder
        return np.dtype(order + self.code)


class _ArraySpec:
    """An array that ``_reconstruct`` made empty and whose ``BUILD`` gives shape, dtype, order and bytes."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None
        self.dtype: np.dtype | None = None
        self.fortran = False
        self.data = b""

    def array(self) -> np.ndarray:
        if self.shape is None or self.dtype is None:
            raise ValueError("an array is made but never given its contents (no BUILD)")
        arr = np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape, order="F" if self.fortran else "C")
        # numpy's own unpickling swaps a foreign byte order to the machine's; so do we (a copy, only then)
        return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="), order="K")


def _text(value: Any, what: str) -> str:
    """A short name or code: Python 3 text, or Python 2's byte string."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError(f"{what} must be a short string, got {type(value).__name__}")
    return value


def _flag(value: Any, what: str) -> bool:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{what} must be a boolean, got {value!r}")


def _reduce(fn: Any, args: Any) -> Any:
    """The result of one of the three allowed calls, described; anything else refused."""
    if not isinstance(fn, _Global) or not isinstance(args, tuple):
        raise ValueError("REDUCE of something that is not an allowed name with a tuple of arguments")
    if fn.name in _RECONSTRUCT:
        ok = (len(args) == 3 and isinstance(args[0], _Global) and args[0].name == _NDARRAY and args[1] == (0,)
              and _text(args[2], "the type code of _reconstruct") == "b")
        if not ok:
            raise ValueError("numpy's _reconstruct called with other arguments than (numpy.ndarray, (0,), b'b')")
        return _ArraySpec()
    if fn.name == _DTYPE:
        if len(args) != 3:
            raise ValueError(f"numpy.dtype called with {len(args)} arguments, expected (code, align, copy)")
        code = _text(args[0], "a dtype code")
        _flag(args[1], "dtype's align")
        _flag(args[2], "dtype's copy")
        if not _DTYPE_CODE.match(code):
            raise ValueError(f"dtype {code!r} is not a plain numeric type (allowed: b1, i1-i8, u1-u8, f2-f8)")
        return _DtypeSpec(code)
    if fn.name == _ENCODE:
        if (len(args) != 2 or not isinstance(args[0], str)
                or _text(args[1], "the encoding") not in ("latin1", "latin-1")):
            raise ValueError("_codecs.encode called with other arguments than (text, 'latin1')")
        try:
            return args[0].encode("latin-1")
        except UnicodeEncodeError as err:
            raise ValueError("_codecs.encode of text that is not latin-1") from err
    if fn.name in _BYTES and args == ():
        return b""
    raise ValueError(f"REDUCE of {fn.name.replace(' ', '.')} with arguments: only numpy's array reconstruction is "
                     "allowed")


def _build(obj: Any, state: Any) -> None:
    """``BUILD``: a dtype's byte order, or an array's shape, dtype, order and bytes."""
    if isinstance(obj, _DtypeSpec) and obj.byteorder is None:
        # numpy's dtype state: (3, byte order, subarray, names, fields, itemsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[2:5] == (None, None, None)
                and state[5:7] == (-1, -1) and state[7] == 0):
            raise ValueError("a dtype state other than a plain numeric type's (3, order, None, None, None, -1, -1, 0)")
        order = _text(state[1], "a byte order")
        if order not in ("<", ">", "|", "="):
            raise ValueError(f"byte order {order!r} is not one of < > | =")
        obj.byteorder = order
        return
    if isinstance(obj, _ArraySpec) and obj.shape is None:
        # ndarray's state: (1, shape, dtype, is_fortran, raw bytes)
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise ValueError("an array state other than (1, shape, dtype, is_fortran, bytes)")
        _, shape, dtype, fortran, data = state
        if (not isinstance(shape, tuple) or len(shape) > _MAX_NDIM
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise ValueError(f"an array shape must be a tuple of at most {_MAX_NDIM} non-negative integers")
        if not isinstance(dtype, _DtypeSpec) or dtype.byteorder is None:
            raise ValueError("an array's dtype is not a built numpy.dtype")
        if isinstance(data, str):  # Python 2's str: the bytes as latin-1 text
            data = data.encode("latin-1")
        if not isinstance(data, bytes):
            raise ValueError(f"an array's contents must be bytes, got {type(data).__name__}")
        dt = dtype.dtype()
        size = dt.itemsize
        for n in shape:
            size *= n
        if size != len(data):
            raise ValueError(f"an array declared {shape} of {dt.str} ({size:,} bytes) carries {len(data):,} bytes")
        obj.shape, obj.dtype, obj.fortran, obj.data = shape, dt, _flag(fortran, "is_fortran"), data
        return
    raise ValueError(f"BUILD on {type(obj).__name__} (only an unbuilt dtype or array may be built)")


def _materialise(value: Any, depth: int = 0) -> Any:
    if isinstance(value, _ArraySpec):
        return value.array()
    if isinstance(value, tuple) and depth < 8:
        return tuple(_materialise(v, depth + 1) for v in value)
    raise ValueError(f"the pickle holds {type(value).__name__.lstrip('_')} where nested tuples of arrays were expected")


def read_array_pickle(raw: bytes, *, max_memo: int = 4096, max_stack: int = 1024, max_ops: int = 1_000_000) -> Any:
    """Nested tuples of numpy arrays from a pickle of them, read without running the pickle machine.

    Args:
        raw: the pickle's bytes (protocol 2 to 4; Python 2's ``cPickle`` protocol 2 included).
        max_memo: most memo entries accepted.
        max_stack: most values on the stack at once.
        max_ops: most opcodes accepted.

    Returns:
        The pickled value, e.g. ``((x, y), (x, y), (x, y))``: tuples (at most 8 deep) of arrays in the machine's
        byte order, read-only views of ``raw``'s bytes where no byte swap was needed.

    Raises:
        ValueError: the bytes are not such a pickle: truncated, an opcode or a name other than those listed in
            the module's docstring, an argument numpy's pickles never pass, a shape that does not match its bytes,
            a bound passed, or a value other than tuples of arrays.
    """
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    proto_seen = False
    try:
        for n_ops, (op, op_arg, pos) in enumerate(pickletools.genops(raw)):
            name, arg = op.name, cast(Any, op_arg)  # genops types it loosely; each opcode's own is checked below
            if n_ops >= max_ops:
                raise ValueError(f"more than {max_ops:,} opcodes")
            if name == "PROTO":
                if n_ops or arg not in (2, 3, 4):
                    raise ValueError(f"protocol {arg} (accepted: 2 to 4, declared first)")
                proto_seen = True
                continue
            if not proto_seen:
                raise ValueError("no protocol 2 to 4 header (PROTO)")
            if name == "FRAME":
                continue
            if name == "STOP":
                if len(stack) != 1 or marks:
                    raise ValueError(f"STOP with {len(stack)} values on the stack and {len(marks)} open marks")
                return _materialise(stack.pop())
            if name in _PUT or name == "MEMOIZE":
                if not stack:
                    raise ValueError("memo store from an empty stack")
                if len(memo) >= max_memo:
                    raise ValueError(f"more than {max_memo:,} memo entries")
                memo[len(memo) if name == "MEMOIZE" else int(arg)] = stack[-1]
                continue
            if name in _GET:
                if arg not in memo:
                    raise ValueError(f"memo entry {arg} read before it is stored")
                stack.append(memo[arg])
            elif name == "MARK":
                marks.append(len(stack))
            elif name == "TUPLE":
                if not marks:
                    raise ValueError("TUPLE without MARK")
                start = marks.pop()
                items = tuple(stack[start:])
                del stack[start:]
                stack.append(items)
            elif name in _TUPLE_N:
                n = _TUPLE_N[name]
                if len(stack) - (marks[-1] if marks else 0) < n:
                    raise ValueError(f"{name} with fewer than {n} values on the stack")
                items = tuple(stack[len(stack) - n:])
                del stack[len(stack) - n:]
                stack.append(items)
            elif name in _PUSH_INT or name in _PUSH_TEXT or name in _PUSH_BYTES:
                stack.append(arg)
            elif name in _PUSH_PY2_STR:
                stack.append(arg.encode("latin-1"))  # genops decodes Python 2's str as latin-1 text
            elif name in _CONSTANTS:
                stack.append(_CONSTANTS[name])
            elif name == "GLOBAL" or name == "STACK_GLOBAL":
                if name == "STACK_GLOBAL":
                    if len(stack) < 2 or not all(isinstance(v, str) for v in stack[-2:]):
                        raise ValueError("STACK_GLOBAL without a module and a name on the stack")
                    arg = f"{stack[-2]} {stack[-1]}"
                    del stack[-2:]
                if arg not in _GLOBALS:
                    raise ValueError(f"refusing {arg.replace(' ', '.')}: a pickle of arrays names only numpy's array "
                                     "reconstruction, numpy.ndarray, numpy.dtype, _codecs.encode and bytes")
                stack.append(_Global(arg))
            elif name == "REDUCE":
                if len(stack) < 2:
                    raise ValueError("REDUCE with fewer than two values on the stack")
                args = stack.pop()
                stack.append(_reduce(stack.pop(), args))
            elif name == "BUILD":
                if len(stack) < 2:
                    raise ValueError("BUILD with fewer than two values on the stack")
                state = stack.pop()
                _build(stack[-1], state)
            else:
                raise ValueError(f"opcode {name} at byte {pos}: not used by a pickle of numpy arrays")
            if len(stack) > max_stack:
                raise ValueError(f"more than {max_stack:,} values on the stack")
            if marks and marks[-1] > len(stack):
                raise ValueError(f"{name} took values from below a MARK")
    except ValueError:
        raise
    except Exception as err:  # genops on damaged bytes (struct errors, bad UTF-8, ...)
        raise ValueError(f"undecodable pickle ({type(err).__name__}: {err})") from err
    raise ValueError("the pickle ends without STOP")
