"""The store's layout as data: format name and version, row columns, chunk sizes, layer specs.

``docs/store-format.md`` describes the layout for readers outside this library; this module is the one
place the library spells it. Nothing here opens a file.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_dualform.optim import RULES, Column, OptimizerState, UpdateRule

FORMAT_NAME = "lightning-dualform"
#: Version 2 names the optimizer's update rule (root attribute ``update_rule``), keeps each rule's own
#: per-step columns and, for rules with state, the optimizer state before the first step (``state/``).
#: Version 1 stores (``torch.optim.SGD`` only) are version 2 stores of the rule ``"sgd"``.
#: Version 3 keeps a convolution's input maps instead of its unfolded key rows (layer attribute
#: ``layout = "maps"``, ``store/conv.py``); a version-2 reader would misread them. Other layers are unchanged.
FORMAT_VERSION = 3
#: The oldest format this library reads.
MIN_FORMAT_VERSION = 1

ROW_DTYPES = ("float32", "float16", "bfloat16")
#: Layer kinds stored as input maps (``layout = "maps"``) from format 3 on.
CONV_KINDS = ("conv1d", "conv2d")
#: the kinds of layer a store records (``docs/store-format.md``, "Layer kinds")
LAYER_KINDS = ("linear", "conv1d", "conv2d", "embedding")
#: Per-row metadata columns: name -> numpy dtype.
ROW_COLUMNS = {"step": np.int64, "epoch": np.int32, "index": np.int64, "position": np.int32, "label": np.int64}
#: The certificate's sums of a layer's memory, ``sum_rows c_w v k^T`` and ``sum_rows c_b v`` (float64), kept for
#: ``attend`` (stored only up to this many weight elements: 128 MB) and removed whenever the rows change.
MEMORY_SUM_DATASETS = ("memory_weight", "memory_bias")
MEMORY_SUM_MAX_ELEMENTS = 1 << 24


def weights_crc32(w: np.ndarray) -> int:
    """CRC-32 of a float32 weight matrix as stored: ties the certificate's sums to the final weights."""
    return zlib.crc32(np.ascontiguousarray(w, dtype=np.float32).tobytes())


def tables_crc32(update_step: np.ndarray, grad_scale: np.ndarray, params: dict[str, dict[str, np.ndarray]]) -> int:
    """CRC-32 of a layer's per-step tables (``update_step``, ``grad_scale``, then each parameter's columns in
    name order, as int64/float64/bool bytes, whatever the update rule's columns are): ties the certificate's
    sums, which were computed with them, to the tables that answers at earlier steps use."""
    crc = zlib.crc32(np.ascontiguousarray(update_step, dtype=np.int64).tobytes())
    crc = zlib.crc32(np.ascontiguousarray(grad_scale, dtype=np.float64).tobytes(), crc)
    for pname in ("weight", "bias"):
        if pname in params:
            for col in sorted(params[pname]):
                arr = np.asarray(params[pname][col])
                arr = arr.astype(np.float64) if arr.dtype.kind == "f" else arr.astype(np.bool_)
                crc = zlib.crc32(np.ascontiguousarray(arr).tobytes(), crc)
    return crc


#: The rebuilt weights an element-wise rule's replay gives at the certificate's end step (float64), kept for
#: ``attend``'s ``dual`` under the same conditions as the memory sums (which only scalar rules have).
REPLAY_DATASETS = ("replay_weight", "replay_bias")

#: per-step table columns of SGD stored as float64 (the others are bool)
FLOAT_PARAM_COLUMNS = ("lr", "momentum", "dampening", "weight_decay")

#: ``update_rule`` of a run whose optimizer has no exact rule (recorded with ``exact=False``): its table keeps
#: the learning rate alone, and the store rebuilds ``p_0 - sum_s lr_s g_s`` plus the stored residual.
PLAIN_RULE = "plain"
PLAIN_COLUMNS = (Column("lr", np.float64), Column("applied", np.bool_))
#: Rules whose ``Q_s`` is a scalar at every step (the per-step coefficients ``c_s`` of ``optim/sgd.py``).
SCALAR_RULES = ("sgd", "asgd")
#: Group of a layer that holds the optimizer state before the first recorded step (rules other than SGD).
STATE_GROUP = "state"
UPDATE_RULES = (*RULES, PLAIN_RULE)


#: How a store rebuilds a layer (``StoreView.form``): per-step scalar coefficients (SGD, ASGD), the replay of
#: an element-wise rule (Adam, AdamW, ...: ``attend/replay.py``), or the plain sum of a run recorded with
#: ``exact=False`` (plus its stored residual).
FORMS = ("scalar", "element-wise", "plain")


