"""The HDF5 store: its layout (:mod:`.format`), encodings (:mod:`.filters`), the writer and its thread
(:mod:`.writer`, :mod:`.skeleton`, :mod:`.truncate`, :mod:`.background`), query sets (:mod:`.query_writer`),
a layer's certificate (:mod:`.certificate`), readers (:mod:`.reader`, :mod:`.validate`) and the shards of a
DDP run (:mod:`.shards`).

The layout is documented in ``docs/store-format.md``; this package is its only writer and the library's
only way in. Nothing here knows about Lightning.

Names are imported on first use (:mod:`lightning_dualform._lazy`): the private modules (the probe's, the
lock's) load without the readers and writer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_dualform._lazy import lazy_exports

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ROW_COLUMNS",
    "ROW_DTYPES",
    "Coefficients",
    "LayerCertificate",
    "LayerReader",
    "LayerSpec",
    "QuerySet",
    "ShardedStoreReader",
    "StepRows",
    "StoreReader",
    "StoreView",
    "StoreWriter",
    "WriterLock",
    "check_replaceable",
    "open_store",
    "read_shard_index",
    "side_files",
    "write_shard_index",
]

if TYPE_CHECKING:
    from lightning_dualform.store._lock import WriterLock
    from lightning_dualform.store._repair import check_replaceable, side_files
    from lightning_dualform.store.certificate import LayerCertificate
    from lightning_dualform.store.format import (
        FORMAT_NAME,
        FORMAT_VERSION,
        ROW_COLUMNS,
        ROW_DTYPES,
        LayerSpec,
        StepRows,
    )
    from lightning_dualform.store.reader import Coefficients, LayerReader, QuerySet, StoreReader, StoreView
    from lightning_dualform.store.shards import ShardedStoreReader, open_store, read_shard_index, write_shard_index
    from lightning_dualform.store.writer import StoreWriter

_WHERE = {
    "WriterLock": "lightning_dualform.store._lock",
    **dict.fromkeys(("check_replaceable", "side_files"), "lightning_dualform.store._repair"),
    **dict.fromkeys(("FORMAT_NAME", "FORMAT_VERSION", "ROW_COLUMNS", "ROW_DTYPES", "LayerSpec", "StepRows"),
                    "lightning_dualform.store.format"),
    **dict.fromkeys(("Coefficients", "LayerReader", "QuerySet", "StoreReader", "StoreView"),
                    "lightning_dualform.store.reader"),
    **dict.fromkeys(("ShardedStoreReader", "open_store", "read_shard_index", "write_shard_index"),
                    "lightning_dualform.store.shards"),
    "StoreWriter": "lightning_dualform.store.writer",
    "LayerCertificate": "lightning_dualform.store.certificate",
}
__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
