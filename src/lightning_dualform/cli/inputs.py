"""Checks and parsing of what a user hands the ``lightning-dualform`` command: store paths, ``--index``,
``--split``, ``--layer``, ``--contribution-to`` and query files.

Every mistake raises :class:`UsageError`, which :func:`~lightning_dualform.cli.main.main` reports as one line
with exit code 2. Query files are read without unpickling anything (``allow_pickle=False``,
``weights_only=True``).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from typing import Any

import numpy as np

# defined in .usage (no numpy: the parser's start-up); the commands import them from here
from lightning_dualform.cli.usage import PROG, UsageError, error_message  # noqa: F401


def check_store_path(path: str) -> None:
    """A STORE argument names an existing file, or a :class:`UsageError` says what to pass."""
    try:
        st = os.stat(path)
    except OSError as err:
        fix = "point it at a store file" if err.errno == errno.ELOOP else "pass a store written by DualFormCallback"
        if err.errno == errno.ENOENT and not os.path.islink(path):
            fix += f" (try `{PROG} demo`)"
        raise UsageError(f"{path}: {_unreachable(path, err)}; {fix}.") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path}: is a folder; pass the .h5 store file inside it.")


def _unreachable(path: str, err: OSError) -> str:
    """Why ``os.stat(path)`` failed, for a message: a symbolic link loop, a link to nothing, ..."""
    if err.errno == errno.ELOOP:
        return f"is a symbolic link loop ({err.strerror})"
    if err.errno == errno.ENOENT and os.path.islink(path):
        return f"is a symbolic link to {os.readlink(path)!r}, which does not exist"
    if err.errno == errno.ENOENT:
        return "no such file"
    return f"cannot be read ({err.strerror or err})"


def positive(value: int | None, option: str) -> None:
    """``option``'s value is None or at least 1."""
    if value is not None and value < 1:
        raise UsageError(f"{option} {value}: expected a positive integer.")


def parse_index(text: str, available: np.ndarray, split: str) -> np.ndarray:
    """Positions (recording order) of the queries named by ``text``: ``'3,17'``, ``'0:10'``, ``'all'``."""
    if text.strip() == "all":
        return np.arange(len(available))
    wanted: list[int] = []
    known = np.unique(available)
    span = f"{known.min()}..{known.max()}" if len(known) else "none"
    for part in text.split(","):
        part = part.strip()
        try:
            if ":" in part:
                lo, hi = (int(x) for x in part.split(":", 1))
                if hi - lo > len(available) - len(wanted):  # bounded by what exists, never materialised
                    raise UsageError(
                        f"--index {text}: the range {part} names {hi - lo} dataset indices, more than the "
                        f"{len(available)} recorded {split} queries (indices {span}); use a range inside them, or all."
                    )
                wanted.extend(range(lo, hi))
            elif part:
                wanted.append(int(part))
        except ValueError:
            raise UsageError(
                f"--index {text}: {part!r} is not an integer or a range like 0:10; use e.g. 3,17 or 0:10 or all."
            ) from None
        if len(wanted) > len(available):
            raise UsageError(
                f"--index {text}: names more queries than the {len(available)} recorded {split} queries "
                f"(indices {span})."
            )
    if not wanted:
        raise UsageError(f"--index {text}: names no query; use e.g. 3,17 or 0:10 or all.")
    first: dict[int, int] = {}
    for p, i in enumerate(available.tolist()):
        first.setdefault(int(i), p)
    missing = [i for i in wanted if i not in first]
    if missing:
        raise UsageError(
            f"--index {text}: no recorded {split} query has dataset index {missing[:5]}; "
            f"the split holds {len(available)} queries with indices {span}."
        )
    return np.array([first[i] for i in wanted], dtype=np.int64)


def load_queries(path: str) -> np.ndarray:
    """``(n, d)`` float32 queries from a .npy (``allow_pickle=False``) or .pt (``weights_only=True``) file."""
    check_input_file(path, "--queries")
    ext = os.path.splitext(path)[1].lower()
    what = f"--queries {path}"
    if ext not in (".npy", ".pt", ".pth"):
        raise UsageError(f"{what}: unsupported file type {ext or '(none)'}; use .npy or .pt.")
    try:  # (opened without blocking and checked again: what is read is the regular file that was checked)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise UsageError(f"{what}: {_unreachable(path, err)}.") from None
    with os.fdopen(fd, "rb") as fh:
        _regular(os.fstat(fh.fileno()), path, "--queries")
        if ext == ".npy":
            return checked_queries(_read_npy(fh, what), what)
        return checked_queries(_read_pt(fh, what), what)


