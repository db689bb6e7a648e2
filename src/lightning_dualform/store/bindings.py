"""The checksums that bind everything a layer's rebuild reads to the finished store (format 4).

HDF5's own checksums (fletcher32 per chunk) say a dataset was not damaged on disk; they do not say it is the
dataset the run wrote: a program that rewrites ``state/weight/exp_avg_sq`` or a convolution's ``padding``
writes valid checksums with it. Beside the CRC-32 of the per-step tables
(:data:`~lightning_dualform.store.certificate.TABLES_CRC32`), a finished store keeps two more per layer:

* :data:`ATTRS_CRC32`: the layer's attributes (the certificate's own and the kept weights' marks excepted: a
  certificate is rewritten after finalisation), its ``input_size`` (a convolution's maps) and the root
  attributes that decide how rows are decoded, replayed and judged (:data:`ROOT_ATTRS`). Checked on open.
* :data:`STATE_CRC32`: everything a replay starts from: the optimizer state before the first step
  (``state/``: each dataset's name, dtype, shape and bytes, each group's attributes), the initial weight and
  bias and SGD's initial momentum buffers. Checked the first time a reader hands the state or the base weights
  out (it can be large: ``info`` does not read it).

The writer computes them at finalisation (in the session that marks the store complete) and the certificate
writes them again (:func:`~lightning_dualform.store.certificate.write_layer_certificate`). A complete store of
format :data:`REQUIRED_FROM` or later must have all three; older stores are checked where they have them, and
their answers are checked against the stored final weights only (``docs/store-format.md``).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Callable, Mapping

import h5py
import numpy as np

#: the layer's attributes, its convolution geometry and the root attributes that decide how it is rebuilt
ATTRS_CRC32 = "certificate_attrs_crc32"
#: the optimizer state before the first step and the initial parameters
STATE_CRC32 = "certificate_state_crc32"
#: the first store format whose complete stores must carry every binding
REQUIRED_FROM = 4
#: root attributes a layer's rebuild depends on: its rule and form, the rows' decoding and the tolerance
ROOT_ATTRS = ("format_version", "update_rule", "optimizer_exact", "row_dtype", "precision", "float32_products")
#: datasets of a layer group that a replay or the base weights start from
INITIAL_DATASETS = ("weight_init", "bias_init", "weight_buffer_init", "bias_buffer_init")
_LEN = struct.Struct("<Q")


def _canonical(value: Any) -> bytes:
    """An attribute's value as bytes that do not depend on how h5py hands it back (str or bytes, numpy
    scalar or array)."""
    if isinstance(value, bytes):
        return b"s" + value
    if isinstance(value, str):
        return b"s" + value.encode("utf-8", "surrogatepass")
    a = np.asarray(value)
    if a.dtype.kind in "OSU":  # variable-length strings: their text, never the pointers
        items = [x.decode("utf-8", "surrogatepass") if isinstance(x, bytes) else str(x) for x in a.reshape(-1)]
        return b"t" + repr((a.shape, items)).encode("utf-8", "surrogatepass")
    return a.dtype.str.encode() + repr(a.shape).encode() + np.ascontiguousarray(a).tobytes()


def _fold(crc: int, *parts: bytes) -> int:
    for p in parts:  # length-prefixed: no two different sequences fold to the same bytes
        crc = zlib.crc32(p, zlib.crc32(_LEN.pack(len(p)), crc))
    return crc


def _attrs_crc(crc: int, attrs: Mapping[str, Any], keys: list[str]) -> int:
    for k in keys:
        crc = _fold(crc, k.encode("utf-8", "surrogatepass"), _canonical(attrs[k]))
    return crc


def _dataset_crc(crc: int, name: str, data: np.ndarray) -> int:
    return _fold(crc, name.encode(), data.dtype.str.encode(), repr(data.shape).encode(),
                 np.ascontiguousarray(data).tobytes())


def bound_attr(name: str) -> bool:
    """Whether a layer attribute is bound by :data:`ATTRS_CRC32` (a certificate's own and the kept weights'
    marks are not: a certificate is rewritten after finalisation)."""
    from lightning_dualform.store.certificate import MARKS, PREFIX

    return not (name.startswith(PREFIX) or name in MARKS)


def attrs_crc32(root_attrs: Mapping[str, Any], group: h5py.Group) -> int:
    """CRC-32 of a layer group's bound attributes (:func:`bound_attr`), its ``input_size`` dataset and the
    root attributes :data:`ROOT_ATTRS` (``root_attrs``: the file's root attributes as h5py gives them)."""
    crc = _attrs_crc(0, root_attrs, [k for k in ROOT_ATTRS if k in root_attrs])
    crc = _attrs_crc(crc, group.attrs, sorted(k for k in group.attrs if bound_attr(k)))
    size = group.get("input_size")
    return _dataset_crc(crc, "input_size", np.asarray(size[()])) if isinstance(size, h5py.Dataset) else crc


def state_crc32(group: h5py.Group, read: Callable[[str], np.ndarray] | None = None) -> int:
    """CRC-32 of a layer group's initial parameters (:data:`INITIAL_DATASETS`) and of its ``state/`` group:
    every dataset (name, dtype, shape, bytes) and every group's attributes, in name order.

    Args:
        read: ``(path in the group) -> the dataset as stored``, for a caller that reads them anyway (default:
            read here).
    """
    read = read or (lambda path: np.asarray(group[path][()]))
    crc = 0
    for name in INITIAL_DATASETS:
        ds = group.get(name)
        if isinstance(ds, h5py.Dataset):
            crc = _dataset_crc(crc, name, read(name))
    state = group.get("state")
    if not isinstance(state, h5py.Group):
        return _fold(crc, b"no state")
    entries: list[tuple[str, h5py.HLObject]] = [("", state)]
    state.visititems(lambda name, obj: entries.append((name, obj)))
    for name, obj in sorted(entries, key=lambda e: e[0]):
        if isinstance(obj, h5py.Dataset):
            crc = _dataset_crc(crc, "state/" + name, read("state/" + name))
        else:
            crc = _fold(crc, ("state/" + name + "/").encode())
            crc = _attrs_crc(crc, obj.attrs, sorted(obj.attrs))
    return crc


def write_bindings(f: h5py.File, group: h5py.Group) -> None:
    """Write a layer's :data:`ATTRS_CRC32` and :data:`STATE_CRC32` as the file holds it now (inside a write
    session, after every other attribute of the layer is written)."""
    group.attrs[STATE_CRC32] = np.int64(state_crc32(group))
    group.attrs[ATTRS_CRC32] = np.int64(attrs_crc32(f.attrs, group))
