"""A layer's exactness certificate as one typed object: written, read and checked in one place.

The certificate says how closely a layer's stored rows rebuild its trained weights (``attend/certificate.py``
computes it by reading the rows; the recording engine computes one as training goes, from random
projections: ``record/sketch.py``). This module owns its bytes, the attributes and datasets of
``/layers/<name>`` that ``docs/store-format.md`` lists under "The certificate":

* :class:`LayerCertificate`: the verdict (``certificate_*`` attributes), with :meth:`~LayerCertificate.to_attrs`
  and :meth:`~LayerCertificate.from_attrs` (a wrong type is a :class:`~lightning_dualform.errors.StoreError`);
* :class:`KeptWeights`: what the full certificate keeps beside it for ``attend`` to reuse, the memory's sums of a
  scalar rule (``memory_weight``/``memory_bias``) or an element-wise rule's replayed weights
  (``replay_weight``/``replay_bias``), and :class:`KeptMarks`, the ``memory_*`` attributes that tie them to the
  rows, end step and final weights they were computed from;
* :func:`write_layer_certificate`: the one operation that writes them, into a store or every shard of a DDP
  run, each file in one all-or-nothing write session under its writer lock (a kill or a full disk leaves the
  layer's certificate missing, never half written);
* :func:`tolerance`: the relative error up to which a store counts as exact.

Nothing here knows about torch: the certificate's math hands numpy arrays.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping

import h5py
import numpy as np

from lightning_dualform.errors import StoreError
from lightning_dualform.store import _h5, _journal
from lightning_dualform.store._lock import WriterLock
from lightning_dualform.store.bindings import write_bindings
from lightning_dualform.store.format import (
    MEMORY_SUM_DATASETS,
    MEMORY_SUM_MAX_ELEMENTS,
    REPLAY_DATASETS,
    store_form,
    tables_crc32,
    weights_crc32,
)

if TYPE_CHECKING:
    from lightning_dualform.store.reader import StoreView

#: how a certificate was made: by reading the store's rows at fit end (or ``verify --write-certificate``), or
#: from random projections of each step's rows carried through training (``record/sketch.py``)
Method = Literal["full", "sketch", "rows"]
METHODS: tuple[str, ...] = ("full", "sketch", "rows")
#: attribute prefix of the verdict; every attribute with it is replaced when a certificate is written
PREFIX = "certificate_"
#: the per-step tables the store finished with (written at finalisation, with or without a certificate)
TABLES_CRC32 = "certificate_tables_crc32"
#: attributes that tie the kept weights to what they were computed from
MARKS = ("memory_end_step", "memory_rows", "memory_weight_final_crc32")

#: Relative error of the rebuilt weights up to which a store counts as exact, by stored row dtype ...
ROW_DTYPE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
#: ... and by training precision: mixed precision rounds each step's weight gradient (a bf16 or fp16 GEMM
#: output) before the update, which no sum of outer products reproduces; these bounds are what the
#: test suite and benchmarks measure with margin (docs/dual-form.md).
PRECISION_TOLERANCE = {"16-mixed": 1e-2, "bf16-mixed": 5e-2}
#: ... and by how float32 products were rounded in training (``float32_products``): TF32 rounds their
#: inputs as float16 does, bf16 as bfloat16 (docs/dual-form.md).
FLOAT32_PRODUCTS_TOLERANCE = {"tf32": 1e-2, "bf16": 5e-2}


def tolerance(row_dtype: str, precision: str, float32_products: str = "ieee") -> float:
    """The documented certificate tolerance of a store (a rounding this library does not know: 5e-2)."""
    products = 1e-4 if float32_products == "ieee" else FLOAT32_PRODUCTS_TOLERANCE.get(float32_products, 5e-2)
    return max(ROW_DTYPE_TOLERANCE.get(row_dtype, 1e-4), PRECISION_TOLERANCE.get(str(precision), 1e-4), products)


def store_tolerance(store: "StoreView") -> float:
    """:func:`tolerance` of an open store, from its metadata (stores from before ``float32_products`` was
    recorded count as IEEE float32)."""
    meta = store.meta
    return tolerance(meta.row_dtype, meta.precision, meta.float32_products)


def beyond_tolerance_cause(cert: "LayerCertificate | None") -> str:
    """Why an answer's ``dual`` can differ from the stored final weights' output, for a warning: the store's own
    certificate already says its rows do not rebuild them (training changed the weights in a way no row explains),
    or, where it says they do, the file changed since."""
    if cert is not None and not cert.exact:
        return (f"The store's certificate says the same (its rows rebuild the trained weights only to relative error "
                f"{cert.rel_err:.2e}): the run changed the weights in a way no row explains (a constraint, a hook or "
                "an edit outside the optimizer, or an inexact run), so its answers are not the trained model's.")
    return "It is damaged or was rewritten; run `lightning-dualform verify` on it."


@dataclass(frozen=True)
class LayerCertificate:
    """How closely a layer's memory rebuilds its trained weights.

    Attributes:
        rel_err: ``max(rel_err_weight, rel_err_bias)``.
        rel_err_weight: ``||W_final - W_rebuilt||_F / ||W_final||_F`` (a sketch: of the projections ``W Z``; rows: of
            the rows replayed).
        rel_err_bias: the same for the bias (0 without one).
        explained: ``1 - rel_err``, at least 0: the share of the weights the memory explains.
        tolerance: the store's documented tolerance (:func:`tolerance`).
        exact: ``rel_err <= tolerance`` and nothing made the run or the layer inexact.
        method: ``"full"`` (the rows read back), ``"sketch"`` (projections carried through training, SGD) or
            ``"rows"`` (an element-wise rule's replay of a few of each weight's rows as training went).
        probes: columns of the sketch's random projection, or rows of the replay (``None`` for ``"full"``).
    """

    rel_err: float
    rel_err_weight: float
    rel_err_bias: float
    explained: float
    tolerance: float
    exact: bool
    method: Method = "full"
    probes: int | None = None

    @classmethod
    def measured(cls, rel_err_weight: float, rel_err_bias: float, tolerance: float, *, exact_run: bool,
                 method: Method = "full", probes: int | None = None) -> "LayerCertificate":
        """The certificate of these errors: exact when within ``tolerance`` and ``exact_run`` (the run and the
        layer were recorded as exact)."""
        err = max(float(rel_err_weight), float(rel_err_bias))
        return cls(err, float(rel_err_weight), float(rel_err_bias), max(0.0, 1.0 - err), float(tolerance),
                   bool(err <= tolerance and exact_run), method, None if probes is None else int(probes))

    def fit_end_line(self, owner: str, name: str, reason: str | None = None) -> str:
        """What the recording says of layer ``name`` at fit end (``reason``: why the run made it inexact)."""
        sampled = f" on the {self.probes} rows of each weight replayed" if self.method == "rows" else ""
        if self.exact:
            verdict = f"exact within {self.tolerance:.0e}{sampled}"
        elif self.rel_err > self.tolerance:
            verdict = f"INEXACT: beyond {self.tolerance:.0e}"
        else:  # within the tolerance where it looked, but the run did something no row explains
            verdict = f"INEXACT: {reason}" if reason else "INEXACT: the run was recorded as inexact"
        return (f"{owner}: {name}: rebuilt weights {'match' if self.exact else 'differ from'} the trained ones "
                f"{'to' if self.exact else 'by'} relative error {self.rel_err:.2e} ({verdict}; the memory explains "
                f"{100 * self.explained:.4g}% of the weights{' replayed' if self.method == 'rows' else ''}).")

    def as_dict(self) -> dict[str, Any]:
        """``{"rel_err", "rel_err_weight", "rel_err_bias", "explained", "tolerance", "exact", "method"}`` (and
        ``"probes"`` for a sketch): what ``DualFormCallback.certificate`` shows per layer."""
        out: dict[str, Any] = {"rel_err": self.rel_err, "rel_err_weight": self.rel_err_weight,
                               "rel_err_bias": self.rel_err_bias, "explained": self.explained,
                               "tolerance": self.tolerance, "exact": self.exact, "method": self.method}
        if self.probes is not None:
            out["probes"] = self.probes
        return out

    def to_attrs(self) -> dict[str, Any]:
        """The ``certificate_*`` attributes to write (``certificate_probes`` only for a sketch)."""
        return {PREFIX + k: v for k, v in self.as_dict().items()}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], where: str) -> "LayerCertificate | None":
        """The certificate a layer group's (decoded) attributes hold, or None when none was written.

        Stores from before ``certificate_method``, ``certificate_explained`` or ``certificate_tolerance`` were
        written read as a full certificate, ``explained = 1 - rel_err`` and tolerance NaN.

        Raises:
            StoreError: an attribute of the wrong type or value.
        """
        if PREFIX + "rel_err" not in attrs:
            return None

        def number(key: str, default: float | None = None) -> float:
            v = attrs.get(PREFIX + key, default)
            if v is None or isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise StoreError(f"{where}: attribute {PREFIX + key!r} is {v!r}, not a number; the file is damaged.")
            return float(v)

        rel_err = number("rel_err")
        exact = attrs.get(PREFIX + "exact", False)
        is_int = isinstance(exact, (int, np.integer)) and int(exact) in (0, 1)
        if not isinstance(exact, (bool, np.bool_)) and not is_int:
            raise StoreError(f"{where}: attribute {PREFIX + 'exact'!r} is {exact!r}, not a boolean; the file is "
                             "damaged.")
        method = attrs.get(PREFIX + "method", "full")
        if method not in METHODS:
            raise StoreError(f"{where}: attribute {PREFIX + 'method'!r} is {method!r}, not one of {METHODS}; the "
                             "file is damaged or from a newer library.")
        probes = attrs.get(PREFIX + "probes")
        number_like = (isinstance(probes, (int, np.integer, float, np.floating))
                       and not isinstance(probes, (bool, np.bool_)))
        if probes is not None and (not number_like or probes != int(probes) or int(probes) < 1):
            raise StoreError(f"{where}: attribute {PREFIX + 'probes'!r} is {probes!r}, not a positive integer; the "
                             "file is damaged.")
        return cls(
            rel_err=rel_err,
            rel_err_weight=number("rel_err_weight", rel_err),
            rel_err_bias=number("rel_err_bias", 0.0),
            explained=number("explained", max(0.0, 1.0 - rel_err)),
            tolerance=number("tolerance", float("nan")),
            exact=bool(exact),
            method=method,
            probes=None if probes is None else int(probes),
        )


@dataclass(frozen=True)
class KeptMarks:
    """What the kept weights were computed from: the model after ``end_step`` optimizer steps, the first
    ``rows`` rows, and final weights of this CRC-32 (:func:`~lightning_dualform.store.format.weights_crc32`)."""

    end_step: int
    rows: int
    weight_final_crc32: int

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], where: str) -> "KeptMarks | None":
        """The marks a layer group's attributes hold, or None when any is missing.

        Raises:
            StoreError: a mark that is not an integer.
        """
        values = {}
        for key in MARKS:
            if key not in attrs:
                return None
            v = attrs[key]
            if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
                raise StoreError(f"{where}: attribute {key!r} is {v!r}, not an integer; the file is damaged.")
            values[key] = int(v)
        return cls(values["memory_end_step"], values["memory_rows"], values["memory_weight_final_crc32"])


@dataclass
class KeptWeights:
    """What a full certificate keeps for ``attend`` (float64): the memory's sums ``sum_rows c_w v k^T``
    ``(d_out, d_in)`` and ``sum_rows c_b v`` ``(d_out,)`` of a scalar rule, or the weights an element-wise rule's
    replay rebuilt; computed over the first ``rows`` rows for the model after ``end_step`` steps."""

    weight: np.ndarray
    bias: np.ndarray | None
    end_step: int
    rows: int

    @property
    def fits(self) -> bool:
        """Whether the store keeps them (up to :data:`~lightning_dualform.store.format.MEMORY_SUM_MAX_ELEMENTS`)."""
        return int(np.size(self.weight)) <= MEMORY_SUM_MAX_ELEMENTS

    @property
    def nbytes(self) -> int:
        return 8 * (int(np.size(self.weight)) + (int(np.size(self.bias)) if self.bias is not None else 0))


def kept_datasets(form: str) -> tuple[str, str]:
    """The datasets of the kept weights of a store of ``form`` (:data:`~lightning_dualform.store.format.FORMS`)."""
    return REPLAY_DATASETS if form == "element-wise" else MEMORY_SUM_DATASETS


def stored_tables_crc32(f: h5py.File, group: h5py.Group, n: int | None = None) -> int:
    """:func:`~lightning_dualform.store.format.tables_crc32` of a layer group's first ``n`` per-step tables as the
    file holds them now (default: the committed steps)."""
    n = int(f["committed_steps"][0]) if n is None else n
    ug = group["updates"]
    params = {p: {c: ug[p][c][:n] for c in ug[p]} for p in ("weight", "bias") if p in ug}
    return tables_crc32(f["update_step"][:n], ug["grad_scale"][:n], params)


def write_layer_certificate(
    path: str,
    layer: str,
    certificate: LayerCertificate,
    *,
    kept: KeptWeights | None = None,
    residual: tuple[np.ndarray, np.ndarray | None] | None = None,
    lock: WriterLock | None = None,
) -> None:
    """Write one layer's certificate into a store, or into every shard a DDP run's index names.

    Per file, one all-or-nothing write session (:mod:`._journal`) under the file's writer lock: the
    ``certificate_*`` attributes (any earlier certificate, the sketch of a finished run included, is replaced),
    the CRC-32 of the per-step tables as the file holds them, the ``kept`` weights with their marks (when they
    fit; older kept weights are removed otherwise) and, for a run recorded with ``exact=False``, the
    ``residual`` ``W_final - W_rebuilt`` (float32).

    Args:
        path: a complete store, or a DDP run's index file.
        layer: the layer's name.
        lock: the writer lock of ``path`` (or of one shard), already held by the caller, who releases it; every
            other file's lock is taken here and released after its write.

    Raises:
        StoreBusyError: another process writes a file.
        StoreError: a file is not a store, or has no such layer.
        OSError: the disk is full (the file keeps what it had).
    """
    from lightning_dualform.store.shards import read_shard_index

    files = read_shard_index(path, probe=False) or [path]
    nbytes = (kept.nbytes if kept is not None and kept.fits else 0) + (
        4 * sum(int(np.size(r)) for r in residual if r is not None) if residual is not None else 0)
    for file in files:
        held = lock is not None and os.path.abspath(file) == os.path.abspath(lock.path)
        with contextlib.nullcontext(lock) if held else WriterLock.acquire(file, f"certificate: writing {layer}") as lk:
            lk.set_phase(f"certificate: writing {layer}")
            with _journal.write_session(file, f"certificate of {layer}", reserve=nbytes + (64 << 10)) as f:
                _write(f, file, layer, certificate, kept, residual)


def _write(f: h5py.File, path: str, layer: str, certificate: LayerCertificate, kept: KeptWeights | None,
           residual: tuple[np.ndarray, np.ndarray | None] | None) -> None:
    """The certificate's attributes and datasets, inside a write session."""
    g = f["layers"].get(layer)
    if not isinstance(g, h5py.Group):
        raise StoreError(f"{path}: no layer {layer!r} to certify.")
    if "weight_final" not in g:
        raise StoreError(f"{path}: layer {layer!r} has no final weights; a certificate needs a complete store.")
    clear_certificate(g)
    _h5.set_attrs(g, certificate.to_attrs())
    g.attrs[TABLES_CRC32] = stored_tables_crc32(f, g)
    attrs = {k: _h5.attr(v) for k, v in f.attrs.items()}
    names = kept_datasets(store_form(str(attrs.get("update_rule", "sgd")), bool(attrs.get("optimizer_exact", True))))
    if kept is not None and kept.fits:  # attend's `dual` reuses them instead of summing or replaying the rows
        _h5.replace(g, names[0], np.asarray(kept.weight, dtype=np.float64))
        if kept.bias is not None:
            _h5.replace(g, names[1], np.asarray(kept.bias, dtype=np.float64))
        g.attrs["memory_end_step"] = int(kept.end_step)
        g.attrs["memory_rows"] = int(kept.rows)
        g.attrs["memory_weight_final_crc32"] = weights_crc32(np.asarray(g["weight_final"][()], dtype=np.float32))
    if residual is not None:
        _h5.replace(g, "weight_residual", np.asarray(residual[0], dtype=np.float32))
        if residual[1] is not None:
            _h5.replace(g, "bias_residual", np.asarray(residual[1], dtype=np.float32))
    write_bindings(f, g)  # what the certificate was computed from: the state, the attributes


def clear_certificate(group: h5py.Group) -> None:
    """Remove a layer group's certificate (inside a write session): its attributes, the tables' CRC-32 and the
    kept weights with their marks (a resume does so before it changes any row)."""
    for key in [k for k in group.attrs if k.startswith(PREFIX) or k in MARKS]:
        del group.attrs[key]
    for name in MEMORY_SUM_DATASETS + REPLAY_DATASETS:
        if name in group:
            del group[name]


def read_certificates(path: str) -> dict[str, LayerCertificate]:
    """Each layer's certificate as one store file holds it (layers without one are left out).

    Raises:
        StoreError: the file is not a store, or a certificate attribute is damaged.
    """
    from lightning_dualform.store.reader import StoreReader

    with StoreReader(path, probe=False) as store:
        return {n: store.layer(n).certificate for n in store.layers if store.layer(n).certificate is not None}


def missing_certificate(store: "StoreView") -> list[str]:
    """Layers of a complete store whose certificate is not written (empty for an unfinished store: its
    certificate comes at fit end)."""
    if not store.complete:
        return []
    return [n for n in store.layers if store.layer(n).certificate is None]
