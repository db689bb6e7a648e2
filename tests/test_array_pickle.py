"""``read_array_pickle``: numpy arrays from a pickle without the pickle machine, checked against ``pickle.loads``
of pickles this test writes itself; hostile pickles are refused and nothing they name runs."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest

from lightning_dualform._array_pickle import read_array_pickle


def _no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every way into the pickle machine fail, so a parse that used one would raise."""

    def refuse(*args, **kwargs):
        raise AssertionError("the pickle machine was used")

    for name in ("loads", "load", "Unpickler", "_Unpickler", "_loads", "_load"):
        monkeypatch.setattr(pickle, name, refuse, raising=False)


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        (rng.integers(0, 256, (5, 784)) / 256.0).astype(np.float32),  # the MNIST file's images
        rng.integers(0, 10, 5).astype(np.int64),  # and its labels
        rng.standard_normal((3, 4)),
        rng.standard_normal((2, 3)).astype(np.float16),
        rng.integers(0, 255, (4, 2)).astype(np.uint8),
        rng.integers(-100, 100, 7).astype(np.int8),
        rng.integers(-1000, 1000, 6).astype(">i4"),  # big-endian
        rng.standard_normal((4, 3)).astype(">f8"),
        np.asfortranarray(rng.standard_normal((3, 5)).astype(np.float32)),
        np.array([True, False, True]),
        np.zeros((0, 784), np.float32),
        np.array(2.5),  # 0-d
        rng.integers(0, 2**16, (2, 2, 3)).astype(np.uint16),
    ]


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_reads_what_pickle_writes(protocol, monkeypatch):
    arrays = _arrays()
    x, y = arrays[0], arrays[1]
    cases = [((x, y), (x, y), (x, y)), tuple(arrays), (x,), ((arrays[2], (arrays[3], arrays[6])),), x]
    blobs = [pickle.dumps(c, protocol=protocol) for c in cases]
    expected = [pickle.loads(b) for b in blobs]  # the reference, computed before the machine is switched off
    _no_unpickling(monkeypatch)
    for blob, want in zip(blobs, expected):
        got = read_array_pickle(blob)

        def same(a, b):
            if isinstance(b, tuple):
                assert isinstance(a, tuple) and len(a) == len(b)
                for u, v in zip(a, b):
                    same(u, v)
            else:
                assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                assert a.flags.f_contiguous == b.flags.f_contiguous
                np.testing.assert_array_equal(a, b)

        same(got, want)


def _op_str(s: bytes) -> bytes:
    """Python 2's byte string: SHORT_BINSTRING or BINSTRING."""
    return (b"U" + bytes([len(s)]) if len(s) < 256 else b"T" + struct.pack("<i", len(s))) + s


def _py2_array(a: np.ndarray) -> bytes:
    """An array as Python 2's cPickle wrote it (protocol 2, byte strings, no memo), like the classic mnist.pkl."""
    shape = b"(" + b"".join(b"J" + struct.pack("<i", n) for n in a.shape) + b"t"
    dtype = (b"cnumpy\ndtype\n" + _op_str(a.dtype.str[1:].encode()) + b"K\x00K\x01\x87R"
             + b"(K\x03" + _op_str(a.dtype.str[:1].encode()) + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _op_str(b"b") + b"\x87R"
            + b"(K\x01" + shape + dtype + b"\x89" + _op_str(a.tobytes()) + b"tb")


def test_reads_python2_cpickle(monkeypatch):
    rng = np.random.default_rng(1)
    x = (rng.integers(0, 256, (70, 784)) / 256.0).astype(np.float32)  # > 255 bytes: BINSTRING
    y = rng.integers(0, 10, 70).astype(np.int64)
    pair = _py2_array(x) + _py2_array(y) + b"\x86"
    blob = b"\x80\x02" + pair + pair + pair + b"\x87."
    _no_unpickling(monkeypatch)
    parts = read_array_pickle(blob)
    assert len(parts) == 3
    for px, py in parts:
        np.testing.assert_array_equal(px, x)
        np.testing.assert_array_equal(py, y)