def load_npy_bytes(data: bytes, what: str) -> np.ndarray:
    """``(n, d)`` float32 queries from the bytes of a ``.npy`` file (``allow_pickle=False``), as
    :func:`load_queries` reads a file; ``what`` names the source in messages."""
    import io

    return checked_queries(_read_npy(io.BytesIO(data), what), what)


#: the first bytes of what a query file may turn out to be instead
_NPY_MAGIC, _ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"
_PICKLE_PROTOCOLS = tuple(bytes([0x80, v]) for v in range(2, 6))


def _read_npy(fh: Any, what: str) -> Any:
    """The array of a ``.npy`` file (never unpickled), or a :class:`UsageError` that says what the file is instead."""
    head = fh.read(8)
    fh.seek(0)
    if head.startswith(_ZIP_MAGIC):
        raise UsageError(f"{what}: is a zip archive (a .npz, or a torch .pt file), not a .npy file; save one array "
                         "with numpy.save (or name a torch file .pt).")
    if head[:2] in _PICKLE_PROTOCOLS:
        raise UsageError(f"{what}: is a Python pickle, which is never unpickled here; save a plain numeric array with "
                         "numpy.save.")
    if not head.startswith(_NPY_MAGIC):  # (numpy would try it as a pickle, and blame pickle)
        raise _damaged(what, ".npy", None, head)
    try:
        return np.load(fh, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err):  # an array of Python objects: the pickle refusal itself
            raise UsageError(f"{what}: holds Python objects, which would need pickle; save a plain numeric array "
                             "with numpy.save.") from err
        raise _damaged(what, ".npy", err, head) from err
    except Exception as err:  # a truncated or damaged header or body, another format
        raise _damaged(what, ".npy", err, head) from err


def _read_pt(fh: Any, what: str) -> Any:
    """The tensor of a ``.pt`` file as a numpy array (``torch.load(weights_only=True)``: nothing is unpickled but
    tensors and plain containers), or a :class:`UsageError`."""
    import torch

    head = fh.read(8)
    fh.seek(0)
    if head.startswith(_NPY_MAGIC):
        raise UsageError(f"{what}: is a .npy file; name it .npy.")
    try:
        obj = torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as err:
        text = clean_text(str(err))
        if "Weights only load failed" in text:  # the pickle refusal: it holds more than tensors
            reason = re.search(r"WeightsUnpickler error: (.*?)(?:\.(?: |$)|$)", text)
            said = f" ({brief(reason.group(1), 100)})" if reason else ""
            raise UsageError(f"{what}: holds Python objects that torch.load(weights_only=True) does not "
                             f"unpickle{said}; save one tensor of shape (n, d_in) with torch.save.") from err
        raise _damaged(what, ".pt", err, head) from err
    if not isinstance(obj, torch.Tensor):
        raise UsageError(f"{what}: holds a {type(obj).__name__}, not a tensor; save one tensor of shape (n, d_in).")
    if obj.is_complex():
        raise UsageError(_complex(what, str(obj.dtype)))
    return obj.detach().float().numpy()


def _damaged(what: str, ext: str, err: BaseException | None, head: bytes) -> UsageError:
    """A query file that cannot be read as ``ext``: empty, or damaged or of another format (the reader's reason,
    where it says one in words)."""
    if not head:
        return UsageError(f"{what}: is empty; save the queries with {_SAVE[ext]}.")
    detail = brief(error_message(err), 150) if err is not None else f"it does not start as a {ext} file does"
    said = f" ({detail})" if re.search("[A-Za-z]", detail) else ""  # (torch says a bare magic number)
    return UsageError(f"{what}: damaged or not a {ext} file{said}; save the queries with {_SAVE[ext]}.")


_SAVE = {".npy": "numpy.save", ".pt": "torch.save"}
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")


def clean_text(text: str) -> str:
    """``text`` on one line without terminal escape sequences or other control characters."""
    text = _ESCAPES.sub("", text)
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def brief(text: str, limit: int) -> str:
    """``text`` (cleaned by :func:`clean_text`) cut to at most about ``limit`` characters at a word's end."""
    text = clean_text(text)
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
    return cut.rstrip(" ,;:") + " ..."


