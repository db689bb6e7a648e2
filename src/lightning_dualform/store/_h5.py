"""Small h5py helpers shared by the store's writers and readers: checksummed datasets, JSON attributes,
appends, and turning low-level failures into :class:`~lightning_dualform.errors.StoreError`."""

from __future__ import annotations

import functools
import json
from typing import Any, Callable

import h5py
import numpy as np

from lightning_dualform.errors import StoreBusyError, StoreError
from lightning_dualform.store import _lock


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



#: HDF5 object versions a store is written with: from 1.10's (SWMR needs them) up to 1.14's, so that every
#: h5py this library supports reads every store it writes (h5py 3.10 ships HDF5 1.14; HDF5 2.0, in h5py 3.15
#: and later, writes datatype messages 1.14 cannot read when the upper bound is "latest").
LIBVER = ("v110", "v114")

DAMAGE = (OSError, KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError)


def _closed(obj: Any) -> bool:
    """Whether ``obj`` (a store reader, or a layer or query set of one) reads a file its reader has closed."""
    store = obj if hasattr(obj, "_f") else getattr(obj, "store", None) or getattr(obj, "_store", None)
    f = getattr(store, "_f", None)
    return isinstance(f, h5py.File) and not f.id.valid


def guarded(method: Callable) -> Callable:
    """Turn any low-level failure while reading stored data into a :class:`StoreError` naming the file."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _closed(self):  # (h5py answers some calls on a closed file, `name in group` with False: never silent)
            path = getattr(self, "path", None) or getattr(getattr(self, "store", None), "path", "store")
            raise RuntimeError(f"{path}: this reader was closed ({method.__name__} called after close()); open the "
                               "store again (StoreReader(path)), or keep using it inside its `with` block.")
        try:
            return method(self, *args, **kwargs)
        except StoreError:
            raise
        except DAMAGE as err:
            path = getattr(self, "path", None) or getattr(getattr(self, "store", None), "path", "store")
            doing = _lock.writer_active(path) if isinstance(path, str) else None
            if doing is not None:  # a live writer rewrote what we were reading: not damage
                raise StoreBusyError(
                    f"{path}: busy: another process is writing it ({doing}) and {method.__name__} read a part "
                    f"being rewritten ({type(err).__name__}: {short(err)}). Reopen it in a moment."
                ) from err
            raise StoreError(f"{path}: damaged store: {_what_failed(self, method, args)} failed ({type(err).__name__}: "
                             f"{short(err)}).{damage_hint(str(err))}") from err

    return wrapper


def _what_failed(obj: Any, method: Callable, args: tuple) -> str:
    """``layer 'net.0': read(0, 4096)``: the call that failed, with the layer or query set it read and its
    integer arguments (a row range)."""
    name = getattr(obj, "name", None)
    kind = "query set" if hasattr(obj, "split") and not hasattr(obj, "d_in") else "layer"
    where = f"{kind} {name!r}: " if isinstance(name, str) else ""
    ints = [str(int(a)) for a in args if isinstance(a, (int, np.integer)) and not isinstance(a, bool)]
    return f"{where}{method.__name__}({', '.join(ints)})" if ints else f"{where}{method.__name__}"


def damage_hint(problem: str) -> str:
    """What a failed read means and what to do, where HDF5's message says it (else nothing)."""
    if "filter returned failure" in problem:
        return (" A chunk's Fletcher-32 checksum does not match its bytes: they changed on disk after they were "
                "written: restore the file from a copy, or record the run again.")
    return ""


# -- validation of what a file says, before it sizes, indexes or sums anything ------------------------
def int_attr(
    attrs: Any, key: str, where: str, *, default: Any = None, lo: int | None = None, hi: int | None = None
) -> int:
    """An integer attribute (numpy integers too; never a bool, float or string), within ``[lo, hi]``."""
    if key not in attrs:
        if default is not None:
            return default
        raise StoreError(f"{where} has no {key!r} attribute; the file is damaged or not a store.")
    v = attrs[key]
    if isinstance(v, np.ndarray) and v.shape == (1,):
        v = v[0]
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise StoreError(f"{where}: attribute {key!r} is {v!r}, not an integer; the file is damaged.")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise StoreError(f"{where}: attribute {key!r} is {v}, outside {lo}..{hi}; the file is damaged.")
    return v


def bool_attr(attrs: Any, key: str, where: str, default: bool | None = None) -> bool:
    """A boolean attribute (``True``/``False``, numpy bools, or the integers 0 and 1)."""
    if key not in attrs:
        if default is not None:
            return default
        raise StoreError(f"{where} has no {key!r} attribute; the file is damaged or not a store.")
    v = attrs[key]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)) and int(v) in (0, 1):
        return bool(v)
    raise StoreError(f"{where}: attribute {key!r} is {v!r}, not a boolean; the file is damaged.")


def str_attr(attrs: Any, key: str, where: str, default: str | None = None) -> str:
    if key not in attrs:
        if default is not None:
            return default
        raise StoreError(f"{where} has no {key!r} attribute; the file is damaged or not a store.")
    v = attr(attrs[key])
    if not isinstance(v, str):
        raise StoreError(f"{where}: attribute {key!r} is {v!r}, not a string; the file is damaged.")
    return v


def json_attr(attrs: Any, key: str, where: str, kind: type, default: Any) -> Any:
    """A JSON attribute that must decode to ``kind`` (``list`` or ``dict``)."""
    if key not in attrs:
        return default
    text = attr(attrs[key])
    try:
        v = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        v = None
    if not isinstance(v, kind):
        raise StoreError(
            f"{where}: attribute {key!r} is not a JSON {kind.__name__} ({str(text)[:80]!r}); the file is damaged."
        )
    return v


def counter(group: h5py.Group, name: str, where: str, hi: int) -> int:
    """A ``(1,)`` integer counter dataset whose value lies in ``0..hi`` (what it counts exists)."""
    ds = group.get(name)
    if not isinstance(ds, h5py.Dataset) or ds.shape != (1,) or ds.dtype.kind not in "iu":
        got = f"{ds.shape} {ds.dtype}" if isinstance(ds, h5py.Dataset) else repr(ds)
        raise StoreError(f"{where}: {name!r} is {got}, expected one integer; the file is damaged.")
    v = int(ds[0])
    if not 0 <= v <= hi:
        raise StoreError(f"{where}: {name!r} is {v}, but only 0..{hi} exist; the file is damaged.")
    return v


def dataset(group: h5py.Group, name: str, where: str, kinds: str, ndim: int | None = None) -> h5py.Dataset:
    """The dataset ``name`` of ``group``, of a dtype kind in ``kinds`` (numpy kind letters) and rank ``ndim``."""
    ds = group.get(name)
    if not isinstance(ds, h5py.Dataset):
        raise StoreError(f"{where} has no dataset {name!r}; the file is damaged or not a store.")
    if ds.dtype.kind not in kinds or (ndim is not None and ds.ndim != ndim):
        raise StoreError(f"{where}: dataset {name!r} is {ds.shape} {ds.dtype}; the file is damaged.")
    return ds


def count_negative(ds: h5py.Dataset, n: int, block: int = 1 << 22) -> int:
    """Entries below zero among the first ``n`` of a 1-D dataset, read in blocks."""
    return sum(int((ds[s : min(s + block, n)] < 0).sum()) for s in range(0, n, block))
