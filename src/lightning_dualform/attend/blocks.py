"""Reading a layer's rows block by block for a pass: block sizes, each rank's share of the blocks, the
prefetch thread that reads block ``i + 1`` (and on CUDA copies it through pinned memory on a side stream) while
block ``i`` is computed, and a convolution's compact blocks unfolded where they are multiplied.

A convolution stored as maps (format 3) is read as its *compact block*: the input maps the block's virtual rows
lie in (:meth:`LayerReader.read_maps <lightning_dualform.store.reader.LayerReader.read_maps>`), about
``1 / prod(kernel)`` of the unfolded keys' bytes, which is what crosses to the compute device (and what a device
block cache keeps). There one ``F.unfold`` of the padded maps (:func:`~lightning_dualform.layers.unfold_maps`,
every ``padding_mode`` applied with ``F.pad``) gives the key rows; the unfolding copies values, so the keys equal
the host's numpy unfolding bit for bit. Block sizes still count virtual rows."""

from __future__ import annotations

import dataclasses
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from lightning_dualform.attend.cache import CachedLayer, Rows, pass_maps, pass_rows
from lightning_dualform.layers import unfold_maps
from lightning_dualform.store.conv import ConvGeometry
from lightning_dualform.store.source import LayerSource

#: automatic block size: keys and values of about this many float32 bytes per block ...
BLOCK_BYTES = 96 * 2**20
#: ... and at most this many bytes of scores per block and query chunk
SCORE_BYTES = 256 * 2**20


#: blocks a pass reads ahead of the one it multiplies. One is enough to overlap the next block's read with this
#: block's products; each more costs a block's memory and gains nothing once the reads keep up (benchmarks/
#: attend_memory.py). A pass holds at most this many blocks plus the one in use, whatever the layer's size.
READ_AHEAD = 1


class Prefetcher:
    """Reads blocks ``[start, stop)`` of a layer on a background thread, ``depth`` blocks ahead.

    ``make(start, stop)`` runs on the thread and returns the block with its arrays on the host: a dict of them,
    or a dataclass (a :class:`~lightning_dualform.attend.kernels.Block`) whose fields hold them, nested dicts and
    dataclasses included (a :class:`CompactKeys`). Every numpy array in it is moved to the compute device, then
    ``finish`` runs (still on the thread, on the device: e.g. :meth:`CompactKeys.unfold`).

    At most ``depth + 1`` blocks are alive at once: the one the consumer holds and those read ahead. The reader
    takes a slot before it reads a block, and the consumer gives it back when it asks for the next one (it is
    done with the last then), so that the memory of a pass stays bounded by the block size whatever the layer's
    size, even when the reads outrun the products.

    On CUDA each array goes through pinned host memory and a non-blocking copy on a side stream; the
    consumer waits on the block's event, so copies overlap the compute stream. The thread holds the GIL
    only inside h5py and numpy calls; torch's matrix products release it.
    """

    _DONE = object()

    def __init__(
        self, make: Callable[[int, int], Any], n_rows: int, block_rows: int, device: torch.device,
        depth: int | None = None, share: tuple[int, int] = (0, 1), finish: Callable[[Any], Any] | None = None,
    ) -> None:
        depth = READ_AHEAD if depth is None else depth
        if depth < 1:
            raise ValueError(f"Prefetcher(depth={depth}): read at least one block ahead.")
        self._make = make
        self.moved_bytes = 0  # host arrays handed to the device so far
        self._finish = finish  # on this thread, on the device (the side stream on CUDA): e.g. unfold a block's maps
        self._bounds = share_of([(s, min(s + block_rows, n_rows)) for s in range(0, n_rows, block_rows)], *share)
        self._device = device
        self._slots = threading.Semaphore(depth + 1)  # blocks alive: those read ahead and the consumer's
        self._q: queue.Queue = queue.Queue()  # bounded by the slots
        self._stop = threading.Event()
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name="dualform-prefetch", daemon=True)
        self._thread.start()

    def _to_device(self, host: Any) -> tuple[Any, Any]:
        self.moved_bytes += host_bytes(host)
        if self._stream is None:
            out = _map_arrays(host, torch.from_numpy)
            return (self._finish(out) if self._finish is not None else out), None

        def move(a: np.ndarray) -> torch.Tensor:
            src = torch.from_numpy(a)
            # The caching host allocator keeps a pinned block alive until the copy that reads it
            # has finished, so a fresh pinned tensor per block is safe and cheap after the first.
            pinned = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            pinned.copy_(src)
            return pinned.to(self._device, non_blocking=True)

        with torch.cuda.stream(self._stream):
            out = _map_arrays(host, move)
            if self._finish is not None:
                out = self._finish(out)
            event = torch.cuda.Event()
            event.record(self._stream)
        return out, event

    def _slot(self) -> bool:
        """Wait for a free slot (False when the pass was closed meanwhile)."""
        while not self._stop.is_set():
            if self._slots.acquire(timeout=0.1):
                return True
        return False

    def _run(self) -> None:
        try:
            for start, stop in self._bounds:
                if not self._slot():
                    return
                self._q.put(self._to_device(self._make(start, stop)))
            self._q.put(self._DONE)
        except BaseException as err:  # handed to the consumer, which re-raises it
            self._q.put(err)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._q.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            block, event = item
            del item
            if event is not None:
                self._wait(block, event)
            yield block
            # the consumer asks for the next block: it is done with this one (this frame's reference goes first)
            del block
            self._slots.release()

    def _wait(self, block: Any, event: Any) -> None:
        """Make the current CUDA stream wait for ``block``'s copies (made on the side stream)."""
        current = torch.cuda.current_stream(self._device)
        current.wait_event(event)
        for t in _tensors(block):
            if t.is_cuda:
                t.record_stream(current)  # allocated on the side stream, used on this one

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _map_arrays(obj: Any, fn: Callable[[np.ndarray], Any]) -> Any:
    """``obj`` with ``fn`` applied to every numpy array in it: a dict's values (a new dict), a dataclass's
    fields (set in place), nested; anything else as it is."""
    if isinstance(obj, np.ndarray):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_arrays(v, fn) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if v is not None and not isinstance(v, (int, float, str, torch.Tensor)):
                setattr(obj, f.name, _map_arrays(v, fn))
        return obj
    return obj


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``obj`` (as :func:`_map_arrays` walks it)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name))