def _complex(what: str, dtype: str) -> str:
    return (f"{what}: holds complex numbers ({dtype}); queries are real inputs of a layer, and the imaginary part "
            "would be dropped. Save the real part (e.g. `q.real`) if that is what you mean.")


def checked_queries(q: Any, what: str) -> np.ndarray:
    """A real, finite, non-empty array as ``(n, d)`` float32 (images flattened), or a :class:`UsageError`
    (complex numbers, NaN or inf, or values beyond float32's range included)."""
    if not isinstance(q, np.ndarray) or q.dtype == object or not np.issubdtype(q.dtype, np.number):
        raise UsageError(f"{what}: expected a numeric array of shape (n, d_in).")
    if q.dtype.kind == "c":
        raise UsageError(_complex(what, str(q.dtype)))
    if q.ndim == 0:
        raise UsageError(f"{what}: holds a single number; expected an array of shape (n, d_in).")
    if q.ndim == 1:
        q = q[None]
    elif q.ndim > 2:
        q = q.reshape(q.shape[0], -1)  # images (n, 28, 28) -> (n, 784)
    if q.shape[0] == 0 or q.shape[1] == 0:
        raise UsageError(f"{what}: holds no queries.")
    if not np.isfinite(q).all():
        raise UsageError(f"{what}: holds NaN or inf; every query must be finite.")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(out).all():
        big = float(np.abs(q).max())
        raise UsageError(f"{what}: holds values beyond float32's range (largest magnitude {big:.3g} > "
                         f"{float(np.finfo(np.float32).max):.3g}); the store's rows and products are float32. "
                         "Scale the queries down.")
    return out


def check_input_file(path: str, option: str) -> None:
    """``option``'s file exists and is a regular file (not a folder, pipe, socket or device, which could block a read
    forever or never end)."""
    try:
        st = os.stat(path)
    except OSError as err:
        fix = "; point it at the file" if err.errno == errno.ELOOP else ""
        raise UsageError(f"{option} {path}: {_unreachable(path, err)}{fix}.") from None
    _regular(st, path, option)


def _regular(st: os.stat_result, path: str, option: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{option} {path}: is a folder, not a file.")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{option} {path}: is {_kind(st.st_mode)}, not a regular file; save the queries to a file.")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def parse_contribution(text: str) -> str | int | None:
    """``--contribution-to``: 'auto', 'pred', 'label', a unit number, or None for 'none'."""
    t = text.strip().lower()
    if t == "none":
        return None
    if t in ("auto", "pred", "label"):
        return t
    try:
        unit = int(t)
    except ValueError:
        raise UsageError(
            f"--contribution-to {text}: expected auto, pred, label, none or an output unit number.") from None
    if unit < 0:
        raise UsageError(f"--contribution-to {text}: a unit number must be >= 0.")
    return unit


def parse_layers(values: list[str] | None, known: list[str]) -> list[str] | None:
    """``--layer`` values (repeated or comma-separated) as known layer names in order, or None for all."""
    if not values:
        return None
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if not names:
        shown = " ".join(repr(v) for v in values)
        raise UsageError(f"--layer {shown}: names no layer; this store has {', '.join(known)} (leave --layer out for "
                         "all of them).")
    bad = [n for n in names if n not in known]
    if bad:
        raise UsageError(f"--layer {bad[0]}: unknown layer; this store has {', '.join(known)}.")
    return list(dict.fromkeys(names))


def pick_split(store: Any, split: str | None) -> str:
    """The query set to attend: ``split``, or 'test', or the store's only one."""
    splits = store.query_splits
    if split is None:
        if not splits:
            raise UsageError(
                f"{store.path} has no recorded queries; pass --queries FILE, or record them with "
                "DualFormCallback(record_queries=('test',)) and trainer.test(...)."
            )
        if "test" in splits:
            return "test"
        if len(splits) == 1:
            return splits[0]
        raise UsageError(f"{store.path} has several query sets ({', '.join(splits)}); choose one with --split.")
    if split not in splits:
        raise UsageError(f"--split {split}: {store.path} has no such query set; it has {', '.join(splits) or 'none'}.")
    return split
