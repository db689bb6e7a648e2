"""A store's root attributes as one typed object: written, read, checked and merged in one place.

HDF5 keeps them as scalars and JSON text (``_h5.set_attrs``); :meth:`StoreMetadata.to_attrs` writes them,
:meth:`StoreMetadata.from_attrs` reads and checks what a file holds (a missing attribute takes its default,
as older stores lack the newer ones; a wrong type is a :class:`~lightning_dualform.errors.StoreError`), and
:meth:`StoreMetadata.merge` combines the shards of a DDP run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from lightning_dualform._float32_products import loosest
from lightning_dualform.errors import StoreError
from lightning_dualform.store.format import FORMAT_NAME, FORMAT_VERSION, MIN_FORMAT_VERSION, ROW_DTYPES, UPDATE_RULES

#: ``status``: being written (or stopped early: the store ends at its last committed step), or finished by fit.
STATUSES = ("recording", "complete")
#: ``gradient_clip_algorithm``: Lightning's two, or each step's factor measured (``DualFormRecorder``)
CLIP_ALGORITHMS = ("norm", "value", "measured")


def clip_algorithm_name(value: Any) -> str:
    """``gradient_clip_algorithm`` as stored: ``"norm"``, ``"value"`` or ``"measured"``, whether given as
    Lightning's ``GradClipAlgorithmType`` or as text (stores written before this was normalised hold
    ``"GradClipAlgorithmType.NORM"``: it reads as ``"norm"``)."""
    text = str(getattr(value, "value", value))
    if text.startswith("GradClipAlgorithmType."):
        text = text.split(".", 1)[1]
    return text.lower()


@dataclass
class StoreMetadata:
    """What a store says about itself and the run that wrote it (see ``docs/store-format.md``)."""

    row_dtype: str = "float32"
    compression: str = "none"
    status: str = "recording"
    layer_order: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    created: str = ""
    recorded_by: str = "DualFormCallback"
    library_version: str = ""
    torch_version: str = ""
    lightning_version: str = ""
    model_class: str = ""
    optimizer: dict[str, Any] = field(default_factory=dict)
    optimizer_exact: bool = True
    #: the optimizer's update rule (``optim.RULES``), or ``"plain"`` for an optimizer without one; stores of
    #: format version 1 (SGD only) lack it
    update_rule: str = "sgd"
    inexact_causes: list[str] = field(default_factory=list)
    gradient_clip_val: float = 0.0
    gradient_clip_algorithm: str = "norm"  # "measured": a DualFormRecorder measured each step's factor
    accumulate_grad_batches: int = 1  # 0: not known (a loop of the user's own)
    precision: str = "32-true"
    float32_products: str = "ieee"  # stores from before it was recorded count as IEEE float32
    rank: int = 0
    world_size: int = 1
    final_step: int | None = None  # set when fit finishes
    epochs: int | None = None
    dropped_layers: dict[str, str] = field(default_factory=dict)
    #: attributes this version does not know (a newer writer's), kept as read
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.gradient_clip_algorithm, str) or hasattr(self.gradient_clip_algorithm, "value"):
            self.gradient_clip_algorithm = clip_algorithm_name(self.gradient_clip_algorithm)

    def to_attrs(self) -> dict[str, Any]:
        """The attributes to write (containers as JSON by ``_h5.set_attrs``; unset optional ones left out)."""
        out: dict[str, Any] = {"format": FORMAT_NAME}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = value
        return {**self.extra, **out}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], path: str) -> "StoreMetadata":
        """Read (decoded) root attributes, checking each type.

        Raises:
            StoreError: not a store, a newer format, or an attribute of the wrong type or value.
        """
        if attrs.get("format") != FORMAT_NAME:
            raise StoreError(
                f"{path}: an HDF5 file but not a lightning-dualform store (no format='{FORMAT_NAME}' attribute)."
            )
        known = {f.name: f for f in fields(cls) if f.name != "extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, raw in attrs.items():
            if key == "format":
                continue
            if key not in known:
                extra[key] = raw
                continue
            values[key] = _typed(key, raw, _kind(known[key].type), path)
        meta = cls(**values, extra=extra)
        if meta.format_version > FORMAT_VERSION:
            raise StoreError(
                f"{path}: store format version {meta.format_version} is newer than this library reads "
                f"({FORMAT_VERSION}); upgrade lightning-dualform."
            )
        if meta.format_version < MIN_FORMAT_VERSION:
            raise StoreError(f"{path}: invalid store format version {meta.format_version}.")
        if meta.update_rule not in UPDATE_RULES:
            raise StoreError(
                f"{path}: unknown update rule {meta.update_rule!r} (this library knows {', '.join(UPDATE_RULES)}); "
                "the file is damaged or from a newer library."
            )
        if meta.row_dtype not in ROW_DTYPES:
            raise StoreError(f"{path}: unknown row dtype {meta.row_dtype!r}.")
        if meta.status not in STATUSES:
            raise StoreError(f"{path}: unknown status {meta.status!r} (expected one of {STATUSES}).")
        if meta.world_size < 1 or not 0 <= meta.rank < meta.world_size:
            raise StoreError(
                f"{path}: rank {meta.rank} of world size {meta.world_size} is impossible; the file is damaged."
            )
        return meta

    @classmethod
    def merge(cls, parts: list["StoreMetadata"]) -> "StoreMetadata":
        """The shards of one DDP run as one store: rank 0's description, complete only when every shard
        is, and the loosest float32 rounding any rank trained with."""
        first = parts[0]
        merged = cls(**{f.name: getattr(first, f.name) for f in fields(cls)})
        merged.status = "complete" if all(p.status == "complete" for p in parts) else "recording"
        merged.float32_products = loosest([p.float32_products for p in parts])
        merged.optimizer_exact = all(p.optimizer_exact for p in parts)
        return merged


def _kind(annotation: Any) -> str:
    text = str(annotation)
    for kind in ("dict", "list", "bool", "float", "int", "str"):
        if text.startswith(kind):
            return kind
    raise TypeError(annotation)  # pragma: no cover - a field of a new type


def _typed(key: str, raw: Any, kind: str, path: str) -> Any:
    """One attribute as ``kind``, or a StoreError that names it."""
    def bad(why: str) -> StoreError:
        return StoreError(f"{path}: root attribute {key!r} is {raw!r}: {why}; the file is damaged.")

    if kind in ("dict", "list"):
        if isinstance(raw, str):
            try:
                raw = json.loads(raw) if raw else ({} if kind == "dict" else [])
            except (ValueError, RecursionError):  # (RecursionError: JSON nested past Python's stack)
                raise bad("not JSON") from None
        want = dict if kind == "dict" else list
        if not isinstance(raw, want):
            raise bad(f"expected a JSON {kind}")
        return raw
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        raise bad("expected a boolean")
    if kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise bad("expected an integer")
        return raw
    if kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise bad("expected a number")
        return float(raw)
    if not isinstance(raw, str):
        raise bad("expected text")
    return raw
