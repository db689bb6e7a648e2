"""``LayerSource``: what a pass over a layer's memory reads, declared once.

Three readers answer it interchangeably: :class:`~lightning_dualform.store.reader.LayerReader` (one file),
:class:`~lightning_dualform.store.shards.ShardedLayerReader` (a DDP run's shards read as one layer) and
:class:`~lightning_dualform.attend.cache.CachedLayer` (either of them, its blocks kept in memory). The passes
of ``attend/`` (and the statistics, the replay, the certificate's sums) are written against this protocol,
not against one reader, as zarr-python's array code is written against its abstract ``Store``.

It is a structural :class:`typing.Protocol`: a reader conforms by having these members (checked by
``tests/test_source.py``, which also runs a pass over a layer that offers nothing else), not by inheriting from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from lightning_dualform.optim import OptimizerState
    from lightning_dualform.store.certificate import LayerCertificate
    from lightning_dualform.store.conv import ConvGeometry
    from lightning_dualform.store.reader import Coefficients


@runtime_checkable
class LayerSource(Protocol):
    """One tracked layer of a store, as a pass reads it.

    Rows are numbered ``0..n_rows`` in step order (a DDP run's shards: step-major, then rank). Keys and values
    come decoded to float32; metadata columns (``step``, ``epoch``, ``index``, ``position``, ``label``) as
    integers, checked against the file's own tables.
    """

    # -- what the layer is ---------------------------------------------------------------------------------
    name: str
    kind: str  # "linear" | "conv" | "embedding"
    d_in: int  # key width (a convolution: C_in x prod(kernel))
    d_out: int
    has_bias: bool
    n_rows: int  # committed rows (virtual rows of a convolution stored as maps)
    exact: bool  # the recorder could record this layer exactly (else the store keeps a residual)
    attrs: dict[str, Any]  # the layer's stored attributes (the certificate's among them)
    certificate: LayerCertificate | None  # the certificate, typed (None where none was written)
    store: Any  # the store it belongs to (``path``, ``form``, ``last_step``, ``complete`` ...)
    #: the convolution whose compact blocks :meth:`read_maps` returns, or None: the reader serves unfolded rows
    #: only (a linear layer, an embedding, a convolution of an older format, a DDP run's shards)
    geometry: ConvGeometry | None

    # -- rows ----------------------------------------------------------------------------------------------
    def read(self, start: int, stop: int, columns: tuple[str, ...] = ...) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of ``columns``: ``keys`` ``(B, d_in)``, ``values`` ``(B, d_out)``, metadata ``(B,)``."""
        ...

    def read_maps(self, start: int, stop: int, columns: tuple[str, ...] = ()) -> dict[str, Any]:
        """A convolution's compact block behind rows ``start:stop`` (only where :attr:`geometry` is set)."""
        ...

    def rows_before(self, step: int) -> int:
        """Rows recorded before optimizer step ``step``: the memory of the model after ``step`` steps."""
        ...

    # -- the optimizer's tables ----------------------------------------------------------------------------
    def end_step(self, at_step: int | None = None) -> tuple[int, int]:
        """``(first step, end step)`` of the model after ``at_step`` steps (default: the last)."""
        ...

    def updates(self) -> dict[str, Any]:
        """The committed per-step tables (``step``, ``grad_scale``, a column dict per parameter)."""
        ...

    def coefficients(self, at_step: int | None = None) -> Coefficients:
        """Per-step scalars ``c_w``, ``c_b`` and the base factors of a scalar rule's store."""
        ...

    def base_weights(
        self, at_step: int | None = None, coef: Coefficients | None = None, with_residual: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """What the memory does not hold, ``a W_0 (+ b buf_0)`` and the bias's (fresh float64 arrays)."""
        ...

    def initial_state(self, pname: str = "weight") -> OptimizerState:
        """An element-wise rule's optimizer state at the store's first step."""
        ...

    def to_view(self, a: np.ndarray) -> np.ndarray:
        """A parameter-shaped array as the ``(d_out, d_in)`` matrix the rows multiply."""
        ...

    def to_param(self, a: np.ndarray) -> np.ndarray:
        """A ``(d_out, d_in)`` matrix in the parameter's own shape."""
        ...

    def stored_memory_sums(self, end_step: int, n_rows: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The certificate's kept sums (or replayed weights) for exactly these rows, or None."""
        ...

    # -- weights -------------------------------------------------------------------------------------------
    @property
    def weight_init(self) -> np.ndarray: ...

    @property
    def bias_init(self) -> np.ndarray | None: ...

    @property
    def weight_final(self) -> np.ndarray | None: ...

    @property
    def bias_final(self) -> np.ndarray | None: ...

    @property
    def weight_residual(self) -> np.ndarray | None: ...

    @property
    def bias_residual(self) -> np.ndarray | None: ...
