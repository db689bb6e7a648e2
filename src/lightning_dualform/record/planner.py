"""The store-size planner: bytes a run will write, estimated from its first optimizer step.

``estimate`` is pure arithmetic; the callback feeds it the rows the first step produced per layer and
the run's length, prints the plan, and :func:`check_disk` refuses to start when it does not fit on the
disk with a safety margin.

The margin (:data:`SAFETY_MARGIN` of the plan plus :data:`SAFETY_BYTES`) covers what the estimate leaves
out or cannot know: HDF5's own metadata (chunk indexes, object headers: well under 1% here), the space
the writer reserves ahead of each write so that HDF5 never meets a full disk (a chunk per column plus
1 MiB, and up to 64 MiB ahead while the disk allows), the write-session journals of the phases after
training (kilobytes), rows per step that vary (sequences of varying length), and other writers on the
same disk. A run once planned with 0.7% headroom hit a full disk near its end; 5% and 64 MiB is more than
every measured overshoot (``docs/benchmarks.md``).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field

from lightning_dualform.errors import DiskSpaceError
from lightning_dualform.store.format import META_CHUNK, MEMORY_SUM_MAX_ELEMENTS, ROW_COLUMNS, chunk_rows_for

#: free space required beyond the plan: this share of it ...
SAFETY_MARGIN = 0.05
#: ... plus this many bytes
SAFETY_BYTES = 64 << 20

#: bytes of the per-row metadata columns (step, epoch, index, position, label)
META_BYTES = 8 + 4 + 8 + 4 + 8


@dataclass
class LayerPlan:
    name: str
    rows_per_step: int
    bytes_per_row: int
    bytes_per_epoch: int
    chunk_rows: int = 1024
    #: a convolution stored as maps: virtual rows per map (its metadata is per map); 1 otherwise
    rows_per_map: int = 1


@dataclass
class Plan:
    """What a run is expected to write."""

    steps_per_epoch: int
    epochs: float  # math.inf when the run has no end
    layers: list[LayerPlan] = field(default_factory=list)
    fixed_bytes: int = 0  # weights (initial and final), raw training inputs

    @property
    def bytes_per_epoch(self) -> int:
        return sum(lp.bytes_per_epoch for lp in self.layers)

    @property
    def total_bytes(self) -> float:
        """Bytes on disk, counting that HDF5 allocates whole chunks."""
        epochs = self.epochs if math.isfinite(self.epochs) else 1
        total = float(self.fixed_bytes)
        for lp in self.layers:
            rows = lp.rows_per_step * self.steps_per_epoch * epochs
            metas = rows / lp.rows_per_map
            data = lp.bytes_per_row - META_BYTES / lp.rows_per_map
            total += math.ceil(rows / lp.chunk_rows) * lp.chunk_rows * data
            total += math.ceil(metas / META_CHUNK) * META_CHUNK * META_BYTES
        return total

    def required_bytes(self, already_written: int = 0) -> float:
        """Free bytes the run needs: what it will still write plus the safety margin."""
        return max(0.0, self.total_bytes - already_written) * (1 + SAFETY_MARGIN) + SAFETY_BYTES

    def describe(self) -> str:
        if not self.steps_per_epoch:  # (not "0 B": the run's length is unknown, not nothing)
            per_step = ", ".join(f"{lp.name}: {_human(lp.bytes_per_row * lp.rows_per_step)}/step "
                                 f"({lp.rows_per_step} rows/step)" for lp in self.layers)
            return (f"store plan: {per_step}; the run's length is not known (a training loader without a length "
                    "and no max_steps, or a recorder without expected_steps), so the store's size and the free disk "
                    "are not checked ahead")
        per_layer = ", ".join(f"{lp.name}: {_human(lp.bytes_per_epoch)}/epoch ({lp.rows_per_step} rows/step)" for lp in self.layers)
        span = f"{self.epochs:g} epoch(s)" if math.isfinite(self.epochs) else "1 epoch (the run has no set end)"
        return f"store plan: {per_layer}; about {_human(self.total_bytes)} for {span}"


def row_bytes(kind: str, d_in: int, d_out: int, itemsize: int) -> int:
    key = 8 if kind == "embedding" else d_in * itemsize  # embeddings store a token id
    return key + d_out * itemsize + META_BYTES


def estimate(
    rows_per_step: dict[str, int],
    shapes: dict[str, tuple[str, int, int, bool]],
    itemsize: int,
    steps_per_epoch: int,
    epochs: float,
    input_bytes: int = 0,
    chunk_rows: int | None = None,
    memory_sums: bool = False,
    maps: dict[str, tuple[int, int, int]] | None = None,
) -> Plan:
    """Plan a run from the rows of one optimizer step.

    Args:
        rows_per_step: rows each layer produced in the first step.
        shapes: ``(kind, d_in, d_out, has_bias)`` per layer.
        itemsize: bytes per stored number (4 for float32, 2 for float16/bfloat16).
        steps_per_epoch: optimizer steps per epoch.
        epochs: epochs left to run (``math.inf`` for none set).
        input_bytes: raw training inputs, stored once per example.
        chunk_rows: rows per chunk of keys and values (``None``: the store's automatic size).
        memory_sums: the full certificate at fit end keeps the memory's float64 sums per layer.
        maps: ``(C_in, P, L)`` of each convolution stored as maps (``store/conv.py``): per map of ``L`` virtual
            rows, ``P`` pixel rows of ``C_in`` values and one metadata entry.
    """
    plan = Plan(steps_per_epoch=steps_per_epoch, epochs=epochs, fixed_bytes=input_bytes)
    for name, (kind, d_in, d_out, has_bias) in shapes.items():
        per_row = row_bytes(kind, d_in, d_out, itemsize)
        rows = int(rows_per_step.get(name, 0))
        chunk = chunk_rows_for(8 if kind == "embedding" else d_in * itemsize, d_out * itemsize, chunk_rows)
        per_map = 1
        if maps and name in maps:
            c_in, pixels, per_map = maps[name]
            per_row = math.ceil((pixels * c_in * itemsize + META_BYTES) / per_map) + d_out * itemsize
            chunk = chunk_rows_for(c_in * itemsize, d_out * itemsize, chunk_rows)
        plan.layers.append(LayerPlan(name, rows, per_row, rows * steps_per_epoch * per_row, chunk, per_map))
        plan.fixed_bytes += 2 * 4 * (d_in * d_out + (d_out if has_bias else 0))  # initial and final weights
        if memory_sums and d_in * d_out <= MEMORY_SUM_MAX_ELEMENTS:
            plan.fixed_bytes += 8 * (d_in * d_out + (d_out if has_bias else 0))  # the certificate's float64 sums
    return plan


def free_bytes(directory: str) -> int:
    return shutil.disk_usage(directory).free


def check_disk(plan: Plan, store_path: str, already_written: int = 0, who: str = "DualFormCallback", *,
               margin: bool = True) -> None:
    """Refuse a run whose plan (with the safety margin, unless ``margin`` is False) does not fit in the free space
    of the store's disk.

    Args:
        plan: the run's plan (:func:`estimate`).
        store_path: the store; its folder's file system is checked.
        already_written: bytes of the store already on disk (a resumed run only adds the rest).
        margin: add :data:`SAFETY_MARGIN` and :data:`SAFETY_BYTES` (the recording engine checks without them:
            the writer's disk reservation stops a run cleanly where the estimate falls short).

    Raises:
        DiskSpaceError: it does not fit (the message says how much is needed, free and what to do).
    """
    directory = os.path.dirname(os.path.abspath(store_path))
    free = free_bytes(directory)
    needed = plan.required_bytes(already_written) if margin else max(0.0, plan.total_bytes - already_written)
    if needed > free:
        extra = f", plus a safety margin of {100 * SAFETY_MARGIN:.0f}% and {SAFETY_BYTES >> 20} MiB" if margin else ""
        raise DiskSpaceError(
            f"{who}: the store {store_path} needs about {needed / 1e9:.2f} GB for this run ({plan.describe()}{extra}) "
            f"but only {free / 1e9:.2f} GB are free in {directory}. Free space, choose another path, narrow `layers=`, "
            "use dtype='float16' or compression='lzf', or pass check_disk=False."
        )


def slow_writer_message(who: str, blocked: float, elapsed: float, path: str, dtype: str,
                        compression: str | None) -> str:
    """What to say when training waited ``blocked`` of the last ``elapsed`` seconds for the store writer: the
    store's settings cost more than the rows are worth, and which to change first."""
    advice = []
    if compression:
        advice.append("compression costs the most (it runs inside HDF5's filter pipeline on one thread): use "
                      "compression=None and compress the finished store if needed")
    if dtype == "float32":
        advice.append("dtype='float16' halves the bytes")
    advice += ["`layers=[...]` tracks fewer layers", "a faster disk helps"]
    advice[0] = advice[0][0].upper() + advice[0][1:]
    return (f"{who}: training waited {blocked:.1f} s of the last {elapsed:.1f} s for the store writer ({path}, "
            f"{dtype} rows, compression={compression!r}): the rows come faster than they can be written. "
            f"{'; '.join(advice)}.")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


assert set(ROW_COLUMNS) == {"step", "epoch", "index", "position", "label"}  # META_BYTES counts these
