"""How rows are encoded on disk: HDF5 compression filters and the bfloat16 codec."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

def compression_kwargs(compression: str | None) -> dict[str, Any]:
    """h5py ``create_dataset`` keyword arguments for a compression name.

    ``None``, ``"lzf"``, ``"gzip"`` (level 4) or ``"gzip-N"`` work everywhere; ``"lz4"``, ``"zstd"`` and
    ``"blosc-zstd"``/``"blosc-lz4"`` (byte-shuffled) need the optional ``hdf5plugin`` package.
    """
    if compression is None or compression == "none":
        return {}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if compression.startswith("gzip-") and compression[5:].isdigit() and 1 <= int(compression[5:]) <= 9:
        return {"compression": "gzip", "compression_opts": int(compression[5:]), "shuffle": True}
    if compression in ("lz4", "zstd", "blosc-lz4", "blosc-zstd"):
        try:
            import hdf5plugin
        except ImportError as err:
            raise ValueError(
                f"compression={compression!r} needs the optional package hdf5plugin: "
                "`pip install 'lightning-dualform[compress]'`, or use 'lzf' or 'gzip'."
            ) from err
        if compression == "lz4":
            return dict(hdf5plugin.LZ4())
        if compression == "zstd":
            return dict(hdf5plugin.Zstd(clevel=3))
        cname: Literal["lz4", "zstd"] = "lz4" if compression == "blosc-lz4" else "zstd"
        return dict(hdf5plugin.Blosc(cname=cname, clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    raise ValueError(
        f"compression={compression!r} is not supported. Expected None, 'lzf', 'gzip', 'gzip-1'..'gzip-9', "
        "'lz4', 'zstd', 'blosc-lz4' or 'blosc-zstd'."
    )



def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (uint16), as torch does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


def encode_rows(x: np.ndarray, row_dtype: str) -> np.ndarray:
    """float32 rows -> the on-disk representation of ``row_dtype`` (rows already in it pass through;
    the callback converts with torch, which is several times faster than numpy's float16 cast)."""
    if row_dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if row_dtype == "float16":
        return x.astype(np.float16, copy=False)
    if x.dtype in (np.uint16, np.int16):
        return x.view(np.uint16)
    return _f32_to_bf16(x)


def decode_rows(x: np.ndarray, row_dtype: str) -> np.ndarray:
    """On-disk rows -> float32."""
    if row_dtype == "bfloat16":
        return _bf16_to_f32(x)
    return x.astype(np.float32, copy=False)
