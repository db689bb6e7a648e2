"""The compact layout of a convolution's rows: input maps stored once, key rows unfolded when read.

A convolution multiplies its weight by one key row per (example, output location): the patch of its padded
input under the kernel. Stored unfolded, every input value is written once per kernel offset (``prod(k)``
times, less the stride's skips). A store of format 3 keeps what the layer saw instead:

- ``keys``: the *unpadded* input map of every (example, call), channel-last, as pixel rows
  ``(E * P, C_in)`` (``P = prod(input_size)`` pixels per map);
- ``values``: the output gradient, one row per (example, output location), ``(E * L, C_out)`` (unchanged:
  the gradient map, channel-last);
- ``step``, ``epoch``, ``index``, ``position``, ``label``: one entry per (example, call), ``(E,)``;
  ``position`` is the call's first row position (the virtual row at output location ``l`` has
  ``position + l``);
- ``input_size``: the spatial size of the input maps, ``(dims,)`` (all calls share it).

*Virtual row* ``r`` (what the unfolded layout stored as row ``r``) is output location ``r % L`` of map
``r // L``. Its key is unfolded from map ``r // L`` after re-applying the layer's padding (every
``padding_mode``). This module is pure numpy: the layout's arithmetic and the unfolding a reader needs
without torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import numpy as np

#: ``layout`` attribute of a format-3 convolution layer (absent: one stored row per key row).
MAPS_LAYOUT = "maps"
#: ``padding_mode`` -> ``numpy.pad`` mode (torch's ``reflect`` excludes the edge, as numpy's does).
_NP_PAD: dict[str, Literal["constant", "reflect", "edge", "wrap"]] = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "edge",
    "circular": "wrap",
}


@dataclass(frozen=True)
class ConvGeometry:
    """What unfolds a convolution's input map into its key rows.

    ``padding`` is in ``F.pad`` order (last spatial dimension first, left then right), as the store keeps it.
    """

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...]
    padding_mode: str
    in_channels: int
    input_size: tuple[int, ...]

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], input_size: Any) -> "ConvGeometry":
        """From a layer's attributes (``kernel_size``, ``stride``, ``dilation``, ``padding``, ``padding_mode``,
        ``in_channels``) and its maps' spatial size.

        Raises:
            ValueError: an attribute is missing or does not describe a convolution of that many dimensions.
        """
        try:
            geom = cls(
                kernel_size=_ints(attrs["kernel_size"]),
                stride=_ints(attrs["stride"]),
                dilation=_ints(attrs["dilation"]),
                padding=_ints(attrs["padding"]),
                padding_mode=str(attrs["padding_mode"]),
                in_channels=int(attrs["in_channels"]),
                input_size=_ints(input_size),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"the convolution's geometry attributes are missing or malformed ({err})") from None
        dims = len(geom.kernel_size)
        if not (
            len(geom.stride) == len(geom.dilation) == len(geom.input_size) == dims and len(geom.padding) == 2 * dims
        ):
            raise ValueError(f"the convolution's geometry does not agree on its number of dimensions ({geom})")
        if geom.padding_mode not in _NP_PAD:
            raise ValueError(f"unknown padding_mode {geom.padding_mode!r}")
        if (
            min(geom.kernel_size + geom.stride + geom.dilation) < 1
            or min(geom.padding, default=0) < 0
            or geom.in_channels < 1
        ):
            raise ValueError(f"the convolution's geometry is not valid ({geom})")
        if min(geom.output_size, default=1) < 1:
            raise ValueError(f"maps of size {geom.input_size} are smaller than the kernel ({geom})")
        return geom

    @property
    def dims(self) -> int:
        return len(self.kernel_size)

    @property
    def padded_size(self) -> tuple[int, ...]:
        # F.pad widths run last dimension first
        return tuple(n + self.padding[2 * (self.dims - 1 - i)] + self.padding[2 * (self.dims - 1 - i) + 1]
                     for i, n in enumerate(self.input_size))

    @property
    def output_size(self) -> tuple[int, ...]:
        return tuple((p - d * (k - 1) - 1) // s + 1
                     for p, k, s, d in zip(self.padded_size, self.kernel_size, self.stride, self.dilation))

    @property
    def pixels(self) -> int:
        """Pixels per input map, ``P``."""
        return math.prod(self.input_size)

    @property
    def locations(self) -> int:
        """Output locations per map, ``L``: virtual rows per (example, call)."""
        return math.prod(self.output_size)

    @property
    def d_in(self) -> int:
        return self.in_channels * math.prod(self.kernel_size)

    def np_pad_width(self) -> list[tuple[int, int]]:
        """``numpy.pad`` widths of a ``(E, C, *spatial)`` batch of maps."""
        spatial = [
            (self.padding[2 * (self.dims - 1 - i)], self.padding[2 * (self.dims - 1 - i) + 1]) for i in range(self.dims)
        ]
        return [(0, 0), (0, 0), *spatial]


def _ints(v: Any) -> tuple[int, ...]:
    if isinstance(v, (str, bytes)):  # the store keeps lists as JSON text
        v = json.loads(v)
    return tuple(int(x) for x in np.asarray(v).reshape(-1))


def maps_from_pixels(pixels: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Pixel rows ``(E * P, C)`` (as stored) -> maps ``(E, C, *input_size)``."""
    e = pixels.shape[0] // geom.pixels
    return np.moveaxis(pixels.reshape(e, *geom.input_size, pixels.shape[1]), -1, 1)


def unfold(maps: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Key rows ``(E * L, C * prod(kernel))`` of maps ``(E, C, *input_size)``: the layer's padding re-applied, one
    row per (map, output location) in row-major location order, each row channel-major then kernel offsets
    (``torch.nn.functional.unfold``'s order)."""
    pad = geom.np_pad_width()
    if any(a or b for a, b in pad):
        mode = _NP_PAD[geom.padding_mode]
        maps = np.pad(maps, pad, mode=mode) if mode != "constant" else np.pad(maps, pad)
    span = tuple(d * (k - 1) + 1 for k, d in zip(geom.kernel_size, geom.dilation))
    axes = tuple(range(2, 2 + geom.dims))
    win = np.lib.stride_tricks.sliding_window_view(maps, span, axis=axes)  # (E, C, *out_full, *span)
    sel = (
        slice(None),
        slice(None),
        *(slice(None, None, s) for s in geom.stride),
        *(slice(None, None, d) for d in geom.dilation),
    )
    keep = (slice(None), slice(None), *(slice(0, o) for o in geom.output_size))
    win = win[sel][keep]  # (E, C, *out, *kernel)
    # -> (E, *out, C, *kernel)
    order = (0, *range(2, 2 + geom.dims), 1, *range(2 + geom.dims, 2 + 2 * geom.dims))
    return np.ascontiguousarray(win.transpose(order)).reshape(maps.shape[0] * geom.locations, geom.d_in)