def share_of(bounds: list[tuple[int, int]], rank: int, world: int) -> list[tuple[int, int]]:
    """Rank ``rank``'s contiguous share of the blocks (sizes differ by at most one block)."""
    per, extra = divmod(len(bounds), world)
    start = rank * per + min(rank, extra)
    return bounds[start : start + per + (rank < extra)]



def progress_bar(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", unit_scale=True)



# ------------------------------------------------------------------------------------------------------
# a convolution's compact blocks
# ------------------------------------------------------------------------------------------------------
def maps_geometry(layer: LayerSource) -> ConvGeometry | None:
    """The geometry of a layer whose passes read compact blocks: a convolution stored as maps in one file (a DDP
    run's shards are read as unfolded rows: their blocks interleave shards, and their ``geometry`` is None), else
    None."""
    return layer.geometry


#: Whether a pass on the CPU reads a convolution's compact blocks without a cache. On the CPU there is no
#: transfer to save, and numpy's unfold on the reader thread was faster than torch's on the compute thread, for
#: the pass and for the certificate's sum; a cache keeps maps (several times less memory) and a CUDA pass moves
#: maps (several times fewer bytes), so those read compact blocks (``benchmarks/conv_attend.py``; the figures
#: are in ``docs/benchmarks.md``, "Attending over a convolution: host unfold against device unfold").
COMPACT_ON_CPU = False


def compact_geometry(layer: LayerSource, device: torch.device | str) -> ConvGeometry | None:
    """The geometry when a pass on ``device`` should read ``layer``'s compact blocks (a convolution stored as
    maps, on a CUDA device or through a cache: see :data:`COMPACT_ON_CPU`), else None (unfolded rows)."""
    geom = maps_geometry(layer)
    if geom is None or COMPACT_ON_CPU or torch.device(device).type != "cpu" or isinstance(layer, CachedLayer):
        return geom
    return None


def read_block(layer: LayerSource, start: int, stop: int, columns: tuple[str, ...], compact: bool) -> Rows:
    """Rows ``start:stop`` of ``columns`` for a pass, through the cache when there is one. ``compact``: a
    convolution's keys as their maps (``maps``, ``skip``, ``rows``, ``locations``: :meth:`LayerReader.read_maps`)
    for :meth:`CompactKeys.unfold` on the compute device; otherwise the keys themselves."""
    if compact and "keys" in columns:
        return pass_maps(layer, start, stop, columns)
    return pass_rows(layer, start, stop, columns)


@dataclass
class CompactKeys:
    """A compact block's key rows, still as the maps they lie in (a convolution stored as maps): the reader thread
    puts it in a block's ``keys``; once its ``maps`` are on the compute device, :meth:`unfold` makes the rows.

    Attributes:
        maps: ``(E, C, *input_size)`` the maps the block's rows lie in (host array, then a device tensor).
        skip: rows of the first map before the block's first row.
        rows: the block's rows.
        dtype: the dtype the unfolded rows are cast to (None: as the maps are).
        scale: ``(rows,)`` a factor per row (a unit score's ``-c_s``), or None.
    """

    maps: Any
    skip: int
    rows: int
    dtype: torch.dtype | None = None
    scale: Any = None

    def unfold(self, geom: ConvGeometry) -> torch.Tensor:
        """The key rows ``(rows, d_in)`` as the host path makes them: unfolded (float32), cast, scaled. Unfolding
        copies values, so they equal the reader's numpy unfolding bit for bit."""
        keys = unfold_maps(geom, self.maps)[self.skip: self.skip + self.rows]
        return scaled(keys.to(self.dtype) if self.dtype is not None else keys, self.scale)


def scaled(keys: Any, scale: Any) -> Any:
    """Key rows (numpy or a tensor) times a per-row ``scale`` ``(B,)`` cast to their dtype first; ``keys`` without."""
    if scale is None:
        return keys
    if isinstance(keys, torch.Tensor):
        return keys * torch.as_tensor(scale).to(keys.device, keys.dtype)[:, None]
    return keys * scale.astype(keys.dtype)[:, None]


def host_bytes(blk: Any) -> int:
    """Bytes of the host arrays of a block (what crosses to the compute device)."""
    total = 0

    def count(a: np.ndarray) -> np.ndarray:
        nonlocal total
        total += a.nbytes
        return a

    _map_arrays(blk, count)
    return total
