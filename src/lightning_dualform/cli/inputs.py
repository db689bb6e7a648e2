"""Checks and parsing of what a user hands the ``lightning-dualform`` command: store paths, ``--index``,
``--split``, ``--layer``, ``--contribution-to`` and query files.

Every mistake raises :class:`UsageError`, which :func:`~lightning_dualform.cli.main.main` reports as one line
with exit code 2. Query files are read without unpickling anything (``allow_pickle=False``,
``weights_only=True``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

# defined in .usage (no numpy: the parser's start-up); the commands import them from here
from lightning_dualform.cli.usage import PROG, UsageError, error_message  # noqa: F401


def check_store_path(path: str) -> None:
    """A STORE argument names an existing file, or a :class:`UsageError` says what to pass."""
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file; pass a store written by DualFormCallback (try `{PROG} demo`).")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a folder; pass the .h5 store file inside it.")


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
    try:
        if ext == ".npy":
            q = np.load(path, allow_pickle=False)
        elif ext in (".pt", ".pth"):
            import torch

            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, torch.Tensor):
                raise UsageError(
                    f"--queries {path}: holds a {type(obj).__name__}, not a tensor; save one tensor of shape (n, d_in)."
                )
            if obj.is_complex():
                raise UsageError(_complex(f"--queries {path}", str(obj.dtype)))
            q = obj.detach().float().numpy()
        else:
            raise UsageError(f"--queries {path}: unsupported file type {ext or '(none)'}; use .npy or .pt.")
    except UsageError:
        raise
    except Exception as err:  # numpy/torch say many things about files they cannot read
        raise UsageError(
            f"--queries {path}: cannot read it without pickle ({error_message(err)[:150]}); save a plain numeric array."
        ) from err
    return checked_queries(q, f"--queries {path}")


def load_npy_bytes(data: bytes, what: str) -> np.ndarray:
    """``(n, d)`` float32 queries from the bytes of a ``.npy`` file (``allow_pickle=False``), as
    :func:`load_queries` reads a file; ``what`` names the source in messages."""
    import io

    try:
        q = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # a pickled or damaged file, another format
        raise UsageError(
            f"{what}: cannot read it as .npy without pickle ({error_message(err)[:150]}); save a plain numeric array "
            "with numpy.save."
        ) from err
    return checked_queries(q, what)


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
    """``option``'s file exists and is not a folder."""
    if not os.path.exists(path):
        raise UsageError(f"{option} {path}: no such file.")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a folder, not a file.")


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
