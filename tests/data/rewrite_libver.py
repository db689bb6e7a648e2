"""Rewrite a fixture store with the object versions of HDF5 1.10-1.14 (``store._h5.LIBVER``), unchanged otherwise.

The fixtures were written by HDF5 2.0 (h5py 3.16) with ``libver="latest"``, whose datatype messages HDF5 1.14
(h5py 3.10, the oldest this library supports) cannot read (HDF5's object copy refuses to lower them). Every
group, dataset and attribute is created again with the same shape, maximum shape, chunks, filters, dtype and
data; only the encoding of the object headers changes.

    python tests/data/rewrite_libver.py tests/data/store_v1_sgd.h5
"""
import os
import sys

import h5py

LIBVER = ("v110", "v114")


def _copy(src: h5py.Group, dst: h5py.Group) -> None:
    for k, v in src.attrs.items():
        dst.attrs[k] = v
    for name, obj in src.items():
        if isinstance(obj, h5py.Group):
            _copy(obj, dst.create_group(name))
            continue
        kw = {}
        if obj.chunks is not None:
            kw = dict(chunks=obj.chunks, maxshape=obj.maxshape, compression=obj.compression,
                      compression_opts=obj.compression_opts, shuffle=obj.shuffle, fletcher32=obj.fletcher32)
        ds = dst.create_dataset(name, shape=obj.shape, dtype=obj.dtype, **kw)
        if obj.size:
            ds[...] = obj[...]
        for k, v in obj.attrs.items():
            ds.attrs[k] = v


def rewrite(path: str) -> None:
    tmp = path + ".rewrite"
    with h5py.File(path, "r") as src, h5py.File(tmp, "w", libver=LIBVER) as dst:
        _copy(src, dst)
    os.replace(tmp, path)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        rewrite(p)