def store_form(update_rule: str, optimizer_exact: bool) -> str:
    """The :data:`FORMS` entry of a store with this ``update_rule`` and ``optimizer_exact``."""
    if not optimizer_exact or update_rule == PLAIN_RULE:
        return "plain"
    return "scalar" if update_rule in SCALAR_RULES else "element-wise"


def table_columns(update_rule: str) -> tuple[Column, ...]:
    """The per-step columns of a parameter's table under ``update_rule`` (``applied`` last)."""
    if update_rule == PLAIN_RULE:
        return PLAIN_COLUMNS
    return RULES[update_rule].columns


def rule_named(update_rule: str) -> UpdateRule | None:
    """The rule of a store's ``update_rule`` (``None`` for ``"plain"``)."""
    return None if update_rule == PLAIN_RULE else RULES[update_rule]
# chunk lengths of 1-D columns: HDF5 allocates whole chunks, so small stores stay small
META_CHUNK = 4096
TABLE_CHUNK = 512
#: automatic chunk size of keys and values: big enough that per-chunk costs vanish, small enough that a
#: chunk is checksummed and written while its rows are still in the CPU's cache (512 KiB trains faster than
#: 3 MB chunks: docs/benchmarks.md, "Training overhead")
CHUNK_BYTES = 512 * 1024


def chunk_rows_for(key_bytes: int, value_bytes: int, chunk_rows: int | None = None) -> int:
    """Rows per chunk of a layer's keys and values: ``chunk_rows`` when given, else the power of two
    nearest to ``CHUNK_BYTES`` over the wider row (64 to 65,536 rows)."""
    if chunk_rows is not None:
        return int(chunk_rows)
    rows = CHUNK_BYTES / max(key_bytes, value_bytes, 1)
    return int(min(65536, max(64, 2 ** round(math.log2(rows)))))



@dataclass
class LayerSpec:
    """What the store needs to know about one tracked layer before recording starts."""

    name: str
    kind: str  # "linear", "conv1d", "conv2d", "embedding"
    d_in: int
    d_out: int
    has_bias: bool
    weight_init: np.ndarray  # (d_out, d_in), float32: the layer's weight viewed as a linear map
    bias_init: np.ndarray | None
    extra: dict[str, Any] = field(default_factory=dict)  # kind-specific attributes (conv geometry ...)
    weight_buffer_init: np.ndarray | None = None  # SGD's momentum buffers that exist before the first step
    bias_buffer_init: np.ndarray | None = None
    #: the weight parameter's own shape (conv: 3-D/4-D; embedding: (num_embeddings, dim)); the optimizer
    #: state is kept in it
    weight_shape: tuple[int, ...] | None = None
    #: the optimizer state before the first recorded step, in the parameters' own shapes (rules other than SGD)
    weight_state: OptimizerState | None = None
    bias_state: OptimizerState | None = None
    #: dtype the state's arrays are stored in (the parameters' dtype: float32, or float64 for 64-true runs)
    state_dtype: str = "float32"

    def fingerprint(self) -> list:
        # a convolution's layout too: a store of unfolded rows (format 2) cannot continue with maps
        return [self.kind, self.d_in, self.d_out, self.has_bias, *(["maps"] if self.kind in CONV_KINDS else [])]


@dataclass
class StepRows:
    """The rows of one layer for one optimizer step (already on the host, float32)."""

    keys: np.ndarray  # (n, d_in)
    values: np.ndarray  # (n, d_out)
    index: np.ndarray  # (n,) dataset index, -1 when unknown
    position: np.ndarray  # (n,) position inside the example
    label: np.ndarray  # (n,) label, -1 when none
    step: int = 0
    epoch: int = 0
    #: a convolution's maps (layout ``"maps"``): their spatial size; ``keys`` are then pixel rows ``(E * P, C_in)``,
    #: ``values`` ``(E * L, d_out)`` and the metadata columns ``(E,)``, one entry per (example, call)
    map_size: tuple[int, ...] | None = None


def settings_of(
    specs: list[LayerSpec], row_dtype: str, compression: str | None, update_rule: str = "sgd"
) -> dict[str, Any]:
    """What must match between a store and a run that continues it."""
    return {
        "layers": {s.name: s.fingerprint() for s in specs},
        "row_dtype": row_dtype,
        "compression": compression or "none",
        "update_rule": update_rule,
    }




#: ``format`` attribute of the small file that names the per-rank stores of a DDP run.
SHARDS_FORMAT = "lightning-dualform-shards"