class _Payload:
    """Pickles to a call of ``os.system`` that would create a file."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.target}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_refuses_os_system_and_runs_nothing(tmp_path, protocol, monkeypatch):
    target = tmp_path / "pwned"
    x = np.zeros((2, 784), np.float32)
    blob = pickle.dumps(((x, _Payload(str(target))), (x, x), (x, x)), protocol=protocol)
    _no_unpickling(monkeypatch)
    with pytest.raises(ValueError, match=r"refusing (posix|os)\.system"):
        read_array_pickle(blob)
    assert not target.exists()


def _good() -> bytes:
    return pickle.dumps(((np.ones((3, 784), np.float32), np.arange(3)),) * 3, protocol=2)


@pytest.mark.parametrize("blob, match", [
    (pickle.dumps((eval, ("1",)), protocol=2), r"refusing (__builtin__|builtins)\.eval"),
    (pickle.dumps(np.array([None, 1], dtype=object), protocol=2), "not a plain numeric type"),  # dtype('O')
    (pickle.dumps(np.array(["ab"]), protocol=2), "not a plain numeric type"),
    (pickle.dumps(np.zeros(2, dtype=[("a", "f4"), ("b", "i4")]), protocol=2), "not a plain numeric type"),
    (pickle.dumps([np.zeros(2)], protocol=2), "EMPTY_LIST"),
    (pickle.dumps({"x": np.zeros(2)}, protocol=2), "EMPTY_DICT"),
    (pickle.dumps((np.zeros(2), 1), protocol=2), "holds int"),
    (pickle.dumps(np.zeros(2), protocol=0), "protocol"),
    (pickle.dumps(np.zeros(2), protocol=5), "protocol"),
    (b"", "STOP"),
    (b"\x80\x02", "STOP"),
    (_good()[: len(_good()) // 2], "expected|STOP|remain"),  # truncated
    (_good()[:-1], "STOP"),
    (b"\x80\x02\xff.", "opcode|undecodable"),  # not an opcode
    (b"\x80\x02T\xff\xff\xff\x7fab.", "expected 2147483647 bytes"),  # a huge declared string, few bytes
    (b"\x80\x02N" + b"r" + struct.pack("<I", 0) + b"h\x01.", "memo entry 1"),
], ids=["eval", "object-dtype", "str-dtype", "record-dtype", "list", "dict", "int-leaf", "protocol-0", "protocol-5",
        "empty", "no-stop", "truncated", "stop-cut", "bad-opcode", "huge-string", "memo-miss"])
def test_refuses_what_is_not_an_array_pickle(blob, match, monkeypatch):
    _no_unpickling(monkeypatch)
    with pytest.raises(ValueError, match=match):
        read_array_pickle(blob)


def _edit(blob: bytes, old: bytes, new: bytes) -> bytes:
    assert blob.count(old) >= 1
    return blob.replace(old, new, 1)


def test_refuses_a_declared_shape_its_bytes_do_not_fill():
    blob = pickle.dumps(np.zeros((2, 3), np.float32), protocol=2)
    # shape (2, 3) -> (2000000000, 3): 24 GB declared, 24 bytes carried; nothing of that size is allocated
    huge = _edit(blob, b"K\x02K\x03\x86", b"J" + struct.pack("<i", 2_000_000_000) + b"K\x03\x86")
    with pytest.raises(ValueError, match="declared .* carries 24 bytes"):
        read_array_pickle(huge)
    with pytest.raises(ValueError, match="non-negative"):
        read_array_pickle(_edit(blob, b"K\x02K\x03\x86", b"J" + struct.pack("<i", -2) + b"K\x03\x86"))


def test_refuses_other_calls_of_the_allowed_names():
    blob = pickle.dumps(np.zeros(2, np.float32), protocol=2)
    with pytest.raises(ValueError, match="latin1"):  # _codecs.encode with another codec
        read_array_pickle(_edit(blob, b"latin1", b"rot_13"))
    with pytest.raises(ValueError, match="_reconstruct called with other arguments"):  # another type code
        read_array_pickle(_edit(blob, b"X\x01\x00\x00\x00b", b"X\x01\x00\x00\x00c"))
    with pytest.raises(ValueError, match="dtype state"):  # a dtype with fields
        read_array_pickle(_edit(blob, b"NNNJ\xff\xff\xff\xff", b"NNNK\x08"))


def test_bounds_memo_stack_and_opcodes():
    memo_bomb = b"\x80\x02N" + b"".join(b"r" + struct.pack("<I", i) for i in range(5000)) + b"."
    with pytest.raises(ValueError, match="memo entries"):
        read_array_pickle(memo_bomb)
    with pytest.raises(ValueError, match="values on the stack"):
        read_array_pickle(b"\x80\x02" + b"N" * 2000 + b".")
    with pytest.raises(ValueError, match="opcodes"):
        read_array_pickle(_good(), max_ops=10)
    assert isinstance(read_array_pickle(_good()), tuple)  # the bounds above leave real pickles alone
