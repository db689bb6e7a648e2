"""Small h5py helpers shared by the store's writers and readers: checksummed datasets, JSON attributes,
appends, and turning low-level failures into :class:`~lightning_dualform.errors.StoreError`."""

from __future__ import annotations

import functools
import json
from typing import Any, Callable

import h5py
import numpy as np

from lightning_dualform.errors import StoreError


def create(group: h5py.Group, name: str, **kwargs: Any) -> h5py.Dataset:
    """Every dataset is chunked with a fletcher32 checksum per chunk: a damaged file raises on read
    instead of answering with wrong numbers."""
    return group.create_dataset(name, fletcher32=True, **kwargs)


def set_attrs(obj: h5py.Group, attrs: dict[str, Any]) -> None:
    """Attributes as HDF5 scalars; containers as JSON text (never pickled)."""
    for k, v in attrs.items():
        if isinstance(v, (dict, list, tuple)):
            v = json.dumps(v)
        elif isinstance(v, str):
            v = str.__str__(v)  # plain str, not an Enum subclass
        obj.attrs[k] = v


def append(ds: h5py.Dataset, data: np.ndarray) -> None:
    if len(data) == 0:
        return
    n = ds.shape[0]
    ds.resize(n + len(data), axis=0)
    ds[n:] = data


def replace(g: h5py.Group, name: str, data: np.ndarray) -> None:
    if name in g:
        del g[name]
    create(g, name, data=data)



def truncate(ds: h5py.Dataset, n: int) -> None:
    if ds.shape[0] != n:
        ds.resize(n, axis=0)



def attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__



DAMAGE = (OSError, KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError)


def guarded(method: Callable) -> Callable:
    """Turn any low-level failure while reading stored data into a :class:`StoreError` naming the file."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except StoreError:
            raise
        except DAMAGE as err:
            path = getattr(self, "path", None) or getattr(getattr(self, "store", None), "path", "store")
            raise StoreError(f"{path}: damaged store: {method.__name__} failed ({type(err).__name__}: {short(err)}).") from err

    return wrapper
